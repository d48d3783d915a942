"""SparsityScheduler: phases switch at the configured optimizer steps only; checkpoints restore every phase."""
import pytest
import torch
from torch import nn

from metaham.nn import InteractionBlock, SparseTensorProduct, SparsityScheduler
from metaham.train.checkpoint import load_checkpoint, save_checkpoint

FEAT = "4x0e+4x1o+2x2e"
SH = "0e+1o+2e"


class _Model(nn.Module):
    """Two gates (an interaction block's and an internal-weight uvw head) driven by one scheduler."""

    def __init__(self, random_steps=2, adaptive_steps=2):
        super().__init__()
        self.block = InteractionBlock(FEAT, FEAT, lmax_sh=2, cutoff=4.0, tp_sparsity=0.5)
        self.head = SparseTensorProduct(FEAT, FEAT, "4x0e", mode="uvw", sparsity=0.5, internal_weights=True)
        self.sparsity = SparsityScheduler(self, random_steps, adaptive_steps)

    def forward(self, x, edge_vec, edge_index):
        h = self.block(x, edge_vec, edge_index)
        return self.head(h, h)


def _graph(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(n, 3, generator=g)
    edge_index = torch.tensor([(i, j) for i in range(n) for j in range(n) if i != j]).T
    x = torch.randn(n, 26, generator=g)
    return x, pos[edge_index[1]] - pos[edge_index[0]], edge_index


def test_phases_switch_at_configured_optimizer_steps_not_on_forward_calls():
    tp = SparseTensorProduct(FEAT, SH, FEAT, sparsity=0.5)
    holder = nn.Module()
    holder.tp = tp
    sched = SparsityScheduler(holder, random_steps=2, adaptive_steps=3)
    x1, x2 = torch.randn(4, 26), torch.randn(4, 9)
    w = torch.randn(4, tp.weight_numel)
    seen = [sched.phase]
    for _ in range(7):
        for training in (True, False, True):  # evaluation and training forwards never count
            tp.train(training)
            tp(x1, x2, w)
        assert int(sched.steps_done) == len(seen) - 1
        seen.append(sched.step())
        assert tp.phase == seen[-1]
    assert seen == ["random", "random", "adaptive", "adaptive", "adaptive", "fixed", "fixed", "fixed"]
    assert int(sched.steps_done) == 7


@pytest.mark.parametrize("random_steps, adaptive_steps, first", [(0, 3, "adaptive"), (0, 0, "fixed"), (4, 0, "random")])
def test_zero_length_phases_are_skipped(random_steps, adaptive_steps, first):
    model = _Model(random_steps, adaptive_steps)
    assert model.sparsity.phase == first
    assert model.block.tp.phase == model.head.phase == first


def test_scheduler_drives_every_gate_and_reselects_after_optimizer_steps():
    torch.manual_seed(0)
    model = _Model(random_steps=1, adaptive_steps=3)
    assert model.sparsity.gates == (model.block.tp, model.head)
    model.sparsity.step()
    assert model.block.tp.phase == model.head.phase == "adaptive"
    with torch.no_grad():
        model.head.path_weight.copy_(torch.tensor([0.1, 0.2, 3.0]))
    model.sparsity.step()
    assert model.head.kept_paths == (1, 2)
    with torch.no_grad():
        model.head.path_weight.copy_(torch.tensor([3.0, 0.2, 0.1]))
    model.sparsity.step()  # still adaptive: the set follows the weights
    assert model.head.kept_paths == (0, 1)
    model.sparsity.step()  # enters fixed: freezes this set
    with torch.no_grad():
        model.head.path_weight.copy_(torch.tensor([0.1, 0.2, 3.0]))
    model.sparsity.step()
    assert model.sparsity.phase == "fixed" and model.head.kept_paths == (0, 1)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2", None])
def test_bad_phase_lengths_are_clear_errors(bad):
    with pytest.raises(ValueError, match="random_steps"):
        SparsityScheduler(nn.Module(), bad, 1)
    with pytest.raises(ValueError, match="adaptive_steps"):
        SparsityScheduler(nn.Module(), 1, bad)


@pytest.mark.parametrize("steps, phase", [(1, "random"), (3, "adaptive"), (5, "fixed")])
def test_checkpoint_round_trip_restores_the_phase_exactly(tmp_path, steps, phase):
    torch.manual_seed(0)
    model = _Model(random_steps=2, adaptive_steps=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, edge_vec, edge_index = _graph()
    for _ in range(steps):
        optimizer.zero_grad()
        model(x, edge_vec, edge_index).pow(2).mean().backward()
        optimizer.step()
        model.sparsity.step()
    assert model.sparsity.phase == phase
    save_checkpoint({"model": model.state_dict()}, tmp_path / "ckpt.pt")

    torch.manual_seed(123)  # a fresh model with other weights, in the random phase
    fresh = _Model(random_steps=2, adaptive_steps=2)
    assert fresh.sparsity.phase == "random"
    fresh.load_state_dict(load_checkpoint(tmp_path / "ckpt.pt")["model"])
    assert fresh.sparsity.phase == phase and int(fresh.sparsity.steps_done) == steps
    for old, new in ((model.block.tp, fresh.block.tp), (model.head, fresh.head)):
        assert new.phase == old.phase == phase
        assert new.kept_paths == old.kept_paths
    model.eval()
    fresh.eval()
    assert torch.equal(model(x, edge_vec, edge_index), fresh(x, edge_vec, edge_index))
    model.train()
    fresh.train()
    torch.manual_seed(7)
    a = model(x, edge_vec, edge_index)
    torch.manual_seed(7)
    assert torch.equal(a, fresh(x, edge_vec, edge_index))
    # Training continues from the same step: the next phase switch comes at the same count.
    assert fresh.sparsity.step() == model.sparsity.step()


def test_reloaded_fixed_checkpoint_is_compact_without_a_forward_pass():
    gate = SparseTensorProduct(FEAT, SH, FEAT, sparsity=0.7)
    with torch.no_grad():
        gate.path_weight.copy_(torch.arange(gate.n_paths, dtype=torch.float32))
    gate.set_phase("fixed")
    fresh = SparseTensorProduct(FEAT, SH, FEAT, sparsity=0.7)
    fresh.load_state_dict(gate.state_dict())
    assert fresh.phase == "fixed"
    assert fresh.kept_paths == tuple(range(gate.n_paths - gate.n_keep, gate.n_paths))
    assert "paths=2/7 (fixed)" in repr(fresh)
