"""SparseTensorProduct: dense equality with e3nn, the three phases' path sets and scales, compactness, errors."""
import math

import pytest
import torch
from e3nn import o3

from equivariance import default_dtype
from metaham.nn import SparseTensorProduct
from metaham.nn.layout import blocks, ir_mul_from_mul_ir, mul_ir_from_ir_mul
from metaham.nn.sparse_tp import n_kept

FEAT = "4x0e+4x1o+2x2e"
SH = "0e+1o+2e"


def _inputs(tp, n=6, generator_seed=1):
    g = torch.Generator().manual_seed(generator_seed)
    x1 = torch.randn(n, tp.irreps_in1.dim, generator=g)
    x2 = torch.randn(n, tp.irreps_in2.dim, generator=g)
    w = None if tp.internal_weights else torch.randn(n, tp.weight_numel, generator=g)
    return x1, x2, w


def _e3nn_with_path_scales(tp, x1, x2, w, scales: dict):
    """e3nn's dense product with path p's weights multiplied by scales[p] (0 for paths not in scales)."""
    ref = o3.TensorProduct(
        tp.irreps_in1, tp.irreps_in2, tp.irreps_out, [(*ins, tp.mode, True) for ins in tp.instructions],
        internal_weights=False, shared_weights=tp.internal_weights,
    )
    weight = (tp.weight if tp.internal_weights else w).detach().clone()
    for p, path in enumerate(tp._paths):
        weight[..., path.w_start : path.w_stop] *= scales.get(p, 0.0)
    return ref(x1, x2, weight)


def _renormalised(tp, paths):
    w = tp.path_weight.detach()[list(paths)]
    return {p: float(v) for p, v in zip(paths, w / w.abs().mean())}


@pytest.mark.parametrize(
    "irreps, mode, internal",
    [
        ((FEAT, SH, FEAT + "+4x1e"), "uvu", False),
        ((FEAT, "2x0e+3x1o", FEAT), "uvu", True),
        ((FEAT, SH, "3x0e+2x1o+5x2e+1x1e"), "uvw", True),
        ((FEAT, "2x0e+3x1o", "3x0e+2x1o"), "uvw", False),
        (("4x0e+4x1o+4x2e", "4x0e+4x1o+4x2e", "4x0e+4x1o+4x2e+4x1e"), "uuu", False),
        (("3x0e+3x1o+3x2e+3x3o", "0e+1o+2e+3o", "3x0e+3x1o+3x2e+3x3o"), "uvu", False),
    ],
)
def test_sparsity_zero_is_e3nn_dense_product_in_every_phase(irreps, mode, internal):
    with default_dtype(torch.float64):
        tp = SparseTensorProduct(*irreps, mode=mode, internal_weights=internal)
        x1, x2, w = _inputs(tp)
        want = _e3nn_with_path_scales(tp, x1, x2, w, {p: 1.0 for p in range(tp.n_paths)})
        assert not hasattr(tp, "path_weight")
        for phase in ("random", "adaptive", "fixed"):
            tp.set_phase(phase)
            for training in (True, False):
                tp.train(training)
                got = tp(x1, x2) if internal else tp(x1, x2, w)
                torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7, 0.9])
def test_random_phase_keeps_exactly_round_fraction_at_random(sparsity):
    tp = SparseTensorProduct(FEAT, SH, FEAT, sparsity=sparsity)
    tp.train()
    draws = {tp._select_paths() for _ in range(30)}
    assert all(len(d) == round((1 - sparsity) * tp.n_paths) for d in draws)
    assert len(draws) > 1  # really random
    assert n_kept(0.7, 11) == 3 and n_kept(0.95, 11) == 1 and n_kept(0.999, 11) == 1


