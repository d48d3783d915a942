"""Sparse tensor-product gate: an e3nn-style tensor product whose paths carry learnable importance weights.

Each path (instruction) ``(i_in1, i_in2, i_out)`` of the tensor product has a scalar importance weight
``path_weight[p]`` (initialised to 1). A forward pass evaluates only a *selected* set of paths and scales each
selected path by its weight renormalised over that set, ``w_p / mean_{q in set} |w_q|``. The set depends on
the phase (driven by :class:`~metaham.nn.scheduler.SparsityScheduler`):

* ``random``: in training mode every forward draws ``n_keep = max(1, round((1 - sparsity) * n_paths))`` paths
  uniformly at random (``per_output``: per output irrep, see below; torch's global RNG, so
  ``torch.manual_seed`` makes runs reproducible; under ``vmap`` pass ``randomness="same"``: one draw for all
  tasks). In eval mode it uses the deterministic top-``n_keep`` set below, so evaluation is deterministic
  and sees the same number of paths (hence the same output scale) as training.
* ``adaptive``: the ``n_keep`` paths with the largest weights, i.e. those at or above the sparsity-quantile
  of the weights (the discrete quantile that keeps exactly ``n_keep``; ties go to the lower path index).
  The set is re-selected from the detached weights whenever :meth:`SparseTensorProduct.set_phase` runs --
  the scheduler calls it after every optimizer step -- and *not* inside ``forward``. Forward passes, eager or
  under ``functional_call`` / ``grad`` / ``vmap``, therefore all use the same set, and the renormalised scales
  are still computed from whatever (possibly per-task, batched) weights ``forward`` is given. In MAML's inner
  loop the meta-parameters choose the set and the adapted weights rescale within it.
* ``fixed``: the top-``n_keep`` set at the moment the phase was entered, frozen -- and so are the kept
  paths' renormalised weights, folded into the compact product's Clebsch-Gordan tensors (SPHNet rebuilds a
  plain product from the kept instructions). ``path_weight`` no longer trains (nor does a value passed
  through ``functional_call``); the per-row (or internal) weights carry every path's scale from then on.

``per_output=True`` makes every selection (random draw or top-weight set) per output irrep: of the ``n_o``
paths into output ``o`` it keeps ``max(1, round((1 - sparsity) * n_o))``, so no output irrep is ever cut off
from its inputs (a global top-k can drop every path into some ``l_out`` and starve whatever reads it). The
total ``n_keep`` is the sum over outputs, a little above ``(1 - sparsity) * n_paths`` where outputs have
few paths.

In every phase only the selected paths are computed (Clebsch-Gordan contractions grouped by input irrep pair,
or by x1 irrep where x2 holds one copy of each irrep, as spherical harmonics do), so dropped paths cost
nothing -- zeroing weights would save no time. The selected set, the phase and the weights
live in the ``state_dict`` (``kept_mask``, ``phase_index``, ``path_weight``): a checkpoint saved in any phase
reloads straight into that phase, in the fixed phase directly in the compact form.

``sparsity = 0`` is the plain dense tensor product: no path weights exist and the output equals e3nn's
``o3.TensorProduct`` with the same instructions (``irrep_normalization="component"``,
``path_normalization="element"``) to rounding.

Output irreps never change with the phase. Path normalisation constants are those of the dense tensor
product; an output irrep that no selected path reaches is zero (documented behaviour, not an error; with
``per_output`` it cannot happen).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from e3nn import o3
from torch import nn

from .layout import blocks, check_layout, ir_mul_from_mul_ir

PHASES = ("random", "adaptive", "fixed")
MODES = ("uvu", "uvw", "uuu")
BACKENDS = ("torch", "cuequivariance")


class _Path(NamedTuple):
    i_in1: int
    i_in2: int
    i_out: int
    alpha: float  # e3nn normalisation constant of the dense product ("component" irreps, "element" paths)
    w_start: int  # slice of this path in the full (dense) weight layout
    w_stop: int
    w_shape: tuple[int, ...]
    col_start: int  # columns of this path in the Clebsch-Gordan buffer of its i_in1
    col_stop: int
    j_start: int  # rows of its i_in2 irrep in that buffer (irreps_in2 components, multiplicities ignored)
    j_stop: int


class KeptPath(NamedTuple):
    """One path as it runs in the kept set: what :meth:`SparseTensorProduct.kept_instructions` lists."""

    i_in1: int  #: index of its x1 irrep
    i_in2: int  #: index of its x2 irrep
    i_out: int  #: index of its output irrep
    cg: torch.Tensor  #: ``(d1, d2, d_out)``: normalised Clebsch-Gordan tensor times the path's gate scale
    w_start: int  #: its columns in the full weight layout
    w_stop: int
    w_shape: tuple[int, ...]  #: (mul1, mul2) uvu, (mul1, mul2, mul_out) uvw, (mul1,) uuu


class _Group(NamedTuple):
    """Selected paths that share an input pair ``(i_in1, i_in2)`` and so one contraction (``i_in2`` None: the
    paths of ``i_in1`` with every x2 irrep, contracted with all of x2 at once)."""

    i_in1: int
    i_in2: int | None
    members: tuple[tuple[int, int], ...]  # (position in the selection, path index)
    cols: slice  # where, in the packed index tensor, this group's Clebsch-Gordan columns are listed
    scale_pos: slice  # where each column's position in the selection (for its gate scale) is listed


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    """``sparsity`` as a float in [0, 1), or a ValueError naming ``what`` and the value."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"{what} must be a number in [0, 1), got {sparsity!r}")
    value = float(sparsity)
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{what} must be in [0, 1), got {sparsity!r}")
    return value


