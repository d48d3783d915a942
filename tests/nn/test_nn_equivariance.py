"""Every layer and block of metaham.nn, in every phase, commutes with rotations and reflections.

Tolerances (relative to the output's largest entry): 1e-5 in float32, 1e-10 in float64 (modules and Wigner D
matrices built in float64). In the random phase the path draw is reseeded so that the rotated and the
unrotated call use the same paths. A pair gate's hard top-k is equivariant only away from ties, so the checks
through one run on inputs in general position and assert that premise (see ``pair_gate_margin``).
"""
import pytest
import torch
from e3nn import o3

from equivariance import assert_equivariant, default_dtype, pair_gate_margin, recorded_pair_gates
from metaham.nn import (
    BesselBasis,
    EquivariantLayerNorm,
    EquivariantLinear,
    GatedNonlinearity,
    InteractionBlock,
    SparsePairGate,
    SparseTensorProduct,
    spherical_harmonics,
)

FEAT = "4x0e+4x1o+2x2e"
DTYPES = [torch.float32, torch.float64]
PHASES = ["random", "adaptive", "fixed"]


def _seeded(fn):
    def call(*args):
        torch.manual_seed(11)
        return fn(*args)

    return call


def _set_phase(module, phase):
    for m in module.modules():
        if isinstance(m, SparseTensorProduct):
            with torch.no_grad():
                if m.sparsity > 0:
                    m.path_weight.copy_(torch.rand(m.n_paths) + 0.5)
            m.set_phase(phase)
    module.train()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize(
    "irreps, mode, internal",
    [
        ((FEAT, "0e+1o+2e", FEAT), "uvu", False),
        ((FEAT, "2x0e+1x1o+1x1e", "3x0e+2x1o+2x1e+2x2e+1x0o"), "uvw", True),
        (("3x0e+3x1o+3x2e", "3x0e+3x1o+3x2e", "3x0e+3x1o+3x2e+3x1e"), "uuu", False),
    ],
)
def test_sparse_tensor_product(dtype, phase, irreps, mode, internal):
    with default_dtype(dtype):
        tp = SparseTensorProduct(*irreps, mode=mode, sparsity=0.5, internal_weights=internal)
        _set_phase(tp, phase)
        x1 = torch.randn(5, tp.irreps_in1.dim)
        x2 = torch.randn(5, tp.irreps_in2.dim)
        if internal:
            assert_equivariant(_seeded(tp), [(x1, tp.irreps_in1), (x2, tp.irreps_in2)], tp.irreps_out)
        else:
            w = torch.randn(5, tp.weight_numel)
            assert_equivariant(_seeded(tp), [(x1, tp.irreps_in1), (x2, tp.irreps_in2), (w, None)], tp.irreps_out)


def test_sparse_tensor_product_up_to_l4_float64():
    with default_dtype(torch.float64):
        feat = "2x0e+2x1o+2x2e+2x3o+2x4e"
        tp = SparseTensorProduct(feat, "0e+1o+2e+3o+4e", feat, sparsity=0.5)
        _set_phase(tp, "fixed")
        assert tp.n_paths > 20
        x1, x2 = torch.randn(4, tp.irreps_in1.dim), torch.randn(4, 25)
        w = torch.randn(4, tp.weight_numel)
        assert_equivariant(tp, [(x1, feat), (x2, "0e+1o+2e+3o+4e"), (w, None)], feat)


@pytest.mark.parametrize("dtype", DTYPES)
def test_building_blocks(dtype):
    with default_dtype(dtype):
        vec = torch.randn(7, 3)
        assert_equivariant(lambda v: spherical_harmonics(3, v), [(vec, "cartesian")], "0e+1o+2e+3o")
        basis = BesselBasis(5, cutoff=3.0)
        assert_equivariant(lambda v: basis(v.norm(dim=-1)), [(vec, "cartesian")], "5x0e")

        lin = EquivariantLinear("3x0e+2x1o+1x0o+2x2e+1x1o", "2x0e+4x1o+1x2e+2x0o")
        x = torch.randn(6, lin.irreps_in.dim)
        assert_equivariant(lin, [(x, lin.irreps_in)], lin.irreps_out)

        gate = GatedNonlinearity("3x0e+1x0o+2x1o+2x2e")
        h = torch.randn(6, gate.irreps_in.dim)
        assert_equivariant(gate, [(h, gate.irreps_in)], gate.irreps_out)

        norm = EquivariantLayerNorm("3x0e+2x0o+4x1o+2x2e")
        with torch.no_grad():  # trained-looking affine parameters: per-channel scales differ
            norm.scale.copy_(torch.rand(norm.scale.shape) + 0.5)
            norm.bias.copy_(torch.randn(norm.bias.shape))
        y = torch.randn(6, norm.irreps.dim)
        assert_equivariant(norm, [(y, norm.irreps)], norm.irreps)

        pair = SparsePairGate(FEAT, 0.5)
        nodes = torch.randn(5, 26)
        edge_index = torch.tensor([(i, j) for i in range(5) for j in range(5) if i != j]).T
        with recorded_pair_gates(pair) as selections:
            assert_equivariant(lambda x: pair(x, edge_index).invariants, [(nodes, FEAT)], f"{pair.n_invariants}x0e")
        _assert_general_position(selections)


