"""The fused contrastive-loss kernel (torch_ppl/kernels/contrastive.py) against the reference.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set in conftest.py).
fp32 is compared with ``assert_close`` at the tolerances below; bf16/fp16 in the Cut Cross-Entropy
style (``assert_no_worse``): the fused error against an fp32 ground truth may not exceed the
reference's own error in that dtype plus ``TOL[dtype]``.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import DEVICE, HAS_TRITON, TOL, assert_no_worse, random_labels, requires_triton

import torch_ppl
from torch_ppl import functional as PF
from torch_ppl import reference

pytestmark = requires_triton
if HAS_TRITON:
    from torch_ppl.kernels import contrastive as kc
    from torch_ppl.kernels._common import as_blc

IGNORE = 255
# fp32: the kernel sums in a different order (tiles) and scales by 1/||x|| * 1/tau instead of
# dividing; z reaches 1/tau = 10, so the loss gets a few ulps of that.
FP32 = dict(rtol=1e-5, atol=2e-5)


@contextlib.contextmanager
def blocks(sizes):
    """Force (BLOCK_N, BLOCK_P, BLOCK_C), e.g. 16s so that tiny shapes span several tiles."""
    old = kc._FORCE_BLOCKS
    kc._FORCE_BLOCKS = sizes
    try:
        yield
    finally:
        kc._FORCE_BLOCKS = old


def make_features(layout: str, lead, channels: int, dtype, gen) -> torch.Tensor:
    """Rows ``(..., C)`` as the functional layer passes them.

    ``nchw``: ``(B, C, H, W)`` contiguous moved channel-last (channel stride H*W);
    ``channels_last``: dense rows; ``flat``: ``(N, C)``; ``sliced``: every other column of a
    wider tensor (non-contiguous rows).
    """
    if layout == "flat":
        n = 1
        for d in lead:
            n *= d
        x = torch.randn(n, channels, generator=gen)
    elif layout == "sliced":
        n = 1
        for d in lead:
            n *= d
        x = torch.randn(n, 2 * channels, generator=gen)[:, ::2]
    else:
        b, h, w = lead
        x = torch.randn(b, channels, h, w, generator=gen)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x = x.movedim(1, -1)
    return x.to(device=DEVICE, dtype=dtype)


def run(fn, x, w, y, grad, **opts):
    """Loss and the gradients of (x, w) for an upstream gradient ``grad``."""
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    loss = fn(x, w, y, **opts)
    dx, dw = torch.autograd.grad(loss, (x, w), grad)
    return loss.detach(), dx, dw


def opts(positives="all", similarity="cosine", temperature=0.1):
    return dict(temperature=temperature, positives=positives, similarity=similarity, ignore_index=IGNORE)


shapes = st.fixed_dictionaries(dict(
    layout=st.sampled_from(["flat", "nchw", "channels_last", "sliced"]),
    b=st.integers(1, 2), h=st.integers(1, 5), w=st.integers(1, 7),
    channels=st.integers(1, 40), classes=st.integers(1, 6), per_class=st.integers(1, 4),
    positives=st.sampled_from(["all", "nearest"]), similarity=st.sampled_from(["cosine", "dot"]),
    small_blocks=st.booleans(), seed=st.integers(0, 2**16),
))


def draw_case(c, dtype=torch.float32, proto_dtype=None):
    gen = torch.Generator().manual_seed(c["seed"])
    lead = (c["b"], c["h"], c["w"])
    x = make_features(c["layout"], lead, c["channels"], dtype, gen)
    protos = torch.randn(c["classes"], c["per_class"], c["channels"], generator=gen)
    protos = protos.to(device=DEVICE, dtype=proto_dtype or dtype)
    y = random_labels(x.shape[:-1], c["classes"], ignore_frac=0.2, generator=gen)
    grad = torch.randn(x.shape[:-1], generator=gen).to(DEVICE)
    return x, protos, y, grad


def grad_scales(x, protos, y, grad, o):
    """Bounds on the terms that the fp32 gradients are sums of, for absolute tolerances.

    ``|dl/dz_p|`` sums to at most 2 over p, so ``|dx_hat| <= 2 |g| / tau * max |W_hat|`` and
    ``|dW_hat| <= sum_n 2 |g_n| / tau * |x_hat_n|``; the cosine normalisation multiplies by
    ``1 / ||x||`` (resp. ``1 / ||W||``) and then cancels the radial part, so a gradient that is
    ~0 (e.g. C = 1) is the difference of terms this large and carries their rounding.
    """
    valid = (y != IGNORE).flatten()
    xf = x.detach().float().reshape(-1, x.shape[-1])[valid]
    w = protos.detach().float().flatten(0, 1)
    g = grad.detach().float().flatten()[valid].abs() * 2.0 / o["temperature"]
    if xf.numel() == 0 or g.numel() == 0:
        return 1.0, 1.0
    if o["similarity"] == "cosine":
        rx = 1.0 / xf.norm(dim=-1).clamp_min(reference.EPS)
        rw = 1.0 / w.norm(dim=-1).clamp_min(reference.EPS)
        return 1.0 + (g * rx).max().item(), 1.0 + g.sum().item() * rw.max().item()
    return 1.0 + g.max().item() * w.abs().max().item(), 1.0 + (g[:, None] * xf.abs()).sum(0).max().item()


# ----------------------------------------------------------------------------- fp32
@settings(max_examples=25)
@given(c=shapes)
def test_matches_reference_fp32(c):
    x, protos, y, grad = draw_case(c)
    o = opts(c["positives"], c["similarity"], temperature=0.1 if c["similarity"] == "cosine" else 1.0)
    with blocks((16, 16, 16) if c["small_blocks"] else None):
        loss, dx, dw = run(kc.contrastive_loss, x, protos, y, grad, **o)
    ref_loss, ref_dx, ref_dw = run(reference.contrastive_loss, x, protos, y, grad, **o)
    assert loss.dtype == torch.float32 and loss.shape == y.shape
    assert dx.dtype == x.dtype and dw.dtype == protos.dtype
    torch.testing.assert_close(loss, ref_loss, **FP32)
    sx, sw = grad_scales(x, protos, y, grad, o)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5 * sx)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-5, atol=1e-5 * sw)
    ignored = y == IGNORE
    assert bool((loss[ignored] == 0).all()) and bool((dx[ignored] == 0).all())


def test_single_pixel_single_prototype():
    """N = 1, P = 1, C = 1: the loss is 0 (the only prototype is the positive) with zero grads."""
    x = torch.tensor([[0.7]], device=DEVICE)
    protos = torch.tensor([[[-1.3]]], device=DEVICE)
    y = torch.tensor([0], device=DEVICE)
    for pos in ("all", "nearest"):
        loss, dx, dw = run(kc.contrastive_loss, x, protos, y, torch.ones(1, device=DEVICE), **opts(pos))
        assert loss.tolist() == [0.0] and dx.abs().max() < 1e-7 and dw.abs().max() < 1e-7


def test_multi_tile_online_logsumexp_far_apart_logits():
    """Several prototype tiles whose maxima differ by much more than exp can hold (tau = 1e-3):
    the online rescaling must not overflow, and the positive may sit in any tile."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 19, generator=gen).to(DEVICE)
    protos = torch.randn(13, 3, 19, generator=gen).to(DEVICE)  # P = 39: three tiles of 16
    y = random_labels((40,), 13, generator=gen)
    grad = torch.rand(40, generator=gen).to(DEVICE)
    for pos in ("all", "nearest"):
        o = opts(pos, temperature=1e-3)
        with blocks((16, 16, 16)):
            loss, dx, dw = run(kc.contrastive_loss, x, protos, y, grad, **o)
        ref = run(reference.contrastive_loss, x, protos, y, grad, **o)
        assert torch.isfinite(loss).all()
        torch.testing.assert_close(loss, ref[0], rtol=1e-5, atol=1e-5 * 1e3)
        torch.testing.assert_close(dx, ref[1], rtol=1e-4, atol=1e-2)
        torch.testing.assert_close(dw, ref[2], rtol=1e-4, atol=1e-2)


