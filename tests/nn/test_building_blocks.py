"""Building blocks: radial basis and cutoff, spherical-harmonic conventions, linear, gate, layer norm."""
import math

import numpy as np
import pytest
import torch
from e3nn import o3
from torch.func import grad, vmap

from equivariance import default_dtype
from metaham.nn import (
    PYSCF_P_TO_E3NN,
    BesselBasis,
    EquivariantLayerNorm,
    EquivariantLinear,
    GatedNonlinearity,
    InteractionBlock,
    polynomial_cutoff,
    spherical_harmonics,
)


def test_bessel_basis_values_cutoff_and_origin():
    with default_dtype(torch.float64):
        basis = BesselBasis(4, cutoff=3.0)
        r = torch.tensor([0.0, 0.7, 2.0, 3.0, 4.5])
        out = basis(r)
        assert out.shape == (5, 4)
        n = torch.arange(1, 5)
        want = math.sqrt(2 / 3.0) * torch.sin(n * math.pi * 0.7 / 3.0) / 0.7 * polynomial_cutoff(torch.tensor(0.7), 3.0)
        torch.testing.assert_close(out[1], want)
        torch.testing.assert_close(out[0], math.sqrt(2 / 3.0) * n * math.pi / 3.0)  # the r -> 0 limit
        assert torch.all(out[3:] == 0)


def test_polynomial_cutoff_is_smooth_at_the_cutoff_under_torch_func():
    with default_dtype(torch.float64):
        f = lambda r: polynomial_cutoff(r, 2.0)  # noqa: E731
        assert float(f(torch.tensor(0.0))) == 1.0
        for r in (2.0 - 1e-6, 2.0, 2.5):
            r = torch.tensor(r)
            assert abs(float(f(r))) < 1e-12
            assert abs(float(grad(f)(r))) < 1e-9
            assert abs(float(grad(grad(f))(r))) < 1e-4
        r = torch.tensor(1.3)
        fd = (f(r + 1e-6) - f(r - 1e-6)) / 2e-6
        torch.testing.assert_close(grad(f)(r), fd, rtol=1e-6, atol=1e-9)


def test_bessel_basis_under_grad_second_order_and_vmap():
    with default_dtype(torch.float64):
        basis = BesselBasis(6, cutoff=4.0)
        r = torch.tensor([0.5, 1.1, 2.9, 3.99])
        energy = lambda r: basis(r).pow(2).sum()  # noqa: E731
        g = grad(energy)(r)
        r_eager = r.clone().requires_grad_()
        (g_eager,) = torch.autograd.grad(energy(r_eager), r_eager, create_graph=True)
        torch.testing.assert_close(g, g_eager)
        h = grad(lambda r: grad(energy)(r).sum())(r)
        (h_eager,) = torch.autograd.grad(g_eager.sum(), r_eager)
        torch.testing.assert_close(h, h_eager)
        torch.testing.assert_close(vmap(basis)(r.reshape(2, 2)), basis(r).reshape(2, 2, 6))


def test_spherical_harmonics_pyscf_axes_match_pyscf_orbital_order():
    gto = pytest.importorskip("pyscf.gto")
    mol = gto.M(atom="H 0 0 0", basis={"H": [[1, [1.0, 1.0]], [2, [1.0, 1.0]], [3, [1.0, 1.0]]]}, spin=1)
    points = np.random.default_rng(0).normal(size=(6, 3))
    ao = mol.eval_gto("GTOval_sph", points)  # p (x, y, z), then d and f in pyscf's m order
    with default_dtype(torch.float64):
        sh = spherical_harmonics(3, torch.tensor(points), axes="pyscf").numpy()
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(unit(sh[:, 1:4]), unit(ao[:, 0:3][:, list(PYSCF_P_TO_E3NN)]), atol=1e-12)
    np.testing.assert_allclose(unit(sh[:, 4:9]), unit(ao[:, 3:8]), atol=1e-12)
    np.testing.assert_allclose(unit(sh[:, 9:16]), unit(ao[:, 8:15]), atol=1e-12)
    # Without the permutation (e3nn's own axes) d functions do not line up with pyscf's.
    with default_dtype(torch.float64):
        plain = spherical_harmonics(2, torch.tensor(points)).numpy()
    assert np.abs(unit(plain[:, 4:9]) - unit(ao[:, 3:8])).max() > 0.1


