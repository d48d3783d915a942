"""The cuequivariance backend computes what our contraction computes: forward and gradients, every mode, dense and
fixed-phase products, per-row and shared weights, full and compact layouts; it follows the phases and the
state_dict; a fixed-phase QH9 model predicts the same matrices with it. Runs on a CPU (cuequivariance-torch's
"naive" method); on CUDA the same code picks NVIDIA's kernels."""
import pytest
import torch

from equivariance import assert_equivariant, default_dtype
from metaham.nn import SparseTensorProduct, SparsityScheduler, use_backend
from metaham.nn import cue_backend

pytest.importorskip("cuequivariance_torch")  # a declared test dependency: skipped only outside `make test`

CASES = {
    "uvu, spherical harmonics": ("uvu", "6x0e+4x1o+4x2e", "0e+1o+2e", "6x0e+4x1o+4x2e+4x1e"),
    "uvu, x2 with channels": ("uvu", "3x0e+2x1o", "2x0e+2x1o", "3x0e+2x1o+2x1e"),
    "uvw": ("uvw", "4x0e+3x1o", "2x0e+2x1o", "5x0e+3x1o+2x1e"),
    "uuu": ("uuu", "4x0e+4x1o+4x2e", "4x0e+4x1o+4x2e", "4x0e+4x1o+4x1e+4x2e"),
}


def _product(case: str, sparsity: float, shared: bool = False, out_layout: str = "mul_ir") -> SparseTensorProduct:
    """A float64 product in its fixed phase (random gate weights, so not simply the first paths)."""
    mode, *irreps = CASES[case]
    with default_dtype(torch.float64):
        tp = SparseTensorProduct(
            *irreps, mode=mode, sparsity=sparsity, internal_weights=shared, per_output=True, out_layout=out_layout
        )
    if sparsity:
        with torch.no_grad():
            tp.path_weight.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(3))
        tp.set_phase("fixed")
    return tp


def _inputs(tp: SparseTensorProduct, n: int = 17, compact: bool = False):
    g = torch.Generator().manual_seed(5)
    x1 = torch.randn(n, tp.irreps_in1.dim, generator=g, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(n, tp.irreps_in2.dim, generator=g, dtype=torch.float64, requires_grad=True)
    if tp.internal_weights:
        return x1, x2, None
    width = len(tp.weight_columns) if compact else tp.weight_numel
    return x1, x2, torch.randn(n, width, generator=g, dtype=torch.float64, requires_grad=True)


def _value_and_grads(tp, x1, x2, w):
    out = tp(x1, x2, w)
    leaves = [t for t in (x1, x2, w, getattr(tp, "weight", None)) if t is not None]
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype).to(out.device)
    return out, torch.autograd.grad((out * cotangent).sum(), leaves)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sparsity", [0.0, 0.6])