def linear_columns(layer: nn.Linear, x: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
    """``layer(x)[..., columns]`` computing only those outputs (all of ``layer(x)`` when ``columns`` is None):
    with :attr:`SparseTensorProduct.weight_columns`, the weights of a fixed-phase product and nothing else."""
    if columns is None:
        return layer(x)
    bias = None if layer.bias is None else layer.bias.index_select(0, columns)
    return nn.functional.linear(x, layer.weight.index_select(0, columns), bias)


def use_backend(module: nn.Module, backend: str, method: str | None = None) -> int:
    """:meth:`SparseTensorProduct.set_backend` on every sparse tensor product in ``module``; returns how many.

    >>> use_backend(model, "cuequivariance")  # doctest: +SKIP
    """
    products = [m for m in module.modules() if isinstance(m, SparseTensorProduct)]
    for product in products:
        product.set_backend(backend, method)
    return len(products)


def n_kept(sparsity: float, n: int) -> int:
    """How many of ``n`` items a gate at ``sparsity`` keeps: ``max(1, round((1 - sparsity) * n))``."""
    return max(1, round((1.0 - sparsity) * n)) if n > 0 else 0


_OUTER_PRODUCT_ELEMENTS = 1 << 18  # a uuu product's outer product is formed in slices of at most this many numbers


class SparseTensorProduct(nn.Module):
    r"""Tensor product ``x1 (x) x2 -> out`` over e3nn irreps with a three-phase sparse path gate.

    Args:
        irreps_in1: irreps of ``x1`` (e.g. node features).
        irreps_in2: irreps of ``x2`` (e.g. spherical harmonics of edge vectors).
        irreps_out: irreps of the output; the same in every phase.
        mode: connection mode of every path: ``"uvu"`` (out mul = mul1, weights (mul1, mul2)), ``"uvw"``
            (weights (mul1, mul2, mul_out)) or ``"uuu"`` (mul1 = mul2 = mul_out, weights (mul1,)).
        sparsity: fraction of paths dropped, in [0, 1). 0 gives the dense tensor product.
        internal_weights: if True the product owns one shared weight vector ``self.weight``
            ``(weight_numel,)``; otherwise ``forward`` takes per-row weights ``(N, weight_numel)``.
        instructions: paths as ``(i_in1, i_in2, i_out)`` index triples; default: every triple allowed by the
            selection rules and by ``mode``'s multiplicity constraint.
        per_output: select paths per output irrep (each keeps at least one path) instead of over all paths.
        out_layout: ``"mul_ir"`` (e3nn's: each output block ``mul`` copies of ``2l + 1`` components) or
            ``"ir_mul"`` (component-major: ``2l + 1`` runs of ``mul`` channels; convert with
            :func:`~metaham.nn.layout.mul_ir_from_ir_mul`). The inputs are always ``mul_ir``. In ``"uvu"``
            mode against one copy of each x2 irrep (spherical harmonics) ``"ir_mul"`` is the product's own
            order, forward and backward (per-edge weights scale whole rows of channels): a caller that sums
            the rows first, as a message-passing layer does over edges, converts only the sums. A ``"uuu"``
            product computes each output block as ``(2l + 1, N, mul)`` whatever the layout (per-row weights
            scale whole rows of channels) and pays one copy per block in either.

    Shapes: ``x1 (N, irreps_in1.dim)``, ``x2 (N, irreps_in2.dim)``, ``weight (N, weight_numel)`` ->
    ``(N, irreps_out.dim)``. External weights always use the FULL (dense) layout, path after path in
    instruction order exactly as e3nn's ``TensorProduct``: a network producing them keeps its shape in every
    phase, and the product reads only the selected paths' slices.
    """

    def __init__(
        self,
        irreps_in1: o3.Irreps | str,
        irreps_in2: o3.Irreps | str,
        irreps_out: o3.Irreps | str,
        mode: str = "uvu",
        sparsity: float = 0.0,
        internal_weights: bool = False,
        instructions: Sequence[tuple[int, int, int]] | None = None,
        per_output: bool = False,
        out_layout: str = "mul_ir",
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.out_layout = check_layout(out_layout, "out_layout")
        self.irreps_in1 = o3.Irreps(irreps_in1)
        self.irreps_in2 = o3.Irreps(irreps_in2)
        self.irreps_out = o3.Irreps(irreps_out)
        for name in ("irreps_in1", "irreps_in2", "irreps_out"):
            irreps = getattr(self, name)
            if any(mul == 0 for mul, _ in irreps):
                raise ValueError(f"{name} = {irreps} contains a zero multiplicity; simplify it first")
        self.mode = mode
        self.sparsity = check_sparsity(sparsity)
        self.internal_weights = bool(internal_weights)
        self.per_output = bool(per_output)

        triples = self._instructions(instructions)
        self._paths = self._build_paths(triples)
        self.instructions = tuple(triples)
        self.n_paths = len(self._paths)
        self._blocks1, self._blocks2 = blocks(self.irreps_in1), blocks(self.irreps_in2)
        self._blocks_out = blocks(self.irreps_out)
        self._sizes1 = [b.mul * b.dim for b in self._blocks1]
        self._sizes2 = [b.mul * b.dim for b in self._blocks2]
        # The candidate sets a selection draws from: all paths, or the paths into each output irrep.
        if self.per_output:
            self._candidates = tuple(
                tuple(p for p, path in enumerate(self._paths) if path.i_out == io) for io in range(len(self.irreps_out))
            )
        else:
            self._candidates = (tuple(range(self.n_paths)),)
        self.n_keep = sum(n_kept(self.sparsity, len(c)) for c in self._candidates) if self.sparsity > 0 else self.n_paths
        # With a single copy of every x2 irrep (e.g. spherical harmonics) in "uvu" mode, the paths of one x1 irrep
        # with all x2 irreps are one contraction against the whole of x2: a few large operations instead of one
        # small set per (x1, x2) irrep pair, which on a CPU cost per operation, not per element.
        self._whole_x2 = self.mode == "uvu" and all(mul == 1 for mul, _ in self.irreps_in2)
        self.weight_numel = self._paths[-1].w_stop

        self._register_clebsch_gordan()
        if self.internal_weights:
            self.weight = nn.Parameter(torch.randn(self.weight_numel))
        if self.sparsity > 0:
            self.path_weight = nn.Parameter(torch.ones(self.n_paths))
        self.register_buffer("phase_index", torch.tensor(0, dtype=torch.long))
        self.register_buffer("kept_mask", torch.ones(self.n_paths, dtype=torch.bool))
        self._phase = PHASES[0]
        self._backend, self._backend_method = "torch", None
        object.__setattr__(self, "_runner", None)  # not a submodule: no state_dict entries (see set_backend)
        self._store_kept(self._top_k() if self.sparsity > 0 else tuple(range(self.n_paths)))

    # ----------------------------------------------------------------------------------------------------
    # construction

    def _instructions(self, instructions) -> list[tuple[int, int, int]]:
        ir1, ir2, iro = self.irreps_in1, self.irreps_in2, self.irreps_out
        if instructions is None:
            triples = [
                (i1, i2, io)
                for i1 in range(len(ir1))
                for i2 in range(len(ir2))
                for io in range(len(iro))
                if iro[io].ir in ir1[i1].ir * ir2[i2].ir and self._muls_allowed(i1, i2, io)
            ]
        else:
            triples = []
            for ins in instructions:
                if len(ins) != 3:
                    raise ValueError(f"instruction {ins!r}: expected an (i_in1, i_in2, i_out) triple")
                i1, i2, io = (int(i) for i in ins)
                if not (0 <= i1 < len(ir1) and 0 <= i2 < len(ir2) and 0 <= io < len(iro)):
                    raise ValueError(f"instruction {ins!r}: index out of range for {ir1} x {ir2} -> {iro}")
                if iro[io].ir not in ir1[i1].ir * ir2[i2].ir:
                    raise ValueError(f"instruction {ins!r}: {ir1[i1].ir} x {ir2[i2].ir} cannot produce {iro[io].ir}")
                if not self._muls_allowed(i1, i2, io):
                    raise ValueError(
                        f"instruction {ins!r}: multiplicities {ir1[i1].mul}, {ir2[i2].mul} -> {iro[io].mul} "
                        f"do not fit mode {self.mode!r}"
                    )
                triples.append((i1, i2, io))
        if not triples:
            raise ValueError(
                f"no tensor-product path: {ir1} x {ir2} -> {iro} (mode {self.mode!r}) admits no instruction; "
                f"check the parities, the l ranges and (for uvu/uuu) the multiplicities"
            )
        unreached = [f"{iro[io]} (index {io})" for io in range(len(iro)) if all(t[2] != io for t in triples)]
        if unreached:
            raise ValueError(
                f"output irreps {', '.join(unreached)} of {iro} receive no path from {ir1} x {ir2} "
                f"(mode {self.mode!r}); remove them from irreps_out"
            )
        return triples

    def _muls_allowed(self, i1: int, i2: int, io: int) -> bool:
        m1, m2, mo = self.irreps_in1[i1].mul, self.irreps_in2[i2].mul, self.irreps_out[io].mul
        if self.mode == "uvu":
            return mo == m1
        if self.mode == "uuu":
            return m1 == m2 == mo
        return True

    def _build_paths(self, triples: list[tuple[int, int, int]]) -> tuple[_Path, ...]:
        ir1, ir2, iro = self.irreps_in1, self.irreps_in2, self.irreps_out

        def shape(i1: int, i2: int, io: int) -> tuple[int, ...]:
            m1, m2, mo = ir1[i1].mul, ir2[i2].mul, iro[io].mul
            return {"uvu": (m1, m2), "uvw": (m1, m2, mo), "uuu": (m1,)}[self.mode]

        def fan_in(i1: int, i2: int) -> int:  # e3nn's num_elements for "element" path normalisation
            return {"uvu": ir2[i2].mul, "uvw": ir1[i1].mul * ir2[i2].mul, "uuu": 1}[self.mode]

        j_offsets = [sum(ir.dim for _, ir in ir2[:i]) for i in range(len(ir2) + 1)]
        columns = {i1: 0 for i1, _, _ in triples}
        paths, start = [], 0
        for i1, i2, io in triples:
            alpha = math.sqrt(iro[io].ir.dim / sum(fan_in(a, b) for a, b, c in triples if c == io))
            w_shape = shape(i1, i2, io)
            stop = start + math.prod(w_shape)
            c0 = columns[i1]
            columns[i1] = c0 + iro[io].ir.dim
            paths.append(
                _Path(i1, i2, io, alpha, start, stop, w_shape, c0, columns[i1], j_offsets[i2], j_offsets[i2 + 1])
            )
            start = stop
        return tuple(paths)

    def _register_clebsch_gordan(self) -> None:
        """One buffer per x1 irrep: ``(d1, sum of x2 irrep dims, columns of its paths)``, each path's
        normalised Wigner 3j symbol in its (x2 irrep rows, own columns) block, zeros elsewhere."""
        d2_total = sum(ir.dim for _, ir in self.irreps_in2)
        for i1, (_, ir1) in enumerate(self.irreps_in1):
            mine = [path for path in self._paths if path.i_in1 == i1]
            if not mine:
                continue
            cg = torch.zeros(ir1.dim, d2_total, mine[-1].col_stop)
            for path in mine:
                l2, l3 = self.irreps_in2[path.i_in2].ir.l, self.irreps_out[path.i_out].ir.l
                block = path.alpha * o3.wigner_3j(ir1.l, l2, l3)
                cg[:, path.j_start : path.j_stop, path.col_start : path.col_stop] = block
            self.register_buffer(f"_cg_{i1}", cg, persistent=False)

    # ----------------------------------------------------------------------------------------------------
    # phases and the kept set

    @property
    def phase(self) -> str:
        """Current phase: ``"random"``, ``"adaptive"`` or ``"fixed"``."""
        return self._phase

    @property
    def kept_paths(self) -> tuple[int, ...]:
        """Indices (into :attr:`instructions`) of the paths used in eval mode and in the adaptive/fixed phases."""
        return self._kept

    def set_phase(self, phase: str) -> None:
        """Enter ``phase``; re-select the top-``n_keep`` paths from the current weights unless already fixed.

        Called by :class:`~metaham.nn.scheduler.SparsityScheduler` after every optimizer step. Entering
        ``"fixed"`` freezes the set selected at that moment; while fixed the set never changes.
        """
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        reselect = self.sparsity > 0 and not (phase == "fixed" and self._phase == "fixed")
        self.phase_index.fill_(PHASES.index(phase))
        self._phase = phase
        if reselect:
            self._store_kept(self._top_k())

    def _top_k(self) -> tuple[int, ...]:
        return self._best_of(self.path_weight.detach().cpu().tolist())

    def _best_of(self, keys: list[float]) -> tuple[int, ...]:
        """The paths with the largest ``keys``, ``n_kept`` of each candidate set (ties: lower index first)."""
        kept: list[int] = []
        for candidates in self._candidates:
            order = sorted(candidates, key=lambda p: (-keys[p], p))
            kept += order[: n_kept(self.sparsity, len(candidates))]
        return tuple(sorted(kept))

    def _store_kept(self, paths: tuple[int, ...]) -> None:
        mask = torch.zeros(self.n_paths, dtype=torch.bool)
        mask[list(paths)] = True
        self.kept_mask.copy_(mask)
        self._set_kept(paths)

    def _set_kept(self, paths: tuple[int, ...]) -> None:
        # The evaluation plan of the kept set is compiled here, outside any torch.func transform, into a
        # buffer: tensors created inside a transform must not be cached, and a buffer follows .to(device).
        self._kept = paths
        self._kept_groups, index = self._compile(paths, self.kept_mask.device)
        self.register_buffer("_kept_index", index, persistent=False)
        self._freeze()
        self._build_runner()

    @property
    def weight_columns(self) -> torch.Tensor | None:
        """In the fixed phase of a sparse product: the ``(K,)`` columns of the full weight layout that the
        kept paths read, ascending; ``forward`` then also takes ``weight (N, K)`` holding just those, so the
        layer producing the weights need not compute the rest (see :func:`linear_columns`). Otherwise None:
        pass the full layout."""
        return None if self._frozen is None else self._weight_index

    def _weight_widths(self) -> tuple[int, ...]:
        return (self.weight_numel,) if self._frozen is None else (self.weight_numel, len(self._weight_index))

    def _freeze(self) -> None:
        """In the fixed phase, fold the kept paths' renormalised weights into their groups' Clebsch-Gordan
        tensors once (one packed buffer): the compact product then does no per-call gate work, as a product
        rebuilt from the kept instructions would not. Outside the fixed phase: no frozen tensors."""
        self._frozen: list[tuple[int, tuple[int, ...]]] | None = None
        if self.sparsity == 0 or self._phase != "fixed":
            self.register_buffer("_frozen_cg", None, persistent=False)
            self.register_buffer("_weight_index", None, persistent=False)
            return
        with torch.no_grad():
            scales = self._path_scales(self._kept_index[: len(self._kept)])
            cgs = [self._group_cg(group, self._kept_index, scales) for group in self._kept_groups]
        self._frozen, offset = [], 0
        for cg in cgs:
            self._frozen.append((offset, tuple(cg.shape)))
            offset += cg.numel()
        self.register_buffer("_frozen_cg", torch.cat([cg.reshape(-1) for cg in cgs]), persistent=False)
        columns = [c for p in self._kept for c in range(self._paths[p].w_start, self._paths[p].w_stop)]
        index = torch.tensor(columns, dtype=torch.long, device=self.kept_mask.device)
        self.register_buffer("_weight_index", index, persistent=False)

    def kept_instructions(self) -> list[KeptPath]:
        """The kept paths in order, each with its normalised Clebsch-Gordan tensor times its current gate scale
        (1 without a gate): what the product computes, apart from how (see :meth:`set_backend`)."""
        with torch.no_grad():
            scales = self._path_scales(self._kept_index[: len(self._kept)])
        out = []
        for j, p in enumerate(self._kept):
            path = self._paths[p]
            cg = getattr(self, f"_cg_{path.i_in1}")[:, path.j_start : path.j_stop, path.col_start : path.col_stop]
            cg = cg if scales is None else cg * scales[j].detach()
            out.append(KeptPath(path.i_in1, path.i_in2, path.i_out, cg, path.w_start, path.w_stop, path.w_shape))
        return out

    @property
    def backend(self) -> str:
        """Who evaluates the kept paths once they are fixed: ``"torch"`` (our contraction) or
        ``"cuequivariance"``."""
        return self._backend

    @property
    def runs_on(self) -> str:
        """Who evaluates the kept paths now: :attr:`backend` once they are fixed, ``"torch"`` before."""
        return "torch" if self._runner is None else self._backend

    @property
    def backend_method(self) -> str | None:
        """The method the backend runs the kept paths with now (e.g. ``"fused_tp"``), None on ours."""
        return None if self._runner is None else self._runner.method

    def set_backend(self, backend: str, method: str | None = None) -> None:
        """Evaluate the kept paths with ``backend`` whenever they are fixed (fixed phase, or no gate at all).

        ``"cuequivariance"`` runs them as one cuequivariance-torch segmented polynomial
        (:mod:`metaham.nn.cue_backend`; ``method`` ``"naive"``, ``"uniform_1d"`` or ``"fused_tp"``, default
        :func:`~metaham.nn.cue_backend.default_method` of the device), ``"torch"`` with our own contraction.
        Set before the fixed phase, it takes effect when the phase is entered. The choice is not part of the
        ``state_dict``: a checkpoint loads with either backend.
        """
        from . import cue_backend

        if backend not in BACKENDS:
            raise ValueError(f"tensor-product backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "cuequivariance":
            if method is not None and method not in cue_backend.METHODS:
                raise ValueError(f"cuequivariance method must be one of {cue_backend.METHODS}, got {method!r}")
            cue_backend.require()
        previous = self._backend, self._backend_method
        self._backend, self._backend_method = backend, method
        try:
            self._build_runner()
        except Exception:  # e.g. a CUDA kernel that does not take this product: keep the backend that worked
            self._backend, self._backend_method = previous
            self._build_runner()
            raise

    def _build_runner(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        runner = None
        if self._backend == "cuequivariance" and (self.sparsity == 0 or self._frozen is not None):
            from .cue_backend import CuePathContraction, default_method

            device = self.kept_mask.device if device is None else device
            dtype = self._cg_dtype() if dtype is None else dtype
            method = self._backend_method or default_method(device)
            runner = CuePathContraction(self, method, dtype).to(device)
        object.__setattr__(self, "_runner", runner)

    def _cg_dtype(self) -> torch.dtype:
        return next(b for name, b in self.named_buffers() if name.startswith("_cg_")).dtype

    def _run_backend(self, x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if (self._runner.columns.device, self._runner.dtype) != (x1.device, x1.dtype):
            self._build_runner(x1.device, x1.dtype)  # moved or cast since: that device's default method, that dtype
        out = self._runner(x1, x2, weight.to(x1.dtype))
        return out if self.out_layout == "mul_ir" else ir_mul_from_mul_ir(out, self._blocks_out)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # The Python mirrors of the phase and kept set follow the loaded buffers, so a fixed-phase checkpoint
        # is evaluated in its compact form right away.
        index = int(self.phase_index)
        kept = tuple(int(i) for i in torch.nonzero(self.kept_mask).flatten().tolist())
        if not (0 <= index < len(PHASES)):
            error_msgs.append(f"{prefix}phase_index: {index} is not a phase index (0 random, 1 adaptive, 2 fixed)")
            return
        if not kept:
            error_msgs.append(f"{prefix}kept_mask: keeps no path")
            return
        self._phase = PHASES[index]
        self._set_kept(kept)

    # ----------------------------------------------------------------------------------------------------
    # forward

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``x1 (N, irreps_in1.dim)``, ``x2 (N, irreps_in2.dim)``, ``weight (N, weight_numel)`` (external
        weights only) -> ``(N, irreps_out.dim)``."""
        if x1.dim() != 2 or x1.shape[1] != sum(self._sizes1):
            raise ValueError(
                f"x1 must have shape (N, {self.irreps_in1.dim}) for {self.irreps_in1}, got {tuple(x1.shape)}"
            )
        if x2.dim() != 2 or x2.shape != (x1.shape[0], sum(self._sizes2)):
            raise ValueError(
                f"x2 must have shape ({x1.shape[0]}, {self.irreps_in2.dim}) for {self.irreps_in2}, "
                f"got {tuple(x2.shape)}"
            )
        if self.internal_weights:
            if weight is not None:
                raise ValueError("this tensor product has internal weights; do not pass weight")
            weight = self.weight
        elif weight is None or weight.shape[:-1] != (x1.shape[0],) or weight.shape[-1] not in self._weight_widths():
            got = None if weight is None else tuple(weight.shape)
            compact = f" or ({x1.shape[0]}, {len(self.weight_columns)}) (compact)" if self._frozen is not None else ""
            raise ValueError(
                f"weight must have shape ({x1.shape[0]}, {self.weight_numel}) (full dense layout){compact}, got {got}"
            )
        paths = self._select_paths()
        if paths is self._kept and self._runner is not None:
            return self._run_backend(x1, x2, weight)
        if paths is self._kept and self._frozen is not None:
            flat = self._frozen_cg
            cgs = [flat[o : o + math.prod(shape)].view(shape) for o, shape in self._frozen]
            return self._contract(x1, x2, weight, self._kept_groups, cgs)
        if paths is self._kept:
            groups, index = self._kept_groups, self._kept_index
        else:  # a random-phase draw: compiled for this call only
            groups, index = self._compile(paths, x1.device)
        scales = self._path_scales(index[: len(paths)])
        return self._contract(x1, x2, weight, groups, [self._group_cg(g, index, scales) for g in groups])

    def _select_paths(self) -> tuple[int, ...]:
        if self.sparsity > 0 and self.training and self._phase == "random":
            if not self.per_output:
                return tuple(sorted(torch.randperm(self.n_paths)[: self.n_keep].tolist()))
            return self._best_of(torch.rand(self.n_paths).tolist())  # uniform within each output's paths
        return self._kept  # all paths when sparsity == 0

    def _path_scales(self, paths: torch.Tensor) -> torch.Tensor | None:
        """Selected paths' weights renormalised over the selection: ``w_p / mean_q |w_q|`` (1 when all equal)."""
        if self.sparsity == 0:
            return None
        w = self.path_weight.index_select(0, paths)
        return w / w.abs().mean().clamp_min(torch.finfo(w.dtype).tiny)

    def _compile(self, paths: tuple[int, ...], device: torch.device) -> tuple[list[_Group], torch.Tensor]:
        """Groups of the selected ``paths`` and one packed LongTensor of index arrays: the path indices
        first, then each group's column and scale-position lists."""
        grouped: dict[tuple[int, int | None], list[tuple[int, int]]] = {}
        for j, p in enumerate(paths):
            path = self._paths[p]
            grouped.setdefault((path.i_in1, None if self._whole_x2 else path.i_in2), []).append((j, p))
        flat: list[int] = list(paths)
        groups = []
        for (i1, i2), members in grouped.items():
            spans = [(j, self._paths[p]) for j, p in members]
            cols = [c for _, path in spans for c in range(path.col_start, path.col_stop)]
            scale_pos = [j for j, path in spans for _ in range(path.col_start, path.col_stop)]
            start = len(flat)
            flat += cols + scale_pos
            middle = start + len(cols)
            groups.append(_Group(i1, i2, tuple(members), slice(start, middle), slice(middle, len(flat))))
        return groups, torch.tensor(flat, dtype=torch.long, device=device)

    def _contract(self, x1, x2, weight, groups, cgs) -> torch.Tensor:
        n = x1.shape[0]
        shared = weight.dim() == 1
        # split(), not one slice per block: the backward of a slice allocates a zero tensor of the full input
        # per slice, which costs more than the contraction itself on CPU; split's backward is one cat.
        x1_blocks = [x.reshape(n, b.mul, b.dim) for x, b in zip(x1.split(self._sizes1, -1), self._blocks1)]
        x2_blocks = [x.reshape(n, b.mul, b.dim) for x, b in zip(x2.split(self._sizes2, -1), self._blocks2)]
        if weight.shape[-1] == self.weight_numel:
            path_weights = dict(enumerate(weight.split([p.w_stop - p.w_start for p in self._paths], -1)))
        else:  # compact: the kept paths' columns only, in path order
            sizes = [self._paths[p].w_stop - self._paths[p].w_start for p in self._kept]
            path_weights = dict(zip(self._kept, weight.split(sizes, -1)))

        if self.mode == "uuu":
            # Component-major copies (d, n, U) of the input blocks, made once per block and shared by the groups
            # that read it: the outer products below then broadcast over whole rows (contiguous), several times
            # faster on a CPU than over trailing dimensions of size 2l + 1, forward and backward.
            x1_blocks = [_component_major(b) for b in x1_blocks]
            x2_blocks = [_component_major(b) for b in x2_blocks]

        # Each output block's sum of weighted terms, accumulated as it goes: torch.addcmul adds a term and its
        # weight in one pass, where a product then a sum would make two passes and an extra (n, d, U) tensor.
        totals: list[torch.Tensor | None] = [None] * len(self._blocks_out)
        component_major = self.out_layout == "ir_mul" and self._whole_x2
        for group, cg in zip(groups, cgs):
            if component_major:  # (n, d_out, U) terms throughout, see _whole_x2_terms
                for i_out, term, factor in self._whole_x2_terms(
                    x1_blocks[group.i_in1], x2, cg, group, path_weights, shared
                ):
                    _accumulate(totals, i_out, term, factor)
                continue
            b = x2.reshape(n, 1, x2.shape[1]) if group.i_in2 is None else x2_blocks[group.i_in2]
            joint = self._pair_contraction(x1_blocks[group.i_in1], b, cg)
            dims = [self._blocks_out[self._paths[p].i_out].dim for _, p in group.members]
            parts = joint.split(dims, 0 if self.mode == "uuu" else -1)
            for part, (_, p) in zip(parts, group.members):
                path = self._paths[p]
                w = path_weights[p].reshape(path.w_shape if shared else (n, *path.w_shape))
                _accumulate(totals, path.i_out, *self._weighted(part, w, shared))

        pieces = []
        for total, block in zip(totals, self._blocks_out):
            if total is not None:
                if self.mode == "uuu":  # (d, n, U), see _pair_contraction
                    total = total.permute(1, 2, 0) if self.out_layout == "mul_ir" else total.transpose(0, 1)
                elif self.out_layout == "ir_mul" and not component_major:
                    total = total.transpose(1, 2)
                pieces.append(total.reshape(n, block.mul * block.dim))
            else:  # no selected path reaches this output
                pieces.append(x1.new_zeros(n, block.mul * block.dim))
        return torch.cat(pieces, dim=-1)

    def _whole_x2_terms(
        self, a: torch.Tensor, x2: torch.Tensor, cg: torch.Tensor, group: _Group, path_weights: dict, shared: bool
    ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """The weighted terms of one ``"uvu"`` group against the whole of ``x2`` as ``(output block, term,
        factor)``, ``term * factor`` being the path's ``(n, d_out, U)`` contribution, computed component-major:
        the per-edge weight of a path multiplies whole rows of U channels (and its gradient sums over rows),
        not trailing runs of ``2l + 1`` components."""
        n, u, d1 = a.shape
        rows = 1 if shared else n
        dims = [self._blocks_out[self._paths[p].i_out].dim for _, p in group.members]
        weights = [path_weights[p].reshape(rows, 1, u) for _, p in group.members]
        outputs = [self._paths[p].i_out for _, p in group.members]
        if d1 == 1:
            # A scalar x1: each term is an outer product (x2 through the CG) x (x1 times the path's weight). The
            # weight meets the (n, 1, U) factor, so no (n, K, U) product is formed and then weighted.
            t = _x2_through_cg(x2, cg).transpose(1, 2)  # (n, K, 1)
            scaled = a.reshape(n, 1, u)
            return [(i, part, scaled * w) for i, part, w in zip(outputs, t.split(dims, 1), weights)]
        joint = _against_one_x2_copy(a, x2, cg, component_major=True)
        return list(zip(outputs, joint.split(dims, 1), weights))

    def _group_cg(self, group: _Group, index: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        """The group's normalised Clebsch-Gordan tensor ``(d1, d2, K)``, each path's columns times its gate
        scale; only the selected paths' columns are read."""
        cg = getattr(self, f"_cg_{group.i_in1}")
        if group.i_in2 is not None:
            path = self._paths[group.members[0][1]]
            cg = cg[:, path.j_start : path.j_stop]
        if group.cols.stop - group.cols.start != cg.shape[-1]:
            cg = cg.index_select(2, index[group.cols])
        return cg if scales is None else cg * scales.index_select(0, index[group.scale_pos])

    def _pair_contraction(self, a: torch.Tensor, b: torch.Tensor, cg: torch.Tensor) -> torch.Tensor:
        k = cg.shape[-1]
        if self.mode == "uuu":  # component-major blocks a (d1, n, U), b (d2, n, U), see _contract
            (d1, n, u), d2 = a.shape, b.shape[0]
            cg_t = cg.reshape(d1 * d2, k).T
            # Without autograd, the outer product is made and contracted a slice of rows at a time, small enough
            # to stay in the CPU's cache between the two: whole, it is (d1 d2) / K times larger than the result
            # (8x for 4 x 4). With autograd the slices' extra backward work cost more than this saved (measured).
            grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or cg.requires_grad)
            rows = max(1, n if grad else _OUTER_PRODUCT_ELEMENTS // (d1 * d2 * u))
            # Kept component-major, (K, n, U): each path's weight then scales whole rows of U channels.
            pieces = [
                (cg_t @ (a_.unsqueeze(1) * b_.unsqueeze(0)).reshape(d1 * d2, a_.shape[1] * u)).reshape(k, -1, u)
                for a_, b_ in zip(a.split(rows, 1), b.split(rows, 1))
            ]
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)
        n, u, d1 = a.shape
        v, d2 = b.shape[1], b.shape[2]
        if v == 1:
            return _against_one_x2_copy(a, b.reshape(n, d2), cg).reshape(n, u, 1, k)
        t = torch.einsum("zvj,ijk->zvik", b, cg)
        return torch.einsum("zui,zvik->zuvk", a, t)  # (n, U, V, K)

    def _weighted(
        self, part: torch.Tensor, w: torch.Tensor, shared: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A path's term as ``(term, factor)``: its contribution is ``term * factor`` (``term`` alone when the
        factor is None, i.e. the weight was contracted in already)."""
        z = "" if shared else "z"
        if self.mode == "uuu":  # part (d, n, U), w ([n,] U): a broadcast over the leading axis only
            return part, w
        if self.mode == "uvu":  # part (n, U, V, d), w ([n,] U, V)
            if part.shape[2] == 1:
                n, u, _, d = part.shape
                return part.reshape(n, u, d), w.reshape(*w.shape[:-1], 1)
            return torch.einsum(f"{z}uv,zuvk->zuk", w, part), None
        return torch.einsum(f"{z}uvw,zuvk->zwk", w, part), None  # uvw

    def extra_repr(self) -> str:
        return (
            f"{self.irreps_in1} x {self.irreps_in2} -> {self.irreps_out}, mode={self.mode}, "
            f"sparsity={self.sparsity}{', per_output' if self.per_output else ''}, "
            f"paths={len(self._kept)}/{self.n_paths} ({self._phase}), "
            f"weight_numel={self.weight_numel}, internal_weights={self.internal_weights}"
            + (f", out_layout={self.out_layout}" if self.out_layout != "mul_ir" else "")
        )


def _accumulate(
    totals: list[torch.Tensor | None], i: int, term: torch.Tensor, factor: torch.Tensor | None
) -> None:
    """``totals[i] += term * factor`` (``term`` alone if ``factor`` is None), starting from nothing."""
    if factor is None:
        totals[i] = term if totals[i] is None else totals[i] + term
    else:
        totals[i] = term * factor if totals[i] is None else torch.addcmul(totals[i], term, factor)


def _x2_through_cg(x2: torch.Tensor, cg: torch.Tensor) -> torch.Tensor:
    """``x2 (n, d2)`` (one copy of each irrep) contracted with ``cg (d1, d2, K)``: ``(n, d1, K)``."""
    d1, d2, k = cg.shape
    return (x2 @ cg.transpose(0, 1).reshape(d2, d1 * k)).reshape(x2.shape[0], d1, k)


def _component_major(block: torch.Tensor) -> torch.Tensor:
    """``(n, U, d)`` -> ``(d, n, U)``, contiguous."""
    return block.permute(2, 0, 1).contiguous()


def _against_one_x2_copy(
    a: torch.Tensor, x2: torch.Tensor, cg: torch.Tensor, component_major: bool = False
) -> torch.Tensor:
    """``x1`` block ``a (n, U, d1)`` times ``x2 (n, d2)`` (one copy of each irrep) through ``cg (d1, d2, K)``:
    ``(n, U, K)``, or ``(n, K, U)`` when ``component_major``. x2 meets the Clebsch-Gordan tensor first (no U
    factor), then one batched product with x1."""
    d1 = a.shape[2]
    t = _x2_through_cg(x2, cg)
    left, right = (t.transpose(1, 2), a.transpose(1, 2)) if component_major else (a, t)
    if d1 == 1:  # scalar x1: an outer product, where bmm is several times slower than a broadcast
        return left * right
    return torch.bmm(left, right)