def test_random_phase_output_is_the_drawn_paths_renormalised():
    with default_dtype(torch.float64):
        tp = SparseTensorProduct(FEAT, SH, FEAT, sparsity=0.6)
        with torch.no_grad():
            tp.path_weight.copy_(torch.rand(tp.n_paths) + 0.5)
        tp.train()
        x1, x2, w = _inputs(tp)
        torch.manual_seed(5)
        paths = tp._select_paths()
        torch.manual_seed(5)
        got = tp(x1, x2, w)
        torch.testing.assert_close(got, _e3nn_with_path_scales(tp, x1, x2, w, _renormalised(tp, paths)), rtol=0, atol=1e-12)


def test_random_phase_eval_is_deterministic_top_weights():
    tp = SparseTensorProduct(FEAT, SH, FEAT, sparsity=0.5)
    with torch.no_grad():
        tp.path_weight.copy_(torch.randperm(tp.n_paths).float())
    tp.set_phase("random")  # re-selects from the weights, as the scheduler does after each step
    tp.eval()
    x1, x2, w = _inputs(tp)
    top = tuple(sorted(torch.argsort(tp.path_weight, descending=True)[: tp.n_keep].tolist()))
    assert tp.kept_paths == top
    assert torch.equal(tp(x1, x2, w), tp(x1, x2, w))


def test_adaptive_phase_keeps_the_quantile_set_and_renormalises():
    with default_dtype(torch.float64):
        tp = SparseTensorProduct(FEAT, SH, FEAT, sparsity=0.7)
        with torch.no_grad():
            tp.path_weight.copy_(torch.randn(tp.n_paths))
        tp.set_phase("adaptive")
        w_path = tp.path_weight.detach()
        threshold = torch.sort(w_path, descending=True).values[tp.n_keep - 1]  # the discrete 0.7-quantile
        assert tp.kept_paths == tuple(torch.nonzero(w_path >= threshold).flatten().tolist())
        assert len(tp.kept_paths) == round(0.3 * tp.n_paths)
        x1, x2, w = _inputs(tp)
        want = _e3nn_with_path_scales(tp, x1, x2, w, _renormalised(tp, tp.kept_paths))
        for training in (True, False):  # adaptive is deterministic in both modes
            tp.train(training)
            torch.testing.assert_close(tp(x1, x2, w), want, rtol=0, atol=1e-12)


def test_adaptive_ties_go_to_lower_index():
    tp = SparseTensorProduct(FEAT, SH, FEAT, sparsity=0.5)  # weights all 1
    tp.set_phase("adaptive")
    assert tp.kept_paths == tuple(range(tp.n_keep))


def test_fixed_phase_freezes_the_set_and_continues_the_adaptive_function():
    tp = SparseTensorProduct(FEAT, SH, FEAT, sparsity=0.5)
    with torch.no_grad():
        tp.path_weight.copy_(torch.rand(tp.n_paths) + 0.1)
    tp.set_phase("adaptive")
    x1, x2, w = _inputs(tp)
    adaptive_out, adaptive_set = tp(x1, x2, w), tp.kept_paths
    tp.set_phase("fixed")
    assert tp.kept_paths == adaptive_set
    # The same function, to float32 rounding only: the folded Clebsch-Gordan tensors are views into one packed
    # buffer, and a BLAS may round a product differently with its operands at other addresses (alignment).
    # A wrong set or scale would be off by O(1).
    torch.testing.assert_close(tp(x1, x2, w), adaptive_out)
    with torch.no_grad():
        tp.path_weight.copy_(-tp.path_weight)  # would select the complement if not frozen
    tp.set_phase("fixed")
    assert tp.kept_paths == adaptive_set
    assert tp.kept_mask.sum() == len(adaptive_set) and tp.phase_index == 2


def _poison(tp, target):
    """NaN into the Clebsch-Gordan block of path ``target`` (and nowhere else)."""
    path = tp._paths[target]
    cg = getattr(tp, f"_cg_{path.i_in1}").clone()
    cg[:, path.j_start : path.j_stop, path.col_start : path.col_stop] = float("nan")
    setattr(tp, f"_cg_{path.i_in1}", cg)


