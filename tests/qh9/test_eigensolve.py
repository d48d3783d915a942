"""The lowest eigenpairs from LAPACK's tridiagonal route equal torch.linalg.eigh's, splittings and
degeneracies included; failures surface as eigh's."""
import numpy as np
import pytest
import torch

from metaham.qh9 import eigensolve
from metaham.qh9.eigensolve import _lapack_lowest, _tridiagonal_lowest, lowest_eigenpairs


def _symmetric(generator: torch.Generator, *shape: int) -> torch.Tensor:
    X = torch.randn(*shape, dtype=torch.float64, generator=generator)
    return X + X.mT


def _assert_eigenpairs(A: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor) -> None:
    """``vectors`` orthonormal, ``A v = lambda v`` for the lowest eigenvalues, ``values`` eigh's."""
    k = vectors.shape[-1]
    assert torch.allclose(values, torch.linalg.eigvalsh(A)[..., : values.shape[-1]], rtol=0, atol=1e-12)
    assert torch.allclose(vectors.mT @ vectors, torch.eye(k, dtype=A.dtype).expand(*A.shape[:-2], k, k), atol=1e-12)
    assert torch.allclose(A @ vectors, vectors * values[..., None, :k], rtol=0, atol=1e-11)


def test_lowest_eigenpairs_equal_eigh(monkeypatch):
    """From 80 x 80 on a CPU the tridiagonal route runs (a spy counts it); smaller matrices get eigh itself."""
    routed = []
    monkeypatch.setattr(eigensolve, "_lapack_lowest", lambda *a: routed.append(a) or _lapack_lowest(*a))
    g = torch.Generator().manual_seed(0)
    A = _symmetric(g, 2, 3, 90, 90)
    values, vectors = lowest_eigenpairs(torch.tril(A), 21, 20)  # only the lower triangle is read
    assert len(routed) == 1
    assert values.shape == (2, 3, 21) and vectors.shape == (2, 3, 90, 20)
    _assert_eigenpairs(A, values, vectors)
    # Random matrices have simple eigenvalues: each vector is eigh's up to its sign.
    reference = torch.linalg.eigh(A).eigenvectors[..., :20]
    assert torch.allclose((vectors * reference).sum(-2).abs(), torch.ones(2, 3, 20, dtype=A.dtype), atol=1e-10)
    small = A[..., :40, :40]
    values, vectors = lowest_eigenpairs(small, 5, 4)
    assert len(routed) == 1
    expected = torch.linalg.eigh(small, UPLO="L")
    assert torch.equal(values, expected.eigenvalues[..., :5]) and torch.equal(vectors, expected.eigenvectors[..., :4])


def test_degenerate_levels_and_reducible_matrices():
    """A direct sum of two equal blocks has every eigenvalue twice: the vectors of each level still come out
    orthonormal. So does a matrix whose tridiagonal form splits (a decoupled first row)."""
    g = torch.Generator().manual_seed(1)
    B = _symmetric(g, 6, 6)
    for A in (torch.block_diag(B, B), torch.block_diag(torch.tensor([[-9.0]], dtype=torch.float64), B)):
        values, vectors = _lapack_lowest(A, 6, 5)
        _assert_eigenpairs(A, values, vectors)


