"""MAML engine: exact meta-gradients (closed form and finite differences), vmap == loop, ANIL, Meta-SGD."""
import pytest
import torch

from metaham.meta import MAML, MetaTask

from meta_problems import hamiltonian_task, linear_loss, linear_task, make_linear_model, tiny_hnn


def _hessian_and_grad(w, data):
    # For L(w) = mean((X w - y)^2): gradient 2/N X^T (X w - y), Hessian 2/N X^T X.
    x, y = data
    n = x.shape[0]
    return 2.0 / n * x.T @ x, 2.0 / n * x.T @ (x @ w - y)


def _closed_form(w, task, lr, steps, first_order):
    """Meta-gradient of one task's query loss after `steps` SGD steps of rate `lr` (vector or scalar)."""
    h_s, _ = _hessian_and_grad(w, task.support)
    fast = w
    for _ in range(steps):
        fast = fast - lr * _hessian_and_grad(fast, task.support)[1]
    g_q = _hessian_and_grad(fast, task.query)[1]
    if first_order:
        return g_q
    jac_t = torch.eye(len(w), dtype=w.dtype) - h_s * lr  # (I - diag(lr) H_s)^T = I - H_s diag(lr)
    return torch.linalg.matrix_power(jac_t, steps) @ g_q


@pytest.mark.parametrize("vmap", [True, False])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_linear_regression_meta_gradient_is_exact(vmap, first_order, steps):
    linear_model = make_linear_model()
    tasks = [linear_task() for _ in range(3)]
    maml = MAML(linear_model, loss=linear_loss, inner_lr=0.05, inner_steps=steps, first_order=first_order, vmap=vmap)
    maml.meta_loss(tasks).backward()
    w = linear_model.weight.detach()[0]
    expected = torch.stack([_closed_form(w, t, 0.05, steps, first_order) for t in tasks]).mean(0)
    torch.testing.assert_close(linear_model.weight.grad[0], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_sgd_gradients_are_exact(first_order):
    linear_model = make_linear_model()
    tasks = [linear_task() for _ in range(3)]
    maml = MAML(linear_model, loss=linear_loss, inner_lr=0.05, meta_sgd=True, first_order=first_order)
    lr = torch.tensor([0.02, 0.05, 0.08, 0.11], dtype=torch.float64)
    with torch.no_grad():
        maml.inner_lrs[0].copy_(lr[None, :])
    maml.meta_loss(tasks).backward()
    w = linear_model.weight.detach()[0]
    expected_w = torch.stack([_closed_form(w, t, lr, 1, first_order) for t in tasks]).mean(0)
    # d/d lr of L_q(w - lr * g_s(w)) = -g_s(w) * g_q(w'), with or without second-order terms.
    expected_lr = []
    for t in tasks:
        g_s = _hessian_and_grad(w, t.support)[1]
        g_q = _hessian_and_grad(w - lr * g_s, t.query)[1]
        expected_lr.append(-g_s * g_q)
    torch.testing.assert_close(linear_model.weight.grad[0], expected_w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(maml.inner_lrs[0].grad[0], torch.stack(expected_lr).mean(0), rtol=1e-10, atol=1e-12)


def _meta_gradient(maml, tasks):
    maml.zero_grad()
    loss = maml.meta_loss(tasks)
    loss.backward()
    return loss.detach(), [w.grad.clone() for w in maml.parameters()]


@pytest.mark.parametrize(
    "options", [{}, {"first_order": True}, {"anil": True, "meta_sgd": True, "inner_steps": 2}], ids=str
)
def test_vmap_and_loop_give_the_same_meta_gradient(options):
    # Two groups that vmap batches (1 and 3 particles), one task on its own (other point count).
    tasks = [hamiltonian_task(1) for _ in range(3)] + [hamiltonian_task(3) for _ in range(2)]
    tasks.insert(2, hamiltonian_task(1, k=4))
    maml = MAML(tiny_hnn(), inner_lr=0.1, **options)
    loss_vmap, grads_vmap = _meta_gradient(maml, tasks)
    maml.vmap = False
    loss_loop, grads_loop = _meta_gradient(maml, tasks)
    torch.testing.assert_close(loss_vmap, loss_loop, rtol=1e-12, atol=0)
    for a, b in zip(grads_vmap, grads_loop):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_second_order_meta_gradient_of_the_hamiltonian_model_matches_finite_differences():
    tasks = [hamiltonian_task(2) for _ in range(2)]
    maml = MAML(tiny_hnn(), inner_lr=0.1, inner_steps=2, meta_sgd=True)
    params = list(maml.parameters())
    direction = [torch.randn_like(w) for w in params]
    _, grads = _meta_gradient(maml, tasks)
    analytic = sum((g * v).sum() for g, v in zip(grads, direction))

    def shifted(eps):
        with torch.no_grad():
            for w, v in zip(params, direction):
                w.add_(eps * v)
            value = maml.meta_loss(tasks)
            for w, v in zip(params, direction):
                w.sub_(eps * v)
        return value

    eps = 1e-5
    numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
    assert abs(analytic - numeric) <= 1e-6 * abs(numeric)
    # The check has teeth: dropping the second-order terms misses the finite difference by far more.
    maml.first_order = True
    _, grads_fo = _meta_gradient(maml, tasks)
    first_order = sum((g * v).sum() for g, v in zip(grads_fo, direction))
    assert abs(first_order - numeric) > 1e-3 * abs(numeric)


def test_anil_adapts_only_the_readout_but_meta_learns_everything():
    model = tiny_hnn()
    task = hamiltonian_task(2)
    maml = MAML(model, anil=True)
    fast = maml.adapt(task.support, task.graph)
    for name, w in model.named_parameters():
        if name.startswith("readout."):
            assert not torch.equal(fast[name], w), name
        else:
            assert fast[name] is w, name
    maml.meta_loss([task]).backward()
    assert all(w.grad is not None and bool((w.grad != 0).any()) for w in model.backbone.parameters())


def test_bad_settings_and_tasks_are_named():
    linear_model = make_linear_model()
    with pytest.raises(ValueError, match="inner_steps"):
        MAML(linear_model, inner_steps=0)
    with pytest.raises(ValueError, match="inner_lr"):
        MAML(linear_model, inner_lr=-0.1)
    with pytest.raises(ValueError, match="'readout.'"):
        MAML(linear_model, anil=True)
    maml = MAML(linear_model, loss=linear_loss)
    with pytest.raises(ValueError, match="at least one task"):
        maml.meta_loss([])
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="task 1: query"):
        maml.meta_loss([linear_task(), MetaTask((x, x[:, 0]), [x], None)])


def test_task_distribution_tasks_convert_with_one_graph_per_system():
    from tasks.task import PhasePoints, Rollouts, Task

    from metaham.meta import to_meta_tasks

    def task(system, n):
        points = lambda: PhasePoints(*torch.randn(4, 5, n, 2))  # noqa: E731
        rollouts = Rollouts(torch.zeros(1), torch.zeros(1, 1, n, 2), torch.zeros(1, 1, n, 2))
        return Task(system, {}, points(), points(), rollouts)

    originals = [task("three_body", 3), task("mass_spring", 1), task("three_body", 3)]
    converted = to_meta_tasks(originals)
    assert converted[0].graph is converted[2].graph and converted[0].graph.shape == (2, 6)
    assert converted[1].graph.shape == (2, 0)
    assert converted[1].support[2] is originals[1].support.dq and converted[1].query[3] is originals[1].query.dp
    MAML(tiny_hnn().float()).meta_loss(converted)  # runs: two groups (vmap) and a singleton
