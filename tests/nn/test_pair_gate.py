"""SparsePairGate: per-graph quantile on batches of different graphs, gating, gradients, no work for dropped pairs."""
import pytest
import torch
from e3nn import o3

from equivariance import assert_equivariant, default_dtype, pair_gate_margin
from metaham.nn import InteractionBlock, PairInvariants, SparsePairGate
from metaham.nn.pair_gate import _segment_quantile
from metaham.nn.sparse_tp import n_kept

FEAT = "4x0e+4x1o+2x2e"


def _batch(sizes=(3, 5, 7, 1), seed=0):
    """Fully connected graphs of the given sizes in one batch (a 1-node graph has no pair)."""
    g = torch.Generator().manual_seed(seed)
    first = [sum(sizes[:k]) for k in range(len(sizes))]
    edges = [(first[k] + i, first[k] + j) for k, n in enumerate(sizes) for i in range(n) for j in range(n) if i != j]
    batch = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    x = torch.randn(len(batch), 26, generator=g)
    pos = 1.5 * torch.randn(len(batch), 3, generator=g)
    edge_index = torch.tensor(edges).T
    return x, pos, edge_index, batch


def _invariants_by_hand(irreps, x, edge_index):
    out = []
    for i, j in edge_index.T.tolist():
        row, start = [], 0
        for mul, ir in o3.Irreps(irreps):
            a = x[i, start : start + mul * ir.dim].reshape(mul, ir.dim)
            b = x[j, start : start + mul * ir.dim].reshape(mul, ir.dim)
            row.append(0.5 * (a + b)[:, 0] if ir == o3.Irrep("0e") else (a * b).sum(1) / ir.dim)
            start += mul * ir.dim
        out.append(torch.cat(row))
    return torch.stack(out)


def test_pair_invariants_are_means_of_scalars_and_channel_inner_products():
    x, _, edge_index, _ = _batch()
    irreps = "4x0e+2x0o+4x1o+2x2e"
    x = torch.randn(x.shape[0], o3.Irreps(irreps).dim)
    inv = PairInvariants(irreps)
    assert inv.n_invariants == 12
    torch.testing.assert_close(inv(x, edge_index), _invariants_by_hand(irreps, x, edge_index))
    assert torch.equal(inv(x, edge_index.flip(0)), inv(x, edge_index))  # symmetric bit for bit


def test_a_gate_given_the_invariants_selects_what_it_computes_itself():
    x, _, edge_index, batch = _batch()
    gate = SparsePairGate(FEAT, 0.5)
    own = gate(x, edge_index, batch)
    given = gate(x, edge_index, batch, invariants=gate.invariants(x, edge_index))
    assert torch.equal(given.index, own.index)
    torch.testing.assert_close(given.invariants, own.invariants)
    with pytest.raises(ValueError, match="invariants must have shape"):
        gate(x, edge_index, batch, invariants=gate.invariants(x, edge_index)[1:])


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7])
def test_each_graph_keeps_its_share_at_or_above_its_quantile(sparsity):
    x, _, edge_index, batch = _batch()
    gate = SparsePairGate(FEAT, sparsity)
    sel = gate(x, edge_index, batch)
    graph = batch[edge_index[0]]
    kept = torch.zeros(edge_index.shape[1], dtype=torch.bool)
    kept[sel.index] = True
    for g in graph.unique():
        in_g = graph == g
        scores = sel.score[in_g]
        k = n_kept(sparsity, int(in_g.sum()))
        threshold = torch.sort(scores, descending=True).values[k - 1]
        # (i, j) and (j, i) share one score: the pair at the quantile keeps both directions, k + 1 when k is odd.
        assert int(kept[in_g].sum()) == k + k % 2
        assert torch.all(sel.threshold[in_g] == threshold)
        assert torch.all(scores[kept[in_g]] >= threshold) and torch.all(scores[~kept[in_g]] < threshold)


def test_per_batch_option_uses_one_quantile():
    x, _, edge_index, batch = _batch()
    sel = SparsePairGate(FEAT, 0.7, per_graph=False)(x, edge_index, batch)
    assert n_kept(0.7, edge_index.shape[1]) <= len(sel.index) <= n_kept(0.7, edge_index.shape[1]) + 1
    assert torch.all(sel.threshold == sel.threshold[0])


