"""Pre-training baseline, test-time adaptation and the point-wise losses."""
import math

import pytest
import torch

from metaham.meta import MAML, Pretrain, VectorFieldLoss, adapt, log_cosh

from meta_problems import hamiltonian_task, linear_loss, linear_task, make_linear_model, tiny_hnn


def test_pretrain_loss_is_the_mean_pooled_task_loss():
    model = tiny_hnn()
    tasks = [hamiltonian_task(1), hamiltonian_task(1), hamiltonian_task(3, k=4)]
    loss = VectorFieldLoss("logcosh")
    params = dict(model.named_parameters())
    expected = torch.stack(
        [loss(model, params, tuple(torch.cat([s, q]) for s, q in zip(t.support, t.query)), t.graph) for t in tasks]
    ).mean()
    torch.testing.assert_close(Pretrain(model, loss).meta_loss(tasks), expected, rtol=1e-12, atol=0)


def test_adapt_follows_plain_sgd_and_leaves_the_model_alone():
    linear_model = make_linear_model()
    task = linear_task()
    w0 = linear_model.weight.detach().clone()
    result = adapt(linear_model, task.support, task.query, steps=4, lr=0.05, eval_at=[0, 2, 4], loss=linear_loss)
    x_s, y_s = task.support
    x_q, y_q = task.query
    w, expected_curve = w0[0], []
    for step in range(5):
        if step in (0, 2, 4):
            expected_curve.append(float((x_q @ w - y_q).pow(2).mean()))
        if step < 4:
            w = w - 0.05 * 2 / len(y_s) * x_s.T @ (x_s @ w - y_s)
    assert result.steps == [0, 2, 4]
    assert result.query_loss == pytest.approx(expected_curve, rel=1e-12)
    torch.testing.assert_close(result.params["weight"][0], w, rtol=1e-12, atol=1e-14)
    assert torch.equal(linear_model.weight, w0)


def test_adapt_reduces_the_query_loss_of_a_hamiltonian_model_with_maml_rates():
    model = tiny_hnn()
    task = hamiltonian_task(2, k=20)
    maml = MAML(model, meta_sgd=True)
    result = adapt(model, task.support, task.support, task.graph, steps=3, lr=maml.learning_rates())
    initial = VectorFieldLoss()(model, dict(model.named_parameters()), task.support, task.graph)
    assert result.query_loss[0] == pytest.approx(float(initial.detach()), rel=1e-12)
    assert result.query_loss[-1] < result.query_loss[0]


def test_adapt_rejects_bad_settings():
    linear_model = make_linear_model()
    task = linear_task()
    with pytest.raises(ValueError, match="steps"):
        adapt(linear_model, task.support, task.query, steps=-1, loss=linear_loss)
    with pytest.raises(ValueError, match="eval_at"):
        adapt(linear_model, task.support, task.query, steps=2, eval_at=[3], loss=linear_loss)
    with pytest.raises(ValueError, match="not among"):
        adapt(linear_model, task.support, task.query, names=["bias"], loss=linear_loss)
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        VectorFieldLoss("l1")


def test_log_cosh_is_exact_smooth_and_overflow_free():
    x = torch.linspace(-5, 5, 11, dtype=torch.float64)
    torch.testing.assert_close(torch.stack([log_cosh(v) for v in x]), torch.log(torch.cosh(x)), rtol=1e-12, atol=1e-14)
    big = torch.tensor([1000.0, -1000.0], dtype=torch.float64)
    assert float(log_cosh(big)) == pytest.approx(1000 - math.log(2), rel=1e-12)
    second = torch.func.grad(torch.func.grad(log_cosh))(torch.tensor(0.0, dtype=torch.float64))
    assert float(second) == pytest.approx(1.0, rel=1e-12)
