"""The backbones' mish: equal to torch's, with derivatives of every order finite where torch's overflow, and
the float32 NaN it caused in second-order MAML through the ``equivariant`` model (a fast particle)."""
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from metaham.hamiltonian import HamiltonianGNN, edge_index
from metaham.hamiltonian._layers import mish
from metaham.meta import MAML, MetaTask
from metaham.meta.losses import VectorFieldLoss
from tasks.cache import derive_seed


def _derivatives(f, x, order=3):
    """f and its first ``order`` derivatives at each entry of the 1-D tensor ``x``."""
    out, g = [], f
    for _ in range(order + 1):
        out.append(vmap(g)(x))
        g = grad(g)
    return out


def test_mish_and_its_derivatives_match_torch():
    x = torch.linspace(-30.0, 30.0, 601, dtype=torch.float64)
    for ours, reference in zip(_derivatives(mish, x), _derivatives(F.mish, x)):
        torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-12)


def test_mish_derivatives_stay_finite_for_large_inputs_in_float32():
    x = torch.tensor([-1e4, -500.0, -90.0, 90.0, 500.0, 1e4])
    assert not torch.isfinite(_derivatives(F.mish, x)[2]).all()  # the overflow this module avoids
    values = _derivatives(mish, x)
    assert all(torch.isfinite(v).all() for v in values)
    torch.testing.assert_close(values[1], (x > 0).float())  # mish -> relu far from 0: slope 0 or 1
    torch.testing.assert_close(values[2], torch.zeros_like(x))


def _meta_gradient(dtype):
    # The reproducer: the float32 meta-loss of this exact model and state was NaN (torch's mish overflowed on
    # the pre-activation of the invariant |p|^2 ~ 168 in the third derivative).
    torch.manual_seed(derive_seed("init", 0))
    model = HamiltonianGNN(backbone="equivariant", hidden=64, layers=2).to(dtype)
    q = torch.tensor([[[-0.1498, 0.0]]], dtype=dtype)
    p = torch.tensor([[[12.9539, 0.0]]], dtype=dtype)
    data = (q, p, torch.zeros_like(q), torch.zeros_like(p))
    loss = MAML(model, VectorFieldLoss("logcosh"), inner_lr=0.3).meta_loss([MetaTask(data, data, edge_index(1))])
    loss.backward()
    return loss.detach(), {name: w.grad for name, w in model.named_parameters() if w.grad is not None}


def test_second_order_meta_gradient_is_finite_in_float32_for_a_fast_particle():
    loss32, grads32 = _meta_gradient(torch.float32)
    loss64, grads64 = _meta_gradient(torch.float64)
    assert torch.isfinite(loss32)
    torch.testing.assert_close(loss32.double(), loss64, rtol=1e-4, atol=0.0)
    # Second order through a particle this fast is ill-conditioned: float32 rounding grows to 2-3e-4 of a
    # tensor's largest entry (it differs by 2x between CPU kernel sets; even float64 runs on two kernel sets
    # differ by ~1e-4, their float32 weight inits by an ulp). 1e-2 leaves 30x for other CPUs and still fails
    # a wrong second-order term by far: first-order MAML is ~100% off here.
    for name, g in grads32.items():
        assert torch.isfinite(g).all(), name
        scale = grads64[name].abs().max()
        assert (g.double() - grads64[name]).abs().max() <= 1e-2 * scale + 1e-6, name
