"""QH9Model: its matrix (pyscf order) rotates as D H D^T in every sparsity phase; CG by l; gates; errors."""
import numpy as np
import pytest
import torch
from ase.build import molecule
from e3nn import o3
from torch_geometric.data import Batch

from equivariance import pair_gate_margin, recorded_pair_gates
from metaham.nn import SparsePairGate, use_backend
from metaham.qh9.basis import UnsupportedError, n_orbitals
from metaham.qh9.dataset import molecule_data
from metaham.qh9.head import BLOCK_IRREPS, OrbitalExpansion
from metaham.qh9.model import QH9Model, build_model
from metaham.qh9.orbitals import PADDED_IRREPS, wigner_D
from metaham.train import load_checkpoint, save_checkpoint

TINY = dict(
    node_irreps="8x0e+4x1o+4x2e+2x3o+2x4e", layers=2, lmax_sh=2, radial_hidden=16, pair_channels=4, head_mul=4,
    head_hidden=16, residual=False,
)


def _batch(names=("H2O", "CH3OH"), seed=0):
    """Displaced molecules from ase with random symmetric "targets" (for the per-element references).

    Displaced: the gates keep pairs and paths by rank, so at an exact tie (the two O-H bonds of a symmetric
    water) rounding noise of a rotation may flip which of two equal pairs is kept."""
    rng = np.random.default_rng(seed)
    molecules = []
    for k, name in enumerate(names):
        atoms = molecule(name)
        n = n_orbitals(atoms.numbers)
        H = rng.normal(size=(n, n))
        pos = atoms.positions + rng.normal(0.0, 0.05, atoms.positions.shape)
        molecules.append(molecule_data(atoms.numbers, pos, H + H.T, id=k, molecule=name))
    return Batch.from_data_list(molecules)


def _model(phase: str) -> QH9Model:
    """A tiny model in ``phase`` ("random", "adaptive", "fixed" or "dense") whose output is not trivial: random
    gate weights (so the kept paths are not simply the first ones), random channel weights instead of the
    zero start, and per-element references fitted to random targets."""
    model = QH9Model(**TINY, dense=phase == "dense", random_steps=1, adaptive_steps=1)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for gate in model.sparsity.gates:
            if gate.sparsity > 0:
                gate.path_weight.copy_(0.5 + torch.rand(gate.n_paths, generator=generator))
        for mlp in (model.head.diag_weights, model.head.pair_weights):
            mlp[-1].weight.normal_(0.0, 0.3, generator=generator)
    model.fit_statistics([_batch()])
    for _ in range({"random": 0, "adaptive": 1, "fixed": 2, "dense": 0}[phase]):
        model.sparsity.step()
    return model.eval()


def _random_rotation(seed: int, improper: bool) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    rotation = q * torch.sign(torch.det(q))
    return -rotation if improper else rotation


@pytest.mark.parametrize("phase", ["random", "adaptive", "fixed", "dense"])
def test_predicted_matrix_rotates_as_wigner_D_H_DT_in_pyscf_order(phase):
    model = _model(phase)
    assert model.sparsity.phase == ("random" if phase == "dense" else phase)
    batch = _batch()
    with torch.no_grad(), recorded_pair_gates(model) as selections:
        H = model(batch.z, batch.pos, batch.batch, batch.ptr)
        again = model(batch.z, batch.pos, batch.batch, batch.ptr)
        for h, h2 in zip(H, again):  # eval mode is deterministic in every phase, the random one included
            assert torch.equal(h, h2)
        for k, improper in enumerate([False, False, True]):
            R = _random_rotation(k, improper)
            rotated = model(batch.z, batch.pos @ R.T, batch.batch, batch.ptr)
            for b in range(batch.num_graphs):
                Z = batch.z[batch.ptr[b] : batch.ptr[b + 1]]
                D = wigner_D(Z, R)
                want = D @ H[b].double() @ D.T
                scale = H[b].abs().max()
                assert scale > 1e-2  # a trivial output would pass vacuously
                err = float((rotated[b].double() - want).abs().max() / scale)
                assert err < 1e-5, f"{phase}: molecule {b}, rotation {k}: relative error {err:.2e}"
            assert all(torch.allclose(h, h.T) for h in rotated)
    # The premise of the check through the pair gates' hard top-k: the inputs are in general position, no dropped
    # pair within 1e-3 (relative) of its quantile -- ~1e4 times the float32 rounding of a rotation -- so every
    # call kept the same pairs (see equivariance.pair_gate_margin).
    if phase != "dense":
        per_call = len(selections) // 5  # the pair gates of one forward pass; five passes
        assert per_call > 0
        assert all(torch.equal(s.index, selections[i % per_call].index) for i, s in enumerate(selections))
        assert min(pair_gate_margin(s) for s in selections) > 1e-3


def test_fixed_phase_keeps_30_percent_of_each_outputs_paths_dense_twin_has_no_gate():
    sparse, dense = _model("fixed"), _model("dense")
    gates = [g for g in sparse.sparsity.gates if g.sparsity > 0]
    assert sparse.blocks[0].tp.sparsity == 0  # its paths each carry one l out of the scalar embedding
    assert len(gates) == 1 + 2  # the second interaction block, the head's diagonal and pair products
    for gate in gates:
        assert gate.phase == "fixed" and gate.per_output and gate.weight_columns is not None
        for io in range(len(gate.irreps_out)):  # every output irrep keeps round(30%) of its paths, >= 1
            into = [p for p, ins in enumerate(gate.instructions) if ins[2] == io]
            assert sum(p in gate.kept_paths for p in into) == max(1, round(0.3 * len(into)))
    assert sum(isinstance(m, SparsePairGate) for m in sparse.modules()) == 3  # two blocks and the head
    assert not any(isinstance(m, SparsePairGate) for m in dense.modules())
    assert all(g.sparsity == 0 and len(g.kept_paths) == g.n_paths for g in dense.sparsity.gates)


