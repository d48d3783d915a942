"""Spherical harmonics of edge vectors, with the axis convention written down.

e3nn's real spherical harmonics (e3nn 0.5/0.6) take (x, y, z) input and use **y as the polar axis**:

* l = 1 returns the input's own components: ``Y_1(v) = sqrt(3) * (x, y, z) / |v|`` (component normalisation),
  and e3nn's ``Irrep("1o").D_from_matrix(R)`` is ``R`` itself, so plain Cartesian vectors are ``1o`` features;
* l >= 2 differ from the textbook / pyscf real harmonics, which use z as the polar axis.

pyscf orders p functions (x, y, z) and d, f, ... functions m = -l..l about the z axis. Feeding e3nn the vector
permuted to (y, z, x) reproduces pyscf's order exactly for every l >= 2 (checked against ``mol.eval_gto`` to
1e-16), and turns l = 1 into pyscf's (x, y, z) permuted by ``[1, 2, 0]``, i.e. (y, z, x). So for work that
must match pyscf matrices (QH9): call :func:`spherical_harmonics` with ``axes="pyscf"`` and reorder each p
shell of a pyscf matrix with :data:`PYSCF_P_TO_E3NN` (and back with :data:`E3NN_P_TO_PYSCF`); s, d, f shells
need no change and no signs flip. The permutation is a proper rotation, so a model built in either frame is
equally equivariant; rotating the molecule by ``R`` acts on e3nn features through ``D(P R P^T)`` with ``P``
the (x, y, z) -> (y, z, x) permutation.
"""
from __future__ import annotations

import torch
from e3nn import o3

#: Index that reorders a pyscf p shell (x, y, z) into the e3nn order used with ``axes="pyscf"``: (y, z, x).
PYSCF_P_TO_E3NN = (1, 2, 0)
#: Inverse of :data:`PYSCF_P_TO_E3NN`: e3nn (y, z, x) back to pyscf (x, y, z).
E3NN_P_TO_PYSCF = (2, 0, 1)

_AXES = ("e3nn", "pyscf")


def sh_irreps(lmax: int) -> o3.Irreps:
    """Irreps of spherical harmonics up to ``lmax``: ``1x0e + 1x1o + 1x2e + ...`` (parity (-1)^l)."""
    if int(lmax) != lmax or lmax < 0:
        raise ValueError(f"lmax must be an integer >= 0, got {lmax!r}")
    return o3.Irreps.spherical_harmonics(int(lmax))


def spherical_harmonics(lmax: int, vectors: torch.Tensor, axes: str = "e3nn") -> torch.Tensor:
    """Real spherical harmonics of the directions of ``vectors``, component-normalised.

    Args:
        lmax: highest degree; the output irreps are :func:`sh_irreps` ``(lmax)``.
        vectors: ``(..., 3)`` Cartesian vectors in (x, y, z) order; zero vectors give zeros for l > 0.
        axes: ``"e3nn"`` uses the vectors as given (e3nn's y-polar convention); ``"pyscf"`` feeds e3nn the
            permutation (y, z, x) so that l >= 2 come out in pyscf's m order (see the module docstring).

    Returns:
        ``(..., (lmax + 1) ** 2)`` tensor; each l block has mean square 1 per component over the sphere.

    Plain torch operations: works under ``torch.func`` transforms (grad, vmap, functional_call).
    """
    if axes not in _AXES:
        raise ValueError(f"axes must be one of {_AXES}, got {axes!r}")
    if vectors.shape[-1] != 3:
        raise ValueError(f"vectors must have shape (..., 3), got {tuple(vectors.shape)}")
    if axes == "pyscf":
        vectors = vectors[..., list(PYSCF_P_TO_E3NN)]
    return o3.spherical_harmonics(sh_irreps(lmax), vectors, normalize=True, normalization="component")
