"""The kept paths of a :class:`~metaham.nn.sparse_tp.SparseTensorProduct`, run by cuequivariance-torch.

cuequivariance-torch (NVIDIA) evaluates "segmented polynomials" with fused CUDA kernels; MACE uses it on GPUs.
A fixed-phase sparse product is a fixed set of paths, so it is one such polynomial: this module writes the
product's :meth:`~metaham.nn.sparse_tp.SparseTensorProduct.kept_instructions` (input and output blocks,
normalised and gate-scaled Clebsch-Gordan tensor, weight shape of every kept path) as a
``cue.SegmentedTensorProduct`` in e3nn's ``mul_ir`` layout, with the weights of the kept paths as its first
operand in the product's compact order, and runs it with ``cuequivariance_torch.SegmentedPolynomial``.

What is computed is the product's own (the instructions); how is the library's (``method``): ``"naive"``
(plain torch, any device: how the tests check it against our contraction on a CPU) or, on CUDA with
``cuequivariance-ops-torch-cu12`` installed (``pip install 'metaham[cuda]'``), ``"uniform_1d"`` or
``"fused_tp"``. :func:`default_method` picks ``"naive"`` on a CPU and ``"fused_tp"`` on CUDA.

>>> tp = SparseTensorProduct("8x0e+8x1o", "0e+1o", "8x0e+8x1o", sparsity=0.5)   # doctest: +SKIP
>>> tp.set_phase("fixed"); tp.set_backend("cuequivariance")                    # doctest: +SKIP
>>> tp(x1, x2, weight)  # the same numbers as with set_backend("torch"), to rounding   # doctest: +SKIP
"""
from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .sparse_tp import KeptPath, SparseTensorProduct

# Operand subscripts of one path for each connection mode (weights, x1, x2, output; "+ijk" the CG tensor):
# e3nn's mul_ir layout, every block stored (multiplicity, 2l + 1).
SUBSCRIPTS = {"uvu": "uv,ui,vj,uk+ijk", "uvw": "uvw,ui,vj,wk+ijk", "uuu": "u,ui,uj,uk+ijk"}
METHODS = ("naive", "uniform_1d", "fused_tp")


def available() -> bool:
    """Whether cuequivariance-torch is installed (its CUDA kernels need ``cuequivariance-ops-torch-cu12`` too)."""
    return importlib.util.find_spec("cuequivariance_torch") is not None


def require() -> None:
    """:class:`ImportError` saying what to install, unless :func:`available`."""
    if not available():
        raise ImportError(
            "the cuequivariance backend needs cuequivariance-torch: pip install cuequivariance-torch (CPU and GPU), "
            "or pip install 'metaham[cuda]' for NVIDIA's CUDA kernels as well"
        )


def default_method(device: torch.device | str) -> str:
    """``"fused_tp"`` on CUDA (NVIDIA's kernel for 3- and 4-operand products), ``"naive"`` elsewhere."""
    return "fused_tp" if torch.device(device).type == "cuda" else "naive"


def kept_polynomial(tp: "SparseTensorProduct", paths: "list[KeptPath] | None" = None):
    """The kept paths of ``tp`` (``paths``: its :meth:`~metaham.nn.sparse_tp.SparseTensorProduct.kept_instructions`,
    taken when not given) as a ``cue.SegmentedPolynomial``: inputs (compact weights, x1, x2), output out."""
    import cuequivariance as cue

    d = cue.SegmentedTensorProduct.from_subscripts(SUBSCRIPTS[tp.mode])
    for operand, irreps in ((1, tp.irreps_in1), (2, tp.irreps_in2), (3, tp.irreps_out)):
        for mul, ir in irreps:
            d.add_segment(operand, (mul, ir.dim))
    weight_modes = SUBSCRIPTS[tp.mode].split(",")[0]
    for path in tp.kept_instructions() if paths is None else paths:
        dims = dict(zip(weight_modes, path.w_shape))
        # None: a new weight segment per path, so the weight operand is the compact layout, path after path.
        d.add_path(None, path.i_in1, path.i_in2, path.i_out, c=path.cg.double().cpu().numpy(), dims=dims)
    return cue.SegmentedPolynomial.eval_last_operand(d)


class CuePathContraction(nn.Module):
    """``forward(x1 (N, d1), x2 (N, d2), weight) -> (N, d_out)``, computed by
    ``cuequivariance_torch.SegmentedPolynomial(method=method)``; ``weight`` ``(N, W)`` per row or ``(W,)``
    shared, ``W`` the product's full width or the compact width of its kept paths
    (:attr:`~metaham.nn.sparse_tp.SparseTensorProduct.weight_columns`).

    Built from a product whose kept set cannot change any more (fixed phase, or no gate at all); the product
    rebuilds it whenever its kept set is set anew (e.g. by loading a checkpoint).
    """

    def __init__(self, tp: "SparseTensorProduct", method: str = "naive", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"cuequivariance method must be one of {METHODS}, got {method!r}")
        require()
        import cuequivariance_torch as cuet

        self.dtype = dtype
        self.full_width = tp.weight_numel
        paths = tp.kept_instructions()
        columns = [c for path in paths for c in range(path.w_start, path.w_stop)]
        self.register_buffer("columns", torch.tensor(columns, dtype=torch.long), persistent=False)
        # The kernels compute in math_dtype (fused_tp would fall back to float32): the product's own dtype.
        math_dtype = None if method == "naive" else dtype
        self.polynomial = cuet.SegmentedPolynomial(kept_polynomial(tp, paths), method=method, math_dtype=math_dtype)
        # What runs: without NVIDIA's kernels (cuequivariance-ops-torch-cu12) the library falls back to "naive".
        self.method = self.polynomial.method

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` in the product's full layout (``weight_numel`` columns) or compact (the kept columns)."""
        if weight.shape[-1] == self.full_width and len(self.columns) != self.full_width:
            weight = weight.index_select(-1, self.columns)
        if weight.dim() == 1:
            weight = weight.unsqueeze(0)  # shared weights: one row, broadcast over the batch
        return self.polynomial([weight, x1, x2])[0]

    def extra_repr(self) -> str:
        return f"method={self.method}, {self.dtype}, {len(self.columns)} of {self.full_width} weight columns"