def test_m1_equals_cross_entropy():
    """With one prototype per class both positive modes are F.cross_entropy on s / tau."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 6, 23, generator=gen).to(DEVICE)
    protos = torch.randn(7, 1, 23, generator=gen).to(DEVICE)
    y = random_labels(x.shape[:-1], 7, generator=gen)
    s = torch.einsum("...c,kc->...k", F.normalize(x, dim=-1), F.normalize(protos[:, 0], dim=-1))
    ce = F.cross_entropy((s / 0.1).movedim(-1, 1), y, ignore_index=IGNORE, reduction="none")
    for pos in ("all", "nearest"):
        torch.testing.assert_close(kc.contrastive_loss(x, protos, y, **opts(pos)), ce, **FP32)


def test_nearest_ties_go_to_the_first_prototype():
    """Duplicated prototypes tie exactly; the gradient goes to the lowest index only."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 8, generator=gen).to(DEVICE)
    protos = torch.randn(3, 1, 8, generator=gen).repeat(1, 3, 1).to(DEVICE)  # 3 copies per class
    y = torch.randint(0, 3, (9,), generator=gen).to(DEVICE)
    grad = torch.ones(9, device=DEVICE)
    loss, dx, dw = run(kc.contrastive_loss, x, protos, y, grad, **opts("nearest"))
    ref = run(reference.contrastive_loss, x, protos, y, grad, **opts("nearest"))
    torch.testing.assert_close(loss, ref[0], **FP32)
    torch.testing.assert_close(dw, ref[2], **FP32)
    torch.testing.assert_close(dx, ref[1], **FP32)