def test_spherical_harmonics_conventions_and_errors():
    v = torch.tensor([[0.0, 0.0, 2.0]])
    y = spherical_harmonics(2, v)
    torch.testing.assert_close(y[0, :4], torch.tensor([1.0, 0.0, 0.0, math.sqrt(3.0)]))  # l=1 is (x, y, z)
    with pytest.raises(ValueError, match="axes"):
        spherical_harmonics(2, v, axes="xyz")
    with pytest.raises(ValueError, match="lmax"):
        spherical_harmonics(-1, v)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        spherical_harmonics(2, v[:, :2])


def test_linear_mixes_channels_of_each_irrep_type():
    with default_dtype(torch.float64):
        lin = EquivariantLinear("2x0e+3x1o+1x0e+2x1o", "4x1o+2x0e+1x2e")
        with torch.no_grad():
            lin.bias.copy_(torch.tensor([0.5, -1.0]))
        x = torch.randn(5, lin.irreps_in.dim)
        out = lin(x)
        scal = torch.cat([x[:, 0:2], x[:, 11:12]], 1)  # the 0e channels, in order
        vec = torch.cat([x[:, 2:11].reshape(5, 3, 3), x[:, 12:18].reshape(5, 2, 3)], 1)  # the 1o channels
        torch.testing.assert_close(out[:, 12:14], scal @ lin.weight_0e / math.sqrt(3) + lin.bias)
        torch.testing.assert_close(out[:, :12].reshape(5, 4, 3), torch.einsum("nud,uw->nwd", vec, lin.weight_1o) / math.sqrt(5))
        assert torch.all(out[:, 14:] == 0)  # no 2e input
        with pytest.raises(ValueError, match="last dimension"):
            lin(x[:, :-1])


def test_linear_in_component_major_layout_is_the_same_map():
    from metaham.nn.layout import blocks, ir_mul_from_mul_ir, mul_ir_from_ir_mul

    with default_dtype(torch.float64):
        irreps_in, irreps_out = "2x0e+3x1o+1x2e+2x1o", "4x1o+2x0e+3x2e+1x1e"
        torch.manual_seed(0)
        lin = EquivariantLinear(irreps_in, irreps_out)
        torch.manual_seed(0)
        lin_ir_mul = EquivariantLinear(irreps_in, irreps_out, layout="ir_mul")
        with torch.no_grad():
            lin.bias.copy_(torch.tensor([0.5, -1.0]))
            lin_ir_mul.bias.copy_(lin.bias)
        assert lin_ir_mul.state_dict().keys() == lin.state_dict().keys()
        x = torch.randn(6, lin.irreps_in.dim, requires_grad=True)
        out = lin(x)
        out_ir_mul = lin_ir_mul(ir_mul_from_mul_ir(x, blocks(irreps_in)))
        torch.testing.assert_close(mul_ir_from_ir_mul(out_ir_mul, blocks(irreps_out)), out, atol=1e-12, rtol=0)
        assert torch.all(out[:, 29:] == 0) and torch.all(out_ir_mul[:, 29:] == 0)  # 1e: no input
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, [x, lin.weight_1o], g)
        g_ir_mul = ir_mul_from_mul_ir(g, blocks(irreps_out))
        grads_ir_mul = torch.autograd.grad(out_ir_mul, [x, lin_ir_mul.weight_1o], g_ir_mul)
        torch.testing.assert_close(grads_ir_mul[0], grads[0], atol=1e-12, rtol=0)
        torch.testing.assert_close(grads_ir_mul[1], grads[1], atol=1e-12, rtol=0)
        assert "layout=ir_mul" in repr(lin_ir_mul)
        with pytest.raises(ValueError, match="layout must be one of"):
            EquivariantLinear(irreps_in, irreps_out, layout="mul_first")


def _silu(z):
    return z / (1 + np.exp(-z))


def _unit_second_moment_scale(f):
    """1 / sqrt(E[f(z)^2]) for z ~ N(0, 1), by adaptive quadrature."""
    from scipy.integrate import quad

    second, _ = quad(lambda z: f(z) ** 2 * np.exp(-z * z / 2) / math.sqrt(2 * math.pi), -40, 40, limit=200)
    return 1 / math.sqrt(second)


