"""The fused head-logit kernel (torch_ppl/kernels/similarity.py) against the reference.

Without a GPU the kernels run on the Triton CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes are tiny and example counts small.

Tolerance, Cut-Cross-Entropy style: the ground truth is the reference in float64 on the
inputs upcast; in bf16/fp16 the fused result may be as far from it as the reference fed the
same low-precision inputs, plus ``TOL[dtype]`` (helpers.assert_no_worse). In float32 a plain
``assert_close`` with the tolerances stated below.

Max pooling is discontinuous: when two prototypes of a class are within rounding of each
other, the fused kernel (whose GEMM rounds the prototypes to the feature dtype, like a
tensor-core matmul) may pick the other one, and the gradient then goes elsewhere. So for
``pooling="max"`` the test (a) checks that every winner the kernel picked is a maximum up to
a rounding bound, and (b) compares logits and gradients with the reference math evaluated at
the kernel's winners. Exact ties are checked separately: they must go to the lowest index.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import DEVICE, TOL, assert_no_worse, requires_triton
from torch_ppl import MultiPrototypeClassifier, reference
from torch_ppl import functional as PF

pytestmark = requires_triton

similarity_mod = pytest.importorskip("torch_ppl.kernels.similarity")
prototype_logits = similarity_mod.prototype_logits
from torch_ppl.kernels._common import as_blc  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FP32_TOL = dict(atol=2e-5, rtol=2e-5)
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


# ----------------------------------------------------------------------------- input builders
def make_x(layout: str, b: int, h: int, w: int, c: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Channel-last rows ``(..., C)`` in the layouts the functional layer hands the kernel."""
    if layout == "rows":  # (N, C), dense
        return torch.randn(b * h * w, c, generator=gen).to(DEVICE, dtype)
    if layout == "rows_strided":  # (N, C) with a row stride > C (a column slice)
        return torch.randn(b * h * w, c + 3, generator=gen).to(DEVICE, dtype)[:, 1:c + 1]
    x4 = torch.randn(b, c, h, w, generator=gen).to(DEVICE, dtype)
    if layout == "nchw":  # x.movedim(1, -1) of contiguous NCHW: channel stride H*W
        return x4.movedim(1, -1)
    if layout == "channels_last":
        return x4.contiguous(memory_format=torch.channels_last).movedim(1, -1)
    if layout == "nchw_sliced":  # every other column: still one (B, H*W, C) strided view
        big = torch.randn(b, c, h, 2 * w, generator=gen).to(DEVICE, dtype)
        return big[..., ::2].movedim(1, -1)
    if layout == "nchw_cropped":  # a crop in W: H and W do not merge into one pixel stride
        big = torch.randn(b, c, h, w + 2, generator=gen).to(DEVICE, dtype)
        return big[..., 1:w + 1].movedim(1, -1)
    raise AssertionError(layout)


def reference_at(x, protos, scale, bias, similarity, pooling, winners, dtype):
    """The reference's formula in ``dtype``; for max pooling evaluated at the given winners."""
    with torch.autocast(x.device.type, enabled=False):
        s = reference.prototype_similarity(x.to(dtype), protos.to(dtype), similarity)
        if pooling == "max":
            pooled = s.gather(-1, winners.unsqueeze(-1)).squeeze(-1)
        else:
            pooled = reference.pool(s, pooling)
        out = (scale.to(dtype) if isinstance(scale, torch.Tensor) else scale) * pooled
        if bias is not None:
            out = out + bias.to(dtype)
    return out


def kernel_winners(x, protos, similarity):
    """The forward kernel's max-pooling winners, shaped like the logits."""
    w_hat = protos.detach().float()
    if similarity == "cosine":
        w_hat = torch.nn.functional.normalize(w_hat, dim=-1, eps=reference.EPS)
    _, winners, _ = torch.ops.torch_ppl.prototype_logits_fwd(
        x.detach(), w_hat.contiguous(), torch.ones((), device=x.device), None, similarity == "cosine", "max")
    return winners.long().reshape(*x.shape[:-1], protos.shape[0])


