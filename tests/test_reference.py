"""float64 gradcheck of every reference op, through the public functional API and the modules.

Every call uses ``backend="reference"``: these tests define what the fused kernels must match
and must not depend on them. Inputs are tiny (gradcheck differentiates numerically, one input
element at a time) and seeded; for ``pooling="max"`` and ``positives="nearest"`` the seeds are
checked to leave a clear winner, so a finite-difference step never flips the argmax.
"""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

import torch_ppl.functional as PF
from torch_ppl import MultiPrototypeClassifier, PPLAttention, PushPullLoss

F64 = torch.float64
REF = "reference"
MARGIN = 1e-3  # gradcheck's eps is 1e-6: a top-2 gap this wide cannot flip


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, g, requires_grad=True):
    return torch.randn(*shape, generator=g, dtype=F64).requires_grad_(requires_grad)


def _labels(shape, k, g, ignore_frac=0.25, ignore_index=255):
    y = torch.randint(0, k, shape, generator=g)
    drop = torch.rand(shape, generator=g) < ignore_frac
    return y.masked_fill(drop, ignore_index)


def _assert_clear_winner(s: torch.Tensor, dim: int) -> None:
    """Precondition for differentiating through an argmax: the top-2 gap along ``dim`` is wide."""
    top2 = s.detach().topk(2, dim=dim).values
    gap = (top2.select(dim, 0) - top2.select(dim, 1)).min().item()
    assert gap > MARGIN, f"seed gives a near-tie ({gap:.2g}); pick another seed"


def _features(four_d: bool, g, c=4):
    return _randn(2, c, 2, 3, g=g) if four_d else _randn(7, c, g=g)


# ----------------------------------------------------------------------------- the head
@pytest.mark.parametrize("four_d", [True, False], ids=["4d", "2d"])
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("pooling", ["max", "logsumexp", "mean"])
def test_prototype_logits_gradcheck(pooling, similarity, four_d):
    g = _gen(1)
    x = _features(four_d, g)
    protos = _randn(3, 2, 4, g=g)
    scale = torch.tensor(2.5, dtype=F64, requires_grad=True)
    bias = _randn(3, g=g)
    if pooling == "max":
        s = PF.prototype_similarity(x, protos, similarity=similarity, backend=REF)
        _assert_clear_winner(s, dim=2)

    def fn(x, protos, scale, bias):
        return PF.prototype_logits(x, protos, similarity=similarity, pooling=pooling, scale=scale, bias=bias,
                                   backend=REF)

    assert fn(x, protos, scale, bias).dtype == F64
    assert gradcheck(fn, (x, protos, scale, bias))


def test_prototype_logits_gradcheck_float_scale_no_bias():
    g = _gen(2)
    x, protos = _randn(5, 3, g=g), _randn(2, 3, 3, g=g)
    assert gradcheck(lambda x, w: PF.prototype_logits(x, w, pooling="logsumexp", scale=4.0, backend=REF), (x, protos))


def test_prototype_similarity_gradcheck():
    g = _gen(3)
    x, protos = _randn(1, 3, 2, 2, g=g), _randn(2, 2, 3, g=g)
    for sim in ("cosine", "dot"):
        assert gradcheck(lambda x, w: PF.prototype_similarity(x, w, similarity=sim, backend=REF), (x, protos))


@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("pooling", ["max", "logsumexp"])
def test_head_module_gradcheck(pooling, kernel_size):
    torch.manual_seed(4)
    head = MultiPrototypeClassifier(2, 2, 2, pooling=pooling, learnable_scale=True, bias=True,
                                    kernel_size=kernel_size, backend=REF).double()
    x = _randn(1, 2, 3, 3, g=_gen(4))
    if pooling == "max":
        s = PF.prototype_similarity(head.embed(x), head.prototypes, backend=REF)
        _assert_clear_winner(s, dim=2)
    params = dict(head.named_parameters())
    assert set(params) == {"prototypes", "bias", "scale"}
    names = list(params)

    def fn(x, *ps):
        return functional_call(head, dict(zip(names, ps)), (x,))

    assert gradcheck(fn, (x, *params.values()))