def test_gated_nonlinearity_layout_and_values():
    gate = GatedNonlinearity("2x0e+1x0o+2x1o+1x2e")
    assert gate.irreps_in == o3.Irreps("2x0e+1x0o+3x0e+2x1o+1x2e")
    h = torch.randn(4, gate.irreps_in.dim)
    out = gate(h)
    c_silu, c_tanh, c_sig = (_unit_second_moment_scale(f) for f in (_silu, np.tanh, lambda z: 1 / (1 + np.exp(-z))))
    torch.testing.assert_close(out[:, :2], torch.nn.functional.silu(h[:, :2]) * c_silu, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out[:, 2:3], torch.tanh(h[:, 2:3]) * c_tanh, rtol=1e-6, atol=1e-7)
    gates = torch.sigmoid(h[:, 3:6]) * c_sig
    torch.testing.assert_close(out[:, 3:9].reshape(4, 2, 3), h[:, 6:12].reshape(4, 2, 3) * gates[:, :2, None], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out[:, 9:14], h[:, 12:17] * gates[:, 2:3], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="scalar"):
        GatedNonlinearity("1x1o+2x0e")


def test_layer_norm_normalises_each_block_per_channel_on_e3nns_layout():
    with default_dtype(torch.float64):
        irreps = o3.Irreps("3x0e+2x0o+4x1o+2x2e")
        norm = EquivariantLayerNorm(irreps)
        with torch.no_grad():
            norm.scale.copy_(torch.arange(1.0, 12.0))
            norm.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
        x = 3.0 * torch.randn(5, irreps.dim) + 1.0
        out = norm(x)
        start, channel = 0, 0
        for mul, ir in irreps:
            block = x[:, start : start + mul * ir.dim].reshape(5, mul, ir.dim)  # channel-major
            if ir.l == 0:
                block = block - block.mean(1, keepdim=True)
            want = block / block.pow(2).mean((1, 2), keepdim=True).add(1e-5).sqrt()
            want = want * norm.scale[channel : channel + mul].reshape(1, mul, 1)
            if ir == o3.Irrep("0e"):
                want = want + norm.bias.reshape(1, 3, 1)
            torch.testing.assert_close(out[:, start : start + mul * ir.dim], want.reshape(5, -1))
            start += mul * ir.dim
            channel += mul
        plain = EquivariantLayerNorm(irreps, affine=False)(x)
        assert torch.allclose(plain[:, :3].mean(1), torch.zeros(5), atol=1e-12)  # scalars centred
        torch.testing.assert_close(plain[:, 5:17].pow(2).mean(1), torch.ones(5), rtol=1e-4, atol=0)


def test_interaction_block_rejects_bad_settings():
    with pytest.raises(ValueError, match="avg_num_neighbors"):
        InteractionBlock("4x0e", "4x0e", avg_num_neighbors=0.0)
    with pytest.raises(ValueError, match="sh_axes"):
        InteractionBlock("4x0e", "4x0e", sh_axes="zyx")
    with pytest.raises(ValueError, match="pair_channels"):
        InteractionBlock("4x0e", "4x0e", pair_channels=0)
    with pytest.raises(ValueError, match="cutoff"):
        InteractionBlock("4x0e", "4x0e", cutoff=-1.0)


def test_pyscf_axes_are_e3nn_axes_on_permuted_vectors():
    torch.manual_seed(0)
    pyscf_block = InteractionBlock("4x0e+2x1o+2x2e", "4x0e+2x1o+2x2e", sh_axes="pyscf")
    e3nn_block = InteractionBlock("4x0e+2x1o+2x2e", "4x0e+2x1o+2x2e")
    e3nn_block.load_state_dict(pyscf_block.state_dict())
    edge_index = torch.tensor([(i, j) for i in range(4) for j in range(4) if i != j]).T
    x, vec = torch.randn(4, 20), torch.randn(12, 3)
    torch.testing.assert_close(pyscf_block(x, vec, edge_index), e3nn_block(x, vec[:, [1, 2, 0]], edge_index))