def check_winners(x, protos, similarity, winners, dtype):
    """Each winner is a maximum up to the rounding of the kernel's GEMM."""
    s = reference.prototype_similarity(x.double(), protos.double(), similarity)
    if similarity == "cosine":
        bound = torch.ones_like(s)
    else:  # |<x, W>| rounding is bounded by u * sum |x_c W_c| <= u |x| |W|
        bound = x.double().norm(dim=-1)[..., None, None] * protos.double().norm(dim=-1)
    slack = (8 + x.shape[-1]) * UNIT_ROUNDOFF[dtype] * bound.amax(-1) + 1e-9
    picked = s.gather(-1, winners.unsqueeze(-1)).squeeze(-1)
    assert bool((picked >= s.amax(-1) - slack).all()), "a max-pooling winner is not a maximum"
    assert bool((winners >= 0).all() and (winners < protos.shape[1]).all())


# ----------------------------------------------------------------------------- main property
@st.composite
def problems(draw):
    layout = draw(st.sampled_from(["rows", "rows_strided", "nchw", "channels_last", "nchw_sliced", "nchw_cropped"]))
    if layout.startswith("rows"):
        b, h, w = 1, 1, draw(st.integers(1, 70))
    else:
        b, h, w = draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 7))
    return dict(
        layout=layout, b=b, h=h, w=w,
        c=draw(st.integers(1, 40)), k=draw(st.integers(1, 6)), m=draw(st.integers(1, 4)),
        similarity=draw(st.sampled_from(["cosine", "dot"])),
        pooling=draw(st.sampled_from(["max", "logsumexp", "mean"])),
        bias=draw(st.booleans()), learnable_scale=draw(st.booleans()),
        fp32_prototypes=draw(st.booleans()),  # the headline case: low-precision x, fp32 W
        x_grad=draw(st.sampled_from([True, True, False])),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=12)