@pytest.mark.parametrize("shared", [False, True], ids=["per-row", "shared"])
@pytest.mark.parametrize("out_layout", ["mul_ir", "ir_mul"])
def test_cuequivariance_matches_our_contraction_forward_and_backward(case, sparsity, shared, out_layout):
    tp = _product(case, sparsity, shared, out_layout)
    x1, x2, w = _inputs(tp)
    ours, our_grads = _value_and_grads(tp, x1, x2, w)
    tp.set_backend("cuequivariance")
    assert tp.runs_on == "cuequivariance" and tp.backend_method == "naive"
    theirs, their_grads = _value_and_grads(tp, x1, x2, w)
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(theirs, ours, rtol=1e-12, atol=1e-12)
    for a, b in zip(their_grads, our_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    tp.set_backend("torch")
    assert tp.runs_on == "torch" and torch.equal(tp(x1, x2, w), ours)


@pytest.mark.parametrize("case", ["uvu, spherical harmonics", "uuu"])
def test_compact_weights_read_the_same_columns(case):
    tp = _product(case, 0.6)
    x1, x2, w = _inputs(tp)
    tp.set_backend("cuequivariance")
    full = tp(x1, x2, w)
    compact = tp(x1, x2, w.index_select(1, tp.weight_columns))
    torch.testing.assert_close(compact, full, rtol=0, atol=0)


def test_the_backend_takes_over_when_the_paths_are_fixed_and_follows_a_loaded_state():
    tp = _product("uvu, spherical harmonics", 0.0)
    with default_dtype(torch.float64):
        sparse = SparseTensorProduct(*CASES["uvu, spherical harmonics"][1:], sparsity=0.6, per_output=True)
    sparse.set_backend("cuequivariance")
    scheduler = SparsityScheduler(sparse, random_steps=1, adaptive_steps=1)
    assert sparse.phase == "random" and sparse.runs_on == "torch"  # the kept set still changes: ours runs
    scheduler.step()
    assert sparse.phase == "adaptive" and sparse.runs_on == "torch"
    scheduler.step()
    assert sparse.phase == "fixed" and sparse.runs_on == "cuequivariance"

    # The choice is not state: the same keys either way, and a loaded kept set rebuilds the polynomial.
    plain = _product("uvu, spherical harmonics", 0.6)
    assert plain.state_dict().keys() == sparse.state_dict().keys()
    sparse.load_state_dict(plain.state_dict())
    assert sparse.kept_paths == plain.kept_paths and sparse.runs_on == "cuequivariance"
    x1, x2, w = _inputs(plain)
    torch.testing.assert_close(sparse(x1, x2, w), plain(x1, x2, w), rtol=1e-12, atol=1e-12)
    assert use_backend(torch.nn.Sequential(tp, sparse), "torch") == 2 and sparse.runs_on == "torch"


def test_the_cuequivariance_product_is_equivariant():
    tp = _product("uuu", 0.6)
    tp.set_backend("cuequivariance")
    x1, x2, w = _inputs(tp)
    w = w.detach()
    assert_equivariant(lambda a, b: tp(a, b, w), [(x1.detach(), tp.irreps_in1), (x2.detach(), tp.irreps_in2)],
                       tp.irreps_out)


def test_bad_backend_or_method_names_it_and_a_missing_library_says_what_to_install(monkeypatch):
    tp = _product("uvw", 0.0)
    with pytest.raises(ValueError, match="'cuda'"):
        tp.set_backend("cuda")
    with pytest.raises(ValueError, match="'fast'"):
        tp.set_backend("cuequivariance", method="fast")
    monkeypatch.setattr(cue_backend, "available", lambda: False)
    with pytest.raises(ImportError, match="pip install cuequivariance-torch"):
        tp.set_backend("cuequivariance")
    assert tp.runs_on == "torch"


def test_default_method_is_naive_on_cpu_and_fused_on_cuda():
    assert cue_backend.default_method("cpu") == "naive"
    assert cue_backend.default_method("cuda:0") == "fused_tp"


def test_a_product_cast_after_choosing_the_backend_computes_in_its_new_dtype():
    with default_dtype(torch.float32):
        tp = SparseTensorProduct(*CASES["uuu"][1:], mode="uuu")
    tp.set_backend("cuequivariance")
    tp = tp.double()
    x1, x2, w = _inputs(tp)
    theirs = tp(x1, x2, w)
    tp.set_backend("torch")
    assert theirs.dtype == torch.float64
    torch.testing.assert_close(theirs, tp(x1, x2, w), rtol=1e-12, atol=1e-12)


CUDA_METHODS = ["naive", "fused_tp", "uniform_1d"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", CUDA_METHODS)
@pytest.mark.parametrize("case", ["uvu, spherical harmonics", "uuu"])
def test_on_cuda_each_method_matches_our_contraction(case, method):
    """On a GPU: NVIDIA's kernels (``pip install 'metaham[cuda]'``) against our contraction, float32 and float64."""
    if method != "naive":
        pytest.importorskip("cuequivariance_ops_torch")
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        tp = _product(case, 0.6).to("cuda", dtype)
        x1, x2, w = (t.detach().to("cuda", dtype).requires_grad_() for t in _inputs(tp))
        ours, our_grads = _value_and_grads(tp, x1, x2, w)
        try:
            tp.set_backend("cuequivariance", method)
            theirs, their_grads = _value_and_grads(tp, x1, x2, w)
        except NotImplementedError as exc:  # a kernel that does not take this product's shape: say which
            pytest.skip(f"{method}: {exc}")
        assert tp.backend_method == method
        scale = float(ours.abs().max())
        torch.testing.assert_close(theirs, ours, rtol=0, atol=tolerance * scale)
        for a, b in zip(their_grads, our_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=tolerance * float(b.abs().max()))


def test_a_backend_that_cannot_be_built_leaves_the_product_as_it_was(monkeypatch):
    tp = _product("uvu, spherical harmonics", 0.6)
    x1, x2, w = _inputs(tp)
    before = tp(x1, x2, w)

    def refuse(*args, **kwargs):
        raise NotImplementedError("this kernel does not take that product")

    monkeypatch.setattr(cue_backend, "CuePathContraction", refuse)
    with pytest.raises(NotImplementedError):
        tp.set_backend("cuequivariance")
    assert tp.backend == "torch" and tp.runs_on == "torch" and torch.equal(tp(x1, x2, w), before)
