"""Property-based tests (hypothesis) of mathematical facts the reference path must satisfy.

Each test states a fact that a wrong implementation would break: a flipped sign, a missing
normalisation, a wrong reduction denominator, gradient leaking to ignored pixels. Where the
fact is an identity with an independent computation (``F.cross_entropy``, ``nn.Conv2d``,
``F.scaled_dot_product_attention``, the fast form of docs/math.md), that computation is written here
with plain PyTorch and never with :mod:`torch_ppl.reference`.

Hypothesis draws the sizes and a seed; tensors come from a seeded ``torch.Generator``.
Everything runs with ``backend="reference"`` and float64 unless the test is about dtypes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_ppl.functional as PF
from torch_ppl import MultiPrototypeClassifier, PPLAttention, PushPullLoss

REF = "reference"
F64 = torch.float64
IGNORE = 255
EXAMPLES = settings(max_examples=25)


def close(a, b, atol=1e-10, rtol=1e-10):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@dataclass
class Problem:
    x: torch.Tensor        # (B, C, H, W) float64 features
    protos: torch.Tensor   # (K, M, C)
    target: torch.Tensor   # (B, H, W), some IGNORE
    weight: torch.Tensor   # (B, H, W) in [0, 1], some exact zeros
    g: torch.Generator

    @property
    def K(self):
        return self.protos.shape[0]

    @property
    def M(self):
        return self.protos.shape[1]


@st.composite
def problems(draw, max_k=4, max_m=4, min_k=1, min_m=1, min_c=1, ignore=True):
    b, h, w = draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    c = draw(st.integers(min_c, 6))
    k, m = draw(st.integers(min_k, max_k)), draw(st.integers(min_m, max_m))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(b, c, h, w, generator=g, dtype=F64)
    protos = torch.randn(k, m, c, generator=g, dtype=F64)
    target = torch.randint(0, k, (b, h, w), generator=g)
    if ignore:
        target = target.masked_fill(torch.rand(b, h, w, generator=g) < 0.25, IGNORE)
    weight = torch.rand(b, h, w, generator=g, dtype=F64)
    weight = weight.masked_fill(torch.rand(b, h, w, generator=g) < 0.25, 0.0)
    return Problem(x, protos, target, weight, g)


def cosine(x, protos):
    """Independent cosine similarity: ``(B, C, H, W), (K, M, C) -> (B, H, W, K, M)``."""
    xn = x / x.norm(dim=1, keepdim=True)
    wn = protos / protos.norm(dim=-1, keepdim=True)
    return torch.einsum("bchw,kmc->bhwkm", xn, wn)


def per_pixel_contrastive(x, protos, target, tau, positives):
    """The formulas of docs/math.md (the push) written out independently, ``(B, H, W)``, 0 at ignored pixels."""
    z = cosine(x, protos) / tau
    valid = target != IGNORE
    y = target.clamp_max(protos.shape[0] - 1) * valid
    z_pos = torch.take_along_dim(z, y[..., None, None], dim=-2).squeeze(-2)
    pos = torch.logsumexp(z_pos, -1) if positives == "all" else z_pos.max(-1).values
    loss = torch.logsumexp(z.flatten(-2), -1) - pos
    return torch.where(valid, loss, torch.zeros_like(loss))


# ----------------------------------------------------------------------------- the head
@EXAMPLES
@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**31 - 1), st.booleans())
def test_from_conv_is_conv2d(c, k, seed, has_bias):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(c, k, 1, bias=has_bias).double()
    x = torch.randn(2, c, 3, 2, dtype=F64)
    head = MultiPrototypeClassifier.from_conv(conv, backend=REF)
    close(head(x), conv(x))


@EXAMPLES
@given(problems())
def test_pooling_order(p):
    """mean <= max <= logsumexp <= max + log M over the M prototypes of each class."""
    out = {pool: PF.prototype_logits(p.x, p.protos, pooling=pool, scale=1.0, backend=REF)
           for pool in ("max", "logsumexp", "mean")}
    tol = 1e-12
    assert (out["mean"] <= out["max"] + tol).all()
    assert (out["max"] <= out["logsumexp"] + tol).all()
    assert (out["logsumexp"] <= out["max"] + math.log(p.M) + tol).all()
    # max pooling is the max of the independent cosine similarities
    close(out["max"], cosine(p.x, p.protos).amax(-1).permute(0, 3, 1, 2))


@EXAMPLES
@given(problems(min_m=2, min_c=2), st.sampled_from(["cosine", "dot"]))  # C=1 cosine is constant
def test_max_pooling_tie_goes_to_lowest_index(p, similarity):
    protos = p.protos[:, :1].expand_as(p.protos).clone().requires_grad_(True)  # all M tied
    logits = PF.prototype_logits(p.x, protos, similarity=similarity, pooling="max", backend=REF)
    (logits * torch.randn(logits.shape, generator=p.g, dtype=F64)).sum().backward()
    assert (protos.grad[:, 1:] == 0).all()
    assert protos.grad[:, 0].abs().sum() > 0


@EXAMPLES
@given(problems(), st.sampled_from(["max", "logsumexp", "mean"]))
def test_cosine_invariant_to_positive_rescaling(p, pooling):
    a = torch.empty(p.x.shape[0], 1, *p.x.shape[2:], dtype=F64).uniform_(0.05, 20.0, generator=p.g)
    b = torch.empty(p.K, p.M, 1, dtype=F64).uniform_(0.05, 20.0, generator=p.g)
    ref = PF.prototype_logits(p.x, p.protos, pooling=pooling, backend=REF)
    close(PF.prototype_logits(a * p.x, b * p.protos, pooling=pooling, backend=REF), ref)
    for positives in ("all", "nearest"):
        ref = PF.contrastive_loss(p.x, p.target, p.protos, positives=positives, reduction="none", backend=REF)
        got = PF.contrastive_loss(a * p.x, p.target, b * p.protos, positives=positives, reduction="none",
                                  backend=REF)
        close(got, ref)


@EXAMPLES
@given(problems(), st.sampled_from(["all", "nearest"]))
def test_cosine_gradient_orthogonal_to_feature(p, positives):
    """Rescaling invariance means d loss / d x_n is orthogonal to x_n (and likewise for W)."""
    x, protos = p.x.clone().requires_grad_(True), p.protos.clone().requires_grad_(True)
    loss = PF.contrastive_loss(x, p.target, protos, p.weight, positives=positives, backend=REF)
    logits = PF.prototype_logits(x, protos, pooling="logsumexp", backend=REF)
    (loss + (logits * torch.randn(logits.shape, generator=p.g, dtype=F64)).sum()).backward()
    close((x.grad * x).sum(1), torch.zeros_like(x[:, 0]), atol=1e-9, rtol=0)
    close((protos.grad * protos).sum(-1), torch.zeros(p.K, p.M, dtype=F64), atol=1e-9, rtol=0)


@EXAMPLES
@given(problems())
def test_permuting_prototypes_within_a_class(p):
    perm = torch.stack([torch.randperm(p.M, generator=p.g) for _ in range(p.K)])  # one per class
    shuffled = torch.take_along_dim(p.protos, perm[..., None], dim=1)
    for pooling in ("max", "logsumexp", "mean"):
        close(PF.prototype_logits(p.x, shuffled, pooling=pooling, backend=REF),
              PF.prototype_logits(p.x, p.protos, pooling=pooling, backend=REF))
    for positives in ("all", "nearest"):
        close(PF.contrastive_loss(p.x, p.target, shuffled, positives=positives, reduction="none", backend=REF),
              PF.contrastive_loss(p.x, p.target, p.protos, positives=positives, reduction="none", backend=REF))


@EXAMPLES
@given(problems(min_k=2))
def test_permuting_classes_with_remapped_labels(p):
    perm = torch.randperm(p.K, generator=p.g)           # new class j is old class perm[j]
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(p.K)
    protos = p.protos[perm]
    valid = p.target != IGNORE
    target = torch.where(valid, inverse[p.target.clamp_max(p.K - 1)], p.target)
    for pooling in ("max", "logsumexp", "mean"):
        close(PF.prototype_logits(p.x, protos, pooling=pooling, backend=REF),
              PF.prototype_logits(p.x, p.protos, pooling=pooling, backend=REF)[:, perm])
    logits = torch.randn(p.x.shape[0], p.K, *p.x.shape[2:], generator=p.g, dtype=F64)
    for positives in ("all", "nearest"):
        close(PF.push_pull_loss(logits[:, perm], p.x, target, protos, p.weight, positives=positives,
                                reduction="none", backend=REF),
              PF.push_pull_loss(logits, p.x, p.target, p.protos, p.weight, positives=positives,
                                reduction="none", backend=REF))


# ----------------------------------------------------------------------------- the push
@EXAMPLES
@given(problems(max_m=1), st.floats(0.05, 2.0), st.sampled_from(["all", "nearest"]))
def test_single_prototype_contrastive_is_cross_entropy(p, tau, positives):
    z = cosine(p.x, p.protos)[..., 0] / tau                      # (B, H, W, K)
    expected = F.cross_entropy(z.permute(0, 3, 1, 2), p.target, ignore_index=IGNORE, reduction="none")
    got = PF.contrastive_loss(p.x, p.target, p.protos, temperature=tau, positives=positives, reduction="none",
                              backend=REF)
    close(got, expected)
    if (p.target != IGNORE).any():
        mean = F.cross_entropy(z.permute(0, 3, 1, 2), p.target, ignore_index=IGNORE)
        close(PF.contrastive_loss(p.x, p.target, p.protos, temperature=tau, positives=positives, backend=REF), mean)


@EXAMPLES
@given(problems(), st.floats(0.05, 2.0))
def test_contrastive_nonnegative_and_nearest_at_least_all(p, tau):
    kw = dict(temperature=tau, reduction="none", backend=REF)
    all_ = PF.contrastive_loss(p.x, p.target, p.protos, positives="all", **kw)
    nearest = PF.contrastive_loss(p.x, p.target, p.protos, positives="nearest", **kw)
    valid = p.target != IGNORE
    assert (all_ >= 0).all()
    assert (nearest >= all_ - 1e-12).all()
    if p.K > 1:  # the denominator also holds the other classes' prototypes: strictly positive
        assert (all_[valid] > 0).all()
    assert (all_[~valid] == 0).all() and (nearest[~valid] == 0).all()


@EXAMPLES
@given(problems(), st.floats(0.05, 2.0), st.sampled_from(["all", "nearest"]))
def test_reduction_none_is_per_pixel_and_sums(p, tau, positives):
    kw = dict(temperature=tau, positives=positives, backend=REF)
    none = PF.contrastive_loss(p.x, p.target, p.protos, p.weight, reduction="none", **kw)
    expected = p.weight * per_pixel_contrastive(p.x, p.protos, p.target, tau, positives)
    close(none, expected)
    close(PF.contrastive_loss(p.x, p.target, p.protos, p.weight, reduction="sum", **kw), none.sum())
    n_valid = int((p.target != IGNORE).sum())
    close(PF.contrastive_loss(p.x, p.target, p.protos, p.weight, reduction="mean", **kw),
          none.sum() / max(n_valid, 1))


@EXAMPLES
@given(problems(), st.floats(0.1, 3.0))
def test_unimatch_weighted_mean(p, c):
    """A confidence mask lowers the mean, it does not renormalise it: the denominator is the
    number of non-ignored pixels, whatever the weights."""
    logits = torch.randn(p.x.shape[0], p.K, *p.x.shape[2:], generator=p.g, dtype=F64)
    valid = p.target != IGNORE
    unweighted = PF.push_pull_loss(logits, p.x, p.target, p.protos, return_terms=True, backend=REF)
    scaled = PF.push_pull_loss(logits, p.x, p.target, p.protos, torch.full_like(p.weight, c), return_terms=True,
                               backend=REF)
    for a, b in zip(scaled, unweighted):
        close(a, c * b)
    masked = PF.push_pull_loss(logits, p.x, p.target, p.protos, p.weight, return_terms=True, backend=REF)
    ce = F.cross_entropy(logits, p.target, ignore_index=IGNORE, reduction="none")
    close(masked.ce, (p.weight * ce)[valid].sum() / max(int(valid.sum()), 1))
    con = per_pixel_contrastive(p.x, p.protos, p.target, 0.1, "all")
    close(masked.contrastive, (p.weight * con)[valid].sum() / max(int(valid.sum()), 1))


@EXAMPLES
@given(problems(), st.sampled_from(["mean", "sum", "none"]), st.sampled_from(["all", "nearest"]))
def test_all_ignored_batch_is_exactly_zero_with_zero_grads(p, reduction, positives):
    logits = torch.randn(p.x.shape[0], p.K, *p.x.shape[2:], generator=p.g, dtype=F64, requires_grad=True)
    x, protos = p.x.clone().requires_grad_(True), p.protos.clone().requires_grad_(True)
    target = torch.full_like(p.target, IGNORE)
    for weight in (None, p.weight):
        loss = PF.push_pull_loss(logits, x, target, protos, weight, positives=positives, reduction=reduction,
                                 backend=REF)
        assert (loss == 0).all() and not loss.isnan().any()
        grads = torch.autograd.grad(loss.sum(), (logits, x, protos))
        for grad in grads:
            assert (grad == 0).all()


@EXAMPLES
@given(problems(), st.sampled_from(["all", "nearest"]), st.sampled_from(["mean", "sum", "none"]))
def test_zero_weight_and_ignored_pixels_get_zero_gradient(p, positives, reduction):
    logits = torch.randn(p.x.shape[0], p.K, *p.x.shape[2:], generator=p.g, dtype=F64, requires_grad=True)
    x = p.x.clone().requires_grad_(True)
    loss = PF.push_pull_loss(logits, x, p.target, p.protos, p.weight, positives=positives, reduction=reduction,
                             backend=REF)
    loss.sum().backward()
    dead = (p.target == IGNORE) | (p.weight == 0)
    for grad in (logits.grad, x.grad):
        per_pixel = grad.abs().sum(1)
        assert (per_pixel[dead] == 0).all()
        # a live pixel (weight > 0, a real label) does get a gradient (the cosine of a C=1
        # feature is the constant +-1, so it has none)
        if p.K > 1 and (grad is logits.grad or p.x.shape[1] > 1):
            assert (per_pixel[~dead] > 0).all()


@EXAMPLES
@given(problems(), st.integers(1, 3), st.integers(1, 3))
def test_logits_bilinear_resize_equals_ce_on_resized_logits(p, fh, fw):
    b, _, h, w = p.x.shape
    logits = torch.randn(b, p.K, h, w, generator=p.g, dtype=F64)
    target = torch.randint(0, p.K, (b, h * fh + 1, w * fw), generator=p.g)
    target = target.masked_fill(torch.rand(target.shape, generator=p.g) < 0.2, IGNORE)
    up = F.interpolate(logits, size=target.shape[1:], mode="bilinear", align_corners=False)
    got = PF.push_pull_loss(logits, None, target, None, contrast_weight=0.0, reduction="none", backend=REF)
    close(got, F.cross_entropy(up, target, ignore_index=IGNORE, reduction="none"))
    if (target != IGNORE).any():
        got = PF.push_pull_loss(logits, None, target, None, contrast_weight=0.0, backend=REF)
        close(got, F.cross_entropy(up, target, ignore_index=IGNORE))


@EXAMPLES
@given(problems(), st.integers(2, 3))
def test_nearest_target_resize_for_coarse_features(p, factor):
    """Labels at ``factor`` times the features' resolution: nearest takes every factor-th label."""
    b, _, h, w = p.x.shape
    target = torch.randint(0, p.K, (b, h * factor, w * factor), generator=p.g)
    target = target.masked_fill(torch.rand(target.shape, generator=p.g) < 0.25, IGNORE)
    weight = torch.rand(target.shape, generator=p.g, dtype=F64)
    sub = (slice(None), slice(None, None, factor), slice(None, None, factor))
    for reduction in ("mean", "sum", "none"):
        got = PF.contrastive_loss(p.x, target, p.protos, weight, reduction=reduction, backend=REF)
        expected = PF.contrastive_loss(p.x, target[sub], p.protos, weight[sub], reduction=reduction, backend=REF)
        close(got, expected)
    logits = torch.randn(b, p.K, h * factor, w * factor, generator=p.g, dtype=F64)
    total = PF.push_pull_loss(logits, p.x, target, p.protos, weight, return_terms=True, backend=REF)
    close(total.contrastive, PF.contrastive_loss(p.x, target[sub], p.protos, weight[sub], backend=REF))