@given(p=problems())
def test_matches_reference(dtype, p):
    gen = torch.Generator().manual_seed(p["seed"])
    k, m, c = p["k"], p["m"], p["c"]
    x = make_x(p["layout"], p["b"], p["h"], p["w"], c, dtype, gen).requires_grad_(p["x_grad"])
    w_dtype = torch.float32 if p["fp32_prototypes"] else dtype
    protos = torch.randn(k, m, c, generator=gen).to(DEVICE, w_dtype).requires_grad_()
    if p["similarity"] == "dot":  # keep dot logits O(1..10) as a trained head's would be
        protos = (protos.detach() / c**0.5).requires_grad_()
    scale = (torch.tensor(3.5, device=DEVICE, dtype=w_dtype).requires_grad_() if p["learnable_scale"] else 3.5)
    bias = torch.randn(k, generator=gen).to(DEVICE, w_dtype).requires_grad_() if p["bias"] else None
    sim, pool = p["similarity"], p["pooling"]

    out = prototype_logits(x, protos, scale, bias, similarity=sim, pooling=pool)
    assert out.shape == (*x.shape[:-1], k) and out.dtype == torch.float32
    grad_out = torch.randn(out.shape, generator=gen).to(DEVICE)
    inputs = [t for t in (x, protos, scale, bias) if isinstance(t, torch.Tensor) and t.requires_grad]
    fused_grads = torch.autograd.grad(out, inputs, grad_out)
    for g, t in zip(fused_grads, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape

    winners = None
    if pool == "max":
        winners = kernel_winners(x, protos, sim)
        check_winners(x.detach(), protos.detach(), sim, winners, dtype)

    def run(compute_dtype, upcast):
        leaves = [t.detach().to(compute_dtype if upcast else t.dtype).requires_grad_() for t in inputs]
        sub = dict(zip(map(id, inputs), leaves))
        args = [sub.get(id(t), t) if isinstance(t, torch.Tensor) else t for t in (x, protos, scale, bias)]
        res = reference_at(*args, sim, pool, winners, compute_dtype)
        return res, torch.autograd.grad(res, leaves, grad_out.to(compute_dtype))

    truth, truth_grads = run(torch.float64, upcast=True)
    names = [n for n, t in zip(("x", "prototypes", "scale", "bias"), (x, protos, scale, bias))
             if isinstance(t, torch.Tensor) and t.requires_grad]
    if dtype == torch.float32 and w_dtype == torch.float32:
        torch.testing.assert_close(out.double(), truth, **FP32_TOL)
        for name, g, gt in zip(names, fused_grads, truth_grads):
            # dx of cosine is divided by |x|, and dscale sums over all N*K logits
            tol = dict(atol=1e-4 * (1 + gt.abs().max().item()), rtol=1e-4)
            torch.testing.assert_close(g.double(), gt, **tol, msg=lambda s: f"grad {name}: {s}")
    else:
        same, same_grads = run(torch.float32, upcast=False)
        tol = TOL[dtype]
        assert_no_worse(out, same, truth, tol, "logits")
        for name, g, gs, gt in zip(names, fused_grads, same_grads, truth_grads):
            # grads of reductions over pixels (prototypes, scale, bias) sum N roundings
            scale_tol = tol if name == "x" else tol * (1 + x.shape[:-1].numel() ** 0.5)
            assert_no_worse(g, gs.to(g.dtype), gt, scale_tol, f"grad {name}")


# ----------------------------------------------------------------------------- specific cases
@pytest.mark.parametrize("pooling", ["max", "logsumexp", "mean"])
def test_single_pixel_one_prototype_wide_channels(pooling):
    """N = 1, P = 1, C > one CPU block of 16 and not a power of two."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 37, generator=gen).to(DEVICE).requires_grad_()
    protos = torch.randn(1, 1, 37, generator=gen).to(DEVICE).requires_grad_()
    out = prototype_logits(x, protos, 10.0, None, similarity="cosine", pooling=pooling)
    ref = reference.prototype_logits(x, protos, 10.0, None, similarity="cosine", pooling=pooling)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    g = torch.autograd.grad(out.sum(), (x, protos))
    r = torch.autograd.grad(ref.sum(), (x, protos))
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("learnable_scale", [False, True])
@pytest.mark.parametrize("pooling", ["max", "logsumexp", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_classes_cross_class_tiles_and_prototype_tiles(pooling, dtype, learnable_scale):
    """K = 37 classes of M = 3: the forward and dx walk three class tiles of 16 (the last one
    padded), the flat prototype axis (P = 111) crosses prototype tiles of the dW kernel in the
    middle of a class; a learnable scale makes dx recompute the similarities for dscale, a
    fixed one lets max and mean pooling skip them."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 20, 3, 5, generator=gen).to(DEVICE, dtype).movedim(1, -1).requires_grad_()
    protos = torch.randn(37, 3, 20, generator=gen).to(DEVICE).requires_grad_()
    scale = torch.tensor(4.0, device=DEVICE).requires_grad_(learnable_scale)
    bias = torch.randn(37, generator=gen).to(DEVICE).requires_grad_()
    inputs = (x, protos, scale, bias) if learnable_scale else (x, protos, bias)
    names = ("x", "prototypes", "scale", "bias") if learnable_scale else ("x", "prototypes", "bias")
    out = prototype_logits(x, protos, scale, bias, similarity="cosine", pooling=pooling)
    grad = torch.randn(out.shape, generator=gen).to(DEVICE)
    fused = torch.autograd.grad(out, inputs, grad)
    winners = kernel_winners(x, protos, "cosine") if pooling == "max" else None

    def run(compute_dtype, upcast):
        leaves = [t.detach().to(compute_dtype if upcast else t.dtype).requires_grad_() for t in (x, protos, scale, bias)]
        res = reference_at(*leaves, "cosine", pooling, winners, compute_dtype)
        wanted = [leaf for leaf, t in zip(leaves, (x, protos, scale, bias)) if t.requires_grad]
        return res, torch.autograd.grad(res, wanted, grad.to(compute_dtype))

    truth, truth_grads = run(torch.float64, upcast=True)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), truth, **FP32_TOL)
        for g, gt in zip(fused, truth_grads):
            torch.testing.assert_close(g.double(), gt, atol=1e-4 * (1 + gt.abs().max().item()), rtol=1e-4)
    else:
        same, same_grads = run(torch.float32, upcast=False)
        assert_no_worse(out, same, truth, TOL[dtype], "logits")
        for name, g, gs, gt in zip(names, fused, same_grads, truth_grads):
            tol = TOL[dtype] if name == "x" else TOL[dtype] * (1 + x.shape[:-1].numel() ** 0.5)
            assert_no_worse(g, gs.to(g.dtype), gt, tol, f"grad {name}")


def test_max_ties_go_to_lowest_index():
    """Duplicate prototypes tie exactly: the logit is theirs and the whole gradient goes to the
    first of them, as torch.argmax does in the reference."""
    gen = torch.Generator().manual_seed(1)
    protos = torch.randn(3, 4, 20, generator=gen)
    protos[:, 2] = protos[:, 1]
    protos[:, 3] = protos[:, 1]
    x = protos[:, 1].repeat(5, 1) + 0.0  # every pixel equals a duplicated prototype of its class
    x, protos = x.to(DEVICE).requires_grad_(), protos.to(DEVICE).requires_grad_()
    out = prototype_logits(x, protos, 1.0, None, similarity="dot", pooling="max")
    ref = reference.prototype_logits(x, protos, 1.0, None, similarity="dot", pooling="max")
    torch.testing.assert_close(out, ref, **FP32_TOL)
    (dw,) = torch.autograd.grad(out.sum(), protos)
    (rw,) = torch.autograd.grad(ref.sum(), protos)
    torch.testing.assert_close(dw, rw, **FP32_TOL)
    assert kernel_winners(x, protos, "dot").ne(2).all() and kernel_winners(x, protos, "dot").ne(3).all()