def test_kept_invariants_are_scaled_by_sigmoid_of_the_margin_and_the_scorer_learns():
    with default_dtype(torch.float64):  # float64: the finite differences below are then accurate to ~1e-10
        x, _, edge_index, batch = _batch()
        x = x.double()
        gate = SparsePairGate(FEAT, 0.6)
        sel = gate(x, edge_index, batch)
        # General position: no dropped pair within 1e-3 (relative) of its quantile, so neither the bias shift nor
        # the finite-difference steps below (which move the scores by < 1e-5) can change the kept set.
        assert pair_gate_margin(sel) > 1e-3
        inv = _invariants_by_hand(FEAT, x, edge_index)
        margin = (sel.score - sel.threshold)[sel.index]
        torch.testing.assert_close(sel.invariants, inv[sel.index] * torch.sigmoid(margin)[:, None])
        assert torch.all(torch.sigmoid(margin) >= 0.5)
        sel.score.retain_grad()
        sel.invariants.sum().backward()

        # The bias shifts every score and so every quantile by the same amount: the kept set and the output do
        # not depend on it, and its gradient is zero in exact arithmetic. What remains is the round-off of
        # summing the per-pair gradients, below (number of pairs) * eps * (their total size): a bound of 2e-13
        # here, for ~1e-15 seen. A quantile that did not follow the scores would leave the order of that total.
        total = float(sel.score.grad.abs().sum())
        assert total > 1e-3
        assert abs(float(gate.scorer.bias.grad)) <= edge_index.shape[1] * torch.finfo(torch.float64).eps * total
        with torch.no_grad():
            gate.scorer.bias.add_(3.0)
        shifted = gate(x, edge_index, batch)
        assert torch.equal(shifted.index, sel.index)
        torch.testing.assert_close(shifted.invariants, sel.invariants, rtol=1e-12, atol=1e-12)  # rounding only
        with torch.no_grad():
            gate.scorer.bias.sub_(3.0)

        # The weights do learn: their gradient is not zero and is the derivative of the output (central finite
        # differences along a random direction; truncation ~step^2, round-off ~1e-16 / step, both < 1e-8 here).
        analytic = gate.scorer.weight.grad
        assert analytic.abs().max() > 1e-3
        direction = torch.randn_like(analytic)
        step = 1e-5

        def output(sign):
            with torch.no_grad():
                gate.scorer.weight.add_(sign * step * direction)
                moved = gate(x, edge_index, batch)
                gate.scorer.weight.sub_(sign * step * direction)
            assert torch.equal(moved.index, sel.index)
            return moved.invariants.sum()

        numeric = (output(1.0) - output(-1.0)) / (2 * step)
        torch.testing.assert_close((analytic * direction).sum(), numeric, rtol=1e-6, atol=1e-8)


def test_both_directions_of_a_pair_have_one_score_and_are_kept_or_dropped_together():
    # The two directions of a pair have equal scores in exact arithmetic; when the quantile falls on one of them
    # (an odd k) both must be kept, on every CPU, so the scores must be equal bit for bit: a matrix product may
    # round two equal rows differently (scoring each direction on its own split a few in a thousand of these
    # selections, depending on the CPU's kernels). Many graphs, both precisions, every k.
    for dtype in (torch.float32, torch.float64):
        for n in range(3, 7):
            edge_index = torch.tensor([(i, j) for i in range(n) for j in range(n) if i != j]).T
            partner = _partner(edge_index)
            for seed in range(4):
                g = torch.Generator().manual_seed(seed)
                x = torch.randn(n, 26, generator=g, dtype=dtype)
                gate = SparsePairGate(FEAT, 0.5).to(dtype)
                with torch.no_grad():
                    gate.scorer.weight.copy_(torch.randn(gate.scorer.weight.shape, generator=g))
                for k in range(1, edge_index.shape[1]):
                    gate.sparsity = 1 - k / edge_index.shape[1]
                    sel = gate(x, edge_index)
                    assert torch.equal(sel.score, sel.score[partner])
                    kept = torch.zeros(edge_index.shape[1], dtype=torch.bool)
                    kept[sel.index] = True
                    assert torch.equal(kept, kept[partner]) and int(kept.sum()) == k + k % 2


