"""PPLHead: the pull, the classifier and the push in one module, against the three composed by hand."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import requires_triton
from torch_ppl import MultiPrototypeClassifier, PPLAttention, PPLHead, PPLHeadOutput, PushPullLoss
from torch_ppl import functional as PF

C, K, M = 6, 3, 2


def _inputs(seed=0, size=5, label_size=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, C, size, size, generator=g)
    y = torch.randint(0, K, (2, label_size, label_size), generator=g)
    y = y.masked_fill(torch.rand(y.shape, generator=g) < 0.2, 255)
    w = torch.rand(y.shape, generator=g)
    return x, y, w


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_equals_the_three_modules_composed_by_hand(kernel_size):
    torch.manual_seed(0)
    head = PPLHead(C, K, M, num_heads=2, kernel_size=kernel_size, backend="reference")
    x, y, w = _inputs()
    out = head(x, y, w)
    assert isinstance(out, PPLHeadOutput)

    clf, pull = head.classifier, head.pull
    assert isinstance(clf, MultiPrototypeClassifier) and isinstance(pull, PPLAttention)
    f = pull(clf.embed(x), clf.prototypes)
    logits = PF.prototype_logits(f, clf.prototypes, similarity="cosine", pooling="max", scale=clf.scale)
    loss = PushPullLoss()(logits, f, y, clf.prototypes, weight=w)
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.features, f)
    torch.testing.assert_close(out.loss, loss)
    assert out.logits.shape == (2, K, 5, 5) and out.features.shape == (2, C * kernel_size ** 2, 5, 5)
    torch.testing.assert_close(head(x), logits)  # without a target: the logits alone


def test_every_parameter_gets_a_gradient_and_state_dict_names():
    head = PPLHead(C, K, M, num_heads=2, layer_scale=1e-2, learnable_scale=True, bias=True)
    x, y, _ = _inputs()
    head(x, y).loss.backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert set(head.state_dict()) == {
        "classifier.prototypes", "classifier.bias", "classifier.scale", "pull.gamma",
        *(f"pull.{p}_proj.{t}" for p in "qkv" for t in ("weight", "bias")), "pull.out_proj.weight", "pull.out_proj.bias",
    }
    assert head.prototypes is head.classifier.prototypes


def test_loss_after_a_forward_without_target_equals_the_loss_inside():
    torch.manual_seed(0)
    head = PPLHead(C, K, M)
    x, y, w = _inputs()
    inside = head(x, y, w, return_terms=True).loss
    logits = nn.functional.interpolate(head(x), scale_factor=2.0, mode="bilinear")  # as smp upsamples after the head
    outside = head.loss(logits, y, w, return_terms=True)
    torch.testing.assert_close(outside.contrastive, inside.contrastive)
    with pytest.raises(RuntimeError, match="no features kept"):
        head.loss(logits, y)  # released by the first call
    head.eval()
    head(x)
    with pytest.raises(RuntimeError, match="no features kept"):
        head.loss(logits, y)  # eval mode keeps nothing


def test_deepcopy_and_pickle_after_a_training_forward():
    """An EMA teacher is often a deepcopy taken mid-training; the kept features (part of an
    autograd graph) are not copied."""
    import copy
    import pickle

    head = PPLHead(C, K, M)
    x, y, _ = _inputs()
    logits = head(x)  # training mode: keeps its features
    for clone in (copy.deepcopy(head), pickle.loads(pickle.dumps(head))):
        with pytest.raises(RuntimeError, match="no features kept"):
            clone.loss(logits, y)
        torch.testing.assert_close(clone(x), logits)
    assert torch.isfinite(head.loss(logits, y))  # the original still has them


@pytest.mark.parametrize("pull", [False, True])
def test_from_conv_starts_as_the_conv(pull):
    conv = nn.Conv2d(C, K, 3, padding=1)
    head = PPLHead.from_conv(conv, num_prototypes=2, pull=pull, layer_scale=None if not pull else 0.0)
    x = torch.randn(2, C, 6, 6)
    torch.testing.assert_close(head(x), conv(x), rtol=1e-5, atol=1e-5)
    assert head.classifier.similarity == "dot" and head.classifier.kernel_size == 3
    assert (head.pull is not None) == pull


def test_bad_calls_raise_naming_the_argument():
    head = PPLHead(C, K, M, pull=False)
    x, y, w = _inputs()
    with pytest.raises(ValueError, match="need a target"):
        head(x, weight=w)
    with pytest.raises(ValueError, match="pull=False"):
        head(x, exclude=y)
    with pytest.raises(TypeError, match="criterion"):
        PPLHead(C, K, criterion=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="backend"):
        PPLHead(C, K, backend="cuda")
    with pytest.raises(ValueError, match="target values"):
        head(x, torch.full_like(y, 7))


def test_custom_criterion_and_exclude():
    torch.manual_seed(0)
    crit = PushPullLoss(temperature=0.5, positives="nearest", contrast_weight=0.3)
    head = PPLHead(C, K, M, criterion=crit)
    assert head.criterion is crit
    x, y, _ = _inputs()
    out = head(x, y, exclude=y)
    f = head.pull(x, head.prototypes, exclude=y)
    torch.testing.assert_close(out.features, f)
    torch.testing.assert_close(out.loss, crit(out.logits, f, y, head.prototypes))


@requires_triton
def test_triton_backend_matches_reference():
    torch.manual_seed(0)
    ref = PPLHead(C, K, M, num_heads=2, backend="reference")
    fused = PPLHead(C, K, M, num_heads=2, backend="triton")
    fused.load_state_dict(ref.state_dict())
    x, y, w = _inputs()
    a, b = ref(x, y, w), fused(x, y, w)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-4, atol=1e-4)
