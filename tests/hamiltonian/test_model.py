"""HamiltonianGNN: the vector field is the symplectic gradient of H, H has no dead parameters, H is invariant
under relabelling particles, and the model batches, vmaps and validates its inputs."""
import pytest
import torch
from torch.func import vmap

from metaham.hamiltonian import HamiltonianGNN, backbone_names, edge_index


def _model(**kw):
    return HamiltonianGNN(backbone="gcn", hidden=kw.pop("hidden", 12), layers=kw.pop("layers", 2), **kw).double()


def _states(*shape):
    return torch.randn(*shape, 2, dtype=torch.float64), torch.randn(*shape, 2, dtype=torch.float64)


@pytest.mark.parametrize("n_particles", [1, 3])
def test_vector_field_is_symplectic_gradient_of_H(n_particles):
    model = _model()
    graph = edge_index(n_particles)
    q, p = _states(7, n_particles)
    q_ref, p_ref = q.clone().requires_grad_(), p.clone().requires_grad_()
    dh_dq, dh_dp = torch.autograd.grad(model(q_ref, p_ref, graph).sum(), (q_ref, p_ref))
    dq_dt, dp_dt = model.vector_field(q, p, graph)
    torch.testing.assert_close(dq_dt, dh_dp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dp_dt, -dh_dq, rtol=1e-12, atol=1e-12)


def test_every_parameter_is_trained_by_a_vector_field_loss():
    # A parameter that only shifts H by a constant would get exactly zero gradient here.
    model = _model()
    graph = edge_index(3)
    q, p = _states(16, 3)
    dq_dt, dp_dt = model.vector_field(q, p, graph)
    loss = (dq_dt - torch.randn_like(dq_dt)).pow(2).mean() + (dp_dt - torch.randn_like(dp_dt)).pow(2).mean()
    loss.backward()
    dead = [name for name, w in model.named_parameters() if w.grad is None or not bool((w.grad != 0).any())]
    assert dead == []
    # ...and the read-out's last layers carry no bias at all.
    assert not any(name.startswith("readout.") and name.endswith("2.bias") for name, _ in model.named_parameters())


def test_H_is_invariant_under_relabelling_particles():
    model = _model()
    graph = edge_index(4)
    q, p = _states(5, 4)
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(model(q[:, perm], p[:, perm], graph), model(q, p, graph), rtol=1e-12, atol=1e-12)
    dq_dt, dp_dt = model.vector_field(q, p, graph)
    dq_perm, dp_perm = model.vector_field(q[:, perm], p[:, perm], graph)
    torch.testing.assert_close(dq_perm, dq_dt[:, perm], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dp_perm, dp_dt[:, perm], rtol=1e-12, atol=1e-12)


def test_edges_change_H_and_a_single_particle_uses_none():
    model = _model()
    q, p = _states(5, 3)
    assert not torch.allclose(model(q, p, edge_index(3)), model(q, p, edge_index(3, [(0, 1)])))
    h1 = model(q[:, :1], p[:, :1], edge_index(1))
    with torch.no_grad():
        for w in model.readout["edge"].parameters():
            w.add_(1.0)
    torch.testing.assert_close(model(q[:, :1], p[:, :1], edge_index(1)), h1)


def test_leading_batch_axes_and_vmap_agree_with_one_state_at_a_time():
    model = _model()
    graph = edge_index(2)
    q, p = _states(3, 4, 2)  # (tasks, points, particles, 2)
    dq_batched, dp_batched = model.vector_field(q, p, graph)
    dq_vmap, dp_vmap = vmap(lambda a, b: model.vector_field(a, b, graph))(q, p)
    dq_one, dp_one = model.vector_field(q[1, 2], p[1, 2], graph)
    torch.testing.assert_close(dq_vmap, dq_batched, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dp_vmap, dp_batched, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dq_one, dq_batched[1, 2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dp_one, dp_batched[1, 2], rtol=1e-12, atol=1e-12)
    assert model(q, p, graph).shape == (3, 4)


def test_vector_field_with_explicit_params_matches_the_modules_own():
    model = _model()
    graph = edge_index(2)
    q, p = _states(4, 2)
    params = {name: 1.5 * w.detach() for name, w in model.named_parameters()}
    scaled = _model()
    scaled.load_state_dict(params)
    for a, b in zip(model.vector_field(q, p, graph, params=params), scaled.vector_field(q, p, graph)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bad_inputs_are_named():
    model = _model()
    q, p = _states(4, 2)
    with pytest.raises(ValueError, match="same shape"):
        model(q, p[:, :1], edge_index(2))
    with pytest.raises(ValueError, match=r"\(\.\.\., n_particles, 2\)"):
        model(torch.randn(4, 2, 3), torch.randn(4, 2, 3), edge_index(2))
    with pytest.raises(ValueError, match="edge_index"):
        model(q, p, edge_index(2).float())
    with pytest.raises(ValueError, match="unknown backbone 'nope'; known backbones: .*gcn"):
        HamiltonianGNN(backbone="nope")
    assert "gcn" in backbone_names()


def test_the_former_name_of_a_renamed_backbone_builds_the_same_model():
    """Configs and checkpoints written as ``sparse_equivariant`` (its name until 2026-12-08) still load."""
    torch.manual_seed(0)
    former = HamiltonianGNN(backbone="sparse_equivariant", hidden=8, layers=1)
    torch.manual_seed(0)
    current = HamiltonianGNN(backbone="equivariant", hidden=8, layers=1)
    assert former.config == current.config == {"backbone": "equivariant", "hidden": 8, "layers": 1}
    assert "sparse_equivariant" not in backbone_names()
    former_state, current_state = former.state_dict(), current.state_dict()
    assert list(former_state) == list(current_state)
    for name, value in current_state.items():
        torch.testing.assert_close(former_state[name], value, rtol=0, atol=0, msg=name)
