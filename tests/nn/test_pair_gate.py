"""SparsePairGate: per-graph quantile on batches of different graphs, gating, gradients, no work for dropped pairs."""
import pytest
import torch
from e3nn import o3

from metaham.nn import InteractionBlock, PairInvariants, SparsePairGate
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
        # Scores are symmetric, so (i, j) and (j, i) tie: the pair at the quantile keeps both directions.
        assert k <= int(kept[in_g].sum()) <= k + 1
        assert torch.all(sel.threshold[in_g] == threshold)
        assert torch.all(scores[kept[in_g]] >= threshold) and torch.all(scores[~kept[in_g]] < threshold)


def test_per_batch_option_uses_one_quantile():
    x, _, edge_index, batch = _batch()
    sel = SparsePairGate(FEAT, 0.7, per_graph=False)(x, edge_index, batch)
    assert n_kept(0.7, edge_index.shape[1]) <= len(sel.index) <= n_kept(0.7, edge_index.shape[1]) + 1
    assert torch.all(sel.threshold == sel.threshold[0])


def test_kept_invariants_are_scaled_by_sigmoid_of_the_margin_and_the_scorer_learns():
    x, _, edge_index, batch = _batch()
    gate = SparsePairGate(FEAT, 0.6)
    sel = gate(x, edge_index, batch)
    inv = _invariants_by_hand(FEAT, x, edge_index)
    margin = (sel.score - sel.threshold)[sel.index]
    torch.testing.assert_close(sel.invariants, inv[sel.index] * torch.sigmoid(margin)[:, None])
    assert torch.all(torch.sigmoid(margin) >= 0.5)
    sel.invariants.sum().backward()
    assert gate.scorer.weight.grad.abs().sum() > 0 and gate.scorer.bias.grad.abs().sum() > 0


def test_scores_are_symmetric_and_invariant():
    from equivariance import assert_equivariant

    x, _, edge_index, batch = _batch()
    gate = SparsePairGate(FEAT, 0.5)
    score = gate(x, edge_index, batch).score
    reverse = {(int(i), int(j)): e for e, (i, j) in enumerate(edge_index.T)}
    partner = torch.tensor([reverse[(int(j), int(i))] for i, j in edge_index.T])
    torch.testing.assert_close(score, score[partner])
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
    radius = float(edge_vec.norm(dim=-1).quantile(0.6))
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