def test_exact_ties_at_the_quantile_are_all_kept_whatever_the_pair_order():
    # Scores that tie exactly on every CPU: small integers and halves, which every summation order adds exactly.
    # Scalar features only, so the invariants are the endpoints' means: scores 0.5 * (x_i + x_j) with x = 0, 1, 1, 2.
    gate = SparsePairGate("2x0e", 0.5)
    with torch.no_grad():
        gate.scorer.weight.copy_(torch.tensor([[1.0, 0.0]]))
        gate.scorer.bias.zero_()
    x = torch.tensor([[0.0, 5.0], [1.0, -3.0], [1.0, 7.0], [2.0, 1.0]])
    edge_index = torch.tensor([(i, j) for i in range(4) for j in range(4) if i != j]).T

    def kept_pairs(gate, edge_index):
        sel = gate(x, edge_index)
        return {tuple(edge_index[:, e].tolist()) for e in sel.index}, sel

    # 12 scores: 1.5 (x4), 1.0 (x4), 0.5 (x4). Sparsity 0.5 keeps k = 6: the 6th largest is 1.0, so all four
    # tied at 1.0 are kept (8 pairs), and those exactly at the quantile are gated by sigmoid(0) = 1/2.
    pairs, sel = kept_pairs(gate, edge_index)
    assert pairs == {(i, j) for i in range(4) for j in range(4) if i != j and x[i, 0] + x[j, 0] >= 2}
    assert len(pairs) == 8 and torch.all(sel.threshold == 1.0)
    at_quantile = sel.score[sel.index] == 1.0
    by_hand = _invariants_by_hand("2x0e", x, edge_index)[sel.index]
    torch.testing.assert_close(sel.invariants[at_quantile], 0.5 * by_hand[at_quantile])
    # The choice does not depend on the order in which the pairs are listed.
    for seed in range(3):
        order = torch.randperm(edge_index.shape[1], generator=torch.Generator().manual_seed(seed))
        assert kept_pairs(gate, edge_index[:, order])[0] == pairs
    # Sparsity 0.9 keeps k = 1: the best score, 1.5, is shared by two pairs (four directions); all are kept.
    gate.sparsity = 0.9
    pairs, _ = kept_pairs(gate, edge_index)
    assert pairs == {(1, 3), (3, 1), (2, 3), (3, 2)}


def _partner(edge_index):
    """For each column (i, j) of edge_index, the column of (j, i)."""
    reverse = {(int(i), int(j)): e for e, (i, j) in enumerate(edge_index.T)}
    return torch.tensor([reverse[(int(j), int(i))] for i, j in edge_index.T])


def test_scores_are_symmetric_and_invariant():
    x, _, edge_index, batch = _batch()
    gate = SparsePairGate(FEAT, 0.5)
    score = gate(x, edge_index, batch).score
    assert torch.equal(score, score[_partner(edge_index)])  # one score per pair, see the test above
    n_edges = edge_index.shape[1]
    assert_equivariant(lambda x: gate(x, edge_index, batch).score, [(x, FEAT)], f"{n_edges}x0e")


def test_dropped_pairs_send_no_message_and_cost_no_compute():
    x, pos, edge_index, batch = _batch()
    block = InteractionBlock(FEAT, FEAT, lmax_sh=2, cutoff=10.0, pair_sparsity=0.7)
    rows = []
    block.tp.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    edge_vec = pos[edge_index[1]] - pos[edge_index[0]]
    out = block(x, edge_vec, edge_index, batch)
    pair_features = block.pre(x)[:, block.irreps_in.dim :]
    kept = block.pair_gate(pair_features, edge_index, batch).index
    assert rows == [len(kept)] and len(kept) < 0.4 * edge_index.shape[1]
    dropped = torch.ones(edge_index.shape[1], dtype=torch.bool)
    dropped[kept] = False
    moved = edge_vec.clone()
    moved[dropped] *= 0.5  # geometry of dropped pairs does not matter
    assert torch.equal(block(x, moved, edge_index, batch), out)
    moved = edge_vec.clone()
    moved[kept[0]] *= 0.5  # geometry of a kept pair does
    assert not torch.allclose(block(x, moved, edge_index, batch), out)


def test_pair_sparsity_is_validated():
    with pytest.raises(ValueError, match="pair sparsity"):
        SparsePairGate(FEAT, 1.0)
    with pytest.raises(ValueError, match="pair sparsity"):
        InteractionBlock(FEAT, FEAT, pair_sparsity=-0.2)


