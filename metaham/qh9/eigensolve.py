"""The dense linear algebra behind QH9's metrics: generalized eigenproblems ``H C = S C eps`` made ordinary, and
the few lowest eigenpairs the metrics read.

* :func:`orthonormal_problem` factors ``S = L L^T`` once per molecule and reduces each ``H`` to
  ``A = L^-1 H L^-T`` (the orbitals are then ``C = L^-T V`` for the eigenvectors ``V`` of ``A``).
* :func:`lowest_eigenpairs` returns the lowest eigenvalues and eigenvectors of ``A`` only: the metrics need the
  occupied orbitals and the LUMO, about a quarter of a def2-SVP spectrum.

On a CPU both run LAPACK through scipy, one matrix at a time (its own reduction, ``dsygst``, and LAPACK's route
to a few eigenpairs, below), faster than torch's batched calls on these sizes (docs/benchmarks.md, "The CPU
allocator and the LAPACK reduction" and "The lowest eigenpairs only"), with scipy's BLAS held to one thread
(:func:`one_blas_thread`); on other devices they are torch's triangular solves and ``torch.linalg.eigh``, where
the matrices are.

>>> import torch
>>> S = torch.eye(3, dtype=torch.float64)[None]
>>> H = torch.diag(torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64))[None, None]
>>> L, A = orthonormal_problem(H, S)
>>> eps, V = lowest_eigenpairs(A, 2, 1)
>>> eps.tolist(), V.abs().flatten().tolist()
([[[-1.0, 2.0]]], [0.0, 1.0, 0.0])
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

_ULP = np.finfo(np.float64).eps
_SAFE_MIN = np.finfo(np.float64).tiny
_ORTHONORMAL_TOL = 1e-10  # largest |V^T V - I| entry accepted from inverse iteration
# Below this size a full eigh is faster: timed on the 73 G2 molecules' def2-SVP matrices (10-114 AOs), the
# tridiagonal route broke even at about 80 AOs (docs/benchmarks.md, "The lowest eigenpairs only").
_TRIDIAGONAL_FROM = 80


def orthonormal_problem(H: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    """The generalized problems ``H C = S C eps`` as ordinary ones: the Cholesky factors ``L`` ``(m, n, n)`` of
    ``S = L L^T`` and ``A = L^-1 H L^-T`` ``(2, m, n, n)`` for the two symmetric matrices ``H`` ``(2, m, n, n)``
    of each molecule, float64; only ``A``'s lower triangle is defined (``eigh(A, UPLO="L")``).

    On a CPU this is LAPACK's own reduction (scipy's ``dsygst``, one molecule at a time), faster than two batched
    triangular solves (docs/benchmarks.md, "The CPU allocator and the LAPACK reduction"); on other devices it is
    torch's triangular solves, where the matrices are. :class:`ValueError` names the molecules (positions in the
    batch) whose overlap is not positive definite.
    """
    return (_lapack_reduction if S.device.type == "cpu" else _torch_reduction)(H, S)


def lowest_eigenpairs(A: Tensor, n_values: int, n_vectors: int) -> tuple[Tensor, Tensor]:
    """The ``n_values`` lowest eigenvalues ``(..., n_values)``, ascending, of symmetric float64 matrices ``A``
    ``(..., n, n)`` (lower triangle read), and the unit eigenvectors of the ``n_vectors`` lowest
    ``(..., n, n_vectors)``; ``n_vectors <= n_values <= n``.

    On a CPU this is LAPACK's route to a few eigenpairs, per matrix: the reduction to a tridiagonal matrix
    (``dsytrd``), all its eigenvalues (``dsterf``, the root-free QR iteration), the wanted vectors by inverse
    iteration (``dstein``), and the back-transformation by the reduction's reflectors, batched
    (``torch.ormqr``). That is ``dsyevx``'s route with its bisection replaced by ``dsterf``, which on these sizes
    finds all eigenvalues faster than bisection finds a quarter of them; the full ``eigh`` spends most of its
    time on the vectors no metric reads. A matrix that LAPACK reports a failure for (e.g. non-finite entries),
    or whose vectors come out less than orthonormal, goes to ``torch.linalg.eigh`` (which then raises where it
    would have). Matrices smaller than 80 x 80, where a full ``eigh`` is faster, and other devices:
    ``torch.linalg.eigh``, sliced.
    """
    n = A.shape[-1]
    if not 0 <= n_vectors <= n_values <= n:
        raise ValueError(f"need 0 <= n_vectors ({n_vectors}) <= n_values ({n_values}) <= n ({n})")
    if A.device.type != "cpu" or n < _TRIDIAGONAL_FROM:
        eps, V = torch.linalg.eigh(A, UPLO="L")
        return eps[..., :n_values], V[..., :n_vectors]
    return _lapack_lowest(A, n_values, n_vectors)


def _lapack_lowest(A: Tensor, n_values: int, n_vectors: int) -> tuple[Tensor, Tensor]:
    from scipy.linalg import lapack

    batch, n = A.shape[:-2], A.shape[-1]
    flat = A.detach().reshape(-1, n, n)
    count = len(flat)
    reflectors = np.empty((count, n, n))
    taus = np.empty((count, n - 1))
    values = np.empty((count, n_values))
    tridiagonal_vectors = np.empty((count, n, n_vectors))
    failed = []  # matrices to solve with torch.linalg.eigh instead
    lwork = int(lapack.dsytrd_lwork(n, lower=1)[0])
    with one_blas_thread():
        for i, a in enumerate(flat.numpy()):
            reduced, d, e, tau, info = lapack.dsytrd(a, lower=1, lwork=lwork)
            pairs = _tridiagonal_lowest(d, e, n_values, n_vectors) if info == 0 else None
            if pairs is None:
                failed.append(i)
                continue
            values[i], tridiagonal_vectors[i] = pairs
            reflectors[i], taus[i] = reduced, tau
    # Inverse iteration's known weakness is orthogonality within tight clusters of eigenvalues (dstein
    # re-orthogonalises within a cluster; checked here all the same, one small batched product).
    Z = torch.from_numpy(tridiagonal_vectors)
    if n_vectors:
        off = (Z.mT @ Z - torch.eye(n_vectors, dtype=Z.dtype)).abs().flatten(1).amax(1)
        failed += torch.nonzero(off > _ORTHONORMAL_TOL).flatten().tolist()
    for i in sorted(set(failed)):
        eps, V = torch.linalg.eigh(flat[i], UPLO="L")
        values[i], tridiagonal_vectors[i] = eps[:n_values].numpy(), V[:, :n_vectors].numpy()
        reflectors[i], taus[i] = 0.0, 0.0  # no back-transformation: identity reflectors
    # dsytrd (lower) leaves Q = H(1) ... H(n-1), reflector j acting on rows j+1.. with its vector below the
    # subdiagonal: in rows 1.. and columns ..n-2 that is geqrf's layout, which ormqr applies (as LAPACK's dormtr).
    rotated = torch.ormqr(torch.from_numpy(reflectors)[:, 1:, :-1], torch.from_numpy(taus), Z[:, 1:])
    V = torch.cat([Z[:, :1], rotated], 1)
    return torch.from_numpy(values).reshape(*batch, n_values), V.reshape(*batch, n, n_vectors)


def _tridiagonal_lowest(
    d: np.ndarray, e: np.ndarray, n_values: int, n_vectors: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """The lowest eigenpairs of the symmetric tridiagonal matrix with diagonal ``d`` and off-diagonal ``e``:
    ``(values (n_values,), vectors (n, n_vectors))``, or None where LAPACK reports a failure.

    ``dstein`` wants the matrix's splitting into unreduced blocks and the eigenvalues grouped by block, as
    ``dstebz`` would give them: the splitting test below is ``dstebz``'s, each block's eigenvalues come from
    ``dsterf``, and the vectors are put back in ascending order of their eigenvalues."""
    from scipy.linalg import lapack

    n = len(d)
    negligible = e * e <= _ULP**2 * np.abs(d[:-1] * d[1:]) + _SAFE_MIN
    e = np.where(negligible, 0.0, e)
    ends = np.append(np.flatnonzero(negligible) + 1, n)
    starts = np.concatenate(([0], ends[:-1]))
    spectra = []
    for start, end in zip(starts, ends):
        if end - start == 1:
            spectra.append(d[start:end].copy())
            continue
        w, info = lapack.dsterf(d[start:end], e[start : end - 1])
        if info:
            return None
        spectra.append(w)
    w = np.concatenate(spectra)
    block = np.repeat(np.arange(1, len(ends) + 1, dtype=np.int32), ends - starts)
    lowest = np.argsort(w, kind="stable")[:n_values]
    wanted = lowest[:n_vectors]  # ascending eigenvalues
    by_block = np.argsort(block[wanted], kind="stable")  # grouped by block, still ascending within each
    iblock = np.zeros(n, dtype=np.int32)
    iblock[:n_vectors] = block[wanted[by_block]]
    isplit = np.zeros(n, dtype=np.int32)
    isplit[: len(ends)] = ends
    z, info = lapack.dstein(d, e, w[wanted[by_block]], iblock, isplit)
    if info:
        return None
    vectors = np.empty_like(z)
    vectors[:, by_block] = z
    return w[lowest], vectors


def one_blas_thread() -> AbstractContextManager:
    """A context in which scipy's and numpy's BLAS (OpenBLAS, with its own thread pool) run on one thread.

    These LAPACK calls work on ~100 x 100 matrices, too small to share: with the pool's default of one thread per
    core, its threads spend the time waiting on each other, and on torch's threads where torch runs several.
    On the 2-core VM, the metrics step took 2.30 ms per molecule with torch at one thread and 4.31 at two,
    against 2.06 and 1.90 with OpenBLAS at one thread (docs/benchmarks.md, "One BLAS thread for the metrics").
    Libraries not loaded yet when it is first used are left alone; torch's own MKL is not a pool this sees.
    """
    return _thread_pools().limit(limits=1, user_api="blas")


@lru_cache(maxsize=None)
def _thread_pools():
    from scipy.linalg import lapack  # noqa: F401 -- loaded first, so that its BLAS is among the pools found
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _torch_reduction(H: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    L, info = torch.linalg.cholesky_ex(S)
    _check_positive(info.cpu().numpy())
    return L, torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, H, upper=False), upper=True, left=False)


def _lapack_reduction(H: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    from scipy.linalg import lapack

    S_np, H_np = S.detach().numpy(), H.detach().numpy()  # metrics: no gradient flows through them
    L, A = np.zeros_like(S_np), np.empty_like(H_np)
    info = np.zeros(len(S_np), dtype=np.int64)
    with one_blas_thread():
        for b in range(len(S_np)):
            factor, info[b] = lapack.dpotrf(S_np[b], lower=1)  # the upper triangle comes back zeroed
            if info[b] == 0:
                L[b] = factor
                for h in range(len(H_np)):
                    A[h, b] = lapack.dsygst(H_np[h, b], factor, itype=1, lower=1)[0]
    _check_positive(info)
    return torch.from_numpy(L), torch.from_numpy(A)


def _check_positive(info: np.ndarray) -> None:
    bad = np.nonzero(info)[0].tolist()
    if bad:
        raise ValueError(f"overlap matrix not positive definite for molecule(s) {bad} of the batch (atoms too close?)")
