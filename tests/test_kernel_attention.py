"""The fused PPLAttention kernel (torch_ppl/kernels/attention.py) against the reference.

The reference projects ``q`` per pixel the plain way; the kernel works on the fast form
(``x Kt^T + c``, ``a Vt``). Both are called through the public functional API
(``backend="triton"`` vs ``backend="reference"``) so that layouts, ``exclude=`` with
``ignore_index`` and the output memory format go the user's way. Without a GPU the kernels
run on CPU tensors under ``TRITON_INTERPRET=1`` (set in conftest.py); there the prototype-tile
size is 16, so more than 16 prototypes per head exercise the online softmax across tiles.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from helpers import DEVICE, HAS_TRITON, TOL, assert_no_worse, requires_triton

pytestmark = requires_triton

import torch_ppl  # noqa: E402
import torch_ppl.functional as PF  # noqa: E402

IGNORE = 255
PARAM_NAMES = ("q_weight", "k_weight", "v_weight", "out_weight", "q_bias", "k_bias", "v_bias", "out_bias", "gamma")

# fp32: the kernel computes the same float32 math in another order (fast form, online softmax)
FP32 = dict(rtol=1e-4, atol=1e-5)


def _kernel():
    from torch_ppl.kernels import attention

    return attention


def make_case(seed, *, layout, batch, height, width, channels, num_heads, head_dim, num_classes,
              protos_per_class, bias, gamma, exclude, x_dtype=torch.float32, param_dtype=torch.float32):
    """Features in the requested layout, (K, M, C) prototypes, projection weights, and an
    exclude label map with about 20 % ignore_index. Returns (x, prototypes, params dict, exclude)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE)

    c, inner = channels, num_heads * head_dim
    if layout == "flat":
        x = randn(batch * height * width, c)
    elif layout == "flat_strided":  # channel stride 2: a non-contiguous (N, C)
        x = randn(batch * height * width, 2 * c)[:, ::2]
    elif layout == "nchw":
        x = randn(batch, c, height, width)
    elif layout == "channels_last":
        x = randn(batch, c, height, width).contiguous(memory_format=torch.channels_last)
    elif layout == "nchw_strided":  # spatially sliced: neither contiguous nor channels_last
        x = randn(batch, c, height, 2 * width)[..., ::2]
    else:
        raise ValueError(layout)
    x = x.to(x_dtype)
    prototypes = randn(num_classes, protos_per_class, c)
    params = {
        "q_weight": randn(inner, c, scale=c ** -0.5),
        "k_weight": randn(inner, c, scale=c ** -0.5),
        "v_weight": randn(inner, c, scale=c ** -0.5),
        "out_weight": randn(c, inner, scale=inner ** -0.5),
        "q_bias": randn(inner, scale=0.5) if bias else None,
        "k_bias": randn(inner, scale=0.5) if bias else None,
        "v_bias": randn(inner, scale=0.5) if bias else None,
        "out_bias": randn(c, scale=0.5) if bias else None,
        "gamma": (randn(c, scale=0.5) + 1.0) if gamma else None,
    }
    params = {k: (None if v is None else v.to(param_dtype)) for k, v in params.items()}
    labels = None
    if exclude:
        shape = (batch * height * width,) if layout.startswith("flat") else (batch, height, width)
        labels = torch.randint(0, num_classes, shape, generator=gen)
        labels = labels.masked_fill(torch.rand(shape, generator=gen) < 0.2, IGNORE).to(DEVICE)
    return x, prototypes, params, labels


def run(x, prototypes, params, labels, num_heads, backend, upcast=False):
    """Forward + backward through the functional API; returns the output and the gradients of
    x, the prototypes and every parameter (None for absent ones)."""
    def prep(t):
        if t is None:
            return None
        t = t.detach()
        if upcast:
            # ground truth: the same (already rounded) values in float32, same memory layout
            t = t.to(torch.float32)
        return t.requires_grad_()

    x, prototypes = prep(x), prep(prototypes)
    params = {k: prep(v) for k, v in params.items()}
    out = PF.prototype_attention(
        x, prototypes, params["q_weight"], params["k_weight"], params["v_weight"], params["out_weight"],
        params["q_bias"], params["k_bias"], params["v_bias"], params["out_bias"],
        num_heads=num_heads, gamma=params["gamma"], exclude=labels, ignore_index=IGNORE, backend=backend,
    )
    gen = torch.Generator().manual_seed(1234)
    grad_out = torch.randn(out.shape, generator=gen).to(DEVICE, out.dtype)
    inputs = [x, prototypes] + [params[k] for k in PARAM_NAMES if params[k] is not None]
    grads = torch.autograd.grad(out, inputs, grad_out)
    names = ["x", "prototypes"] + [k for k in PARAM_NAMES if params[k] is not None]
    return out.detach(), dict(zip(names, grads))