@EXAMPLES
@given(problems(), st.floats(0.0, 3.0), st.floats(0.0, 3.0), st.sampled_from(["mean", "sum", "none"]))
def test_return_terms_total(p, ce_weight, contrast_weight, reduction):
    logits = torch.randn(p.x.shape[0], p.K, *p.x.shape[2:], generator=p.g, dtype=F64)
    crit = PushPullLoss(ce_weight=ce_weight, contrast_weight=contrast_weight, reduction=reduction, backend=REF)
    terms = crit(logits, p.x, p.target, p.protos, p.weight, return_terms=True)
    close(terms.total, ce_weight * terms.ce + contrast_weight * terms.contrastive)
    close(crit(logits, p.x, p.target, p.protos, p.weight), terms.total)
    ce = F.cross_entropy(logits, p.target, ignore_index=IGNORE, reduction="none") * p.weight
    close(terms.ce, {"none": ce, "sum": ce.sum(),
                     "mean": ce.sum() / max(int((p.target != IGNORE).sum()), 1)}[reduction])
    close(terms.contrastive,
          PF.contrastive_loss(p.x, p.target, p.protos, p.weight, reduction=reduction, backend=REF))


# ----------------------------------------------------------------------------- the pull
def _attention(c, heads, head_dim, bias=True, layer_scale=None, seed=0, **kw):
    torch.manual_seed(seed)
    return PPLAttention(c, heads, head_dim, bias=bias, layer_scale=layer_scale, backend=REF, **kw).double()