@pytest.mark.parametrize("mode, irreps", [("uvu", (FEAT, SH, FEAT)), ("uvw", (FEAT, SH, "2x0e+3x1o+2x2e"))])
def test_fixed_phase_evaluates_only_the_kept_paths(mode, irreps):
    # A product that merely zeroed the dropped paths' weights would return NaN (0 * NaN); ours never reads
    # a dropped path's data.
    tp = SparseTensorProduct(*irreps, mode=mode, sparsity=0.5)
    target = tp.n_paths // 2
    with torch.no_grad():
        tp.path_weight.fill_(1.0)
        tp.path_weight[target] = -5.0
    _poison(tp, target)  # before the fixed phase, whose compact product is folded from the (poisoned) buffers
    tp.set_phase("fixed")
    assert target not in tp.kept_paths
    x1, x2, w = _inputs(tp)
    assert torch.isfinite(tp(x1, x2, w)).all()
    dense = SparseTensorProduct(*irreps, mode=mode, sparsity=0.0)
    _poison(dense, target)
    assert torch.isnan(dense(x1, x2, w)).any()  # the poison is real


def test_output_irreps_fixed_and_unreached_outputs_are_zero():
    tp = SparseTensorProduct("2x0e+2x1o", "0e+1o", "2x0e+2x1o", sparsity=0.75)  # 4 paths, keeps 1
    with torch.no_grad():
        tp.path_weight.copy_(torch.tensor([5.0, 1.0, 1.0, 1.0]))
    tp.set_phase("fixed")
    (i1, i2, io) = tp.instructions[tp.kept_paths[0]]
    x1, x2, w = _inputs(tp)
    out = tp(x1, x2, w)
    assert out.shape == (x1.shape[0], tp.irreps_out.dim)
    for index, s in enumerate(tp.irreps_out.slices()):
        assert (out[:, s].abs().sum() > 0) == (index == io)


@pytest.mark.parametrize("phase", ["random", "adaptive"])
def test_gradients_reach_the_path_weights(phase):
    tp = SparseTensorProduct(FEAT, SH, FEAT, sparsity=0.5)
    with torch.no_grad():
        tp.path_weight.copy_(torch.rand(tp.n_paths) + 0.5)
    tp.set_phase(phase)
    tp.train()
    x1, x2, w = _inputs(tp)
    torch.manual_seed(3)
    used = tp._select_paths()
    torch.manual_seed(3)
    tp(x1, x2, w).pow(2).sum().backward()
    grad = tp.path_weight.grad
    assert all(grad[p] != 0 for p in used)
    assert all(grad[p] == 0 for p in range(tp.n_paths) if p not in used)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), True, "0.5", None])
def test_bad_sparsity_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="sparsity"):
        SparseTensorProduct(FEAT, SH, FEAT, sparsity=bad)


def test_bad_configurations_are_clear_errors():
    with pytest.raises(ValueError, match="no tensor-product path"):
        SparseTensorProduct("4x0e", "1o", "4x0e")
    with pytest.raises(ValueError, match="receive no path"):
        SparseTensorProduct("4x0e", "0e", "4x0e+4x1o")
    with pytest.raises(ValueError, match="no tensor-product path"):
        SparseTensorProduct("4x0e", "0e", "3x0e", mode="uvu")  # multiplicity mismatch
    with pytest.raises(ValueError, match="mode"):
        SparseTensorProduct(FEAT, SH, FEAT, mode="uvv")
    with pytest.raises(ValueError, match="cannot produce"):
        SparseTensorProduct(FEAT, SH, FEAT, instructions=[(0, 0, 1)])
    with pytest.raises(ValueError, match="phase"):
        SparseTensorProduct(FEAT, SH, FEAT, sparsity=0.5).set_phase("warmup")
    tp = SparseTensorProduct(FEAT, SH, FEAT)
    x1, x2, w = _inputs(tp)
    with pytest.raises(ValueError, match="weight must have shape"):
        tp(x1, x2, w[:, :-1])
    with pytest.raises(ValueError, match="x2 must have shape"):
        tp(x1, x2[:, :4], w)