# Each example runs the interpreter several times; shrinking a failure would take many minutes,
# so it is switched off (the failing example is still printed in full).
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)

shapes = st.fixed_dictionaries({
    "layout": st.sampled_from(["flat", "flat_strided", "nchw", "channels_last", "nchw_strided"]),
    "batch": st.integers(1, 2),
    "height": st.integers(1, 6),
    "width": st.integers(1, 6),
    "channels": st.integers(1, 40),
    "num_heads": st.integers(1, 3),
    "head_dim": st.integers(1, 9),
    "num_classes": st.integers(1, 6),
    "protos_per_class": st.integers(1, 4),
    "bias": st.booleans(),
    "gamma": st.booleans(),
    "exclude": st.booleans(),
})


@settings(max_examples=20, phases=NO_SHRINK)
@given(case=shapes, seed=st.integers(0, 2 ** 16))
def test_fp32_forward_and_every_gradient_match_reference(case, seed):
    x, w, params, labels = make_case(seed, **case)
    out, grads = run(x, w, params, labels, case["num_heads"], "triton")
    ref_out, ref_grads = run(x, w, params, labels, case["num_heads"], "reference")
    assert out.shape == x.shape and out.dtype == x.dtype
    if x.dim() == 4:  # the functional returns x's memory format
        for fmt in (torch.contiguous_format, torch.channels_last):
            assert out.is_contiguous(memory_format=fmt) == ref_out.is_contiguous(memory_format=fmt), fmt
    torch.testing.assert_close(out, ref_out, **FP32)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **FP32, msg=lambda m: f"d{name}: {m}")


@settings(max_examples=12, phases=NO_SHRINK)
@given(case=shapes, seed=st.integers(0, 2 ** 16), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       low_params=st.booleans())
def test_low_precision_no_worse_than_reference(case, seed, dtype, low_params):
    """bf16/fp16 features with float32 prototypes (the headline case), and projection weights in
    float32 (AMP) or in the low dtype. Cut-Cross-Entropy style: |fused - gt| <= |ref_same - gt| + tol."""
    x, w, params, labels = make_case(seed, **case, x_dtype=dtype,
                                     param_dtype=dtype if low_params else torch.float32)
    out, grads = run(x, w, params, labels, case["num_heads"], "triton")
    same, same_grads = run(x, w, params, labels, case["num_heads"], "reference")
    gt, gt_grads = run(x, w, params, labels, case["num_heads"], "reference", upcast=True)
    assert out.dtype == dtype
    assert_no_worse(out, same, gt, TOL[dtype], "out")
    for name in grads:
        assert grads[name].dtype == same_grads[name].dtype, name
        assert_no_worse(grads[name], same_grads[name], gt_grads[name], TOL[dtype], f"d{name}")


@pytest.mark.parametrize("num_heads,head_dim", [(1, 5), (3, 2)])
def test_single_class_exclude_reads_nothing_without_nan(num_heads, head_dim):
    """K = 1 with exclude=: a pixel labelled 0 sees no prototype, so o = out_bias only, and no
    NaN anywhere in the output or the gradients; ignored pixels attend normally."""
    case = dict(layout="nchw", batch=2, height=3, width=5, channels=7, num_heads=num_heads, head_dim=head_dim,
                num_classes=1, protos_per_class=3, bias=True, gamma=True, exclude=True)
    x, w, params, labels = make_case(0, **case)
    labels[0, 0, :] = IGNORE
    labels[1] = 0
    out, grads = run(x, w, params, labels, num_heads, "triton")
    ref_out, ref_grads = run(x, w, params, labels, num_heads, "reference")
    assert torch.isfinite(out).all()
    blind = labels == 0
    expected = x + (params["gamma"] * params["out_bias"])[:, None, None]
    torch.testing.assert_close(out.movedim(1, -1)[blind], expected.movedim(1, -1)[blind], **FP32)
    torch.testing.assert_close(out, ref_out, **FP32)
    for name in grads:
        assert torch.isfinite(grads[name]).all(), name
        torch.testing.assert_close(grads[name], ref_grads[name], **FP32, msg=lambda m: f"d{name}: {m}")


