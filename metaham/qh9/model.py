"""The QH9 Hamiltonian model: a sparse equivariant encoder and the orbital-block head, in pyscf order.

``QH9Model`` maps a batch of molecules (H, C, N, O, F; def2-SVP) to their Kohn-Sham matrices:

1. **encoder**: element embedding (``n_scalars x 0e``), then ``layers``
   :class:`~metaham.nn.InteractionBlock` s to ``node_irreps`` (natural parities up to l = 4 by default) over
   the pairs of each molecule closer than ``cutoff``, with spherical harmonics in pyscf's axis convention
   (``sh_axes="pyscf"``) so that l = 2 features come out in pyscf's m order and l = 1 as (y, z, x);
2. **head** (:class:`~metaham.qh9.head.BlockHead`): one padded ``14 x 14`` block per atom and per pair
   ``i > j`` (every pair of the molecule: Kohn-Sham matrices are dense);
3. **assembly** (:func:`~metaham.qh9.orbitals.assemble`): blocks times ``output_scale``, plus each element's
   reference block on the diagonal, into full symmetric matrices in pyscf AO order (p shells back to
   (x, y, z)); with ``residual`` the MINAO initial-guess Fock matrix ``H_init`` is added (the network learns
   ``H - H_init``, as SPHNet does).

Sparsity: with ``dense=False`` every tensor product of the encoder (but the first block's, whose paths each
carry one l from the scalar embedding) and the head is a :class:`~metaham.nn.SparseTensorProduct` at
``tp_sparsity`` (by default keeping that share of the paths into each output irrep, so none is starved), and
every interaction block and the head's environment term have a :class:`~metaham.nn.SparsePairGate` at
``pair_sparsity`` over the pairs longer than ``pair_keep_radius`` (bonds) and ``head_pair_keep_radius``
(first and second neighbours) respectively -- on molecules of a few atoms a plain per-molecule quantile
drops bonded pairs (water would keep one of its three); ``model.sparsity`` is the
:class:`~metaham.nn.SparsityScheduler` (random -> adaptive -> fixed, in optimizer steps; its state is in the
model's ``state_dict``). ``dense=True`` removes both gates: the QHNet-like twin at identical widths.

Input: PyG molecules (:mod:`metaham.qh9.dataset`): :meth:`QH9Model.predict` and :meth:`QH9Model.target` take a
``torch_geometric.data.Batch`` (from a ``QH9Dataset`` through PyG's ``DataLoader``, or ``Batch.from_data_list``
of your own molecules) or a single ``Data``; ``forward(z, pos, batch, ptr)`` takes its tensors.

>>> from ase.build import molecule
>>> from metaham.qh9.dataset import molecule_data
>>> model = QH9Model(node_irreps="8x0e+4x1o+4x2e+2x3o+2x4e", layers=1, head_mul=4, residual=False)
>>> atoms = molecule("CH3OH")
>>> [h.shape for h in model.predict(molecule_data(atoms.numbers, atoms.positions))]
[torch.Size([48, 48])]
"""
from __future__ import annotations

import inspect
from typing import Any, Iterable

import numpy as np
import torch
from e3nn import o3
from torch import Tensor, nn

from metaham.nn import InteractionBlock, SparsityScheduler

from torch_geometric.data import Batch, Data

from .basis import check_elements
from .dataset import matrices
from .head import BlockHead
from .orbitals import N_SLOTS, PADDED_IRREPS, assemble, decompose

ELEMENTS = (1, 6, 7, 8, 9)  # H, C, N, O, F: the def2-SVP layout QH9 covers
# The "format" of a checkpoint holding a QH9Model (written by `metaham qh9 train`, read by `metaham qh9 eval`).
CHECKPOINT_FORMAT = "metaham-qh9-model"