@EXAMPLES
@given(problems(), st.booleans())
def test_zero_v_proj_makes_attention_the_identity(p, bias):
    c = p.x.shape[1]
    attn = _attention(c, 1, 3, bias=bias, layer_scale=0.7)
    with torch.no_grad():
        attn.v_proj.weight.zero_()
        if bias:
            attn.v_proj.bias.zero_()
    out = attn(p.x, p.protos)
    expected = p.x + (attn.gamma * attn.out_proj.bias)[:, None, None] if bias else p.x
    close(out, expected)
    if not bias:
        assert torch.equal(out, p.x)


@EXAMPLES
@given(problems(min_k=2), st.integers(1, 3), st.integers(1, 3), st.booleans(), st.booleans())
def test_attention_matches_sdpa_and_fast_form(p, heads, head_dim, bias, use_exclude):
    """The module equals ``F.scaled_dot_product_attention`` on the projected q, k, v (with a
    boolean mask for ``exclude``), and the fast form (docs/math.md) gives the same."""
    b, c, h, w = p.x.shape
    attn = _attention(c, heads, head_dim, bias=bias, layer_scale=0.5, seed=int(p.target.sum()))
    exclude = p.target if use_exclude else None
    out = attn(p.x, p.protos, exclude=exclude)

    rows = p.x.permute(0, 2, 3, 1).reshape(-1, c)                        # (N, C)
    protos = p.protos.reshape(-1, c)                                     # (P, C)
    q = attn.q_proj(rows).view(-1, heads, head_dim).transpose(0, 1)      # (h, N, d)
    k = attn.k_proj(protos).view(-1, heads, head_dim).transpose(0, 1)    # (h, P, d)
    v = attn.v_proj(protos).view(-1, heads, head_dim).transpose(0, 1)
    mask = None
    if use_exclude:
        proto_class = torch.arange(p.K).repeat_interleave(p.M)
        mask = rows.new_ones(rows.shape[0], protos.shape[0], dtype=torch.bool)
        labels = exclude.reshape(-1)
        mask &= labels[:, None] != proto_class[None, :]                  # True = may attend
    read = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1).reshape(-1, heads * head_dim)
    expected = rows + attn.gamma * attn.out_proj(read)
    close(out.permute(0, 2, 3, 1).reshape(-1, c), expected)

    # fast form: K~_i = k_i W_qi / sqrt(d), c_i = k_i . b_qi / sqrt(d), V~_i = v_i W_oi^T
    wq = attn.q_proj.weight.view(heads, head_dim, c)
    wo = attn.out_proj.weight.view(c, heads, head_dim).permute(1, 2, 0)  # (h, d, C)
    k_tilde = k @ wq / math.sqrt(head_dim)                               # (h, P, C)
    bq = attn.q_proj.bias.view(heads, head_dim, 1) if bias else torch.zeros(heads, head_dim, 1, dtype=F64)
    c_i = (k @ bq).squeeze(-1) / math.sqrt(head_dim)                      # (h, P)
    v_tilde = v @ wo                                                     # (h, P, C)
    scores = rows @ k_tilde.transpose(1, 2) + c_i[:, None, :]            # (h, N, P)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    fast = (scores.softmax(-1) @ v_tilde).sum(0)
    if bias:
        fast = fast + attn.out_proj.bias
    close(out.permute(0, 2, 3, 1).reshape(-1, c), rows + attn.gamma * fast)


