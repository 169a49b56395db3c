"""The attention's two GPU forms: the fused fast form and the projected form
(torch_ppl/kernels/projected.py), and the rule that picks between them.

The projected form is chosen by default only on CUDA tensors; here it is forced
(``TORCH_PPL_ATTENTION_FORM=projected``) so that the whole path a GPU user takes (functional API
-> ``backend="triton"`` -> projected form) runs on the CPU. The fused kernels' own tests (test_kernel_attention.py) are unaffected:
on the interpreter the fast form always runs.
"""
from __future__ import annotations

import contextlib
import os
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import DEVICE, LOW_PRECISION, TOL, assert_no_worse, requires_triton
from test_kernel_attention import FP32, NO_SHRINK, make_case, run
from test_kernel_attention import shapes as kernel_shapes

pytestmark = requires_triton

import torch_ppl  # noqa: E402
from torch_ppl import reference  # noqa: E402

CUDA = torch.device("cuda")
VOC = dict(channels=256, num_protos=210)
ADE = dict(channels=512, num_protos=1500)


def _projected():
    from torch_ppl.kernels import projected

    return projected


@contextlib.contextmanager
def projected_form():
    """Every call through ``backend="triton"`` takes the projected form (the environment variable
    a user would set); yields the list of the projected form's calls."""
    projected = _projected()
    with mock.patch.dict(os.environ, {projected.FORM_ENV_VAR: "projected"}), \
            mock.patch.object(projected, "prototype_attention", wraps=projected.prototype_attention) as spy:
        yield spy.call_args_list


# the fused kernels' shapes, without exclude= (which the projected form does not take)
shapes = kernel_shapes.map(lambda case: dict(case, exclude=False))