class QH9Model(nn.Module):
    """Molecules -> Kohn-Sham matrices (pyscf order); see the module docstring.

    Args:
        node_irreps: node feature irreps of the encoder (``0e`` scalars first).
        layers: interaction blocks (>= 1).
        lmax_sh: highest degree of the edge spherical harmonics.
        cutoff: message-passing radius, Angstrom.
        num_basis: Bessel functions of edge lengths (encoder and head).
        radial_hidden: width of the encoder's edge MLPs.
        pair_channels: channels per irrep type of the pair-gate invariants.
        avg_num_neighbors: normalisation of aggregated messages.
        head_mul: multiplicity of every irrep of the head's block features.
        head_hidden: width of the head's weight MLPs.
        head_cutoff: radius of the Bessel basis of the head's pair distances, Angstrom.
        dense: no gates at all (the dense twin).
        tp_sparsity: sparsity of every tensor-product gate (ignored when dense; 0: dense tensor products).
        pair_sparsity: sparsity of the pair gates (ignored when dense; 0: no pair gate).
        pair_keep_radius: pairs closer than this (Angstrom; 1.6 covers every covalent bond of H, C, N, O, F)
            are exempt from the encoder's pair gates: messages between bonded atoms are never dropped.
        head_pair_keep_radius: pairs closer than this (Angstrom; 3.0 covers first and second neighbours,
            whose off-diagonal blocks are the large ones) always get the head's environment term.
        tp_per_output: every tensor-product gate keeps its share of the paths into each output irrep (never
            cuts an irrep off); False: a share of all paths of the product (may drop whole irreps).
        random_steps, adaptive_steps: optimizer steps of the scheduler's random and adaptive phases.
        residual: predict ``H_init + network`` (``H_init`` the MINAO-guess Fock matrix) instead of ``H``.

    Attributes:
        config: the arguments as a plain dict (what a checkpoint stores to rebuild the model).
        sparsity: the :class:`~metaham.nn.SparsityScheduler`; call ``model.sparsity.step()`` after each
            optimizer step.
    """

    def __init__(
        self,
        node_irreps: str = "32x0e+16x1o+16x2e+8x3o+8x4e",
        layers: int = 3,
        lmax_sh: int = 4,
        cutoff: float = 5.0,
        num_basis: int = 8,
        radial_hidden: int = 32,
        pair_channels: int = 8,
        avg_num_neighbors: float = 8.0,
        head_mul: int = 16,
        head_hidden: int = 64,
        head_cutoff: float = 12.0,
        dense: bool = False,
        tp_sparsity: float = 0.7,
        pair_sparsity: float = 0.7,
        pair_keep_radius: float = 1.6,
        head_pair_keep_radius: float = 3.0,
        tp_per_output: bool = True,
        random_steps: int = 60,
        adaptive_steps: int = 30,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if int(layers) != layers or layers < 1:
            raise ValueError(f"layers must be an integer >= 1, got {layers!r}")
        self.irreps_node = o3.Irreps(node_irreps)
        if not self.irreps_node or self.irreps_node[0].ir != o3.Irrep("0e"):
            raise ValueError(f"node_irreps = {node_irreps!r}: must start with 0e scalars")
        self.dense = bool(dense)
        self.residual = bool(residual)
        self.cutoff = float(cutoff)
        n_scalars = self.irreps_node[0].mul
        irreps_embed = o3.Irreps(f"{n_scalars}x0e")

        lookup = torch.full((max(ELEMENTS) + 1,), -1, dtype=torch.long)
        lookup[list(ELEMENTS)] = torch.arange(len(ELEMENTS))
        self.register_buffer("_element_index", lookup, persistent=False)
        self.embedding = nn.Linear(len(ELEMENTS), n_scalars)
        block_options = dict(
            lmax_sh=lmax_sh, num_basis=num_basis, cutoff=cutoff, radial_hidden=radial_hidden, pair_channels=pair_channels,
            tp_sparsity=0.0 if dense else tp_sparsity, pair_sparsity=None if dense or not pair_sparsity else pair_sparsity,
            pair_keep_radius=pair_keep_radius, tp_per_output=tp_per_output, avg_num_neighbors=avg_num_neighbors,
            sh_axes="pyscf",
        )
        # The first block's product has one path per output l (scalars x Y_l -> l): pruning any of them would
        # remove that l from the whole network, so its tensor product stays dense (it is also the cheapest).
        self.blocks = nn.ModuleList(
            InteractionBlock(
                irreps_embed if k == 0 else self.irreps_node, self.irreps_node,
                **{**block_options, **({"tp_sparsity": 0.0} if k == 0 else {})},
            )
            for k in range(int(layers))
        )
        self.head = BlockHead(
            self.irreps_node, mul=head_mul, hidden=head_hidden, cutoff=head_cutoff, num_basis=num_basis,
            pair_channels=pair_channels, tp_sparsity=0.0 if dense else tp_sparsity,
            pair_sparsity=None if dense or not pair_sparsity else pair_sparsity,
            pair_keep_radius=head_pair_keep_radius, tp_per_output=tp_per_output,
        )
        # Set from training data by fit_statistics: each element's invariant diagonal block (removes the
        # large, geometry-independent part: core levels of tens of Hartree) and the RMS of what is left.
        self.register_buffer("atom_reference", torch.zeros(len(lookup), N_SLOTS, N_SLOTS))
        self.register_buffer("output_scale", torch.tensor(1.0))
        self.sparsity = SparsityScheduler(self, random_steps, adaptive_steps)

    # ------------------------------------------------------------------------------------------------
    # the network

    def blocks_of(self, z: Tensor, pos: Tensor, batch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The network's padded e3nn-order blocks, before scaling and references.

        Args:
            z: ``(N,)`` atomic numbers of all molecules; pos: ``(N, 3)`` Angstrom; batch: ``(N,)`` molecule
                index of each atom (ascending): the fields of a PyG ``Batch`` of that name.

        Returns:
            ``(diag (N, 14, 14), pairs (2, P), offdiag (P, 14, 14))``, every pair ``i > j`` of each molecule.
        """
        element = self._elements(z)
        pos = pos.to(self.atom_reference.dtype)
        edge_index, pairs = _molecule_graph(pos, batch, self.cutoff)
        x = self.embedding(nn.functional.one_hot(element, len(ELEMENTS)).to(pos.dtype))
        edge_vec = pos.index_select(0, edge_index[1]) - pos.index_select(0, edge_index[0])
        for block in self.blocks:
            x = block(x, edge_vec, edge_index, batch)
        pair_vec = pos.index_select(0, pairs[0]) - pos.index_select(0, pairs[1])
        diag, offdiag = self.head(x, pairs, pair_vec, batch)
        return diag, pairs, offdiag

    def forward(self, z: Tensor, pos: Tensor, batch: Tensor, ptr: Tensor) -> list[Tensor]:
        """The learned part of each molecule's matrix, ``(norb_b, norb_b)`` in the model's dtype, pyscf order:
        ``H - H_init`` when ``residual``, else ``H`` (compare with :meth:`target`). The arguments are the
        fields of a PyG ``Batch`` of those names (``ptr``: ``(B + 1,)`` atom offsets of the molecules)."""
        diag, pairs, offdiag = self.blocks_of(z, pos, batch)
        diag = diag * self.output_scale + self.atom_reference.index_select(0, z.long())
        return assemble(z, ptr, diag, pairs, offdiag * self.output_scale)

    def target(self, data: Batch | Data) -> list[Tensor]:
        """What :meth:`forward` is trained to match, per molecule of ``data`` (a PyG ``Batch`` or one
        ``Data``), in the model's dtype: ``H - H_init`` or ``H``."""
        dtype = self.atom_reference.dtype
        if not self.residual:
            return [h.to(dtype) for h in matrices(data, "H")]
        return [(h - h0).to(dtype) for h, h0 in zip(matrices(data, "H"), self._initial_guess(data))]

    def predict(self, data: Batch | Data) -> list[Tensor]:
        """Predicted Kohn-Sham matrices ``(norb_b, norb_b)`` float64, pyscf order, of every molecule of ``data``:
        a PyG ``Batch`` or one ``Data`` (fields ``z``, ``pos``; ``H_init`` for a residual model). The
        evaluator's predictor."""
        batch = data if isinstance(data, Batch) else Batch.from_data_list([data])
        initial = self._initial_guess(batch) if self.residual else None  # a missing H_init fails before the network
        learned = self(batch.z, batch.pos, batch.batch, batch.ptr)
        if initial is None:
            return [h.double() for h in learned]
        return [h0.double() + h.double() for h0, h in zip(initial, learned)]

    def _initial_guess(self, data: Batch | Data) -> list[Tensor]:
        if "H_init" not in data:
            rows = f"rows {torch.as_tensor(data.id).reshape(-1).tolist()}: " if "id" in data else ""
            raise ValueError(
                f"{rows}this model learns H - H_init but the data has no H_init (MINAO-guess Fock); fill it "
                "with metaham.qh9.data.with_initial_guess, pass it to metaham.qh9.dataset.molecule_data, or use "
                "a file from `metaham qh9 generate`"
            )
        return matrices(data, "H_init")

    def _elements(self, Z: Tensor) -> Tensor:
        Z = Z.long()
        in_range = (Z >= 0) & (Z < len(self._element_index))
        element = self._element_index[Z.clamp(0, len(self._element_index) - 1)]
        if not bool((in_range & (element >= 0)).all()):
            check_elements(Z.cpu().numpy())  # raises UnsupportedError naming the element
        return element

    # ------------------------------------------------------------------------------------------------
    # statistics of the training data

    @torch.no_grad()
    def fit_statistics(self, batches: Iterable[Batch]) -> dict[str, Any]:
        """Set ``atom_reference`` and ``output_scale`` from training batches (PyG ``Batch`` es; before training).

        ``atom_reference[z]``: the mean over atoms of element z of the rotation-invariant part of their
        diagonal target blocks -- for two shells of the same l, ``trace / (2l + 1)`` times the identity (the
        only invariant a ``l x l`` block has), zero between shells of different l. Being invariant, it
        keeps the model exactly equivariant. ``output_scale``: the RMS over all matrix entries of the
        target minus the references, so that the network's unit-scale output matches the target's scale.

        Returns:
            ``{"elements": [...], "output_scale": float}``.
        """
        dtype = self.atom_reference.dtype
        projector = _invariant_projector().to(dtype)
        sums = torch.zeros(len(self._element_index), N_SLOTS * N_SLOTS, dtype=torch.float64)
        counts = torch.zeros(len(self._element_index), dtype=torch.float64)
        cached = []
        for batch in batches:
            batch = batch.to("cpu")
            targets = [t.double() for t in self.target(batch)]
            empty = torch.zeros(2, 0, dtype=torch.long)
            diag, _, _, _ = decompose(targets, batch.z, batch.ptr, empty)
            invariant = diag.reshape(len(batch.z), -1) @ projector.double()
            sums.index_add_(0, batch.z.long(), invariant)
            counts.index_add_(0, batch.z.long(), torch.ones(len(batch.z), dtype=torch.float64))
            cached.append((batch, targets))
        if not cached:
            raise ValueError("fit_statistics needs at least one training batch")
        reference = (sums / counts.clamp(min=1)[:, None]).reshape(-1, N_SLOTS, N_SLOTS)
        square, entries = 0.0, 0
        for batch, targets in cached:
            base = assemble(batch.z, batch.ptr, reference[batch.z.long()], torch.zeros(2, 0, dtype=torch.long),
                            torch.zeros(0, N_SLOTS, N_SLOTS, dtype=torch.float64))
            for t, b in zip(targets, base):
                square += float(((t - b) ** 2).sum())
                entries += t.numel()
        self.atom_reference.copy_(reference.to(dtype))
        self.output_scale.fill_(max(float(np.sqrt(square / entries)), 1e-8))
        return {"elements": [int(z) for z in torch.nonzero(counts).flatten()], "output_scale": float(self.output_scale)}


def _invariant_projector() -> Tensor:
    """``(196, 196)`` orthogonal projector of a flattened padded ``14 x 14`` block onto its rotation
    invariants: for every two shells of equal l, the normalised identity on their ``(2l+1) x (2l+1)`` part."""
    starts, vectors = [], []
    offset = 0
    for mul, ir in PADDED_IRREPS:
        starts += [(offset + c * ir.dim, ir.l) for c in range(mul)]
        offset += mul * ir.dim
    for r0, l_row in starts:
        for c0, l_col in starts:
            if l_row != l_col:
                continue
            v = torch.zeros(N_SLOTS, N_SLOTS, dtype=torch.float64)
            idx = torch.arange(2 * l_row + 1)
            v[r0 + idx, c0 + idx] = 1.0 / np.sqrt(2 * l_row + 1)
            vectors.append(v.reshape(-1))
    basis = torch.stack(vectors)  # orthonormal rows
    return basis.T @ basis


def _molecule_graph(pos: Tensor, batch: Tensor, cutoff: float) -> tuple[Tensor, Tensor]:
    """Message edges ``(2, E)`` as (source j, target i), both directions, every two atoms of one molecule
    closer than ``cutoff``; head pairs ``(2, P)`` as (i, j) with ``i > j``, every two atoms of one molecule."""
    same = batch[:, None] == batch[None, :]
    index = torch.arange(len(batch), device=batch.device)
    lower = same & (index[:, None] > index[None, :])
    pairs = torch.nonzero(lower).T  # (i, j), i > j
    close = same & (index[:, None] != index[None, :]) & (torch.cdist(pos.detach(), pos.detach()) < cutoff)
    target, source = torch.nonzero(close).T
    return torch.stack([source, target]), pairs


def build_model(config: dict[str, Any]) -> QH9Model:
    """A :class:`QH9Model` from a plain dict of its arguments (``model.config`` of a checkpoint)."""
    unknown = sorted(set(config) - set(inspect.signature(QH9Model).parameters))
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(unknown)}")
    return QH9Model(**config)