def test_clebsch_gordan_coefficients_are_chosen_by_l_not_by_position():
    """Features listed in a scrambled irreps order still give blocks that rotate as D_row B D_col^T, and the
    path-to-entry map is orthogonal (the full Clebsch-Gordan change of basis)."""
    scrambled = o3.Irreps([(3, ir) for _, ir in reversed(BLOCK_IRREPS)])
    expansion = OrbitalExpansion(scrambled)
    assert torch.allclose(expansion.cg @ expansion.cg.T, torch.eye(PADDED_IRREPS.dim**2), atol=1e-5)
    x = torch.randn(2, scrambled.dim)
    weight = torch.randn(2, expansion.n_channels)
    R = _random_rotation(3, improper=True)
    D_feat = scrambled.D_from_matrix(R.float())
    D_block = PADDED_IRREPS.D_from_matrix(R.float())
    got = expansion(x @ D_feat.T, weight)
    want = D_block @ expansion(x, weight) @ D_block.T
    assert torch.allclose(got, want, atol=1e-5)


def test_orbital_expansion_of_component_major_features_gives_the_same_blocks():
    """``layout="ir_mul"`` reads the features component-major and orders its channels the same way: same
    blocks and gradients as e3nn's layout, same parameters (a checkpoint of either loads into the other)."""
    from metaham.nn.layout import blocks, ir_mul_from_mul_ir

    irreps = o3.Irreps([(3, ir) for _, ir in BLOCK_IRREPS])
    torch.manual_seed(0)
    expansion = OrbitalExpansion(irreps).double()
    component_major = OrbitalExpansion(irreps, layout="ir_mul").double()
    component_major.load_state_dict(expansion.state_dict())
    x = torch.randn(4, irreps.dim, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, expansion.n_channels, dtype=torch.float64, requires_grad=True)
    want = expansion(x, weight)
    got = component_major(ir_mul_from_mul_ir(x, blocks(irreps)), weight)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, [x, weight], g), torch.autograd.grad(want, [x, weight], g)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_checkpoint_reloads_the_fixed_phase_and_its_outputs(tmp_path):
    model = _model("fixed")
    save_checkpoint({"config": model.config, "model": model.state_dict()}, tmp_path / "m.pt")
    state = load_checkpoint(tmp_path / "m.pt")
    clone = build_model(state["config"])
    clone.load_state_dict(state["model"])
    clone.eval()
    assert clone.sparsity.phase == "fixed" and int(clone.sparsity.steps_done) == 2
    assert [g.kept_paths for g in clone.sparsity.gates] == [g.kept_paths for g in model.sparsity.gates]
    batch = _batch()
    with torch.no_grad():
        for a, b in zip(model.predict(batch), clone.predict(batch)):
            assert torch.equal(a, b) and a.dtype == torch.float64


def test_other_elements_and_missing_initial_guess_are_clear_errors():
    model = QH9Model(**TINY)
    Z = torch.tensor([16, 1, 1])  # H2S
    with pytest.raises(UnsupportedError, match=r"S \(Z=16\)"):
        model.blocks_of(Z, torch.randn(3, 3), torch.zeros(3, dtype=torch.long))
    residual = QH9Model(**{**TINY, "residual": True})
    with pytest.raises(ValueError, match="H_init"):
        residual.predict(_batch(("H2O",)))
    with pytest.raises(ValueError, match="unknown model option"):
        build_model({"layers": 1, "widht": 3})


def test_torch_compile_traces_the_model_and_matches_eager():
    """`metaham bench qh9 --compile` times the model under torch.compile. Tracing fails if a forward pass
    iterates e3nn irreps (e3nn's ``Irrep.__len__`` raises inside dynamo's guards): the layers read plain-int
    blocks (``metaham.nn.layout``). Two batches of different sizes go through one dynamic-shape compile.
    Backend ``eager``: dynamo's tracing and guards, where that failure happens, without inductor's C++ code
    generation (minutes on this CPU; the bench's runs compare inductor's output with eager)."""
    model = _model("fixed")
    compiled = torch.compile(model, dynamic=True, backend="eager")
    with torch.no_grad():
        for names in (("H2O", "CH3OH"), ("CH4", "H2O", "C2H6")):
            batch = _batch(names)
            args = (batch.z, batch.pos, batch.batch, batch.ptr)
            for want, got in zip(model(*args), compiled(*args)):
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("phase", ["fixed", "dense"])
def test_cuequivariance_backend_predicts_the_same_matrices(phase):
    """Every tensor product of a fixed-phase (or dense) model run by cuequivariance-torch: the same matrices."""
    pytest.importorskip("cuequivariance_torch")
    model, batch = _model(phase), _batch()
    with torch.no_grad():
        ours = model.predict(batch)
        assert use_backend(model, "cuequivariance") == len(model.sparsity.gates) > 0
        assert {gate.runs_on for gate in model.sparsity.gates} == {"cuequivariance"}
        theirs = model.predict(batch)
    for a, b in zip(theirs, ours, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))