def test_many_prototypes_per_class_int16_winners():
    """M > 127: the saved winners switch from int8 to int16 and must still index correctly."""
    gen = torch.Generator().manual_seed(10)
    v = torch.randn(8, generator=gen)
    protos = torch.randn(2, 130, 8, generator=gen)
    protos[:, 129] = v  # the winner of both classes, an index int8 cannot hold
    x = (v + 0.01 * torch.randn(5, 8, generator=gen)).to(DEVICE).requires_grad_()
    protos = protos.to(DEVICE).requires_grad_()
    out = prototype_logits(x, protos, 3.0, None, similarity="cosine", pooling="max")
    ref = reference.prototype_logits(x, protos, 3.0, None, similarity="cosine", pooling="max")
    torch.testing.assert_close(out, ref, **FP32_TOL)
    w_hat = torch.nn.functional.normalize(protos.detach(), dim=-1)
    _, winners, _ = torch.ops.torch_ppl.prototype_logits_fwd(x.detach(), w_hat, torch.ones((), device=DEVICE), None,
                                                          True, "max")
    assert winners.dtype == torch.int16 and bool((winners == 129).all())
    g = torch.randn(out.shape, generator=gen).to(DEVICE)
    for a, b in zip(torch.autograd.grad(out, (x, protos), g), torch.autograd.grad(ref, (x, protos), g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pooling", ["max", "logsumexp", "mean"])
def test_zero_feature_row_matches_reference(pooling):
    """A zero row takes F.normalize's eps branch (x / eps): same logits and gradient. For max
    and mean pooling dx takes the normalisation's radial term from the logits, which the eps
    branch must not subtract (a row of norm 1e-14 would otherwise be off by |x| / eps)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 24, generator=gen)
    x[3] = 0.0
    x[4] = 1e-14  # |x| < eps, not zero
    x, protos = x.to(DEVICE).requires_grad_(), torch.randn(2, 3, 24, generator=gen).to(DEVICE).requires_grad_()
    scale = torch.tensor(2.0, device=DEVICE).requires_grad_()
    bias = torch.randn(2, generator=gen).to(DEVICE).requires_grad_()
    out = prototype_logits(x, protos, scale, bias, similarity="cosine", pooling=pooling)
    ref = reference.prototype_logits(x, protos, scale, bias, similarity="cosine", pooling=pooling)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    g = torch.randn(out.shape, generator=gen).to(DEVICE)
    leaves = (x, protos, scale, bias)
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_scale_gradient_without_feature_gradient(pooling, similarity):
    """Frozen features, a learnable scale: dscale comes from the logits alone (sum_k g (logits -
    bias) / scale), with no dx to form; bias and prototype gradients as the reference's."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 20, 3, 7, generator=gen).to(DEVICE).movedim(1, -1)
    protos = torch.randn(5, 3, 20, generator=gen).to(DEVICE).requires_grad_()
    scale = torch.tensor(3.0, device=DEVICE).requires_grad_()
    bias = torch.randn(5, generator=gen).to(DEVICE).requires_grad_()
    out = prototype_logits(x, protos, scale, bias, similarity=similarity, pooling=pooling)
    ref = reference.prototype_logits(x, protos, scale, bias, similarity=similarity, pooling=pooling)
    g = torch.randn(out.shape, generator=gen).to(DEVICE)
    for a, b in zip(torch.autograd.grad(out, (protos, scale, bias), g),
                    torch.autograd.grad(ref, (protos, scale, bias), g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("similarity, learnable, kept", [("cosine", False, True), ("dot", True, True),
                                                         ("dot", False, False)])
def test_logits_are_saved_only_where_the_backward_reads_them(similarity, learnable, kept):
    """Max pooling reads the logits in the backward for cosine similarity and for dscale; a
    dot-product head with a fixed scale (the 1x1 conv it replaces) keeps nothing of its output."""
    head = MultiPrototypeClassifier(16, 4, 2, similarity=similarity, learnable_scale=learnable,
                                    backend="triton").to(DEVICE)
    x = torch.randn(2, 16, 3, 5, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logits = head(x)
    assert any(t.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr() for t in saved) == kept
    logits.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_logits_edited_in_place(memory_format):
    """Logits are a plain tensor: a dot-product head with a fixed scale (the 1x1 conv it
    replaces) may have them masked in place and gets the reference's gradients (NCHW logits
    used to be a view made inside the op, which autograd refuses to see edited). A head whose
    backward reads its logits (cosine) raises autograd's error instead of a wrong gradient."""
    gen = torch.Generator().manual_seed(9)
    x0 = torch.randn(2, 16, 3, 5, generator=gen).to(DEVICE).contiguous(memory_format=memory_format)
    grads = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(0)
        head = MultiPrototypeClassifier(16, 4, 2, similarity="dot", scale=1.0, bias=True, backend=backend).to(DEVICE)
        x = x0.clone(memory_format=torch.preserve_format).requires_grad_()
        logits = head(x)
        logits[:, 1] = -1e4
        (logits * torch.arange(15.0, device=DEVICE).view(1, 1, 3, 5)).sum().backward()
        grads[backend] = (x.grad, head.prototypes.grad, head.bias.grad)
    for a, b in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, **FP32_TOL)
    head = MultiPrototypeClassifier(16, 4, 2, backend="triton").to(DEVICE)
    logits = head(x0.clone(memory_format=torch.preserve_format).requires_grad_())
    logits[:, 1] = -1e4
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logits.sum().backward()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("pooling", ["max", "logsumexp", "mean"])
def test_non_finite_features_give_non_finite_logits(pooling):
    x = torch.randn(4, 16, device=DEVICE)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    out = prototype_logits(x, torch.randn(3, 2, 16, device=DEVICE), 1.0, None, similarity="cosine", pooling=pooling)
    assert torch.isfinite(out[[0, 3]]).all()
    assert not torch.isfinite(out[1]).any() and not torch.isfinite(out[2]).any()


def test_float64_raises_type_error():
    x = torch.randn(4, 8, device=DEVICE, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='reference'"):
        prototype_logits(x, torch.randn(2, 2, 8, device=DEVICE), 1.0, None, similarity="cosine", pooling="max")
    with pytest.raises(TypeError, match="prototypes"):
        prototype_logits(x.float(), torch.randn(2, 2, 8, device=DEVICE, dtype=torch.float64), 1.0, None,
                         similarity="cosine", pooling="max")


def test_empty_input():
    x = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    protos = torch.randn(3, 2, 8, device=DEVICE, requires_grad=True)
    out = prototype_logits(x, protos, 1.0, None, similarity="cosine", pooling="max")
    assert out.shape == (0, 3)
    dx, dw = torch.autograd.grad(out.sum(), (x, protos))
    assert dx.shape == x.shape and not dw.any()


def test_output_layout_follows_features():
    """NCHW features: logits written into a (B, K, H, W)-contiguous buffer (the functional
    layer's move back is free); channels_last: a channels_last buffer."""
    gen = torch.Generator().manual_seed(3)
    x4 = torch.randn(2, 8, 3, 5, generator=gen).to(DEVICE)
    protos = torch.randn(4, 2, 8, generator=gen).to(DEVICE)
    out = prototype_logits(x4.movedim(1, -1), protos, 1.0, None, similarity="cosine", pooling="mean")
    assert out.movedim(-1, 1).is_contiguous()
    out_cl = prototype_logits(x4.contiguous(memory_format=torch.channels_last).movedim(1, -1), protos, 1.0, None,
                              similarity="cosine", pooling="mean")
    assert out_cl.is_contiguous()
    torch.testing.assert_close(out, out_cl, **FP32_TOL)


@pytest.mark.parametrize("layout", ["rows", "rows_strided", "nchw", "channels_last", "nchw_sliced"])
def test_strided_layouts_reach_the_kernel_without_a_copy(layout):
    """The kernels take (B, L, C) strides: every layout whose pixel axes merge into one stride
    is passed as a view of x's memory (a crop in W is not one of them and is copied)."""
    x = make_x(layout, 2, 3, 4, 5, torch.float32, torch.Generator().manual_seed(9))
    view = as_blc(x)
    assert view.dim() == 3 and view.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


def test_autocast_returns_fp32_logits_and_input_dtype_grads():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 12, 3, 3, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    head = MultiPrototypeClassifier(12, 3, 2, backend="triton").to(DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = head(x)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and head.prototypes.grad.dtype == torch.float32


# ----------------------------------------------------------------------------- torch.library / compile
def _small_inputs(requires_grad=True):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 10, 3, 4, generator=gen).to(DEVICE).movedim(1, -1)
    w_hat = torch.nn.functional.normalize(torch.randn(3, 2, 10, generator=gen), dim=-1).to(DEVICE)
    scale = torch.tensor(2.0, device=DEVICE)
    bias = torch.randn(3, generator=gen).to(DEVICE)
    if requires_grad:
        x, w_hat, scale, bias = (t.requires_grad_() for t in (x, w_hat, scale, bias))
    return x, w_hat, scale, bias


@pytest.mark.parametrize("pooling", ["max", "logsumexp"])
def test_opcheck_forward(pooling):
    x, w_hat, scale, bias = _small_inputs()
    torch.library.opcheck(torch.ops.torch_ppl.prototype_logits_fwd.default, (x, w_hat, scale, bias, True, pooling))
    torch.library.opcheck(torch.ops.torch_ppl.prototype_logits_fwd.default, (x, w_hat, scale, None, False, pooling))


@pytest.mark.parametrize("pooling", ["max", "logsumexp"])
def test_opcheck_backward(pooling):
    x, w_hat, scale, bias = _small_inputs(requires_grad=False)
    logits, stat, inv = torch.ops.torch_ppl.prototype_logits_fwd(x, w_hat, scale, bias, True, pooling)
    grad = torch.randn_like(logits)
    saved = (logits, bias) if pooling == "max" else (None, None)
    for flags in ((True, True, True), (False, True, False)):
        torch.library.opcheck(torch.ops.torch_ppl.prototype_logits_bwd.default,
                              (grad, x, w_hat, scale, stat, inv, *saved, True, pooling, *flags),
                              test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    """fullgraph=True fails on any graph break. backend="aot_eager": inductor would try to
    compile the surrounding graph with a C++ toolchain on CPU, which CI does not need to test;
    the custom ops are opaque nodes for either backend, and aot_eager also traces the backward."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 10, 3, 4, generator=gen).to(DEVICE).requires_grad_()
    protos = torch.randn(3, 2, 10, generator=gen).to(DEVICE).requires_grad_()
    scale = torch.tensor(4.0, device=DEVICE, requires_grad=True)

    def f(x, protos, scale):
        return PF.prototype_logits(x, protos, scale=scale, pooling="logsumexp", backend="triton").square().mean()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c = compiled(x, protos, scale)
    grads_c = torch.autograd.grad(loss_c, (x, protos, scale))
    loss_e = f(x, protos, scale)
    grads_e = torch.autograd.grad(loss_e, (x, protos, scale))
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


def test_deterministic_mode_is_bitwise_repeatable():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(67, 24, generator=gen).to(DEVICE).requires_grad_()
    protos = torch.randn(5, 3, 24, generator=gen).to(DEVICE).requires_grad_()
    scale = torch.tensor(5.0, device=DEVICE, requires_grad=True)
    g = torch.randn(67, 5, generator=gen).to(DEVICE)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        runs = []
        for _ in range(2):
            out = prototype_logits(x, protos, scale, None, similarity="cosine", pooling="max")
            runs.append([out, *torch.autograd.grad(out, (x, protos, scale), g)])
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    # and the atomic path agrees with it (up to summation order)
    out = prototype_logits(x, protos, scale, None, similarity="cosine", pooling="max")
    for a, b in zip(torch.autograd.grad(out, (x, protos, scale), g), runs[0][1:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- public API end to end
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_module_triton_matches_reference(memory_format):
    gen = torch.Generator().manual_seed(8)
    torch.manual_seed(8)
    heads = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(8)
        heads[backend] = MultiPrototypeClassifier(19, 4, 3, pooling="max", learnable_scale=True, bias=True,
                                                  backend=backend).to(DEVICE)
    x = torch.randn(2, 19, 5, 6, generator=gen).to(DEVICE).contiguous(memory_format=memory_format)
    outs, grads = {}, {}
    for backend, head in heads.items():
        xb = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        outs[backend] = head(xb)
        outs[backend].square().sum().backward()
        grads[backend] = [xb.grad] + [p.grad for p in head.parameters()]
    assert outs["triton"].shape == (2, 4, 5, 6)
    assert outs["triton"].is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(outs["triton"], outs["reference"], **FP32_TOL)
    for a, b in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
