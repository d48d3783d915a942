"""Sparse SE(3)-equivariant building blocks on e3nn irreps, usable under ``torch.func``.

The public surface:

* :class:`SparseTensorProduct` -- tensor product with a three-phase sparse path gate; its kept paths run on our
  contraction or, with :func:`use_backend`, on cuequivariance-torch (:mod:`metaham.nn.cue_backend`);
* :class:`SparsityScheduler` -- drives every such gate in a model, in optimizer steps;
* :class:`SparsePairGate` -- keeps each graph's most important pairs before any message is computed;
* :class:`InteractionBlock` -- message / aggregate / update with both gates as options;
* building blocks: :class:`BesselBasis`, :func:`polynomial_cutoff`, :func:`spherical_harmonics` (axis
  conventions, pyscf order), :class:`EquivariantLinear`, :class:`GatedNonlinearity`,
  :class:`EquivariantLayerNorm`.
"""
from .gate import GatedNonlinearity
from .interaction import InteractionBlock
from .linear import EquivariantLinear
from .norm import EquivariantLayerNorm
from .pair_gate import PairInvariants, PairSelection, SparsePairGate
from .radial import BesselBasis, polynomial_cutoff
from .scheduler import SparsityScheduler
from .sh import E3NN_P_TO_PYSCF, PYSCF_P_TO_E3NN, sh_irreps, spherical_harmonics
from .sparse_tp import KeptPath, SparseTensorProduct, linear_columns, use_backend

__all__ = [
    "BesselBasis",
    "E3NN_P_TO_PYSCF",
    "EquivariantLayerNorm",
    "EquivariantLinear",
    "GatedNonlinearity",
    "InteractionBlock",
    "KeptPath",
    "PYSCF_P_TO_E3NN",
    "PairInvariants",
    "PairSelection",
    "SparsePairGate",
    "SparseTensorProduct",
    "SparsityScheduler",
    "polynomial_cutoff",
    "linear_columns",
    "sh_irreps",
    "spherical_harmonics",
    "use_backend",
]