# ----------------------------------------------------------------------------- the push
@pytest.mark.parametrize("four_d", [True, False], ids=["4d", "2d"])
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("positives", ["all", "nearest"])
def test_contrastive_loss_gradcheck(positives, similarity, four_d):
    g = _gen(5)
    x = _features(four_d, g)
    protos = _randn(3, 3, 4, g=g)
    target = _labels((2, 2, 3) if four_d else (7,), 3, g)
    weight = torch.rand(target.shape, generator=g, dtype=F64)
    if positives == "nearest":
        s = PF.prototype_similarity(x, protos, similarity=similarity, backend=REF)
        _assert_clear_winner(s, dim=2)
    for reduction, w in (("mean", None), ("mean", weight), ("sum", weight), ("none", weight)):
        def fn(x, protos):
            return PF.contrastive_loss(x, target, protos, w, temperature=0.5, positives=positives,
                                       similarity=similarity, reduction=reduction, backend=REF)

        assert gradcheck(fn, (x, protos)), (reduction, w is not None)


def test_contrastive_loss_gradcheck_resized_target():
    """Features at half the label resolution: the target and the weight are nearest-resized."""
    g = _gen(6)
    x, protos = _randn(1, 3, 2, 2, g=g), _randn(2, 2, 3, g=g)
    target, weight = _labels((1, 4, 4), 2, g), torch.rand(1, 4, 4, generator=g, dtype=F64)
    assert gradcheck(lambda x, w: PF.contrastive_loss(x, target, w, weight, backend=REF), (x, protos))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_push_pull_loss_gradcheck(reduction):
    g = _gen(7)
    logits = _randn(2, 3, 2, 3, g=g)
    feats = _randn(2, 4, 2, 3, g=g)
    protos = _randn(3, 2, 4, g=g)
    target = _labels((2, 2, 3), 3, g)
    weight = torch.rand(2, 2, 3, generator=g, dtype=F64)

    def fn(logits, feats, protos):
        return PF.push_pull_loss(logits, feats, target, protos, weight, temperature=0.3, ce_weight=0.7,
                                 contrast_weight=1.3, reduction=reduction, backend=REF)

    assert gradcheck(fn, (logits, feats, protos))


def test_push_pull_loss_gradcheck_resized_logits_and_features():
    """Logits bilinearly upsampled to the target; features at a coarser resolution still."""
    g = _gen(8)
    logits, feats, protos = _randn(1, 2, 2, 2, g=g), _randn(1, 3, 2, 2, g=g), _randn(2, 2, 3, g=g)
    target, weight = _labels((1, 4, 4), 2, g), torch.rand(1, 4, 4, generator=g, dtype=F64)
    s = PF.prototype_similarity(feats, protos, backend=REF)
    _assert_clear_winner(s, dim=2)
    crit = PushPullLoss(positives="nearest", backend=REF)
    assert gradcheck(lambda a, b, c: crit(a, b, target, c, weight), (logits, feats, protos))


def test_push_pull_loss_gradcheck_2d_return_terms():
    g = _gen(9)
    logits, feats, protos = _randn(6, 3, g=g), _randn(6, 4, g=g), _randn(3, 2, 4, g=g)
    target = _labels((6,), 3, g)
    crit = PushPullLoss(similarity="dot", backend=REF)
    assert gradcheck(lambda a, b, c: tuple(crit(a, b, target, c, return_terms=True)), (logits, feats, protos))


# ----------------------------------------------------------------------------- the pull
def _attention_weights(g, c=4, inner=4, with_bias=True):
    ws = [_randn(inner, c, g=g) for _ in range(3)] + [_randn(c, inner, g=g)]
    bs = [_randn(inner, g=g) for _ in range(3)] + [_randn(c, g=g)] if with_bias else [None] * 4
    return ws, bs