@settings(max_examples=15, phases=NO_SHRINK, deadline=None)
@given(case=shapes, seed=st.integers(0, 2 ** 16))
def test_projected_form_matches_reference_fp32(case, seed):
    """Forward and every gradient, through the functional API, layouts and strides included."""
    x, w, params, labels = make_case(seed, **case)
    with projected_form() as calls:
        out, grads = run(x, w, params, labels, case["num_heads"], "triton")
    ref_out, ref_grads = run(x, w, params, labels, case["num_heads"], "reference")
    assert calls, "the projected form did not run"
    torch.testing.assert_close(out, ref_out, **FP32)
    assert set(grads) == set(ref_grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **FP32, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@settings(max_examples=6, phases=NO_SHRINK, deadline=None)
@given(case=shapes, seed=st.integers(0, 2 ** 16))
def test_projected_form_low_precision_no_worse_than_reference(case, seed, dtype):
    x, w, params, labels = make_case(seed, **case, x_dtype=dtype)
    with projected_form() as calls:
        out, grads = run(x, w, params, labels, case["num_heads"], "triton")
    assert calls
    same, same_grads = run(x, w, params, labels, case["num_heads"], "reference")
    gt, gt_grads = run(x, w, params, labels, case["num_heads"], "reference", upcast=True)
    assert out.dtype == dtype and grads["x"].dtype == dtype
    assert_no_worse(out, same, gt, TOL[dtype], "out")
    for name in grads:
        assert_no_worse(grads[name], same_grads[name], gt_grads[name], TOL[dtype], f"d{name}")


def test_projected_form_gradcheck_float64():
    """The projected form is plain PyTorch: its float64 gradients agree with finite differences."""
    projected = _projected()
    gen = torch.Generator().manual_seed(3)
    c, h, d, p = 5, 2, 3, 4

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()

    args = (randn(2, 3, c), randn(p, c), randn(h * d, c), randn(h * d, c), randn(h * d, c), randn(c, h * d),
            randn(h * d), randn(h * d), randn(h * d), randn(c), randn(c))

    def fn(*a):
        return projected.prototype_attention(*a, num_heads=h)

    assert torch.autograd.gradcheck(fn, args)
    torch.testing.assert_close(fn(*args), reference.prototype_attention(*args, num_heads=h), rtol=1e-12, atol=1e-12)


def test_projected_form_ignores_autocast():
    """Like the fused kernels and the reference, the projected form computes in float32 under
    autocast; the output keeps x's dtype, each gradient its parameter's."""
    case = dict(layout="nchw", batch=1, height=3, width=4, channels=16, num_heads=2, head_dim=8,
                num_classes=3, protos_per_class=2, bias=True, gamma=True, exclude=False)
    x, w, params, labels = make_case(7, **case, x_dtype=torch.bfloat16)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        with projected_form() as calls:
            out, grads = run(x, w, params, labels, 2, "triton")
        same, same_grads = run(x, w, params, labels, 2, "reference")
    gt, gt_grads = run(x, w, params, labels, 2, "reference", upcast=True)
    assert calls
    assert out.dtype == torch.bfloat16
    # float32 arithmetic, not bfloat16: the output agrees with the reference's to float32
    # rounding (then rounded once to bfloat16)
    torch.testing.assert_close(out, same, rtol=2 ** -8, atol=1e-5)
    assert_no_worse(out, same, gt, TOL[torch.bfloat16], "out")
    for name in grads:
        assert grads[name].dtype == same_grads[name].dtype, name
        assert_no_worse(grads[name], same_grads[name], gt_grads[name], TOL[torch.bfloat16], f"d{name}")


def _autograd_nodes(t):
    """Names of the autograd nodes that produced ``t``."""
    seen, names, todo = set(), set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo += [next_fn for next_fn, _ in node.next_functions]
    return names


def test_projected_form_module_compile_and_no_pixels(monkeypatch):
    """PPLAttention on the projected form: torch.compile(fullgraph=True) traces it, and an input
    without pixels gives an empty output."""
    monkeypatch.setenv("TORCH_PPL_ATTENTION_FORM", "projected")
    module = torch_ppl.PPLAttention(16, num_heads=2, layer_scale=0.5, backend="triton").to(DEVICE)
    x = torch.randn(2, 16, 3, 5, device=DEVICE)
    w = torch.randn(4, 3, 16, device=DEVICE)
    eager = module(x, w)
    names = _autograd_nodes(eager)
    assert any("ScaledDotProduct" in n for n in names), names
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")(x, w)
    empty = module(x[:, :, :0], w)
    module.backend = "reference"
    ref = module(x, w)
    torch.testing.assert_close(eager, ref, **FP32)
    torch.testing.assert_close(compiled, ref, **FP32)
    assert empty.shape == (2, 16, 0, 5)


def test_only_cuda_features_take_the_projected_form():
    choose = _projected().choose_form
    args = dict(x_dtype=torch.float32, channels=256, num_heads=8, num_protos=210, inner=256)
    assert choose(CUDA, **args, exclude=False) == "projected"
    assert choose(torch.device("cpu"), **args, exclude=False) == "fast"
    assert choose(torch.device("meta"), **args, exclude=False) == "fast"


def test_exclude_deterministic_and_odd_heads_keep_the_fast_form():
    choose = _projected().choose_form
    args = dict(x_dtype=torch.float32, channels=256, num_protos=210)
    assert choose(CUDA, **args, num_heads=8, inner=256, exclude=True) == "fast"
    assert choose(CUDA, **args, num_heads=8, inner=8 * 40, exclude=False) == "projected"
    assert choose(CUDA, **args, num_heads=8, inner=8 * 33, exclude=False) == "fast"
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert choose(CUDA, **args, num_heads=8, inner=256, exclude=False) == "fast"
    finally:
        torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize("shape", [VOC, ADE], ids=["voc", "ade"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tf32", [False, True])
def test_one_head_keeps_the_fast_form(shape, dtype, tf32):
    """PPLAttention's default (one head, d = C) runs the fused kernels at the benchmark shapes,
    in every feature dtype and whether or not float32 matmuls may use TF32."""
    choose = _projected().choose_form
    c = shape["channels"]
    was = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        assert choose(CUDA, dtype, c, 1, shape["num_protos"], c, exclude=False) == "fast"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was


def test_form_costs_fast_grows_with_heads_projected_does_not():
    costs = _projected().form_costs
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        one_fast, one_proj = costs(1, 210, 256, 256, dtype, False)
        for h in (2, 4, 8):
            fast, proj = costs(h, 210, 256, 256, dtype, False)
            assert fast == pytest.approx(h * one_fast)
            assert proj == pytest.approx(one_proj)
        # TF32 projections only make the projected form cheaper
        assert costs(8, 210, 256, 256, dtype, True)[1] < one_proj
    # with TF32 allowed the fused kernels multiply float32 features in TF32, as bfloat16's
    assert costs(8, 210, 256, 256, torch.float32, True)[0] == costs(8, 210, 256, 256, torch.bfloat16, True)[0]


def test_many_heads_of_float32_features_take_the_projected_form():
    """Eight heads at voc (the docs' examples): float32 features take the projected form;
    bfloat16 features, and float32 ones with TF32 allowed, keep the fused kernels, whose GEMMs
    run on tensor cores."""
    choose = _projected().choose_form
    voc = dict(channels=256, num_heads=8, num_protos=210, inner=256, exclude=False)
    assert choose(CUDA, torch.float32, **voc) == "projected"
    assert choose(CUDA, torch.bfloat16, **voc) == "fast"
    was = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:  # the fused kernels then multiply float32 features in TF32 too
        assert choose(CUDA, torch.float32, **voc) == "fast"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was


def test_form_environment_variable(monkeypatch):
    choose = _projected().choose_form
    voc = dict(channels=256, num_heads=8, num_protos=210, inner=256)
    monkeypatch.setenv("TORCH_PPL_ATTENTION_FORM", "fast")
    assert choose(CUDA, torch.float32, **voc, exclude=False) == "fast"
    monkeypatch.setenv("TORCH_PPL_ATTENTION_FORM", "projected")
    assert choose(torch.device("cpu"), torch.bfloat16, **voc, exclude=False) == "projected"
    assert choose(CUDA, torch.float32, **voc, exclude=True) == "fast"  # no mask in the projected form
    monkeypatch.setenv("TORCH_PPL_ATTENTION_FORM", "auto")
    assert choose(CUDA, torch.float32, **voc, exclude=False) == "projected"
    monkeypatch.setenv("TORCH_PPL_ATTENTION_FORM", "flash")
    with pytest.raises(ValueError, match="TORCH_PPL_ATTENTION_FORM must be one of"):
        choose(CUDA, torch.float32, **voc, exclude=False)


def test_exclude_runs_the_fused_kernels_even_when_projected_is_asked_for(monkeypatch):
    monkeypatch.setenv("TORCH_PPL_ATTENTION_FORM", "projected")
    projected = _projected()
    case = dict(layout="nchw", batch=1, height=2, width=3, channels=8, num_heads=2, head_dim=8,
                num_classes=3, protos_per_class=2, bias=True, gamma=False, exclude=True)
    x, w, params, labels = make_case(2, **case)
    with mock.patch.object(projected, "prototype_attention", wraps=projected.prototype_attention) as spy:
        out, _ = run(x, w, params, labels, 2, "triton")
    ref, _ = run(x, w, params, labels, 2, "reference")
    assert not spy.called
    torch.testing.assert_close(out, ref, **FP32)


def test_projected_form_keeps_no_copy_of_float32_nchw_features(monkeypatch):
    """The projected form's q_proj keeps the features themselves for its weight gradient, not a
    row-major copy of NCHW features (N x C floats more)."""
    monkeypatch.setenv("TORCH_PPL_ATTENTION_FORM", "projected")
    case = dict(layout="nchw", batch=2, height=5, width=7, channels=24, num_heads=2, head_dim=8,
                num_classes=3, protos_per_class=2, bias=True, gamma=True, exclude=False)
    x, w, params, _ = make_case(4, **case)
    x.requires_grad_()
    params = {k: v.requires_grad_() for k, v in params.items() if v is not None}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = torch_ppl.functional.prototype_attention(
            x, w, params["q_weight"], params["k_weight"], params["v_weight"], params["out_weight"],
            params["q_bias"], params["k_bias"], params["v_bias"], params["out_bias"], num_heads=2,
            gamma=params["gamma"], backend="triton")
    out.sum().backward()
    assert x.grad is not None and any("ScaledDotProduct" in n for n in _autograd_nodes(out))
    storage = x.untyped_storage().data_ptr()
    rows = x.detach().permute(0, 2, 3, 1).reshape(-1)
    copies = [tuple(t.shape) for t in saved if t.numel() == x.numel() and t.untyped_storage().data_ptr() != storage
              and torch.equal(t.detach().reshape(-1), rows)]
    assert not copies, copies
    assert any(t.untyped_storage().data_ptr() == storage for t in saved)  # x itself is kept
