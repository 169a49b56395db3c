"""The one-pass head + push (torch_ppl/kernels/head_push.py) against the reference composition.

``prototype_logits_and_contrastive`` must return what ``prototype_logits`` and
``contrastive_loss`` return, forward and backward. Without a GPU the kernels run on the Triton
CPU interpreter (tests/conftest.py), so shapes are tiny; the interpreter tiles are 16 wide, so
odd sizes cross class tiles, prototype tiles (mid-class) and pixel tiles.

Tolerances as in the two ops' own tests: float32 against the reference in float64 with
``assert_close``; bfloat16/float16 no worse than the reference fed the same low-precision
inputs, plus ``TOL[dtype]`` (helpers.assert_no_worse). Max pooling and nearest positives pick
an argmax: the reference is evaluated at the kernel's picks, and each pick is checked to be a
maximum up to the rounding of the kernel's GEMM (see test_kernel_similarity.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import DEVICE, TOL, assert_no_worse, random_labels, requires_triton
from torch_ppl import PPLHead, PushPullLoss, reference
from torch_ppl import functional as PF

pytestmark = requires_triton

head_push = pytest.importorskip("torch_ppl.kernels.head_push")
from test_kernel_similarity import UNIT_ROUNDOFF, check_winners, make_x  # noqa: E402

IGNORE = 255
FP32 = dict(atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------- helpers
def kernel_picks(x, protos, target, similarity, temperature):
    """The forward kernel's max-pooling winners ``(..., K)`` and nearest positives ``(...)``
    (flat prototype index, -1 at ignored pixels)."""
    w_hat = protos.detach().float()
    if similarity == "cosine":
        w_hat = F.normalize(w_hat, dim=-1, eps=reference.EPS)
    out = torch.ops.torch_ppl.prototype_logits_contrastive_fwd(
        x.detach(), w_hat.contiguous(), torch.ones((), device=x.device), None, target, similarity == "cosine",
        "max", 1.0 / temperature, True, IGNORE)
    winners, best = out[1], out[6]
    return winners.long().reshape(*x.shape[:-1], protos.shape[0]), best.long().reshape(target.shape)


def reference_pair(x, protos, scale, bias, target, *, similarity, pooling, temperature, positives, winners, best,
                   dtype):
    """The reference's logits and per-pixel loss in ``dtype``, with max pooling and nearest
    positives evaluated at the given picks."""
    with torch.autocast(x.device.type, enabled=False):
        s = reference.prototype_similarity(x.to(dtype), protos.to(dtype), similarity)
        pooled = s.gather(-1, winners.unsqueeze(-1)).squeeze(-1) if pooling == "max" else reference.pool(s, pooling)
        logits = (scale.to(dtype) if isinstance(scale, torch.Tensor) else scale) * pooled
        if bias is not None:
            logits = logits + bias.to(dtype)
        z = s / temperature
        m = protos.shape[1]
        valid = target != IGNORE
        y = torch.where(valid, target, torch.zeros_like(target))
        z_pos = z.gather(-2, y[..., None, None].expand(*y.shape, 1, m)).squeeze(-2)
        if positives == "all":
            pos = torch.logsumexp(z_pos, dim=-1)
        else:
            pick = torch.where(valid, best - y * m, torch.zeros_like(best))
            pos = z_pos.gather(-1, pick.unsqueeze(-1)).squeeze(-1)
        loss = torch.where(valid, torch.logsumexp(z.flatten(-2), dim=-1) - pos, torch.zeros((), dtype=dtype))
    return logits, loss


def check_nearest(x, protos, target, best, similarity, temperature, dtype):
    """Each nearest positive is of the pixel's class and a maximum of ``z`` up to rounding."""
    valid = target != IGNORE
    m = protos.shape[1]
    assert bool((best[~valid] == -1).all())
    if not bool(valid.any()):
        return
    s = reference.prototype_similarity(x.double(), protos.double(), similarity)[valid]
    y, b = target[valid], best[valid]
    assert bool((b // m == y).all()), "a nearest positive of the wrong class"
    own = s.gather(1, y[:, None, None].expand(-1, 1, m)).squeeze(1)
    picked = own.gather(1, (b - y * m)[:, None]).squeeze(1)
    bound = 1.0 if similarity == "cosine" else (x.double().norm(dim=-1)[valid][:, None]
                                               * protos.double().norm(dim=-1).flatten()[None]).amax(-1)
    slack = (8 + x.shape[-1]) * UNIT_ROUNDOFF[dtype] * bound + 1e-9
    assert bool((picked >= own.amax(-1) - slack).all()), "a nearest positive is not a maximum"


# ----------------------------------------------------------------------------- main property
@st.composite
def problems(draw):
    layout = draw(st.sampled_from(["rows", "nchw", "channels_last", "nchw_sliced"]))
    if layout == "rows":
        b, h, w = 1, 1, draw(st.integers(1, 40))
    else:
        b, h, w = draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 6))
    return dict(
        layout=layout, b=b, h=h, w=w,
        c=draw(st.integers(1, 40)), k=draw(st.integers(1, 6)), m=draw(st.integers(1, 4)),
        similarity=draw(st.sampled_from(["cosine", "dot"])),
        pooling=draw(st.sampled_from(["max", "logsumexp", "mean"])),
        positives=draw(st.sampled_from(["all", "nearest"])),
        bias=draw(st.booleans()), learnable_scale=draw(st.booleans()),
        ignore_frac=draw(st.sampled_from([0.0, 0.3, 1.0])),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@settings(max_examples=10)
@given(p=problems())
def test_matches_reference(dtype, p):
    """Logits, per-pixel loss and the gradients of x, prototypes, a learnable scale and the
    bias, for an upstream gradient into both outputs."""
    gen = torch.Generator().manual_seed(p["seed"])
    k, m, c = p["k"], p["m"], p["c"]
    sim, pool, positives = p["similarity"], p["pooling"], p["positives"]
    tau = 0.1 if sim == "cosine" else 1.0
    x = make_x(p["layout"], p["b"], p["h"], p["w"], c, dtype, gen).requires_grad_()
    protos = torch.randn(k, m, c, generator=gen).to(DEVICE)
    if sim == "dot":  # keep dot similarities O(1) as a trained head's would be
        protos = protos / c**0.5
    protos.requires_grad_()
    scale = torch.tensor(3.5, device=DEVICE).requires_grad_() if p["learnable_scale"] else 3.5
    bias = torch.randn(k, generator=gen).to(DEVICE).requires_grad_() if p["bias"] else None
    target = random_labels(x.shape[:-1], k, ignore_frac=p["ignore_frac"], generator=gen)
    opts = dict(similarity=sim, pooling=pool, temperature=tau, positives=positives, ignore_index=IGNORE)

    logits, loss = head_push.prototype_logits_and_contrastive(x, protos, target, scale, bias, **opts)
    assert logits.shape == (*x.shape[:-1], k) and logits.dtype == torch.float32
    assert loss.shape == target.shape and loss.dtype == torch.float32
    assert bool((loss[target == IGNORE] == 0).all())
    g_logits = torch.randn(logits.shape, generator=gen).to(DEVICE)
    g_loss = torch.randn(loss.shape, generator=gen).to(DEVICE)
    inputs = [t for t in (x, protos, scale, bias) if isinstance(t, torch.Tensor) and t.requires_grad]
    fused = torch.autograd.grad((logits, loss), inputs, (g_logits, g_loss))
    for g, t in zip(fused, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape and bool(torch.isfinite(g).all())

    winners, best = kernel_picks(x, protos, target, sim, tau)
    check_winners(x.detach(), protos.detach(), sim, winners, dtype)
    check_nearest(x.detach(), protos.detach(), target, best, sim, tau, dtype)

    def run(compute_dtype, upcast):
        leaves = [t.detach().to(compute_dtype if upcast else t.dtype).requires_grad_() for t in inputs]
        sub = dict(zip(map(id, inputs), leaves))
        args = [sub.get(id(t), t) if isinstance(t, torch.Tensor) else t for t in (x, protos, scale, bias)]
        out = reference_pair(*args, target, winners=winners, best=best, dtype=compute_dtype, **{
            key: opts[key] for key in ("similarity", "pooling", "temperature", "positives")})
        grads = torch.autograd.grad(out, leaves, (g_logits.to(compute_dtype), g_loss.to(compute_dtype)))
        return out, grads

    (t_logits, t_loss), truth = run(torch.float64, upcast=True)
    names = [
        n for n, t in zip(("x", "prototypes", "scale", "bias"), (x, protos, scale, bias))
        if isinstance(t, torch.Tensor) and t.requires_grad]
    if dtype == torch.float32:
        torch.testing.assert_close(logits.double(), t_logits, **FP32)
        torch.testing.assert_close(loss.double(), t_loss, **FP32)
        for name, g, gt in zip(names, fused, truth):
            torch.testing.assert_close(g.double(), gt, atol=1e-4 * (1 + gt.abs().max().item()), rtol=1e-4,
                                       msg=lambda msg, name=name: f"grad {name}: {msg}")
    else:
        (s_logits, s_loss), same = run(torch.float32, upcast=False)
        assert_no_worse(logits, s_logits, t_logits, TOL[dtype], "logits")
        assert_no_worse(loss, s_loss, t_loss, TOL[dtype] / tau, "loss")
        pixels = x.shape[:-1].numel()
        for name, g, gs, gt in zip(names, fused, same, truth):
            # sums over pixels carry one rounding per pixel; 1/tau scales the push's share
            tol = TOL[dtype] / tau * (1.0 if name == "x" else 1 + pixels**0.5)
            assert_no_worse(g, gs.to(g.dtype), gt, tol, f"grad {name}")


# ----------------------------------------------------------------------------- properties
@pytest.mark.parametrize("pooling", ["max", "logsumexp", "mean"])
@pytest.mark.parametrize("positives", ["all", "nearest"])
def test_equals_the_two_separate_ops(pooling, positives):
    """The one op returns what prototype_logits and contrastive_loss (both fused) return, with
    the same gradients (up to summation order): 37 classes cross three class tiles, M = 3
    prototype tiles mid-class, weights and a mean reduction."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 20, 3, 5, generator=gen).to(DEVICE).requires_grad_()
    protos = torch.randn(37, 3, 20, generator=gen).to(DEVICE).requires_grad_()
    scale = torch.tensor(4.0, device=DEVICE).requires_grad_()
    bias = torch.randn(37, generator=gen).to(DEVICE).requires_grad_()
    target = random_labels((2, 3, 5), 37, generator=gen)
    weight = torch.rand(2, 3, 5, generator=gen).to(DEVICE)
    head = dict(similarity="cosine", pooling=pooling, scale=scale, bias=bias, backend="triton")
    push = dict(temperature=0.1, positives=positives, similarity="cosine", backend="triton")
    logits, loss = PF.prototype_logits_and_contrastive(x, protos, target, weight, **head, **{
        k: v for k, v in push.items() if k != "similarity" and k != "backend"})
    ref_logits = PF.prototype_logits(x, protos, **head)
    ref_loss = PF.contrastive_loss(x, target, protos, weight, **push)
    torch.testing.assert_close(logits, ref_logits, **FP32)
    torch.testing.assert_close(loss, ref_loss, **FP32)
    g = torch.randn(logits.shape, generator=gen).to(DEVICE)
    inputs = (x, protos, scale, bias)
    fused = torch.autograd.grad((logits * g).sum() + 2.0 * loss, inputs)
    separate = torch.autograd.grad((ref_logits * g).sum() + 2.0 * ref_loss, inputs)
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_one_prototype_per_class_is_cross_entropy_of_z(similarity):
    """M = 1: the contrastive term is F.cross_entropy of z = s / tau, whatever the positives."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(23, 9, generator=gen).to(DEVICE).requires_grad_()
    protos = torch.randn(5, 1, 9, generator=gen).to(DEVICE).requires_grad_()
    target = random_labels((23,), 5, generator=gen)
    tau = 0.5
    for positives in ("all", "nearest"):
        _, loss = PF.prototype_logits_and_contrastive(x, protos, target, similarity=similarity, temperature=tau,
                                                      positives=positives, reduction="sum", backend="triton")
        z = reference.prototype_similarity(x, protos, similarity).squeeze(-1) / tau
        expected = F.cross_entropy(z, target, ignore_index=IGNORE, reduction="sum")
        torch.testing.assert_close(loss, expected, **FP32)
        for a, b in zip(torch.autograd.grad(loss, (x, protos)), torch.autograd.grad(expected, (x, protos))):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_batch_gives_zero_loss_and_zero_gradients(reduction):
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 12, 3, 4, generator=gen).to(DEVICE).requires_grad_()
    protos = torch.randn(3, 2, 12, generator=gen).to(DEVICE).requires_grad_()
    target = torch.full((2, 3, 4), IGNORE, dtype=torch.long, device=DEVICE)
    logits, loss = PF.prototype_logits_and_contrastive(x, protos, target, reduction=reduction, backend="triton")
    assert bool((loss == 0).all())
    dx, dw = torch.autograd.grad(loss.sum(), (x, protos), retain_graph=True)
    assert bool((dx == 0).all()) and bool((dw == 0).all())
    # the logits still carry their own gradient
    dx, dw = torch.autograd.grad((logits.square().sum() + loss.sum()), (x, protos))
    expected = torch.autograd.grad(PF.prototype_logits(x, protos, backend="triton").square().sum(), (x, protos))
    for a, b in zip((dx, dw), expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_single_pixel_with_labels_at_a_finer_resolution():
    """One pixel of features; the 2 x 3 label map is nearest-resized to it, as contrastive_loss does."""
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(1, 7, 1, 1, generator=gen).to(DEVICE).requires_grad_()
    protos = torch.randn(4, 3, 7, generator=gen).to(DEVICE).requires_grad_()
    target = torch.tensor([[[2, 1, 0], [3, 3, 3]]], device=DEVICE)
    outs = {b: PF.prototype_logits_and_contrastive(x, protos, target, pooling="logsumexp", backend=b)
            for b in ("reference", "triton")}
    for a, b in zip(outs["triton"], outs["reference"]):
        torch.testing.assert_close(a, b, **FP32)
    grads = {b: torch.autograd.grad(o[0].sum() + o[1], (x, protos)) for b, o in outs.items()}
    for a, b in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_gradcheck_reference_composition():
    """float64 gradcheck of the definition (reference backend), logsumexp pooling (smooth), all
    positives, learnable scale and bias, weights."""
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(2, 5, 2, 3, generator=gen, dtype=torch.float64).requires_grad_()
    protos = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64).requires_grad_()
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_()
    target = random_labels((2, 2, 3), 3, generator=gen, device="cpu")
    weight = torch.rand(2, 2, 3, generator=gen, dtype=torch.float64)

    def f(x, protos, scale, bias):
        logits, loss = PF.prototype_logits_and_contrastive(x, protos, target, weight, pooling="logsumexp",
                                                           scale=scale, bias=bias, temperature=0.5,
                                                           backend="reference")
        return logits, loss

    assert torch.autograd.gradcheck(f, (x, protos, scale, bias))


@pytest.mark.parametrize("forced", [dict(S_CHUNK=16), dict(S_TRANSPOSED=True)], ids=["chunks", "transposed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("pooling", ["max", "logsumexp"])
def test_similarity_forms_of_the_prototype_gradient(pooling, dtype, forced, monkeypatch):
    """The prototype gradient's similarity of 16-bit features has three forms on the GPU
    (_joint_dw_config): two channel halves held on chip, channel chunks read from memory into
    one accumulator (S_CHUNK: sm_80 at C = 512), and the transposed GEMM (S_TRANSPOSED:
    bfloat16 features on sm_90). NCHW features on the interpreter take the halves; each
    other form is forced here (40 channels: the last chunk of 16 masked) and must give the same
    gradients up to summation order. Both users: the one op, and logsumexp pooling alone."""
    similarity = pytest.importorskip("torch_ppl.kernels.similarity")
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(2, 40, 3, 5, generator=gen).to(DEVICE, dtype).requires_grad_()
    protos = torch.randn(7, 3, 40, generator=gen).to(DEVICE).requires_grad_()
    target = random_labels((2, 3, 5), 7, generator=gen)
    g = torch.randn(2, 7, 3, 5, generator=gen).to(DEVICE)

    def grads():
        logits, loss = PF.prototype_logits_and_contrastive(
            x, protos, target, None, similarity="cosine", pooling=pooling, scale=4.0, bias=None,
            temperature=0.1, positives="all", backend="triton")
        alone = PF.prototype_logits(x, protos, similarity="cosine", pooling=pooling, scale=4.0, backend="triton")
        one = torch.autograd.grad((logits * g).sum() + 2.0 * loss, (x, protos))
        return one + torch.autograd.grad((alone * g).sum(), (x, protos))

    held = grads()
    config = similarity._joint_dw_config

    def other_form(device, c, x_dtype, channel_stride, **kwargs):
        tiles = config(device, c, x_dtype, channel_stride, **kwargs)
        assert tiles["S_CHUNK"] == 0 and not tiles["S_TRANSPOSED"]
        return dict(tiles, **forced)

    monkeypatch.setattr(similarity, "_joint_dw_config", other_form)
    monkeypatch.setattr(head_push, "_joint_dw_config", other_form)
    for a, b in zip(grads(), held):
        torch.testing.assert_close(a, b, atol=1e-3 * b.abs().max().item(), rtol=0)


@pytest.mark.parametrize("chunk, reload, dtype", [(0, False, torch.bfloat16), (0, True, torch.bfloat16),
                                                  (16, False, torch.bfloat16), (0, True, torch.float16)],
                         ids=["held", "reloaded", "chunks", "reloaded-float16"])
@pytest.mark.parametrize("positives", ["all", "nearest"])
@pytest.mark.parametrize("pooling", ["max", "logsumexp", "mean"])
def test_flat_prototype_tiles_of_dx(pooling, positives, chunk, reload, dtype, monkeypatch):
    """dx from recomputed similarities (the one op; the head alone with logsumexp pooling)
    walks the prototypes one class tile and prototype index at a time, or (sm_90 and sm_100,
    16-bit features of 128 to 512 channels; on the interpreter channels-last features) in
    tiles of the flat P = K*M axis, with the rows held on chip, held and loaded again for the
    normalisation backward at the end, or read again in channel chunks per tile (float16 takes
    its dx GEMM's Ŵ in float32, loaded per tile).
    NCHW features take the class tiles on the interpreter; the flat forms are forced here (7
    classes of 3 prototypes: tiles of 16 split classes; 40 channels: the last chunk of 16
    masked) and must give the same dx and, with a learnable scale, the same d(scale), up to
    summation order."""
    similarity = pytest.importorskip("torch_ppl.kernels.similarity")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 40, 3, 5, generator=gen).to(DEVICE, dtype).requires_grad_()
    protos = torch.randn(7, 3, 40, generator=gen).to(DEVICE)
    scale = torch.tensor(4.0, device=DEVICE).requires_grad_()
    target = random_labels((2, 3, 5), 7, generator=gen)
    g = torch.randn(2, 7, 3, 5, generator=gen).to(DEVICE)

    def grads():
        logits, loss = PF.prototype_logits_and_contrastive(
            x, protos, target, None, similarity="cosine", pooling=pooling, scale=scale, bias=None,
            temperature=0.1, positives=positives, backend="triton")
        one = torch.autograd.grad((logits * g).sum() + 2.0 * loss.sum(), (x, scale))
        alone = PF.prototype_logits(x, protos, similarity="cosine", pooling="logsumexp", scale=scale,
                                    backend="triton")
        return one + torch.autograd.grad((alone * g).sum(), (x, scale))

    tiles = grads()

    class Flat(similarity._Config):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            assert self.dx_block_p == 0 and not self.reload_x
            self.dx_block_p, self.dx_s_chunk, self.reload_x = 16, chunk, reload

    monkeypatch.setattr(similarity, "_Config", Flat)
    monkeypatch.setattr(head_push, "_Config", Flat)
    for a, b in zip(grads(), tiles):
        torch.testing.assert_close(a, b, atol=1e-3 * b.abs().max().item(), rtol=0)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_wide_offsets_give_the_same_gradients(layout, monkeypatch):
    """Offsets within an image are 32-bit unless an image spans 2**31 elements or more
    (``needs_wide_offsets``), which no test can allocate: the 64-bit path is forced here, for the
    one op's and the head's kernels and the attention's, and must agree with the default."""
    similarity = pytest.importorskip("torch_ppl.kernels.similarity")
    attention = pytest.importorskip("torch_ppl.kernels.attention")
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 24, 3, 5, generator=gen).to(DEVICE, torch.bfloat16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    protos = torch.randn(5, 3, 24, generator=gen).to(DEVICE).requires_grad_()
    weights = [(torch.randn(24, 24, generator=gen) / 5).to(DEVICE).requires_grad_() for _ in range(4)]
    target = random_labels((2, 3, 5), 5, generator=gen)
    g = torch.randn(2, 5, 3, 5, generator=gen).to(DEVICE)

    def grads():
        logits, loss = PF.prototype_logits_and_contrastive(x, protos, target, pooling="logsumexp", scale=4.0,
                                                           backend="triton")
        alone = PF.prototype_logits(x, protos, pooling="max", scale=4.0, backend="triton")
        pulled = PF.prototype_attention(x, protos, *weights, None, None, None, None, num_heads=2,
                                        exclude=target, backend="triton")
        total = (logits * g).sum() + loss + (alone * g).sum() + (pulled.float() ** 2).sum()
        return torch.autograd.grad(total, (x, protos, *weights))

    narrow = grads()
    for module in (similarity, head_push, attention):
        monkeypatch.setattr(module, "needs_wide_offsets", lambda *tensors: True)
    for a, b in zip(grads(), narrow):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_deterministic_mode_is_bitwise_repeatable():
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(67, 24, generator=gen).to(DEVICE).requires_grad_()
    protos = torch.randn(5, 3, 24, generator=gen).to(DEVICE).requires_grad_()
    scale = torch.tensor(5.0, device=DEVICE, requires_grad=True)
    target = random_labels((67,), 5, generator=gen)
    g = torch.randn(67, 5, generator=gen).to(DEVICE)
    inputs = (x, protos, scale)

    def step():
        logits, loss = PF.prototype_logits_and_contrastive(x, protos, target, scale=scale, backend="triton")
        return [logits, loss, *torch.autograd.grad((logits * g).sum() + loss, inputs)]

    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        runs = [step(), step()]
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    for a, b in zip(step(), runs[0]):  # the atomic path, up to summation order
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_checks_are_those_of_the_two_ops():
    x = torch.randn(2, 8, 3, 3, device=DEVICE)
    protos = torch.randn(4, 2, 8, device=DEVICE)
    target = torch.zeros(2, 3, 3, dtype=torch.long, device=DEVICE)
    fn = PF.prototype_logits_and_contrastive
    with pytest.raises(ValueError, match="target"):
        fn(x, protos, target + 7, backend="triton")
    with pytest.raises(ValueError, match="pooling"):
        fn(x, protos, target, pooling="median", backend="triton")
    with pytest.raises(ValueError, match="temperature"):
        fn(x, protos, target, temperature=0.0, backend="triton")
    with pytest.raises(ValueError, match="weight"):
        fn(x, protos, target, -torch.ones(2, 3, 3, device=DEVICE), backend="triton")
    with pytest.raises(TypeError, match="backend='reference'"):
        fn(x.double(), protos.double(), target, backend="triton")


# ----------------------------------------------------------------------------- torch.library / compile
def _op_inputs():
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(2, 10, 3, 4, generator=gen).to(DEVICE).movedim(1, -1)
    w_hat = F.normalize(torch.randn(3, 2, 10, generator=gen), dim=-1).to(DEVICE)
    target = random_labels((2, 3, 4), 3, generator=gen)
    return x, w_hat, torch.tensor(2.0, device=DEVICE), torch.randn(3, generator=gen).to(DEVICE), target


@pytest.mark.parametrize("pooling, nearest", [("max", False), ("logsumexp", True)])
def test_opcheck(pooling, nearest):
    x, w_hat, scale, bias, target = _op_inputs()
    args = (x, w_hat, scale, bias, target, True, pooling, 10.0, nearest, IGNORE)
    torch.library.opcheck(torch.ops.torch_ppl.prototype_logits_contrastive_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    out = torch.ops.torch_ppl.prototype_logits_contrastive_fwd(*args)
    bwd = (torch.randn_like(out[0]), torch.randn_like(out[3]), x, w_hat, scale, target, out[1], out[4], out[5],
           out[6], True, pooling, 10.0, nearest, IGNORE, False, True, True, True)
    torch.library.opcheck(torch.ops.torch_ppl.prototype_logits_contrastive_bwd.default, bwd,
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    """No graph break with fullgraph=True; backend="aot_eager" also traces the backward (the
    custom ops are opaque nodes for any backend)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(18)
    x = torch.randn(2, 10, 3, 4, generator=gen).to(DEVICE).requires_grad_()
    protos = torch.randn(3, 2, 10, generator=gen).to(DEVICE).requires_grad_()
    scale = torch.tensor(4.0, device=DEVICE, requires_grad=True)
    target = random_labels((2, 3, 4), 3, generator=gen)

    def f(x, protos, scale):
        logits, loss = PF.prototype_logits_and_contrastive(x, protos, target, scale=scale, pooling="logsumexp",
                                                           positives="nearest", backend="triton")
        return logits.square().mean() + loss

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c = compiled(x, protos, scale)
    grads_c = torch.autograd.grad(loss_c, (x, protos, scale))
    loss_e = f(x, protos, scale)
    grads_e = torch.autograd.grad(loss_e, (x, protos, scale))
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- the module
def _heads(backend, **kwargs):
    torch.manual_seed(19)
    return PPLHead(12, 4, 3, pull=False, learnable_scale=True, bias=True, backend=backend, **kwargs).to(DEVICE)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", [
    dict(memory_format=torch.contiguous_format, reduction="mean", weight=True, return_terms=True),
    dict(memory_format=torch.channels_last, reduction="sum", weight=False, return_terms=False),
    dict(memory_format=torch.contiguous_format, reduction="none", weight=True, return_terms=False,
         positives="nearest", pooling="logsumexp"),
], ids=["mean-nchw", "sum-nhwc", "none-nearest-lse"])
def test_ppl_head_equals_the_two_op_path(backend, case, monkeypatch):
    """``PPLHead(x, target)`` (one op on the Triton backend) against the same head computed the
    two-op way (prototype_logits, then the criterion on its logits and features): logits, loss
    terms and every gradient, up to summation order. Labels at twice the features' resolution,
    except for reduction="none", which needs them at the same."""
    case = dict(case)
    fmt, reduction = case.pop("memory_format"), case.pop("reduction")
    use_weight, return_terms = case.pop("weight"), case.pop("return_terms")
    crit_opts = dict(positives=case.pop("positives", "all"), reduction=reduction, backend=backend)
    head = _heads(backend, pooling=case.pop("pooling", "max"), criterion=PushPullLoss(**crit_opts))
    gen = torch.Generator().manual_seed(20)
    x = torch.randn(2, 12, 3, 5, generator=gen).to(DEVICE).contiguous(memory_format=fmt)
    size = (3, 5) if reduction == "none" else (6, 10)
    target = random_labels((2, *size), 4, generator=gen)
    weight = torch.rand(2, *size, generator=gen).to(DEVICE) if use_weight else None

    calls = []
    original = PF.prototype_logits_and_contrastive
    monkeypatch.setattr(PF, "prototype_logits_and_contrastive", lambda *a, **k: calls.append(1) or original(*a, **k))
    xa = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    out = head(xa, target, weight, return_terms=return_terms)
    assert len(calls) == (1 if backend == "triton" else 0)
    terms = out.loss if return_terms else (out.loss,)

    xb = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    c = head.classifier
    logits = PF.prototype_logits(xb, c.prototypes, similarity=c.similarity, pooling=c.pooling, scale=c.scale,
                                 bias=c.bias, backend=backend)
    expected = head.criterion(logits, xb, target, c.prototypes, weight, return_terms=return_terms)
    expected = expected if return_terms else (expected,)
    torch.testing.assert_close(out.logits, logits, **FP32)
    assert out.logits.is_contiguous(memory_format=fmt)
    for a, b in zip(terms, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    params = list(head.parameters())
    g = torch.randn(logits.shape, generator=gen).to(DEVICE)
    fused = torch.autograd.grad((out.logits * g).sum() + terms[0].sum(), [xa, *params])
    twice = torch.autograd.grad((logits * g).sum() + expected[0].sum(), [xb, *params])
    for a, b in zip(fused, twice):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_ppl_head_keeps_the_two_op_path_for_other_criteria(monkeypatch):
    """A criterion whose similarity differs from the classifier's, or with the contrast term off,
    is not the fused op's kind."""
    calls = []
    original = PF.prototype_logits_and_contrastive
    monkeypatch.setattr(PF, "prototype_logits_and_contrastive", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(2, 12, 3, 5, device=DEVICE)
    target = random_labels((2, 3, 5), 4, generator=torch.Generator().manual_seed(21))
    for crit in (PushPullLoss(similarity="dot", backend="triton"), PushPullLoss(contrast_weight=0.0, backend="triton")):
        _heads("triton", criterion=crit)(x, target)
    assert not calls
    _heads("triton")(x, target)
    assert len(calls) == 1