def test_many_prototypes_online_softmax_and_large_scores():
    """P = 150 per head (ten prototype tiles on the interpreter) with large scores: the online
    softmax must rescale exactly like a one-shot softmax."""
    case = dict(layout="flat", batch=1, height=5, width=7, channels=24, num_heads=2, head_dim=12,
                num_classes=50, protos_per_class=3, bias=True, gamma=False, exclude=True)
    x, w, params, labels = make_case(3, **case)
    x = x * 8.0  # scores of order 10-100
    out, grads = run(x, w, params, labels, 2, "triton")
    ref_out, ref_grads = run(x, w, params, labels, 2, "reference")
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("groups,out_split", [(2, False), (2, True)])
@pytest.mark.parametrize("channels,num_heads,exclude", [(40, 2, True), (20, 1, False)])
def test_forward_channel_groups_and_split_output(monkeypatch, groups, out_split, channels, num_heads, exclude):
    """The forward's channel groups and its two programs per pixel tile (GPU choices at C = 512,
    _fwd_groups) forced on the interpreter: 40 channels make two 16-wide chunks per group
    (the last partly past C), 20 channels a second group of one chunk, mostly past C."""
    monkeypatch.setattr(_kernel(), "_fwd_groups", lambda *args: (groups, out_split))
    monkeypatch.setattr(_kernel(), "_rows_tiles", lambda *args: None)  # the chunked form
    case = dict(layout="channels_last", batch=2, height=3, width=7, channels=channels, num_heads=num_heads,
                head_dim=4, num_classes=11, protos_per_class=2, bias=True, gamma=True, exclude=exclude)
    x, w, params, labels = make_case(7, **case)
    out, grads = run(x, w, params, labels, num_heads, "triton")
    ref_out, ref_grads = run(x, w, params, labels, num_heads, "reference")
    torch.testing.assert_close(out, ref_out, **FP32)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **FP32, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("channels,num_classes,protos_per_class,exclude", [(20, 7, 5, True), (33, 2, 1, False)])
def test_whole_channel_forward(monkeypatch, layout, channels, num_classes, protos_per_class, exclude, dtype):
    """The forward's whole-channel form (_fwd_rows, one head, 16-bit features: the GPU's choice
    on sm_90) forced for both layouts, against the chunked form and the reference: 35
    prototypes cross three 16-wide tiles (the online softmax across them), 2 prototypes fill
    one tile partly; 20 and 33 channels leave the second half of the output tile partly or
    wholly past C; 21 pixels cross two pixel tiles. Its scores are the chunked form's (bf16: Kt
    rounded to TF32, multiplied as two exact bf16 halves; fp16: 22-bit halves), so the two agree
    to a rounding of the 16-bit output, and the backward, which reads the forward's lse, gives
    the same gradients."""
    attention = _kernel()
    case = dict(layout=layout, batch=1, height=3, width=7, channels=channels, num_heads=1, head_dim=6,
                num_classes=num_classes, protos_per_class=protos_per_class, bias=True, gamma=True, exclude=exclude)
    x, w, params, labels = make_case(11, **case, x_dtype=dtype)
    monkeypatch.setattr(attention, "_rows_tiles", lambda *args: (16, 16))
    out, grads = run(x, w, params, labels, 1, "triton")
    monkeypatch.setattr(attention, "_rows_tiles", lambda *args: None)
    chunked, chunked_grads = run(x, w, params, labels, 1, "triton")
    same, same_grads = run(x, w, params, labels, 1, "reference")
    gt, gt_grads = run(x, w, params, labels, 1, "reference", upcast=True)
    rounding = dict(rtol=2 * torch.finfo(dtype).eps, atol=1e-5)
    torch.testing.assert_close(out, chunked, **rounding)
    assert_no_worse(out, same, gt, TOL[dtype], "out")
    for name in grads:
        torch.testing.assert_close(grads[name], chunked_grads[name], **rounding, msg=lambda m: f"d{name}: {m}")
        assert_no_worse(grads[name], same_grads[name], gt_grads[name], TOL[dtype], f"d{name}")