def test_weight_layout_is_the_full_dense_layout_in_every_phase():
    tp = SparseTensorProduct(FEAT, SH, FEAT, sparsity=0.7)
    dense = SparseTensorProduct(FEAT, SH, FEAT)
    assert tp.weight_numel == dense.weight_numel == o3.TensorProduct(
        FEAT, SH, FEAT, [(*i, "uvu", True) for i in dense.instructions], shared_weights=False
    ).weight_numel
    x1, x2, w = _inputs(tp)
    for phase in ("random", "adaptive", "fixed"):
        tp.set_phase(phase)
        assert tp(x1, x2, w).shape == dense(x1, x2, w).shape


def _outputs_reached(tp, paths):
    return {tp.instructions[p][2] for p in paths}


def test_global_top_k_can_cut_off_an_output_irrep_per_output_never_does():
    # Weights that favour the paths into output 0: a global top-k drops every path into the others.
    irreps = ("2x0e+2x1o+2x2e", "0e+1o+2e", "2x0e+2x1o+2x2e")
    for per_output in (False, True):
        tp = SparseTensorProduct(*irreps, sparsity=0.7, per_output=per_output)
        with torch.no_grad():
            tp.path_weight.copy_(torch.tensor([10.0 if ins[2] == 0 else 1.0 for ins in tp.instructions]))
        tp.set_phase("fixed")
        reached = _outputs_reached(tp, tp.kept_paths)
        assert (reached == set(range(len(tp.irreps_out)))) == per_output
        x1, x2, w = _inputs(tp)
        out = tp(x1, x2, w)
        assert all((out[:, s].abs().sum() > 0) == (io in reached) for io, s in enumerate(tp.irreps_out.slices()))


def test_per_output_keeps_the_rounded_share_of_each_outputs_paths_in_every_phase():
    tp = SparseTensorProduct(FEAT, SH, FEAT, sparsity=0.7, per_output=True)
    into = {io: [p for p, ins in enumerate(tp.instructions) if ins[2] == io] for io in range(len(tp.irreps_out))}
    want = {io: n_kept(0.7, len(paths)) for io, paths in into.items()}
    assert tp.n_keep == sum(want.values())
    with torch.no_grad():
        tp.path_weight.copy_(torch.randn(tp.n_paths))
    tp.train()
    draws = {tp._select_paths() for _ in range(30)}
    assert len(draws) > 1  # random phase: random, and per output
    tp.set_phase("adaptive")
    for paths in [*draws, tp.kept_paths]:
        assert {io: sum(1 for p in paths if p in into[io]) for io in into} == want
    w = tp.path_weight.detach()
    for io, paths in into.items():  # adaptive: the top weights within each output
        kept = [p for p in tp.kept_paths if p in paths]
        assert min(w[kept]) >= max([w[p] for p in paths if p not in kept], default=-math.inf)


def test_per_output_fixed_phase_checkpoint_reloads_compact(tmp_path):
    tp = SparseTensorProduct(FEAT, SH, FEAT, sparsity=0.7, per_output=True)
    with torch.no_grad():
        tp.path_weight.copy_(torch.rand(tp.n_paths) + 0.1)
    tp.set_phase("fixed")
    torch.save(tp.state_dict(), tmp_path / "tp.pt")
    fresh = SparseTensorProduct(FEAT, SH, FEAT, sparsity=0.7, per_output=True)
    fresh.load_state_dict(torch.load(tmp_path / "tp.pt", weights_only=True))
    assert fresh.phase == "fixed" and fresh.kept_paths == tp.kept_paths
    x1, x2, w = _inputs(tp)
    torch.testing.assert_close(fresh(x1, x2, w), tp(x1, x2, w), rtol=0, atol=0)