# a covering set of (exclude, gamma, biases, heads, layout): every pair of options appears
ATTENTION_CASES = [
    (True, True, True, 2, True), (True, False, False, 1, False), (False, True, False, 2, False),
    (False, False, True, 1, True), (True, True, False, 1, True), (False, True, True, 1, False),
    (True, False, True, 2, False), (False, False, False, 2, True),
]


@pytest.mark.parametrize(
    "with_exclude, with_gamma, with_bias, num_heads, four_d", ATTENTION_CASES,
    ids=["-".join(("exclude" if e else "all", "gamma" if g else "nogamma", "bias" if b else "nobias", f"h{h}",
                   "4d" if d else "2d")) for e, g, b, h, d in ATTENTION_CASES],
)
def test_prototype_attention_gradcheck(with_exclude, with_gamma, with_bias, num_heads, four_d):
    g = _gen(10)
    x = _features(four_d, g)
    protos = _randn(3, 2, 4, g=g)
    (qw, kw, vw, ow), (qb, kb, vb, ob) = _attention_weights(g, with_bias=with_bias)
    gamma = _randn(4, g=g) if with_gamma else None
    exclude = _labels((2, 2, 3) if four_d else (7,), 3, g) if with_exclude else None
    tensors = [x, protos, qw, kw, vw, ow] + [t for t in (qb, kb, vb, ob, gamma) if t is not None]

    def fn(*ts):
        it = iter(ts)
        x, w, qw, kw, vw, ow = (next(it) for _ in range(6))
        qb, kb, vb, ob = ((next(it) if with_bias else None) for _ in range(4))
        gm = next(it) if with_gamma else None
        return PF.prototype_attention(x, w, qw, kw, vw, ow, qb, kb, vb, ob, num_heads=num_heads, gamma=gm,
                                      exclude=exclude, backend=REF)

    assert fn(*tensors).dtype == F64
    assert gradcheck(fn, tuple(tensors))


def test_attention_module_gradcheck_head_dim_and_flat_prototypes():
    """3 heads of head_dim=2 on C=4 (h*d != C), layer scale, prototypes given as (P, C)."""
    torch.manual_seed(11)
    attn = PPLAttention(4, num_heads=3, head_dim=2, layer_scale=0.5, backend=REF).double()
    g = _gen(11)
    x, protos = _randn(1, 4, 2, 2, g=g), _randn(5, 4, g=g)
    params = dict(attn.named_parameters())
    names = list(params)

    def fn(x, w, *ps):
        return functional_call(attn, dict(zip(names, ps)), (x, w))

    assert gradcheck(fn, (x, protos, *params.values()))


def test_attention_module_gradcheck_exclude_at_label_resolution():
    """exclude given at twice the features' resolution is nearest-resized, ignore_index hides nothing."""
    torch.manual_seed(12)
    attn = PPLAttention(4, num_heads=2, backend=REF).double()
    g = _gen(12)
    x, protos = _randn(1, 4, 2, 2, g=g), _randn(3, 2, 4, g=g)
    exclude = _labels((1, 4, 4), 3, g)
    assert gradcheck(lambda x, w: attn(x, w, exclude=exclude), (x, protos))


def test_a_term_at_weight_zero_is_still_reported():
    """With its input given, a term is computed at weight 0 (for return_terms) and multiplied
    out of the total; with the input None it is skipped and reported as 0."""
    g = torch.Generator().manual_seed(3)
    x, protos = torch.randn(2, 4, 3, 3, generator=g), torch.randn(3, 2, 4, generator=g)
    logits, target = torch.randn(2, 3, 3, 3, generator=g), torch.randint(0, 3, (2, 6, 6), generator=g)
    terms = PF.push_pull_loss(logits, x, target, protos, ce_weight=0.0, return_terms=True, backend="reference")
    assert terms.ce > 0
    torch.testing.assert_close(terms.total, terms.contrastive)
    skipped = PF.push_pull_loss(None, x, target, protos, ce_weight=0.0, return_terms=True, backend="reference")
    assert skipped.ce == 0
    torch.testing.assert_close(skipped.total, terms.total)