def test_kt_rounded_to_tf32_splits_into_exact_bf16_halves():
    attention = _kernel()
    kt = torch.randn(1000) * torch.logspace(-20, 20, 1000)
    kt[:3] = torch.tensor([float("nan"), float("inf"), 0.0])
    r = attention._kt_operand(kt, torch.bfloat16)
    assert r[0].isnan() and r[1] == float("inf") and r[2] == 0
    assert attention._kt_operand(kt, torch.float16) is kt
    finite = r[3:]
    assert (finite.view(torch.int32) & 0x1FFF == 0).all()  # 10 explicit mantissa bits: TF32
    assert ((finite - kt[3:]).abs() <= kt[3:].abs() * 2.0 ** -11).all()  # to nearest
    hi, lo, scale = attention._16bit_halves(finite, torch.bfloat16)
    assert hi.dtype == lo.dtype == torch.bfloat16 and scale.tolist() == [1.0]
    assert torch.equal(hi.float() + lo.float(), finite)


@pytest.mark.parametrize("peak", [1e-6, 0.3, 1e5])
def test_kt_float16_halves_hold_22_bits_at_any_scale(peak):
    """float16's halves of Kt, scaled by a power of two so its largest value sits at 2**10:
    no overflow, and hi + lo within 2**-21 of the largest value (TF32 halves: 2**-20)."""
    attention = _kernel()
    kt = torch.randn(500, generator=torch.Generator().manual_seed(0))
    kt = kt / kt.abs().max() * peak
    hi, lo, scale = attention._16bit_halves(kt, torch.float16)
    assert hi.dtype == lo.dtype == torch.float16 and torch.isfinite(hi).all() and torch.isfinite(lo).all()
    assert scale.shape == (1,) and scale.dtype == torch.float32
    assert 2 ** 10 <= float(hi.float().abs().max()) <= 2 ** 11 and math.log2(float(scale)).is_integer()
    err = ((hi.float() + lo.float()).double() * float(scale) - kt.double()).abs().max()
    assert err <= 2.0 ** -21 * peak
    # all zeros (and non-finite) take no scale
    assert attention._16bit_halves(torch.zeros(5), torch.float16)[2].tolist() == [1.0]
    assert attention._16bit_halves(torch.tensor([1.0, float("inf")]), torch.float16)[2].tolist() == [1.0]


def test_whole_channel_forward_tiles():
    """Which calls take the whole-channel forward: one head, 16-bit features up to 256 channels
    on a GPU with wgmma (or tcgen05, Triton 3.8 on); channels-last 16-bit features of one head
    on the interpreter."""
    attention = _kernel()
    from torch_ppl.kernels._common import CompileTarget, compile_for

    cpu = torch.device("cpu")
    assert attention._rows_tiles(cpu, 35, 20, torch.bfloat16, 1, (1,)) == (16, 16)
    assert attention._rows_tiles(cpu, 35, 20, torch.bfloat16, 1, (21,)) is None
    assert attention._rows_tiles(cpu, 35, 20, torch.bfloat16, 2, (1,)) is None
    assert attention._rows_tiles(cpu, 35, 20, torch.float16, 1, (1,)) == (16, 16)
    assert attention._rows_tiles(cpu, 35, 20, torch.float32, 1, (1,)) is None
    with compile_for(CompileTarget(90, 132)):
        assert attention._rows_tiles(cpu, 210, 256, torch.bfloat16, 1, (16641,)) == (64, 16)
        assert attention._rows_tiles(cpu, 210, 256, torch.float16, 1, (16641,)) == (64, 16)
        assert attention._rows_tiles(cpu, 20, 128, torch.bfloat16, 1, (1,)) == (64, 16)
        for args in [(210, 512, torch.bfloat16, 1), (210, 256, torch.float32, 1), (210, 256, torch.bfloat16, 8)]:
            assert attention._rows_tiles(cpu, *args, (1,)) is None, args
    with compile_for(CompileTarget(80, 108)):
        assert attention._rows_tiles(cpu, 210, 256, torch.bfloat16, 1, (1,)) is None
    with compile_for(CompileTarget(100, 148)):  # B200: on tcgen05 from Triton 3.8
        expected = (64, 16) if attention._TRITON >= (3, 8) else None
        assert attention._rows_tiles(cpu, 210, 256, torch.bfloat16, 1, (1,)) == expected