@EXAMPLES
@given(problems())
def test_exclude_all_ignore_equals_no_exclude(p):
    attn = _attention(p.x.shape[1], 2, 2)
    everything_ignored = torch.full_like(p.target, IGNORE)
    assert torch.equal(attn(p.x, p.protos, exclude=everything_ignored), attn(p.x, p.protos))


@EXAMPLES
@given(problems(min_k=2))
def test_exclude_hides_own_class(p):
    """Moving a pixel's own-class prototypes anywhere does not change its output under exclude."""
    attn = _attention(p.x.shape[1], 1, 3)
    target = torch.randint(0, p.K, p.target.shape, generator=p.g)
    own = torch.zeros(p.K, dtype=torch.bool)
    own[0] = True
    moved = torch.where(own[:, None, None], torch.randn(p.protos.shape, generator=p.g, dtype=F64), p.protos)
    pixels = target == 0
    out, out_moved = attn(p.x, p.protos, exclude=target), attn(p.x, moved, exclude=target)
    close(out.permute(0, 2, 3, 1)[pixels], out_moved.permute(0, 2, 3, 1)[pixels])
    if (~pixels).any():  # the other pixels do see class 0 and change
        diff = (out - out_moved).abs().sum(1)[~pixels]
        assert (diff > 0).all()


