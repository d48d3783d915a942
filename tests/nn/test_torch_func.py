"""torch.func: functional_call + grad (first and second order) and vmap agree with plain eager autograd.

Second order is checked the way MAML uses it: the gradient, through one inner SGD step, of the loss at the
adapted parameters. All in float64 so that agreement is to rounding.
"""
import pytest
import torch
from torch.func import functional_call, grad, vmap

from equivariance import default_dtype, pair_gate_margin, recorded_pair_gates
from metaham.nn import InteractionBlock, SparseTensorProduct

FEAT = "4x0e+4x1o+2x2e"
LR = 0.1


def _edges(n):
    return torch.tensor([(i, j) for i in range(n) for j in range(n) if i != j]).T


def _make(kind, phase, pair_sparsity=None):
    if kind == "tp":
        module = SparseTensorProduct(FEAT, FEAT, "4x0e+4x1o+2x2e+2x1e", mode="uvw", sparsity=0.5, internal_weights=True)
    else:
        module = InteractionBlock(FEAT, FEAT, lmax_sh=2, cutoff=4.0, tp_sparsity=0.5, pair_sparsity=pair_sparsity)
    for m in module.modules():
        if isinstance(m, SparseTensorProduct):
            with torch.no_grad():
                m.path_weight.copy_(torch.rand(m.n_paths) + 0.5)
            m.set_phase(phase)
    return module.train()


def _inputs(kind, seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 26, generator=g, dtype=torch.float64)
    if kind == "tp":
        return (x, torch.randn(n, 26, generator=g, dtype=torch.float64))
    pos = torch.randn(n, 3, generator=g, dtype=torch.float64)
    edge_index = _edges(n)
    return (x, pos[edge_index[1]] - pos[edge_index[0]], edge_index)


def _loss(module, params, inputs):
    torch.manual_seed(3)  # the random phase draws the same paths in every call
    return functional_call(module, params, inputs).pow(2).mean()


def _maml(module, params, inputs):
    g = grad(lambda p: _loss(module, p, inputs))(params)
    return _loss(module, {k: v - LR * g[k] for k, v in params.items()}, inputs)


def _eager(module, inputs):
    """(gradient, MAML meta-gradient) with torch.autograd only."""
    names, leaves = zip(*module.named_parameters())
    zero = lambda g, p: torch.zeros_like(p) if g is None else g  # noqa: E731
    loss = _loss(module, dict(zip(names, leaves)), inputs)
    g = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    g = [zero(gi, p) for gi, p in zip(g, leaves)]
    adapted = {k: p - LR * gi for k, p, gi in zip(names, leaves, g)}
    meta = torch.autograd.grad(_loss(module, adapted, inputs), leaves, allow_unused=True)
    return {k: gi.detach() for k, gi in zip(names, g)}, {k: zero(m, p) for k, m, p in zip(names, meta, leaves)}


def _close(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-11, msg=k)


@pytest.mark.parametrize(
    "kind, phase, pair_sparsity",
    [
        ("tp", "random", None), ("tp", "adaptive", None), ("tp", "fixed", None),
        ("block", "random", None), ("block", "adaptive", None), ("block", "fixed", None),
        ("block", "random", 0.5), ("block", "adaptive", 0.5), ("block", "fixed", 0.5),
    ],
)
def test_grad_and_second_order_match_eager(kind, phase, pair_sparsity):
    with default_dtype(torch.float64):
        module = _make(kind, phase, pair_sparsity)
        inputs = _inputs(kind)
        params = {k: v.detach() for k, v in module.named_parameters()}
        with recorded_pair_gates(module) as selections:
            eager_grad, eager_meta = _eager(module, inputs)
        # With a pair gate, the premise of comparing two computations that round differently: no dropped pair
        # within 1e-6 (relative) of its quantile, at the parameters and at the adapted ones (float64 rounding
        # is ~1e-16), so both keep the same pairs.
        assert pair_sparsity is None or min(pair_gate_margin(s) for s in selections) > 1e-6
        _close(grad(lambda p: _loss(module, p, inputs))(params), eager_grad)
        _close(grad(lambda p: _maml(module, p, inputs))(params), eager_meta)
        gate_grads = [eager_grad[k] for k in eager_grad if k.endswith("path_weight")]
        # The gate weights train until the fixed phase folds them into the compact product as constants.
        assert gate_grads and all((g.abs().sum() > 0) == (phase != "fixed") for g in gate_grads)
        if pair_sparsity is not None:
            assert eager_grad["pair_gate.scorer.weight"].abs().sum() > 0  # and so does the pair scorer


@pytest.mark.parametrize(
    "kind, phase", [("tp", "adaptive"), ("tp", "fixed"), ("block", "adaptive"), ("block", "fixed"), ("tp", "random")]
)
def test_vmap_over_tasks_matches_a_loop(kind, phase):
    # The random phase draws paths from the RNG: vmap needs randomness="same" (one draw for all tasks).
    with default_dtype(torch.float64):
        module = _make(kind, phase)
        params = {k: v.detach() for k, v in module.named_parameters()}
        tasks = [_inputs(kind, seed=s) for s in range(3)]
        # Per-task parameters too (as after MAML's inner step): the kept set stays the shared one.
        g = torch.Generator().manual_seed(9)
        batched_params = {k: torch.stack([v + 0.01 * torch.randn(v.shape, generator=g) for _ in tasks]) for k, v in params.items()}
        batched_inputs = [torch.stack(parts) for parts in zip(*tasks)]
        if kind == "block":
            batched_inputs[2] = tasks[0][2]  # same graph for every task: not batched
        in_dims = (0, 0, 0) if kind == "tp" else (0, 0, 0, None)

        def task_grad(p, *inputs):
            return grad(lambda q: _maml(module, q, inputs))(p)

        got = vmap(task_grad, in_dims=in_dims, randomness="same")(batched_params, *batched_inputs)
        for t, inputs in enumerate(tasks):
            want = task_grad({k: v[t] for k, v in batched_params.items()}, *inputs)
            _close({k: v[t] for k, v in got.items()}, want)
        outputs = vmap(lambda p, *i: _loss(module, p, i), in_dims=in_dims, randomness="same")(batched_params, *batched_inputs)
        for t, inputs in enumerate(tasks):
            torch.testing.assert_close(outputs[t], _loss(module, {k: v[t] for k, v in batched_params.items()}, inputs))