def _assert_general_position(selections):
    """The premise of an equivariance check through a pair gate: every call kept the same pairs, and the inputs
    are far from a tie (1e-3 of the score scale, ~1e4 times float32 rounding), so no rounding could flip one."""
    assert selections and all(torch.equal(s.index, selections[0].index) for s in selections)
    assert min(pair_gate_margin(s) for s in selections) > 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("pair_sparsity", [None, 0.5])
def test_interaction_block(dtype, phase, pair_sparsity):
    with default_dtype(dtype):
        sizes = (4, 6)
        batch = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
        edges = [(i, j) for i in range(10) for j in range(10) if i != j and batch[i] == batch[j]]
        edge_index = torch.tensor(edges).T
        block = InteractionBlock(FEAT, "4x0e+2x0o+3x1o+2x1e+2x2e", lmax_sh=2, cutoff=5.0, tp_sparsity=0.5, pair_sparsity=pair_sparsity)
        _set_phase(block, phase)
        x, pos = torch.randn(10, 26), 1.2 * torch.randn(10, 3)

        def run(x, pos):
            return block(x, pos[edge_index[1]] - pos[edge_index[0]], edge_index, batch)

        with recorded_pair_gates(block) as selections:
            assert_equivariant(_seeded(run), [(x, FEAT), (pos, "cartesian")], block.irreps_out)
        if pair_sparsity is not None:
            _assert_general_position(selections)
            assert len(selections[0].index) < edge_index.shape[1]  # the gate really dropped pairs


def test_interaction_block_pair_gate_at_an_exact_tie_keeps_every_tied_pair_and_stays_equivariant():
    # At an exact tie equivariance holds only because every pair tied at the quantile is kept (no arbitrary
    # choice among them). A zero scorer ties all pairs exactly (0 * x = 0 in any order of summation, so on every
    # CPU): all are kept, each gated by sigmoid(0) = 1/2, and the block is equivariant and equals the
    # ungated block whose pair invariants are halved.
    with default_dtype(torch.float64):
        edge_index = torch.tensor([(i, j) for i in range(6) for j in range(6) if i != j]).T
        block = InteractionBlock(FEAT, FEAT, lmax_sh=2, cutoff=5.0, pair_sparsity=0.7)
        with torch.no_grad():
            block.pair_gate.scorer.weight.zero_()
        x, pos = torch.randn(6, 26), torch.randn(6, 3)

        def run(x, pos):
            return block(x, pos[edge_index[1]] - pos[edge_index[0]], edge_index)

        with recorded_pair_gates(block) as selections:
            assert_equivariant(run, [(x, FEAT), (pos, "cartesian")], block.irreps_out)
        assert all(torch.equal(s.index, torch.arange(edge_index.shape[1])) for s in selections)
        ungated = InteractionBlock(FEAT, FEAT, lmax_sh=2, cutoff=5.0)
        ungated.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith("pair_gate.")})
        with torch.no_grad():  # the edge MLP reads the invariants linearly first: halve its weights on them
            ungated.edge_mlp[0].weight[:, -ungated.irreps_pair.num_irreps :] *= 0.5
        torch.testing.assert_close(run(x, pos), ungated(x, pos[edge_index[1]] - pos[edge_index[0]], edge_index))


def test_the_check_catches_a_wrongly_reshaped_layer_norm():
    # The public code's mistake: reading a (mul x (2l+1)) block as ((2l+1) x mul). Equivariant while the
    # per-channel scales are equal, broken once they differ -- the shared check must see it.
    from equivariance import equivariance_error

    scale = torch.tensor([0.5, 1.0, 1.5, 2.0])

    def wrong(x):
        block = x.reshape(-1, 3, 4)
        return (block / block.pow(2).mean((1, 2), keepdim=True).sqrt() * scale).reshape(-1, 12)

    assert equivariance_error(wrong, [(torch.randn(5, 12), "4x1o")], "4x1o") > 1e-2


def test_pyscf_axes_block_is_equivariant_in_the_permuted_frame():
    # With sh_axes="pyscf" the features live in the frame (y, z, x): rotating the molecule by R acts on them
    # through D(P R P^T).
    with default_dtype(torch.float64):
        block = InteractionBlock(FEAT, FEAT, lmax_sh=2, cutoff=5.0, sh_axes="pyscf")
        perm = torch.eye(3)[[1, 2, 0]]
        features = lambda rot: o3.Irreps(FEAT).D_from_matrix(perm @ rot @ perm.T)  # noqa: E731
        edge_index = torch.tensor([(i, j) for i in range(5) for j in range(5) if i != j]).T
        x, pos = torch.randn(5, 26), torch.randn(5, 3)

        def run(x, pos):
            return block(x, pos[edge_index[1]] - pos[edge_index[0]], edge_index)

        assert_equivariant(run, [(x, features), (pos, "cartesian")], features)