def test_exclude_hiding_every_prototype_reads_nothing():
    """K = 1 and exclude = 0 hides all prototypes: the pixel reads nothing (no NaN from an empty
    softmax), so the output is ``x + gamma * out_bias`` and the gradients stay finite."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 3, generator=g, dtype=F64, requires_grad=True)
    protos = torch.randn(1, 3, 4, generator=g, dtype=F64, requires_grad=True)
    attn = _attention(4, 2, 2, layer_scale=0.5)
    exclude = torch.zeros(2, 3, 3, dtype=torch.long)
    exclude[0, 0, 0] = IGNORE  # this pixel hides nothing and reads the prototypes
    out = attn(x, protos, exclude=exclude)
    hidden = exclude == 0
    expected = (x + (attn.gamma * attn.out_proj.bias)[:, None, None]).permute(0, 2, 3, 1)[hidden]
    close(out.permute(0, 2, 3, 1)[hidden], expected)
    assert not torch.allclose(out[0, :, 0, 0], x[0, :, 0, 0] + attn.gamma * attn.out_proj.bias)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(protos.grad).all()
    torch.testing.assert_close(x.grad.permute(0, 2, 3, 1)[hidden], torch.ones_like(expected), rtol=0, atol=0)


def test_detach_prototypes_gives_no_prototype_grad():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    for detach in (False, True):
        protos = torch.randn(3, 2, 4, generator=g, requires_grad=True)
        attn = PPLAttention(4, 2, detach_prototypes=detach, backend=REF)
        attn(x, protos).square().sum().backward()
        if detach:
            assert protos.grad is None
        else:
            assert protos.grad is not None and protos.grad.abs().sum() > 0
        assert attn.k_proj.weight.grad.abs().sum() > 0  # the projections still learn


# ----------------------------------------------------------------------------- layouts and dtypes
@EXAMPLES
@given(problems(min_k=2))
def test_4d_and_2d_forms_agree(p):
    b, c, h, w = p.x.shape
    rows = p.x.permute(0, 2, 3, 1).reshape(-1, c)
    flat_t, flat_w = p.target.reshape(-1), p.weight.reshape(-1)
    to_rows = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])  # noqa: E731
    for pooling in ("max", "logsumexp", "mean"):
        close(PF.prototype_logits(rows, p.protos, pooling=pooling, bias=torch.ones(p.K, dtype=F64), backend=REF),
              to_rows(PF.prototype_logits(p.x, p.protos, pooling=pooling, bias=torch.ones(p.K, dtype=F64),
                                          backend=REF)))
    logits = torch.randn(b, p.K, h, w, generator=p.g, dtype=F64)
    for reduction in ("mean", "sum", "none"):
        four = PF.push_pull_loss(logits, p.x, p.target, p.protos, p.weight, reduction=reduction, backend=REF)
        two = PF.push_pull_loss(to_rows(logits), rows, flat_t, p.protos, flat_w, reduction=reduction, backend=REF)
        close(two, four.reshape(-1) if reduction == "none" else four)
    attn = _attention(c, 1, 2)
    close(attn(rows, p.protos, exclude=flat_t), to_rows(attn(p.x, p.protos, exclude=p.target)))


def test_channels_last_same_values_and_layout():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 5, 6, generator=g)
    xcl = x.contiguous(memory_format=torch.channels_last)
    assert not xcl.is_contiguous()
    head = MultiPrototypeClassifier(8, 3, 2, bias=True, backend=REF)
    attn = PPLAttention(8, 2, layer_scale=0.1, backend=REF)
    target = torch.randint(0, 3, (2, 5, 6), generator=g)
    for module, args in ((head, ()), (attn, (head.prototypes,)), (attn, (head.prototypes, target))):
        out, out_cl = module(x, *args), module(xcl, *args)
        assert out.is_contiguous() and out_cl.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out_cl, out, atol=1e-6, rtol=1e-6)
    logits, logits_cl = head(x), head(xcl)
    crit = PushPullLoss(backend=REF)
    torch.testing.assert_close(crit(logits_cl, xcl, target, head.prototypes),
                               crit(logits, x, target, head.prototypes), atol=1e-6, rtol=1e-6)


def test_autocast_keeps_logits_and_losses_float32():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 5, 6, generator=g)
    target = torch.randint(0, 3, (2, 10, 12), generator=g)
    head = MultiPrototypeClassifier(8, 3, 2, bias=True, backend=REF)
    attn = PPLAttention(8, 2, backend=REF)
    crit = PushPullLoss(backend=REF)
    with torch.no_grad():
        features = attn(x, head.prototypes)
        fp32 = crit(head(features), features, target, head.prototypes, return_terms=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = attn(x, head.prototypes)
        logits = head(features)
        terms = crit(logits, features, target, head.prototypes, return_terms=True)
        contrast = PF.contrastive_loss(features, target, head.prototypes, backend=REF)
        bf16_logits = head(x.bfloat16())
    assert features.dtype == torch.float32
    assert logits.dtype == torch.float32 and bf16_logits.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in terms) and contrast.dtype == torch.float32
    # computed in fp32, not bf16: agrees with the no-autocast run to fp32 accuracy
    for a, b in zip(terms, fp32):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    terms.total.backward()
    assert head.prototypes.grad.dtype == torch.float32 and torch.isfinite(head.prototypes.grad).all()