def test_fixed_phase_reads_compact_weights_made_by_linear_columns_only():
    from metaham.nn import linear_columns

    with default_dtype(torch.float64):
        tp = SparseTensorProduct(FEAT, SH, FEAT, sparsity=0.7, per_output=True)
        layer = torch.nn.Linear(5, tp.weight_numel)
        h = torch.randn(6, 5)
        x1, x2, _ = _inputs(tp)
        assert tp.weight_columns is None  # random phase: the full layout only
        with pytest.raises(ValueError, match="full dense layout"):
            tp(x1, x2, torch.randn(6, 7))
        tp.set_phase("fixed")
        columns = tp.weight_columns
        want = [c for p in tp.kept_paths for c in range(tp._paths[p].w_start, tp._paths[p].w_stop)]
        assert columns.tolist() == want and len(want) < tp.weight_numel
        compact = linear_columns(layer, h, columns)
        torch.testing.assert_close(compact, layer(h)[:, columns], rtol=0, atol=1e-12)
        torch.testing.assert_close(tp(x1, x2, compact), tp(x1, x2, layer(h)), rtol=0, atol=1e-12)
        assert torch.equal(linear_columns(layer, h, None), layer(h))


def test_fixed_phase_folds_the_path_weights_into_constants():
    tp = SparseTensorProduct(FEAT, SH, FEAT, sparsity=0.5)
    with torch.no_grad():
        tp.path_weight.copy_(torch.rand(tp.n_paths) + 0.5)
    tp.set_phase("fixed")
    x1, x2, w = _inputs(tp)
    want = _e3nn_with_path_scales(tp, x1, x2, w, _renormalised(tp, tp.kept_paths))
    torch.testing.assert_close(tp(x1, x2, w), want, rtol=1e-5, atol=1e-5)
    tp(x1, x2, w.requires_grad_()).sum().backward()
    assert w.grad.abs().sum() > 0 and tp.path_weight.grad is None  # no gate work left in the compact product


@pytest.mark.parametrize(
    "irreps, mode",
    [((FEAT, SH, FEAT), "uvu"), (("4x0e+4x1o", "4x0e+4x1o", "4x0e+4x1o+4x1e"), "uuu"), ((FEAT, SH, "2x0e+3x1o"), "uvw")],
)
def test_no_rows_give_an_empty_output_in_every_phase(irreps, mode):
    # An empty graph (no edges within the cutoff) must flow through, not trip over a shape inferred from 0 rows.
    tp = SparseTensorProduct(*irreps, mode=mode, sparsity=0.5)
    for phase in ("random", "adaptive", "fixed"):
        tp.set_phase(phase)
        out = tp(torch.zeros(0, tp.irreps_in1.dim), torch.zeros(0, tp.irreps_in2.dim), torch.zeros(0, tp.weight_numel))
        assert out.shape == (0, tp.irreps_out.dim)


def test_layout_conversions_reorder_each_block_and_invert_each_other():
    layout = blocks("2x0e+2x1o")
    # mul_ir: channel after channel, each with its 2l + 1 components; ir_mul: component after component.
    mul_ir = torch.tensor([[0.0, 1.0, 10.0, 11.0, 12.0, 20.0, 21.0, 22.0]])
    ir_mul = torch.tensor([[0.0, 1.0, 10.0, 20.0, 11.0, 21.0, 12.0, 22.0]])
    assert torch.equal(ir_mul_from_mul_ir(mul_ir, layout), ir_mul)
    assert torch.equal(mul_ir_from_ir_mul(ir_mul, layout), mul_ir)
    x = torch.randn(5, o3.Irreps(FEAT).dim)
    assert torch.equal(mul_ir_from_ir_mul(ir_mul_from_mul_ir(x, blocks(FEAT)), blocks(FEAT)), x)


