"""The three nn.Modules: conversion from conv/linear classifiers, parameters, state_dict,
extra_repr, initialisation. All on ``backend="reference"``."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_ppl import MultiPrototypeClassifier, PPLAttention, PushPullLoss

REF = "reference"


def _x(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- from_conv
@pytest.mark.parametrize("num_prototypes, pooling", [(1, "max"), (3, "max"), (3, "mean"), (1, "logsumexp")])
@pytest.mark.parametrize("kernel_size, padding", [(1, 0), (3, 1), (3, "same"), (5, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_from_conv2d_reproduces_it(kernel_size, padding, num_prototypes, pooling, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 4, kernel_size, padding=padding, bias=bias).double()
    x = _x(2, 5, 6, 7)
    head = MultiPrototypeClassifier.from_conv(conv, num_prototypes, pooling=pooling, backend=REF)
    assert head.prototypes.shape == (4, num_prototypes, 5 * kernel_size ** 2)
    assert head.prototypes.dtype == torch.float64 and (head.bias is not None) == bias
    out = head(x)
    assert out.shape == (2, 4, 6, 7)
    torch.testing.assert_close(out, conv(x), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("num_prototypes", [1, 2])
def test_from_linear_reproduces_it(num_prototypes):
    torch.manual_seed(1)
    linear = nn.Linear(6, 3).double()
    head = MultiPrototypeClassifier.from_conv(linear, num_prototypes, backend=REF)
    rows = _x(10, 6)
    torch.testing.assert_close(head(rows), linear(rows), atol=1e-12, rtol=1e-12)
    image = _x(2, 6, 3, 4)  # a Linear classifier applied per pixel is a 1x1 conv
    torch.testing.assert_close(head(image), linear(image.movedim(1, -1)).movedim(-1, 1), atol=1e-12, rtol=1e-12)


def test_from_conv_float32_and_logsumexp_shift():
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 5, 1)
    x = _x(2, 8, 4, 4, dtype=torch.float32)
    torch.testing.assert_close(MultiPrototypeClassifier.from_conv(conv, backend=REF)(x), conv(x))
    # M identical copies under logsumexp add log M to every logit: the conversion is exact
    # only for max/mean pooling, as documented
    head = MultiPrototypeClassifier.from_conv(conv, 4, pooling="logsumexp", backend=REF)
    torch.testing.assert_close(head(x), conv(x) + math.log(4))


def test_from_conv_overrides_and_biasless_conv():
    conv = nn.Conv2d(4, 3, 1, bias=False)
    head = MultiPrototypeClassifier.from_conv(conv)
    assert head.bias is None and head.similarity == "dot" and float(head.scale) == 1.0
    head = MultiPrototypeClassifier.from_conv(conv, bias=True, similarity="cosine", scale=5.0, learnable_scale=True)
    assert torch.equal(head.bias.detach(), torch.zeros(3))
    assert head.similarity == "cosine" and isinstance(head.scale, nn.Parameter) and float(head.scale.detach()) == 5.0
    # the copy is a copy: training the head leaves the conv alone
    before = conv.weight.detach().clone()
    with torch.no_grad():
        head.prototypes.add_(1.0)
    assert torch.equal(conv.weight.detach(), before)


def test_from_conv_gradients_match_conv():
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 3, 3, padding=1).double()
    head = MultiPrototypeClassifier.from_conv(conv, backend=REF)
    x = _x(1, 4, 5, 5)
    g = _x(1, 3, 5, 5, seed=1)
    (head(x) * g).sum().backward()
    (conv(x) * g).sum().backward()
    torch.testing.assert_close(head.prototypes.grad.reshape(conv.weight.shape), conv.weight.grad)
    torch.testing.assert_close(head.bias.grad, conv.bias.grad)


# ----------------------------------------------------------------------------- head details
def test_kernel_size_3_embed_shapes_and_padding():
    head = MultiPrototypeClassifier(3, 4, 2, kernel_size=3, backend=REF)
    assert head.prototypes.shape == (4, 2, 27) and head.feature_dim == 27
    x = torch.ones(2, 3, 5, 6)
    emb = head.embed(x)
    assert emb.shape == (2, 27, 5, 6)
    # channel-major, 3x3 neighbourhood row-major: (c, dy, dx) -> c*9 + dy*3 + dx
    center = emb[:, [c * 9 + 4 for c in range(3)]]
    assert torch.equal(center, x)
    corner = emb[0, :, 0, 0].view(3, 3, 3)  # top-left pixel: its top row and left column are padding
    assert (corner[:, 0, :] == 0).all() and (corner[:, :, 0] == 0).all() and (corner[:, 1:, 1:] == 1).all()
    assert head(x).shape == (2, 4, 5, 6)
    assert MultiPrototypeClassifier(3, 4).embed(x) is x


def test_learnable_scale():
    x = _x(2, 4, 3, 3, dtype=torch.float32)
    fixed = MultiPrototypeClassifier(4, 3, scale=7.0, backend=REF)
    assert "scale" not in dict(fixed.named_parameters()) and "scale" in dict(fixed.named_buffers())
    learn = MultiPrototypeClassifier(4, 3, scale=7.0, learnable_scale=True, backend=REF)
    assert isinstance(learn.scale, nn.Parameter) and float(learn.scale.detach()) == 7.0
    learn.load_state_dict(fixed.state_dict())
    out = learn(x)
    torch.testing.assert_close(out, fixed(x))
    out.square().sum().backward()
    assert learn.scale.grad is not None and learn.scale.grad.abs() > 0
    # logits scale linearly in it
    with torch.no_grad():
        learn.scale.mul_(2.0)
    torch.testing.assert_close(learn(x), 2.0 * fixed(x))


@pytest.mark.parametrize("module_fn", [
    lambda: MultiPrototypeClassifier(4, 3, 2, bias=True, learnable_scale=True, kernel_size=3, backend=REF),
    lambda: MultiPrototypeClassifier(4, 3, 2, similarity="dot", pooling="mean", scale=2.0, backend=REF),
    lambda: PPLAttention(4, 2, layer_scale=1e-2, backend=REF),
    lambda: PPLAttention(4, 3, head_dim=5, bias=False, backend=REF),
], ids=["head-3x3", "head-dot", "attn-gamma", "attn-nobias"])
def test_state_dict_round_trip(module_fn):
    torch.manual_seed(4)
    src = module_fn()
    torch.manual_seed(5)
    dst = module_fn()
    x = _x(2, 4, 3, 3, dtype=torch.float32)
    protos = _x(3, 2, 4, seed=1, dtype=torch.float32)
    args = (x,) if isinstance(src, MultiPrototypeClassifier) else (x, protos)
    assert not torch.equal(src(*args), dst(*args))
    buffer = io.BytesIO()
    torch.save(src.state_dict(), buffer)
    buffer.seek(0)
    dst.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(src(*args), dst(*args))


def test_state_dict_keys():
    head = MultiPrototypeClassifier(4, 3, 2, bias=True)
    assert set(head.state_dict()) == {"prototypes", "bias", "scale"}
    attn = PPLAttention(4, 2, layer_scale=0.1)
    assert set(attn.state_dict()) == {f"{p}.{t}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")
                                      for t in ("weight", "bias")} | {"gamma"}
    assert PushPullLoss().state_dict() == {}  # the loss owns no prototypes


def test_extra_repr():
    head = MultiPrototypeClassifier(8, 5, 3, pooling="logsumexp", scale=12.5, learnable_scale=True, bias=True,
                                    kernel_size=3, backend=REF)
    assert head.extra_repr() == ("8, num_classes=5, num_prototypes=3, similarity='cosine', pooling='logsumexp', "
                                 "scale=12.5 (learnable), bias=True, kernel_size=3, backend='reference'")
    assert "MultiPrototypeClassifier(8, num_classes=5" in repr(head)
    attn = PPLAttention(8, 2, layer_scale=1e-4, detach_prototypes=True)
    assert attn.extra_repr() == "8, num_heads=2, head_dim=4, bias=True, layer_scale=True, detach_prototypes=True"
    assert PPLAttention(8).extra_repr() == "8, num_heads=1, head_dim=8, bias=True"
    loss = PushPullLoss(temperature=0.2, positives="nearest")
    assert loss.extra_repr() == ("temperature=0.2, contrast_weight=1, ce_weight=1, positives='nearest', "
                                 "similarity='cosine', ignore_index=255, reduction='mean'")


def test_reset_parameters():
    torch.manual_seed(6)
    head = MultiPrototypeClassifier(16, 4, 3, bias=True)
    torch.testing.assert_close(head.prototypes.detach().norm(dim=-1), torch.ones(4, 3))
    bound = 1 / math.sqrt(16)
    assert head.bias.abs().max() <= bound
    before = head.prototypes.detach().clone()
    head.reset_parameters()
    assert not torch.equal(head.prototypes.detach(), before)
    # distinct prototypes within a class (else max pooling would be a tie forever)
    cos = F.normalize(head.prototypes.detach(), dim=-1) @ F.normalize(head.prototypes.detach(), dim=-1).transpose(1, 2)
    assert (cos - torch.eye(3)).abs().max() < 0.999

    dot = MultiPrototypeClassifier(16, 4, 3, similarity="dot", bias=True, kernel_size=3)
    bound = 1 / math.sqrt(16 * 9)
    assert dot.prototypes.abs().max() <= bound and dot.bias.abs().max() <= bound
    assert dot.prototypes.std() > bound / 4  # spread over the range, not all zero
    # seeded: same seed, same initialisation
    torch.manual_seed(7)
    a = MultiPrototypeClassifier(16, 4, 3)
    torch.manual_seed(7)
    b = MultiPrototypeClassifier(16, 4, 3)
    assert torch.equal(a.prototypes, b.prototypes)


# ----------------------------------------------------------------------------- attention and loss
def test_attention_structure_and_layer_scale():
    attn = PPLAttention(12, num_heads=3, layer_scale=1e-4)
    assert attn.head_dim == 4
    assert attn.q_proj.weight.shape == (12, 12) and attn.out_proj.weight.shape == (12, 12)
    assert torch.equal(attn.gamma.detach(), torch.full((12,), 1e-4))
    wide = PPLAttention(12, num_heads=2, head_dim=16, bias=False)
    assert wide.k_proj.weight.shape == (32, 12) and wide.out_proj.weight.shape == (12, 32)
    assert wide.q_proj.bias is None and wide.gamma is None
    # a small layer scale starts the block near the identity
    x, protos = _x(2, 12, 3, 3, dtype=torch.float32), _x(4, 2, 12, seed=1, dtype=torch.float32)
    out = attn(x, protos)
    assert (out - x).abs().max() < 1e-2 and not torch.equal(out, x)


def test_every_parameter_gets_a_gradient():
    """DDP with find_unused_parameters=False needs a gradient for every parameter each step."""
    torch.manual_seed(8)
    head = MultiPrototypeClassifier(8, 4, 3, bias=True, learnable_scale=True, backend=REF)
    attn = PPLAttention(8, 2, layer_scale=0.1, backend=REF)
    crit = PushPullLoss(backend=REF)
    feats = torch.randn(2, 8, 5, 5, requires_grad=True)
    target = torch.randint(0, 4, (2, 10, 10))
    pulled = attn(feats, head.prototypes)
    crit(head(pulled), pulled, target, head.prototypes).backward()
    for module in (head, attn):
        for name, param in module.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_modules_follow_dtype_and_memory_format():
    head = MultiPrototypeClassifier(4, 3, 2, backend=REF).double()
    attn = PPLAttention(4, 2, backend=REF).double()
    x = _x(1, 4, 3, 5).contiguous(memory_format=torch.channels_last)
    assert head(x).dtype == torch.float64
    out = attn(x, head.prototypes)
    assert out.dtype == torch.float64 and out.is_contiguous(memory_format=torch.channels_last)
    assert head(_x(7, 4)).shape == (7, 3) and attn(_x(7, 4), head.prototypes).shape == (7, 4)


@pytest.mark.parametrize("cls", [MultiPrototypeClassifier, PPLAttention, PushPullLoss])
def test_init_and_forward_have_their_own_docstrings(cls):
    """help(cls) shows what the constructor checks and what forward takes, not nn.Module's
    generic "Should be overridden by all subclasses"."""
    for name in ("__init__", "forward"):
        doc = cls.__dict__[name].__doc__
        assert doc and "Should be overridden" not in doc and "Initialize internal Module state" not in doc, name
    assert "Raises:" in cls.__init__.__doc__ and "Returns:" in cls.forward.__doc__