def test_split_tridiagonal_matrix_with_levels_shared_between_blocks():
    """An exactly split tridiagonal matrix with two equal blocks: dstein gets each block's eigenvalues, and the
    vectors come back in ascending order of their values, one per block for each shared level."""
    d = np.array([2.0, -1.0, 0.5, 2.0, -1.0, 0.5, 3.0])
    e = np.array([0.7, 0.3, 0.0, 0.7, 0.3, 0.0])
    T = np.diag(d) + np.diag(e, 1) + np.diag(e, -1)
    values, vectors = _tridiagonal_lowest(d, e, 5, 4)
    exact = np.linalg.eigvalsh(T)[:5]
    np.testing.assert_allclose(values, exact, rtol=0, atol=1e-13)
    assert values[0] == pytest.approx(values[1], abs=1e-14)  # the shared lowest level
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(4), atol=1e-13)
    np.testing.assert_allclose(T @ vectors, vectors * values[:4], atol=1e-12)
    # The shared level has one vector in each of the two equal blocks (rows 0-2 and 3-5).
    blocks = [set(np.flatnonzero(np.abs(vectors[:, j]) > 1e-12) // 3) for j in (0, 1)]
    assert sorted(map(sorted, blocks)) == [[0], [1]]


def test_edge_sizes_and_bad_requests():
    g = torch.Generator().manual_seed(2)
    A = _symmetric(g, 4, 8, 8)
    values, vectors = _lapack_lowest(A, 8, 8)  # the whole spectrum
    _assert_eigenpairs(A, values, vectors)
    values, vectors = _lapack_lowest(A, 1, 0)
    assert vectors.shape == (4, 8, 0)
    assert torch.allclose(values[..., 0], torch.linalg.eigvalsh(A)[..., 0], atol=1e-12)
    one = torch.tensor([[[2.5]]], dtype=torch.float64)
    assert lowest_eigenpairs(one, 1, 1)[0].item() == 2.5
    for n_values, n_vectors in ((9, 1), (2, 3), (2, -1)):
        with pytest.raises(ValueError, match="n_vectors"):
            lowest_eigenpairs(A, n_values, n_vectors)


def test_non_finite_matrix_fails_as_eigh_does():
    g = torch.Generator().manual_seed(3)
    A = _symmetric(g, 3, 10, 10)
    A[1, 4, 2] = float("nan")
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.eigh(A, UPLO="L")
    with pytest.raises(torch.linalg.LinAlgError):
        _lapack_lowest(A, 4, 3)


def test_vectors_that_come_out_less_than_orthonormal_are_solved_by_eigh(monkeypatch):
    """The guard against inverse iteration's weakness on tight clusters: a matrix whose tridiagonal vectors are
    not orthonormal is solved by eigh instead, and the others of the batch are untouched."""
    g = torch.Generator().manual_seed(4)
    A = _symmetric(g, 3, 12, 12)
    calls = []
    original = eigensolve._tridiagonal_lowest

    def spoiled_second(d, e, n_values, n_vectors):
        values, vectors = original(d, e, n_values, n_vectors)
        calls.append(len(calls))
        if len(calls) == 2:
            vectors[:, 1] = vectors[:, 0]  # two equal "eigenvectors"
        return values, vectors

    monkeypatch.setattr(eigensolve, "_tridiagonal_lowest", spoiled_second)
    values, vectors = _lapack_lowest(A, 5, 4)
    assert len(calls) == 3
    _assert_eigenpairs(A, values, vectors)


def test_lapack_calls_run_on_one_blas_thread(monkeypatch):
    """The per-matrix LAPACK calls run with scipy's BLAS pool at one thread (threads of a pool sized for the
    machine only wait on each other on matrices this small), and the pool is as it was afterwards."""
    from scipy.linalg import lapack
    from threadpoolctl import threadpool_info

    from metaham.qh9.eigensolve import orthonormal_problem

    def blas_threads() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    before = blas_threads()
    assert before, "no BLAS pool found: scipy's LAPACK should bring one"
    seen = []
    for name in ("dsytrd", "dsygst"):
        original = getattr(lapack, name)

        def spy(*args, _original=original, **kwargs):
            seen.append(blas_threads())
            return _original(*args, **kwargs)

        monkeypatch.setattr(lapack, name, spy)
    g = torch.Generator().manual_seed(5)
    B = torch.randn(2, 9, 9, dtype=torch.float64, generator=g)
    S = B @ B.mT / 9 + torch.eye(9, dtype=torch.float64)
    _, A = orthonormal_problem(_symmetric(g, 2, 2, 9, 9), S)
    _lapack_lowest(A, 3, 2)
    assert len(seen) == 8 and all(threads and set(threads) == {1} for threads in seen)
    assert blas_threads() == before