@pytest.mark.parametrize(
    "irreps, mode, internal",
    [
        ((FEAT, SH, FEAT + "+4x1e"), "uvu", False),  # x2 one copy of each irrep: the component-major contraction
        ((FEAT, SH, FEAT), "uvu", True),
        ((FEAT, "2x0e+3x1o", FEAT), "uvu", False),
        ((FEAT, SH, "3x0e+2x1o+5x2e+1x1e"), "uvw", False),
        (("4x0e+4x1o+4x2e", "4x0e+4x1o+4x2e", "4x0e+4x1o+4x2e+4x1e"), "uuu", False),
    ],
)
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_ir_mul_output_is_the_mul_ir_output_reordered_forward_and_backward(irreps, mode, internal, sparsity):
    with default_dtype(torch.float64):
        options = {"mode": mode, "sparsity": sparsity, "internal_weights": internal}
        ours = SparseTensorProduct(*irreps, **options)
        theirs = SparseTensorProduct(*irreps, **options, out_layout="ir_mul")
        if sparsity:
            with torch.no_grad():
                ours.path_weight.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(3))
        theirs.load_state_dict(ours.state_dict())
        x1, x2, w = _inputs(tp=ours, n=7)
        leaves = [t.requires_grad_() for t in (x1, x2, w) if t is not None] + list(ours.parameters())
        out_blocks = blocks(ours.irreps_out)
        cotangent = torch.randn(7, ours.irreps_out.dim, generator=torch.Generator().manual_seed(4))
        for phase in ("random", "adaptive", "fixed"):
            ours.set_phase(phase), theirs.set_phase(phase)
            torch.manual_seed(0)  # the random phase draws its paths in training mode: the same draw for both
            want = ir_mul_from_mul_ir(ours(x1, x2, w), out_blocks)
            torch.manual_seed(0)
            got = theirs(x1, x2, w)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
            their_leaves = leaves[: len(leaves) - len(list(ours.parameters()))] + list(theirs.parameters())
            want_grads = torch.autograd.grad((want * cotangent).sum(), leaves, allow_unused=True)
            got_grads = torch.autograd.grad((got * cotangent).sum(), their_leaves, allow_unused=True)
            for g_want, g_got in zip(want_grads, got_grads):
                assert (g_want is None) == (g_got is None)
                if g_want is not None:
                    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-12)


def test_bad_out_layout_is_a_clear_error():
    with pytest.raises(ValueError, match="out_layout must be one of"):
        SparseTensorProduct(FEAT, SH, FEAT, out_layout="ir-mul")


@pytest.mark.parametrize("out_layout", ["mul_ir", "ir_mul"])
def test_uuu_product_without_autograd_in_slices_of_rows_is_the_same(monkeypatch, out_layout):
    import metaham.nn.sparse_tp as sparse_tp

    with default_dtype(torch.float64):
        irreps = ("4x0e+4x1o+4x2e", "4x0e+4x1o+4x2e", "4x0e+4x1o+4x2e+4x1e")
        tp = SparseTensorProduct(*irreps, mode="uuu", sparsity=0.5, out_layout=out_layout)
        tp.set_phase("fixed")
        x1, x2, w = _inputs(tp, n=23)
        whole = tp(x1, x2, w)  # no input requires grad, but 23 rows fit in one slice
        # Slices of 80 numbers: one row at a time for 2e x 2e (25 x 4 channels per row: more than 80, but never
        # fewer than one row) and 1o x 2e (60), 20 rows then 3 for 0e x 0e (4): even and uneven slices
        monkeypatch.setattr(sparse_tp, "_OUTER_PRODUCT_ELEMENTS", 80)
        with torch.no_grad():
            sliced = tp(x1, x2, w)
            assert tp(x1[:0], x2[:0], w[:0]).shape == (0, tp.irreps_out.dim)  # no rows: one empty slice
        torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-12)
        want = _e3nn_with_path_scales(tp, x1, x2, w, _renormalised(tp, tp._kept))
        if out_layout == "ir_mul":
            want = ir_mul_from_mul_ir(want, blocks(tp.irreps_out))
        torch.testing.assert_close(sliced, want, rtol=0, atol=1e-12)