# ----------------------------------------------------------------------------- bf16 / fp16
@pytest.mark.parametrize("dtype,proto_dtype", [
    (torch.bfloat16, torch.float32),  # the headline case: bf16 features, fp32 prototypes
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
])
@settings(max_examples=10)
@given(c=shapes)
def test_low_precision_no_worse_than_reference(dtype, proto_dtype, c):
    x, protos, y, grad = draw_case(c, dtype, proto_dtype)
    if c["similarity"] == "dot":  # keep |z| moderate: dot logits grow with |x| |W|
        x, protos = (x.float() * 0.3).to(dtype), (protos.float() * 0.3).to(proto_dtype)
    o = opts(c["positives"], c["similarity"], temperature=0.1 if c["similarity"] == "cosine" else 1.0)
    with blocks((16, 16, 16) if c["small_blocks"] else None):
        fused = run(kc.contrastive_loss, x, protos, y, grad, **o)
    same = run(reference.contrastive_loss, x, protos, y, grad, **o)
    truth = run(reference.contrastive_loss, x.float(), protos.float(), y, grad, **o)
    assert fused[0].dtype == torch.float32
    assert fused[1].dtype == dtype and fused[2].dtype == proto_dtype
    tol = TOL[dtype]
    for name, f, s, t in zip(("loss", "dx", "dW"), fused, same, truth):
        # gradients: relative to their largest entry (tol is relative to |gt| elementwise)
        scale = 1.0 if name == "loss" else max(1.0, t.abs().max().item())
        assert_no_worse(f / scale, s / scale, t / scale, tol, f"{dtype} {name}")