@pytest.mark.parametrize("wanted", [("x", "gamma", "out_bias"), ("gamma",), ("gamma", "v_weight")])
def test_gradients_of_a_subset(wanted):
    """Only some inputs need gradients (frozen prototypes and projections, a layer scale being
    trained): d(gamma) comes from the dx kernel when no prototype-side gradient is wanted, and
    from the prototype-gradient kernel's dVt accumulator otherwise; both match the reference."""
    case = dict(layout="nchw", batch=2, height=5, width=3, channels=20, num_heads=2, head_dim=6,
                num_classes=4, protos_per_class=5, bias=True, gamma=True, exclude=True)
    x, w, params, labels = make_case(11, **case)
    results = []
    for backend in ("triton", "reference"):
        tensors = {"x": x, "prototypes": w, **params}
        tensors = {k: v.detach().requires_grad_(k in wanted) for k, v in tensors.items()}
        out = PF.prototype_attention(
            tensors["x"], tensors["prototypes"], *(tensors[k] for k in PARAM_NAMES[:-1]), num_heads=2,
            gamma=tensors["gamma"], exclude=labels, ignore_index=IGNORE, backend=backend)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
        results.append((out.detach(), torch.autograd.grad(out, [tensors[k] for k in wanted], grad_out)))
    (out, grads), (ref_out, ref_grads) = results
    torch.testing.assert_close(out, ref_out, **FP32)
    for name, got, expected in zip(wanted, grads, ref_grads):
        torch.testing.assert_close(got, expected, **FP32, msg=lambda m: f"d{name}: {m}")


def test_deterministic_mode_is_bitwise_repeatable_and_agrees_with_atomics():
    case = dict(layout="nchw", batch=2, height=6, width=6, channels=10, num_heads=2, head_dim=4,
                num_classes=5, protos_per_class=4, bias=True, gamma=True, exclude=True)
    x, w, params, labels = make_case(7, **case)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = run(x, w, params, labels, 2, "triton")
        second = run(x, w, params, labels, 2, "triton")
    finally:
        torch.use_deterministic_algorithms(previous)
    atomic = run(x, w, params, labels, 2, "triton")
    assert torch.equal(first[0], second[0])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), f"d{name} differs between two deterministic runs"
        torch.testing.assert_close(first[1][name], atomic[1][name], **FP32)


def test_forward_saves_no_pixel_by_prototype_tensor():
    """Every tensor autograd keeps for the backward is at most N x C (x itself) or N x h (the
    softmax statistics); the reference, which keeps N x h x P attention weights, fails this."""
    n, c, k, m, h = 64, 8, 6, 4, 2
    x, w, params, _ = make_case(0, layout="flat", batch=1, height=8, width=8, channels=c, num_heads=h,
                                head_dim=4, num_classes=k, protos_per_class=m, bias=True, gamma=True,
                                exclude=False)
    x.requires_grad_()
    w.requires_grad_()
    for v in params.values():
        v.requires_grad_()

    def biggest_saved(backend):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            PF.prototype_attention(x, w, params["q_weight"], params["k_weight"], params["v_weight"],
                                   params["out_weight"], params["q_bias"], params["k_bias"], params["v_bias"],
                                   params["out_bias"], num_heads=h, gamma=params["gamma"], backend=backend)
        return max(sizes)

    assert biggest_saved("triton") <= n * c
    assert biggest_saved("reference") >= n * h * k * m