def test_exempt_pairs_are_always_kept_ungated_and_the_rest_compete_among_themselves():
    x, pos, edge_index, batch = _batch()
    length = (pos[edge_index[1]] - pos[edge_index[0]]).norm(dim=-1)
    # The radius is the median length itself: make the two directions' lengths equal bit for bit (elementwise
    # max is exact), so that this mask and the gate agree on every pair, the one at the radius included.
    length = torch.maximum(length, length[_partner(edge_index)])
    exempt = length < length.median()
    gate = SparsePairGate(FEAT, 0.7, keep_radius=float(length.median()))
    with torch.no_grad():  # make the exempt pairs score lowest: a plain quantile would drop them all
        gate.scorer.weight.zero_()
    sel = gate(x, edge_index, batch, length)
    with pytest.raises(ValueError, match="pass their lengths"):
        gate(x, edge_index, batch)
    kept = torch.zeros_like(exempt)
    kept[sel.index] = True
    assert kept[exempt].all()
    graph = batch[edge_index[0]]
    for g in graph.unique():
        free = (graph == g) & ~exempt
        k = n_kept(0.7, int(free.sum())) if free.any() else 0
        assert k <= int(kept[free].sum()) <= k + 1 or int(kept[free].sum()) == int(free.sum())  # ties keep more
    inv = _invariants_by_hand(FEAT, x, edge_index)
    position = {int(e): r for r, e in enumerate(sel.index)}
    rows = torch.tensor([position[int(e)] for e in torch.nonzero(exempt).flatten()])
    torch.testing.assert_close(sel.invariants[rows], inv[exempt])  # exempt: factor 1
    assert torch.all(sel.threshold[exempt] == -torch.inf)


def test_interaction_block_never_drops_pairs_within_the_keep_radius():
    x, pos, edge_index, batch = _batch(sizes=(3, 4))  # tiny graphs: a plain 0.7 gate keeps 2 of 6 pairs
    edge_vec = pos[edge_index[1]] - pos[edge_index[0]]
    # A radius half way between the 6th and 7th shortest of the 9 pairs (each listed twice), far from every
    # length, so that rounding of the lengths cannot decide which pairs are short.
    lengths = edge_vec.norm(dim=-1).sort().values
    assert lengths[12] - lengths[11] > 1e-3 * lengths[12]
    radius = float(lengths[11] + lengths[12]) / 2
    rows = []
    block = InteractionBlock(FEAT, FEAT, lmax_sh=2, cutoff=100.0, pair_sparsity=0.7, pair_keep_radius=radius)
    block.tp.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    out = block(x, edge_vec, edge_index, batch)
    short = edge_vec.norm(dim=-1) < radius
    assert rows[0] >= int(short.sum()) + 1
    moved = edge_vec.clone()
    moved[torch.nonzero(short).flatten()[0]] *= 0.9  # every short pair sends a message
    assert not torch.allclose(block(x, moved, edge_index, batch), out)
    with pytest.raises(ValueError, match="pair_keep_radius"):
        InteractionBlock(FEAT, FEAT, pair_sparsity=0.7, pair_keep_radius=-1.0)


def test_segment_quantile_is_each_segments_kth_largest_with_empty_segments_and_ties():
    g = torch.Generator().manual_seed(3)
    # Segment 1 is empty (a graph without pairs between two with pairs); segment 3 holds ties at its quantile.
    segment = torch.tensor([0, 2, 0, 3, 2, 0, 3, 3, 2, 0, 3, 2, 2, 0])
    score = torch.randn(len(segment), generator=g, dtype=torch.float64)
    score[segment == 3] = torch.tensor([0.5, 0.5, 0.5, -1.0], dtype=torch.float64)
    score.requires_grad_()
    for sparsity in (0.0, 0.3, 0.5, 0.9):
        threshold = _segment_quantile(score, segment, sparsity)
        for s in (0, 2, 3):
            members = score.detach()[segment == s]
            k = n_kept(sparsity, len(members))
            assert torch.all(threshold[segment == s] == torch.sort(members, descending=True).values[k - 1])
    # Differentiable: the gradient of a segment's threshold lands on one score that holds its value.
    (grad,) = torch.autograd.grad(_segment_quantile(score, segment, 0.5)[segment == 0].sum(), score)
    assert int((grad != 0).sum()) == 1 and float(grad.sum()) == float((segment == 0).sum())
    assert score[grad != 0].item() == _segment_quantile(score, segment, 0.5)[segment == 0][0].item()