def test_autocast_gives_fp32_loss_and_input_dtype_grads():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(30, 12, generator=gen).to(DEVICE)
    protos = torch.randn(4, 2, 12, generator=gen).to(DEVICE)
    y = random_labels((30,), 4, generator=gen)
    plain = run(kc.contrastive_loss, x, protos, y, torch.ones(30, device=DEVICE), **opts())
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        auto = run(kc.contrastive_loss, x, protos, y, torch.ones(30, device=DEVICE), **opts())
    assert auto[0].dtype == torch.float32 and auto[1].dtype == torch.float32
    for a, b in zip(auto, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("positives", ["all", "nearest"])
def test_no_valid_pixel_gives_zero_and_zero_grads(positives):
    x = torch.randn(6, 10, device=DEVICE)
    x[2] = float("nan")  # ignored pixels may hold anything
    protos = torch.randn(3, 2, 10, device=DEVICE)
    y = torch.full((6,), IGNORE, device=DEVICE)
    loss, dx, dw = run(kc.contrastive_loss, x, protos, y, torch.ones(6, device=DEVICE), **opts(positives))
    assert loss.tolist() == [0.0] * 6
    assert bool((dx == 0).all()) and bool((dw == 0).all())
    total = PF.contrastive_loss(x, y, protos, backend="triton")
    assert total.item() == 0.0


@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_non_finite_features_at_a_valid_pixel_give_a_non_finite_loss(bad, similarity):
    x = torch.randn(5, 6, device=DEVICE)
    x[1, 3] = bad  # valid pixel
    x[4, 0] = bad  # ignored pixel
    protos = torch.randn(2, 2, 6, device=DEVICE)
    y = torch.tensor([0, 1, 1, 0, IGNORE], device=DEVICE)
    for pos in ("all", "nearest"):
        loss, dx, _ = run(kc.contrastive_loss, x, protos, y, torch.ones(5, device=DEVICE), **opts(pos, similarity))
        assert not torch.isfinite(loss[1]), (pos, loss)
        assert torch.isfinite(loss[[0, 2, 3]]).all()
        assert loss[4].item() == 0.0 and bool((dx[4] == 0).all())
        assert torch.isfinite(dx[[0, 2, 3]]).all()


def test_zero_feature_rows_match_reference():
    """||x|| = 0 < eps: x_hat = 0 and dx = dx_hat / eps, as F.normalize (no projection term)."""
    x = torch.randn(4, 5, device=DEVICE)
    x[2] = 0.0
    protos = torch.randn(2, 3, 5, device=DEVICE)
    y = torch.tensor([0, 1, 1, 0], device=DEVICE)
    grad = torch.full((4,), 1e-12, device=DEVICE)  # keep dx = 1e12 * dx_hat readable
    fused = run(kc.contrastive_loss, x, protos, y, grad, **opts())
    ref = run(reference.contrastive_loss, x, protos, y, grad, **opts())
    for f, r in zip(fused, ref):
        torch.testing.assert_close(f, r, **FP32)


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.uint8, torch.int16])
def test_other_integer_label_dtypes(label_dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(20, 7, generator=gen).to(DEVICE)
    protos = torch.randn(3, 2, 7, generator=gen).to(DEVICE)
    y = random_labels((20,), 3, generator=gen)
    expected = reference.contrastive_loss(x, protos, y, **opts())
    torch.testing.assert_close(kc.contrastive_loss(x, protos, y.to(label_dtype), **opts()), expected, **FP32)


def test_empty_batch():
    x = torch.randn(0, 7, device=DEVICE, requires_grad=True)
    protos = torch.randn(3, 2, 7, device=DEVICE, requires_grad=True)
    loss = kc.contrastive_loss(x, protos, torch.zeros(0, dtype=torch.long, device=DEVICE), **opts())
    assert loss.shape == (0,)
    loss.sum().backward()
    assert bool((protos.grad == 0).all())


def test_float64_is_refused_before_any_launch():
    x = torch.randn(3, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="backend='reference'"):
        kc.contrastive_loss(x, torch.randn(2, 1, 4, device=DEVICE), torch.zeros(3, dtype=torch.long), **opts())
    with pytest.raises(TypeError, match="prototypes"):
        kc.contrastive_loss(x.float(), torch.randn(2, 1, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.long), **opts())


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_strided_features_are_not_copied(memory_format):
    """The kernel takes the (B, L, C) strides: NCHW (channel stride H*W) and channels_last
    features reach it as views, and dx comes back in the features' own layout."""
    x = torch.randn(2, 6, 3, 5, device=DEVICE).contiguous(memory_format=memory_format)
    rows = as_blc(x.movedim(1, -1))
    assert rows.data_ptr() == x.data_ptr() and rows.shape == (2, 15, 6)
    xr = x.detach().requires_grad_()
    loss = PF.contrastive_loss(xr, random_labels((2, 3, 5), 2), torch.randn(2, 2, 6, device=DEVICE),
                               backend="triton")
    loss.backward()
    assert xr.grad.stride() == x.stride()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_z_over_channel_chunks_for_16_bit_features(dtype, monkeypatch):
    """On sm_80 at C = 512 the dW kernel takes z of bf16 features over channel chunks read from
    memory (Z_CHUNK, _bwd_configs); the interpreter tiles do not, so here both backward
    kernels are forced to: 40 channels in chunks of 16 (the last one masked) give the
    gradients of the tile held on chip, up to summation order."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 40, 3, 5, generator=gen).to(DEVICE, dtype).movedim(1, -1).requires_grad_()
    protos = torch.randn(7, 3, 40, generator=gen).to(DEVICE).requires_grad_()
    y = torch.randint(0, 7, (2, 3, 5), generator=gen).to(DEVICE)
    y[0, 0, :2] = IGNORE

    def grads():
        loss = kc.contrastive_loss(x, protos, y, temperature=0.1, positives="all", similarity="cosine",
                                   ignore_index=IGNORE)
        return torch.autograd.grad(loss.sum(), (x, protos))

    held = grads()
    configs = kc._bwd_configs

    def chunked(*args):
        return tuple(dict(cfg, Z_CHUNK=16) for cfg in configs(*args))

    monkeypatch.setattr(kc, "_bwd_configs", chunked)
    for a, b in zip(grads(), held):
        torch.testing.assert_close(a, b, atol=1e-3 * b.abs().max().item(), rtol=0)


@pytest.mark.parametrize("similarity, positives", [("cosine", "all"), ("dot", "nearest")])
def test_transposed_z_of_the_prototype_gradient(similarity, positives, monkeypatch):
    """The dW kernel's z GEMM as (Ŵ xᵀ)ᵀ (S_TRANSPOSED: bfloat16 features on sm_90, the
    prototypes the rows of a wgmma; on the interpreter channels-last features) gives the
    gradients of the plain form, up to summation order: NCHW features forced to it, 40
    channels, ignored pixels, 7 classes of 3 prototypes in one tile."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 40, 3, 5, generator=gen).to(DEVICE, torch.bfloat16).movedim(1, -1).requires_grad_()
    protos = torch.randn(7, 3, 40, generator=gen).to(DEVICE).requires_grad_()
    y = torch.randint(0, 7, (2, 3, 5), generator=gen).to(DEVICE)
    y[0, 0, :2] = IGNORE
    configs = kc._bwd_configs

    def grads(transposed):
        def forced(*args):
            dx, dw = configs(*args)
            assert not dw["S_TRANSPOSED"]  # NCHW features take the plain form on the interpreter
            return dx, dict(dw, S_TRANSPOSED=transposed)

        monkeypatch.setattr(kc, "_bwd_configs", forced)
        loss = kc.contrastive_loss(x, protos, y, temperature=0.1, positives=positives, similarity=similarity,
                                   ignore_index=IGNORE)
        return torch.autograd.grad(loss.sum(), (x, protos))

    (dx_t, dw_t), (dx_p, dw_p) = grads(True), grads(False)
    torch.testing.assert_close(dx_t, dx_p)  # the dx kernel is the same in both
    torch.testing.assert_close(dw_t, dw_p, atol=1e-3 * dw_p.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("similarity, positives", [("cosine", "all"), ("dot", "nearest")])
def test_dx_in_channel_halves_matches_whole_rows(dtype, similarity, positives, monkeypatch):
    """dx in two channel halves, with x read again for the normalisation backward (64-pixel
    tiles on sm_90; the interpreter's default for 16-bit features), gives the gradients of the
    whole rows held on chip, up to summation order: 40 channels (the second half masked past
    40 of 64), ignored pixels and an all-zero row (cosine's clamped norm)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 40, 3, 5, generator=gen)
    x[1, :, 2, 4] = 0.0
    x = x.to(DEVICE, dtype).movedim(1, -1).requires_grad_()
    protos = torch.randn(7, 3, 40, generator=gen).to(DEVICE).requires_grad_()
    y = torch.randint(0, 7, (2, 3, 5), generator=gen).to(DEVICE)
    y[0, 0, :2] = IGNORE
    configs = kc._bwd_configs

    def grads(halves):
        monkeypatch.setattr(kc, "_bwd_configs", lambda *a: (dict(configs(*a)[0], HALVES=halves), configs(*a)[1]))
        loss = kc.contrastive_loss(x, protos, y, temperature=0.1, positives=positives, similarity=similarity,
                                   ignore_index=IGNORE)
        return torch.autograd.grad(loss.sum(), (x, protos))

    (dx_h, dw_h), (dx_w, dw_w) = grads(True), grads(False)
    rows = x.detach().ne(0).any(-1)
    scale = dx_w[rows].float().abs().max().item()
    torch.testing.assert_close(dx_h[rows].float(), dx_w[rows].float(), atol=1e-2 * scale, rtol=0)
    # the zero row's dx is du / eps for cosine (inf in float16), alike in both forms
    torch.testing.assert_close(dx_h[~rows].float(), dx_w[~rows].float(), atol=0, rtol=2e-2)
    torch.testing.assert_close(dw_h, dw_w)  # the dW kernel is the same in both


# ----------------------------------------------------------------------------- dW reduction
def test_deterministic_mode_is_bitwise_repeatable():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 40, 20, generator=gen).to(DEVICE)  # 3 * 3 pixel tiles of 16 > 4 programs
    protos = torch.randn(5, 3, 20, generator=gen).to(DEVICE)
    y = random_labels((3, 40), 5, generator=gen)
    grad = torch.rand(3, 40, generator=gen).to(DEVICE)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with blocks((16, 16, 16)):
            first = run(kc.contrastive_loss, x, protos, y, grad, **opts())
            second = run(kc.contrastive_loss, x, protos, y, grad, **opts())
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    ref = run(reference.contrastive_loss, x, protos, y, grad, **opts())
    torch.testing.assert_close(first[2], ref[2], **FP32)
    with blocks((16, 16, 16)):  # and the atomic path agrees
        atomic = run(kc.contrastive_loss, x, protos, y, grad, **opts())
    torch.testing.assert_close(atomic[2], first[2], **FP32)


def test_only_the_needed_gradient_is_computed():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(25, 9, generator=gen).to(DEVICE)
    protos = torch.randn(3, 2, 9, generator=gen).to(DEVICE)
    y = random_labels((25,), 3, generator=gen)
    ref = run(reference.contrastive_loss, x, protos, y, torch.ones(25), **opts())
    xr = x.clone().requires_grad_()
    kc.contrastive_loss(xr, protos, y, **opts()).sum().backward()
    torch.testing.assert_close(xr.grad, ref[1], **FP32)
    pr = protos.clone().requires_grad_()
    kc.contrastive_loss(x, pr, y, **opts()).sum().backward()
    torch.testing.assert_close(pr.grad, ref[2], **FP32)


# ----------------------------------------------------------------------------- torch.library
def test_opcheck():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 11, 9, generator=gen).to(DEVICE)
    w_hat = F.normalize(torch.randn(6, 9, generator=gen), dim=-1).to(DEVICE)
    y = random_labels((2, 11), 3, generator=gen)
    for nearest in (False, True):
        # inputs that require grad: opcheck then also checks the autograd registration
        args = (x.requires_grad_(), w_hat.requires_grad_(), y, 2, 10.0, True, nearest, IGNORE)
        torch.library.opcheck(torch.ops.torch_ppl.contrastive_loss_fwd.default, args)
        x, w_hat = x.detach(), w_hat.detach()
        _, lse, pos, best = torch.ops.torch_ppl.contrastive_loss_fwd(x, w_hat, y, 2, 10.0, True, nearest, IGNORE)
        bwd_args = (torch.randn(2, 11, generator=gen).to(DEVICE), x, w_hat, y, lse, pos, best, 2, 10.0,
                    True, nearest, IGNORE, False, True, True)
        torch.library.opcheck(torch.ops.torch_ppl.contrastive_loss_bwd.default, bwd_args)


def test_torch_compile_fullgraph():
    """fullgraph=True fails on any graph break. The ops are opaque custom ops, so the backend
    matters little; aot_eager keeps the test fast (inductor would compile C++ on CPU)."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 7, 5, 10, generator=gen).to(DEVICE)
    protos = torch.randn(3, 2, 10, generator=gen).to(DEVICE)
    y = random_labels((2, 7, 5), 3, generator=gen)
    weight = torch.rand(2, 7, 5, generator=gen).to(DEVICE)

    def step(x, protos):
        return PF.contrastive_loss(x.movedim(-1, 1), y, protos, weight, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager = run(lambda a, b, _y: step(a, b), x, protos, y, torch.tensor(1.0))
    traced = run(lambda a, b, _y: compiled(a, b), x, protos, y, torch.tensor(1.0))
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------- public API
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("positives", ["all", "nearest"])
def test_push_pull_loss_triton_matches_reference(reduction, positives):
    """The module path end to end: CE on bilinearly resized logits, contrastive on
    nearest-resized labels and weights, UniMatch reduction."""
    gen = torch.Generator().manual_seed(10)
    feats = torch.randn(2, 12, 6, 5, generator=gen).to(DEVICE)
    logits = torch.randn(2, 4, 6, 5, generator=gen).to(DEVICE)
    protos = torch.randn(4, 3, 12, generator=gen).to(DEVICE)
    size = (6, 5) if reduction == "none" else (12, 10)
    y = random_labels((2, *size), 4, generator=gen)
    weight = (torch.rand(2, *size, generator=gen) > 0.3).float().to(DEVICE)
    results = {}
    for backend in ("reference", "triton"):
        crit = torch_ppl.PushPullLoss(positives=positives, reduction=reduction, backend=backend)
        f = feats.clone().requires_grad_()
        p = protos.clone().requires_grad_()
        lg = logits.clone().requires_grad_()
        out = crit(lg, f, y, p, weight=weight)
        out.backward(torch.ones_like(out))
        results[backend] = (out.detach(), f.grad, p.grad, lg.grad)
    for a, b in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(a, b, **FP32)


def test_functional_dispatches_to_the_kernel(monkeypatch):
    calls = []
    original = kc.contrastive_loss

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(kc, "contrastive_loss", spy)
    x = torch.randn(10, 4, device=DEVICE)
    PF.contrastive_loss(x, random_labels((10,), 2), torch.randn(2, 2, 4, device=DEVICE), backend="triton")
    assert calls == [1]