def test_module_end_to_end_and_torch_compile_fullgraph():
    """PPLAttention(backend="triton") agrees with the reference module, and torch.compile with
    fullgraph=True traces it (forward and backward) without a graph break. On CPU the compile
    backend is "aot_eager": inductor cannot compile user Triton kernels for CPU tensors, while
    aot_eager still runs dynamo (graph breaks are errors under fullgraph) and AOTAutograd."""
    torch.manual_seed(0)
    module = torch_ppl.PPLAttention(12, num_heads=3, head_dim=5, layer_scale=0.5, backend="triton").to(DEVICE)
    x = torch.randn(2, 12, 4, 5, device=DEVICE).requires_grad_()
    w = torch.randn(3, 2, 12, device=DEVICE).requires_grad_()
    labels = torch.randint(0, 3, (2, 8, 10), device=DEVICE)  # resized to 4 x 5 (nearest) by the functional
    labels[0, :4] = IGNORE

    def loss_and_grads(fn):
        out = fn(x, w, labels)
        return [out] + list(torch.autograd.grad(out.square().sum(), [x, w] + list(module.parameters())))

    fused = loss_and_grads(module)
    compiled = loss_and_grads(torch.compile(module, fullgraph=True, backend="aot_eager"))
    module.backend = "reference"
    ref = loss_and_grads(module)
    module.backend = "triton"
    for a, b, r in zip(fused, compiled, ref):
        torch.testing.assert_close(a, r, **FP32)
        torch.testing.assert_close(b, r, **FP32)


def test_autocast_keeps_dtypes_and_matches_reference():
    """Under autocast the prototype-side GEMMs stay float32 (autocast switched off there, as in
    the reference); the output keeps x's dtype and gradients each parameter's dtype."""
    case = dict(layout="nchw", batch=1, height=4, width=4, channels=9, num_heads=2, head_dim=3,
                num_classes=3, protos_per_class=2, bias=True, gamma=True, exclude=False)
    x, w, params, labels = make_case(5, **case, x_dtype=torch.bfloat16)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out, grads = run(x, w, params, labels, 2, "triton")
        same, same_grads = run(x, w, params, labels, 2, "reference")
    gt, gt_grads = run(x, w, params, labels, 2, "reference", upcast=True)
    assert out.dtype == torch.bfloat16
    assert_no_worse(out, same, gt, TOL[torch.bfloat16], "out")
    for name in grads:
        assert grads[name].dtype == (torch.bfloat16 if name == "x" else torch.float32), name
        assert_no_worse(grads[name], same_grads[name], gt_grads[name], TOL[torch.bfloat16], f"d{name}")


def _op_args(exclude: bool, optional: bool):
    attention = _kernel()
    gen = torch.Generator().manual_seed(0)
    c, h, p = 6, 2, 5
    x = torch.randn(2, c, 3, 4, generator=gen).movedim(1, -1).flatten(1, 2)  # (B, L, C) view of NCHW
    kt, cc, vt = attention.prototype_side(
        torch.randn(p, c, generator=gen), torch.randn(h * 3, c, generator=gen), torch.randn(h * 3, c, generator=gen),
        torch.randn(h * 3, c, generator=gen), torch.randn(c, h * 3, generator=gen),
        torch.randn(h * 3, generator=gen), None, None, h)
    labels = torch.randint(-1, p, (x.shape[0] * x.shape[1],), generator=gen) if exclude else None
    bo = torch.randn(c, generator=gen) if optional else None
    gamma = torch.randn(c, generator=gen) if optional else None
    cc = cc if optional else None
    x = x.to(DEVICE).detach().requires_grad_()
    tensors = [t if t is None else t.detach().to(DEVICE).requires_grad_() for t in (kt, cc, vt, bo, gamma)]
    return (x, *tensors, None if labels is None else labels.to(DEVICE), h, 1)


