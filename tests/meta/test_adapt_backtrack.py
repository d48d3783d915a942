"""Safeguarded adaptation (``backtrack``): a step that does not lower the support loss is halved until it does
(skipped if it never does); steps that descend are plain SGD's; per task under vmap."""
import pytest
import torch

from metaham.meta import MetaTask, adapt
from metaham.meta.adapt import adapt_tasks

from meta_problems import linear_loss, linear_task, make_linear_model


def _support_loss(w, task):
    x, y = task.support
    return float((x @ w - y).pow(2).mean())


def _reference(w, task, lr, steps, backtrack):
    """The rule written out for least squares: try lr, lr/2, ... lr/2^backtrack; keep w if none descends."""
    x, y = task.support
    for _ in range(steps):
        g = 2 / len(y) * x.T @ (x @ w - y)
        for halvings in range(backtrack + 1):
            trial = w - lr * 0.5**halvings * g
            new, old = _support_loss(trial, task), _support_loss(w, task)
            # Premise of comparing with the library's own decisions: none is a near-tie that the two ways of
            # computing the loss (float64, ~1e-16 relative apart) could decide differently.
            assert abs(new - old) > 1e-12 * old
            if new <= old:
                w = trial
                break
    return w


def _unstable_lr(task):
    # Plain SGD on mean((Xw - y)^2) is unstable above 2 / lambda_max(2 X^T X / n); take 8x that.
    x, _ = task.support
    return 8 * len(x) / float(torch.linalg.eigvalsh(x.T @ x).max())


def test_backtracking_stops_the_divergence_of_too_large_a_step():
    torch.manual_seed(0)
    model, task = make_linear_model(), linear_task(n_support=12)
    lr = _unstable_lr(task)
    plain = adapt(model, task.support, task.support, steps=20, lr=lr, loss=linear_loss)
    assert plain.query_loss[-1] > 1e6 * plain.query_loss[0]  # the failure being fixed
    safe = adapt(model, task.support, task.support, steps=20, lr=lr, loss=linear_loss, backtrack=10)
    assert all(b <= a for a, b in zip(safe.query_loss, safe.query_loss[1:]))  # monotone support loss
    assert safe.query_loss[-1] < 0.5 * safe.query_loss[0]
    expected = _reference(model.weight.detach()[0], task, lr, 20, backtrack=10)
    torch.testing.assert_close(safe.params["weight"][0], expected, rtol=1e-10, atol=1e-12)


def test_descending_steps_are_plain_sgd_and_a_step_that_never_descends_is_skipped():
    torch.manual_seed(1)
    model, task = make_linear_model(), linear_task(n_support=12)
    small = 0.05 / _unstable_lr(task)  # 400x below the stability limit: every plain step descends
    plain = adapt(model, task.support, task.query, steps=5, lr=small, loss=linear_loss)
    safe = adapt(model, task.support, task.query, steps=5, lr=small, loss=linear_loss, backtrack=3)
    # Bit for bit: an accepted first trial is the very same arithmetic as the plain step (w - 1.0 * lr * g with
    # the same gradient kernels on the same shapes), so any difference would be a change of the step.
    torch.testing.assert_close(safe.params["weight"], plain.params["weight"], rtol=0, atol=0)
    # lr 1e6 x the limit with one halving allowed: both trials overshoot, so the weights stay.
    huge = adapt(model, task.support, task.query, steps=2, lr=1e6 * _unstable_lr(task), loss=linear_loss, backtrack=1)
    torch.testing.assert_close(huge.params["weight"], model.weight.detach(), rtol=0, atol=0)


def test_vmapped_tasks_backtrack_each_on_its_own():
    torch.manual_seed(2)
    model = make_linear_model()
    calm = linear_task(n_support=12)
    x, y = linear_task(n_support=12).support
    steep = MetaTask((10 * x, y), calm.query, None)  # 100x the curvature: only this task needs halvings
    lr = 0.5 * _unstable_lr(calm)
    together = adapt_tasks(model, [calm, steep], steps=6, lr=lr, loss=linear_loss, backtrack=12)
    for task, result in zip([calm, steep], together):
        alone = adapt(model, task.support, task.query, steps=6, lr=lr, loss=linear_loss, backtrack=12)
        torch.testing.assert_close(result.params["weight"], alone.params["weight"], rtol=1e-10, atol=1e-12)
        expected = _reference(model.weight.detach()[0], task, lr, 6, backtrack=12)
        torch.testing.assert_close(result.params["weight"][0], expected, rtol=1e-10, atol=1e-12)


def test_backtrack_must_be_a_non_negative_integer():
    model, task = make_linear_model(), linear_task()
    with pytest.raises(ValueError, match="backtrack"):
        adapt(model, task.support, task.query, loss=linear_loss, backtrack=-1)


def test_only_tasks_still_without_a_descending_step_are_tried_again():
    torch.manual_seed(2)
    model = make_linear_model()
    calm = linear_task(n_support=12)
    x, y = linear_task(n_support=12).support
    steep = MetaTask((10 * x, y), calm.query, None)  # only this task needs halvings
    tried = []  # tasks in each trial evaluation (the ones under no_grad; the gradients' are under grad)

    def recording_loss(model, params, data, graph):
        inputs = data[0]
        if not torch.is_grad_enabled() and torch._C._functorch.is_batchedtensor(inputs):
            tried.append(torch._C._functorch.get_unwrapped(inputs).shape[0])
        return linear_loss(model, params, data, graph)

    lr = 0.05 * _unstable_lr(calm)  # 0.4x calm's stability limit, 40x steep's
    adapt_tasks(model, [calm, steep], steps=1, lr=lr, loss=recording_loss, metric=linear_loss, backtrack=12)
    assert tried[0] == 2 and len(tried) > 2 and set(tried[1:]) == {1}  # calm descends at once, steep does not