@pytest.mark.parametrize("exclude,optional", [(True, True), (False, False)])
def test_opcheck_forward_op(exclude, optional):
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration and
    torch.compile-ability of torch_ppl::prototype_attention_fwd."""
    torch.library.opcheck(torch.ops.torch_ppl.prototype_attention_fwd.default, _op_args(exclude, optional))


def test_opcheck_backward_op():
    x, kt, cc, vt, bo, gamma, labels, h, m = _op_args(True, True)
    _, lse = torch.ops.torch_ppl.prototype_attention_fwd(x, kt, cc, vt, bo, gamma, labels, h, m)
    grad = torch.randn_like(x)
    args = (grad, x.detach(), kt.detach(), cc.detach(), vt.detach(), gamma.detach(), labels, lse, h, m,
            True, True, True, True, True)
    # no autograd test: the backward op is not itself differentiable (no double backward)
    torch.library.opcheck(torch.ops.torch_ppl.prototype_attention_bwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_float64_is_a_clear_type_error():
    x, w, params, _ = make_case(0, layout="flat", batch=1, height=2, width=2, channels=4, num_heads=1,
                                head_dim=4, num_classes=2, protos_per_class=1, bias=False, gamma=False,
                                exclude=False)
    with pytest.raises(TypeError, match=r"x has dtype torch\.float64.*backend='reference'"):
        run(x.double(), w, params, None, 1, "triton")
    with pytest.raises(TypeError, match=r"q_weight has dtype torch\.float64"):
        run(x, w, {**params, "q_weight": params["q_weight"].double()}, None, 1, "triton")


def test_no_pixels():
    attention = _kernel()
    x = torch.zeros(0, 5, device=DEVICE, requires_grad=True)
    w = torch.randn(3, 5, device=DEVICE, requires_grad=True)
    weights = [torch.randn(4, 5, device=DEVICE, requires_grad=True) for _ in range(3)]
    out_w = torch.randn(5, 4, device=DEVICE, requires_grad=True)
    out = attention.prototype_attention(x, w, *weights, out_w, None, None, None, None, None, num_heads=2)
    assert out.shape == (0, 5)
    gx, gw = torch.autograd.grad(out.sum(), [x, w], allow_unused=True)
    assert gx.shape == (0, 5) and torch.equal(gw, torch.zeros_like(w))


def test_strided_small_inputs():
    """gamma, out_bias, q_bias as strided views and prototypes in a permuted layout: the kernel
    indexes these as dense rows, so the op must make them dense rather than misread them."""
    case = dict(layout="flat", batch=1, height=3, width=7, channels=6, num_heads=2, head_dim=3,
                num_classes=4, protos_per_class=2, bias=True, gamma=True, exclude=True)
    x, w, params, labels = make_case(11, **case)
    params = dict(params)
    for name in ("gamma", "out_bias", "q_bias"):
        params[name] = torch.stack([params[name], torch.zeros_like(params[name])], -1)[..., 0]
        assert not params[name].is_contiguous()
    w = w.transpose(0, 2).contiguous().transpose(0, 2)  # (K, M, C), channel axis outermost in memory
    assert not w.is_contiguous()
    out, grads = run(x, w, params, labels, 2, "triton")
    ref_out, ref_grads = run(x, w, params, labels, 2, "reference")
    torch.testing.assert_close(out, ref_out, **FP32)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **FP32, msg=lambda m: f"d{name}: {m}")


if HAS_TRITON:
    import triton
    import triton.language as tl

    from torch_ppl.kernels.attention import _tf32_halves

    @triton.jit
    def _split_kernel(t_ptr, hi_ptr, lo_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        hi, lo = _tf32_halves(tl.load(t_ptr + offs))
        tl.store(hi_ptr + offs, hi)
        tl.store(lo_ptr + offs, lo)


def test_tf32_halves_split_exactly():
    """With float16 features the kernels multiply the fp32 side as two TF32 operands ``hi + lo``
    against the exact float16 side. ``hi`` must be exact in TF32 (its 13 low mantissa bits
    zero), ``hi + lo`` the value itself, and ``lo`` at most 2**-10 of it, so that TF32's reading
    of ``lo`` (10 mantissa bits) loses less than 2**-20 of the value."""
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(1024, generator=gen) * torch.logspace(-30, 30, 1024)  # normal numbers
    t[:4] = torch.tensor([0.0, -0.0, 1.0 + 2.0 ** -23, -(2.0 - 2.0 ** -23)])
    t = t.to(DEVICE)
    hi, lo = torch.empty_like(t), torch.empty_like(t)
    _split_kernel[(1,)](t, hi, lo, BLOCK=1024)
    assert torch.equal(hi + lo, t)
    assert torch.equal(hi.view(torch.int32) & 0x1FFF, torch.zeros_like(hi, dtype=torch.int32))
    assert bool((lo.abs() <= t.abs() * 2.0 ** -10).all())
