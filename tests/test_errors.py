"""Every public entry point and module constructor rejects bad input with a
``ValueError`` (shape, dtype, range) or ``TypeError`` (kind) whose message names the argument
and says what it got; non-finite features give a non-finite loss, never a silent 0."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import torch_ppl.functional as PF
from torch_ppl import MultiPrototypeClassifier, PPLAttention, PushPullLoss

REF = "reference"
B, C, H, W, K, M = 2, 4, 3, 3, 3, 2


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, W, generator=g)
    protos = torch.randn(K, M, C, generator=g)
    target = torch.randint(0, K, (B, H, W), generator=g)
    target[0, 0, 0] = 255
    logits = torch.randn(B, K, H, W, generator=g)
    weight = torch.rand(B, H, W, generator=g)
    attn = {"q_weight": torch.randn(C, C), "k_weight": torch.randn(C, C), "v_weight": torch.randn(C, C),
            "out_weight": torch.randn(C, C)}
    return x, protos, target, logits, weight, attn


X, PROTOS, TARGET, LOGITS, WEIGHT, ATTN = _inputs()


def logits_call(**kw):
    args = dict(x=X, prototypes=PROTOS, backend=REF)
    args.update(kw)
    return lambda: PF.prototype_logits(**args)


def similarity_call(**kw):
    args = dict(x=X, prototypes=PROTOS, backend=REF)
    args.update(kw)
    return lambda: PF.prototype_similarity(**args)


def attention_call(**kw):
    args = dict(x=X, prototypes=PROTOS, backend=REF, **ATTN)
    args.update(kw)
    return lambda: PF.prototype_attention(**args)


def contrastive_call(**kw):
    args = dict(features=X, target=TARGET, prototypes=PROTOS, weight=WEIGHT, backend=REF)
    args.update(kw)
    return lambda: PF.contrastive_loss(**args)


def push_pull_call(**kw):
    args = dict(logits=LOGITS, features=X, target=TARGET, prototypes=PROTOS, weight=WEIGHT, backend=REF)
    args.update(kw)
    return lambda: PF.push_pull_loss(**args)


META = torch.device("meta")

# (id, call, exception, text the message must contain)
CASES = [
    # prototype_logits
    ("logits-x-list", logits_call(x=X.tolist()), TypeError, "x must be a torch.Tensor"),
    ("logits-x-int", logits_call(x=X.long()), TypeError, "x must be a floating-point"),
    ("logits-x-3d", logits_call(x=X[0]), ValueError, "x must have shape"),
    ("logits-x-no-channels", logits_call(x=X[:, :0]), ValueError, "x must have at least one channel"),
    ("logits-protos-C", logits_call(prototypes=PROTOS[..., :3]), ValueError, "prototypes have C=3"),
    ("logits-protos-2d", logits_call(prototypes=PROTOS[0]), ValueError, "prototypes must have shape (K, M, C)"),
    ("logits-protos-empty", logits_call(prototypes=PROTOS[:0]), ValueError, "prototypes must not be empty"),
    ("logits-protos-int", logits_call(prototypes=PROTOS.long()), TypeError, "prototypes must be a floating"),
    ("logits-pooling", logits_call(pooling="min"), ValueError, "pooling must be one of"),
    ("logits-pooling-type", logits_call(pooling=None), TypeError, "pooling must be a str"),
    ("logits-similarity", logits_call(similarity="euclidean"), ValueError, "similarity must be one of"),
    ("logits-scale-nan", logits_call(scale=math.nan), ValueError, "scale must be a finite number > 0; got nan"),
    ("logits-scale-0", logits_call(scale=0.0), ValueError, "scale must be a finite number > 0; got 0.0"),
    ("logits-scale-negative", logits_call(scale=-10.0), ValueError, "scale must be a finite number > 0; got -10.0"),
    ("logits-scale-str", logits_call(scale="10"), TypeError, "scale must be a float"),
    ("logits-scale-tensor", logits_call(scale=torch.ones(2)), ValueError, "scale must be a float or a one-element"),
    ("logits-bias-shape", logits_call(bias=torch.zeros(K + 1)), ValueError, "bias must have shape (K,)"),
    ("logits-bias-int", logits_call(bias=torch.zeros(K, dtype=torch.long)), TypeError, "bias must be a floating"),
    ("logits-backend", logits_call(backend="cuda"), ValueError, "backend must be one of"),
    ("logits-backend-type", logits_call(backend=None), TypeError, "backend must be a str"),
    ("logits-device", logits_call(prototypes=PROTOS.to(META)), ValueError, "prototypes on meta"),
    # prototype_similarity
    ("similarity-x-3d", similarity_call(x=X[0]), ValueError, "x must have shape"),
    ("similarity-protos-C", similarity_call(prototypes=PROTOS[..., :1]), ValueError, "prototypes have C=1"),
    ("similarity-similarity", similarity_call(similarity="l2"), ValueError, "similarity must be one of"),
    ("similarity-backend", similarity_call(backend="triton2"), ValueError, "backend must be one of"),
    # prototype_attention
    ("attention-x-int", attention_call(x=X.int()), TypeError, "x must be a floating-point"),
    ("attention-protos-C", attention_call(prototypes=PROTOS[..., :2]), ValueError, "prototypes have C=2"),
    ("attention-protos-1d", attention_call(prototypes=PROTOS[0, 0]), ValueError, "prototypes must have shape"),
    ("attention-heads-0", attention_call(num_heads=0), ValueError, "num_heads must be >= 1"),
    ("attention-heads-float", attention_call(num_heads=2.0), TypeError, "num_heads must be an int"),
    ("attention-heads-divide", attention_call(num_heads=3), ValueError, "q_weight must have shape (h*d, C)"),
    ("attention-q-C", attention_call(q_weight=torch.randn(C, C + 1)), ValueError, "q_weight must have shape"),
    ("attention-q-type", attention_call(q_weight=None), TypeError, "q_weight must be a torch.Tensor"),
    ("attention-k-shape", attention_call(k_weight=torch.randn(C + 2, C)), ValueError, "k_weight must have shape"),
    ("attention-v-shape", attention_call(v_weight=torch.randn(C, 1)), ValueError, "v_weight must have shape"),
    ("attention-out-shape", attention_call(out_weight=torch.randn(C, 2 * C)), ValueError,
     "out_weight must have shape"),
    ("attention-q-bias", attention_call(q_bias=torch.zeros(C + 1)), ValueError, "q_bias must have shape"),
    ("attention-k-bias", attention_call(k_bias=torch.zeros(1, C)), ValueError, "k_bias must have shape"),
    ("attention-v-bias", attention_call(v_bias=torch.zeros(C, dtype=torch.long)), TypeError,
     "v_bias must be a floating"),
    ("attention-out-bias", attention_call(out_bias=torch.zeros(C - 1)), ValueError, "out_bias must have shape"),
    ("attention-gamma", attention_call(gamma=torch.ones(C + 1)), ValueError, "gamma must have shape"),
    ("attention-exclude-flat-protos", attention_call(prototypes=PROTOS.reshape(-1, C), exclude=TARGET), ValueError,
     "exclude= needs prototypes shaped (K, M, C)"),
    ("attention-exclude-range", attention_call(exclude=TARGET.masked_fill(TARGET == 1, K)), ValueError,
     "exclude values must be in [0, 3)"),
    ("attention-exclude-negative", attention_call(exclude=TARGET - 1), ValueError, "exclude values must be in"),
    ("attention-exclude-float", attention_call(exclude=TARGET.float()), TypeError, "exclude must be an integer"),
    ("attention-exclude-batch", attention_call(exclude=TARGET[:1]), ValueError,
     "x and exclude must have the same batch size (first dimension); got x 2, exclude 1"),
    ("attention-exclude-empty", attention_call(exclude=TARGET[:, :0]), ValueError, "exclude must have H' >= 1"),
    ("attention-ignore-index", attention_call(exclude=TARGET, ignore_index=255.0), TypeError,
     "ignore_index must be an int"),
    ("attention-device", attention_call(gamma=torch.ones(C, device=META)), ValueError, "gamma on meta"),
    ("attention-backend", attention_call(backend="Reference"), ValueError, "backend must be one of"),
    # contrastive_loss
    ("contrastive-target-range", contrastive_call(target=TARGET.masked_fill(TARGET == 0, K)), ValueError,
     "target values must be in [0, 3) or ignore_index=255; found [3]"),
    ("contrastive-target-negative", contrastive_call(target=TARGET.masked_fill(TARGET == 0, -1)), ValueError,
     "found [-1]"),
    ("contrastive-target-other-ignore", contrastive_call(ignore_index=-100), ValueError, "found [255]"),
    ("contrastive-target-float", contrastive_call(target=TARGET.float()), TypeError, "target must be an integer"),
    ("contrastive-target-bool", contrastive_call(target=TARGET > 0), TypeError, "target must be an integer"),
    ("contrastive-target-shape", contrastive_call(target=TARGET[0]), ValueError, "target must have shape"),
    ("contrastive-target-list", contrastive_call(target=TARGET.tolist()), TypeError, "target must be a torch.Tensor"),
    ("contrastive-features-1d", contrastive_call(features=X[0, 0, 0]), ValueError, "features must have shape"),
    ("contrastive-protos-C", contrastive_call(prototypes=PROTOS[..., :3]), ValueError, "prototypes have C=3"),
    ("contrastive-weight-shape", contrastive_call(weight=WEIGHT[:, :2]), ValueError,
     "weight must have the target's shape"),
    ("contrastive-weight-negative", contrastive_call(weight=WEIGHT - 0.5), ValueError,
     "weight must be finite and >= 0 everywhere; found minimum"),
    ("contrastive-weight-nan", contrastive_call(weight=WEIGHT.masked_fill(TARGET == 1, math.nan)), ValueError,
     "weight must be finite and >= 0 everywhere; found nan"),
    ("contrastive-weight-inf", contrastive_call(weight=WEIGHT.masked_fill(TARGET == 1, math.inf)), ValueError,
     "found inf"),
    ("contrastive-batch", contrastive_call(target=TARGET[:1], weight=None), ValueError,
     "features and target must have the same batch size (first dimension); got features 2, target 1"),
    ("contrastive-target-empty", contrastive_call(target=TARGET[:, :, :0], weight=None), ValueError,
     "target must have H' >= 1 and W' >= 1"),
    ("contrastive-weight-int", contrastive_call(weight=torch.ones(B, H, W, dtype=torch.long)), TypeError,
     "weight must be a floating"),
    ("contrastive-temperature-0", contrastive_call(temperature=0.0), ValueError, "temperature must be a finite"),
    ("contrastive-temperature-neg", contrastive_call(temperature=-0.1), ValueError, "temperature"),
    ("contrastive-temperature-inf", contrastive_call(temperature=math.inf), ValueError, "temperature"),
    ("contrastive-temperature-str", contrastive_call(temperature="0.1"), TypeError, "temperature must be a float"),
    ("contrastive-positives", contrastive_call(positives="hardest"), ValueError, "positives must be one of"),
    ("contrastive-similarity", contrastive_call(similarity="cos"), ValueError, "similarity must be one of"),
    ("contrastive-reduction", contrastive_call(reduction="avg"), ValueError, "reduction must be one of"),
    ("contrastive-ignore-index", contrastive_call(ignore_index="255"), TypeError, "ignore_index must be an int"),
    ("contrastive-backend", contrastive_call(backend="gpu"), ValueError, "backend must be one of"),
    ("contrastive-device", contrastive_call(prototypes=PROTOS.to(META)), ValueError, "prototypes on meta"),
    # push_pull_loss
    ("push-pull-logits-K", push_pull_call(logits=LOGITS[:, :2]), ValueError, "logits have K=2 classes"),
    ("push-pull-logits-none", push_pull_call(logits=None), TypeError, "logits must be a torch.Tensor"),
    ("push-pull-logits-int", push_pull_call(logits=LOGITS.long()), TypeError, "logits must be a floating"),
    ("push-pull-logits-3d", push_pull_call(logits=LOGITS[0]), ValueError, "logits must have shape"),
    ("push-pull-logits-batch", push_pull_call(logits=LOGITS[:1]), ValueError,
     "logits must have the batch size (first dimension) of features and target, 2; logits has 1"),
    ("push-pull-features-batch", push_pull_call(features=torch.randn(3, C, H, W)), ValueError,
     "features must have the batch size (first dimension) of logits and target, 2; features has 3"),
    ("push-pull-target-batch", push_pull_call(target=TARGET[:1], weight=None), ValueError,
     "target must have the batch size (first dimension) of logits and features, 2; target has 1"),
    ("push-pull-ce-only-batch", push_pull_call(features=None, prototypes=None, contrast_weight=0.0,
                                               target=TARGET[:1], weight=None), ValueError,
     "logits and target must have the same batch size (first dimension); got logits 2, target 1"),
    ("push-pull-logits-2d-N", push_pull_call(logits=torch.randn(5, K), features=X[:, :, 0, 0], target=TARGET[:, 0, 0],
                                             weight=None), ValueError,
     "logits must have the batch size (first dimension) of features and target, 2; logits has 5"),
    ("push-pull-target-empty", push_pull_call(target=TARGET[:, :0], weight=None), ValueError,
     "target must have H' >= 1 and W' >= 1"),
    ("push-pull-mixed-dims", push_pull_call(logits=torch.randn(B, K), features=X, weight=None), ValueError,
     "logits and features must both be 4-D or both 2-D"),
    ("push-pull-features-none", push_pull_call(features=None), TypeError, "features must be a torch.Tensor"),
    ("push-pull-both-none", push_pull_call(logits=None, features=None, ce_weight=0.0, contrast_weight=0.0),
     ValueError, "logits and features are both None"),
    ("push-pull-protos-none", push_pull_call(prototypes=None), TypeError, "prototypes must be a torch.Tensor"),
    ("push-pull-protos-C", push_pull_call(prototypes=PROTOS[..., :3]), ValueError, "prototypes have C=3"),
    ("push-pull-target-range", push_pull_call(target=TARGET + 1), ValueError, "target values must be in [0, 3)"),
    ("push-pull-target-float", push_pull_call(target=TARGET.double()), TypeError, "target must be an integer"),
    ("push-pull-weight-negative", push_pull_call(weight=-WEIGHT), ValueError, "weight must be finite and >= 0"),
    ("push-pull-weight-nan", push_pull_call(weight=torch.full_like(WEIGHT, math.nan)), ValueError,
     "weight must be finite and >= 0 everywhere; found nan"),
    ("push-pull-weight-shape", push_pull_call(weight=WEIGHT[0]), ValueError, "weight must have the target's shape"),
    ("push-pull-ce-weight", push_pull_call(ce_weight=math.nan), ValueError, "ce_weight must be a finite number >= 0"),
    ("push-pull-ce-weight-negative", push_pull_call(ce_weight=-0.5), ValueError,
     "ce_weight must be a finite number >= 0; got -0.5"),
    ("push-pull-contrast-weight-negative", push_pull_call(contrast_weight=-1), ValueError,
     "contrast_weight must be a finite number >= 0; got -1"),
    ("push-pull-contrast-weight", push_pull_call(contrast_weight="1"), TypeError, "contrast_weight must be a float"),
    ("push-pull-temperature", push_pull_call(temperature=0), ValueError, "temperature must be a finite"),
    ("push-pull-positives", push_pull_call(positives=1), TypeError, "positives must be a str"),
    ("push-pull-reduction", push_pull_call(reduction="batchmean"), ValueError, "reduction must be one of"),
    ("push-pull-none-coarse", push_pull_call(features=X[:, :, :2, :2], reduction="none"), ValueError,
     "reduction='none' adds per-pixel maps"),
    ("push-pull-backend", push_pull_call(backend="auto "), ValueError, "backend must be one of"),
    ("push-pull-device", push_pull_call(logits=LOGITS.to(META)), ValueError, "logits on meta"),
    # module constructors
    ("head-in-channels", lambda: MultiPrototypeClassifier(0, K), ValueError, "in_channels must be >= 1"),
    ("head-num-classes", lambda: MultiPrototypeClassifier(C, 2.0), TypeError, "num_classes must be an int"),
    ("head-num-prototypes", lambda: MultiPrototypeClassifier(C, K, 0), ValueError, "num_prototypes must be >= 1"),
    ("head-similarity", lambda: MultiPrototypeClassifier(C, K, similarity="l2"), ValueError,
     "similarity must be one of"),
    ("head-pooling", lambda: MultiPrototypeClassifier(C, K, pooling="softmax"), ValueError, "pooling must be one of"),
    ("head-scale", lambda: MultiPrototypeClassifier(C, K, scale=math.inf), ValueError, "scale must be a finite number > 0"),
    ("head-scale-0", lambda: MultiPrototypeClassifier(C, K, scale=0.0), ValueError,
     "scale must be a finite number > 0; got 0.0"),
    ("head-scale-negative", lambda: MultiPrototypeClassifier(C, K, scale=-10.0, learnable_scale=True), ValueError,
     "scale must be a finite number > 0; got -10.0"),
    ("head-scale-type", lambda: MultiPrototypeClassifier(C, K, scale=None), TypeError, "scale must be a float"),
    ("head-kernel-even", lambda: MultiPrototypeClassifier(C, K, kernel_size=2), ValueError,
     "kernel_size must be odd"),
    ("head-kernel-0", lambda: MultiPrototypeClassifier(C, K, kernel_size=0), ValueError, "kernel_size must be >= 1"),
    ("head-backend", lambda: MultiPrototypeClassifier(C, K, backend="cpu"), ValueError, "backend must be one of"),
    ("head-forward-C", lambda: MultiPrototypeClassifier(C + 1, K, backend=REF)(X), ValueError,
     "prototypes have C=5 channels but the features have C=4"),
    ("head-forward-3x3-2d", lambda: MultiPrototypeClassifier(C, K, kernel_size=3)(X[:, :, 0, 0]), ValueError,
     "x must have shape (B, C, H, W) for kernel_size=3"),
    ("head-embed-list", lambda: MultiPrototypeClassifier(C, K, kernel_size=3).embed(X.tolist()), TypeError,
     "x must be a torch.Tensor; got list"),
    ("head-embed-int", lambda: MultiPrototypeClassifier(C, K, kernel_size=3).embed(X.long()), TypeError,
     "x must be a floating-point tensor"),
    ("head-forward-3x3-C", lambda: MultiPrototypeClassifier(C + 1, K, kernel_size=3)(X), ValueError,
     "x must have C=5 channels"),
    ("from-conv-stride", lambda: MultiPrototypeClassifier.from_conv(nn.Conv2d(C, K, 1, stride=2)), ValueError,
     "conv must be a stride-1"),
    ("from-conv-padding", lambda: MultiPrototypeClassifier.from_conv(nn.Conv2d(C, K, 3)), ValueError,
     "zero padding kernel_size // 2"),
    ("from-conv-groups", lambda: MultiPrototypeClassifier.from_conv(nn.Conv2d(C, C, 1, groups=2)), ValueError,
     "groups-1"),
    ("from-conv-even", lambda: MultiPrototypeClassifier.from_conv(nn.Conv2d(C, K, 2)), ValueError,
     "odd square kernel"),
    ("from-conv-reflect", lambda: MultiPrototypeClassifier.from_conv(nn.Conv2d(C, K, 3, padding=1,
                                                                                padding_mode="reflect")),
     ValueError, "zero padding"),
    ("from-conv-conv1d", lambda: MultiPrototypeClassifier.from_conv(nn.Conv1d(C, K, 1)), TypeError,
     "conv must be an nn.Conv2d or nn.Linear; got Conv1d"),
    ("attn-channels", lambda: PPLAttention(0), ValueError, "channels must be >= 1"),
    ("attn-heads", lambda: PPLAttention(C, 0), ValueError, "num_heads must be >= 1"),
    ("attn-heads-divide", lambda: PPLAttention(10, 3), ValueError, "channels=10 must be divisible by num_heads=3"),
    ("attn-head-dim", lambda: PPLAttention(C, 2, 0), ValueError, "head_dim must be >= 1"),
    ("attn-head-dim-type", lambda: PPLAttention(C, 2, 1.5), TypeError, "head_dim must be an int"),
    ("attn-layer-scale", lambda: PPLAttention(C, layer_scale=math.nan), ValueError, "layer_scale must be finite"),
    ("attn-layer-scale-type", lambda: PPLAttention(C, layer_scale="1e-4"), TypeError,
     "layer_scale must be a float"),
    ("attn-ignore-index", lambda: PPLAttention(C, ignore_index=None), TypeError, "ignore_index must be an int"),
    ("attn-backend", lambda: PPLAttention(C, backend="triton-cpu"), ValueError, "backend must be one of"),
    ("attn-forward-C", lambda: PPLAttention(C, backend=REF)(X, PROTOS[..., :2]), ValueError, "prototypes have C=2"),
    ("attn-forward-exclude", lambda: PPLAttention(C, backend=REF)(X, PROTOS, TARGET + 1), ValueError,
     "exclude values must be in [0, 3)"),
    ("loss-temperature", lambda: PushPullLoss(temperature=0.0), ValueError, "temperature must be a finite"),
    ("loss-temperature-type", lambda: PushPullLoss(temperature=None), TypeError, "temperature must be a float"),
    ("loss-contrast-weight", lambda: PushPullLoss(contrast_weight=math.inf), ValueError,
     "contrast_weight must be a finite number >= 0"),
    ("loss-contrast-weight-negative", lambda: PushPullLoss(contrast_weight=-1), ValueError,
     "contrast_weight must be a finite number >= 0; got -1"),
    ("loss-ce-weight-negative", lambda: PushPullLoss(ce_weight=-1.0), ValueError,
     "ce_weight must be a finite number >= 0; got -1.0"),
    ("loss-ce-weight", lambda: PushPullLoss(ce_weight=True), TypeError, "ce_weight must be a float"),
    ("loss-positives", lambda: PushPullLoss(positives="any"), ValueError, "positives must be one of"),
    ("loss-similarity", lambda: PushPullLoss(similarity="dot-product"), ValueError, "similarity must be one of"),
    ("loss-ignore-index", lambda: PushPullLoss(ignore_index=255.0), TypeError, "ignore_index must be an int"),
    ("loss-reduction", lambda: PushPullLoss(reduction="mean "), ValueError, "reduction must be one of"),
    ("loss-backend", lambda: PushPullLoss(backend="Triton"), ValueError, "backend must be one of"),
    ("loss-forward-target", lambda: PushPullLoss(backend=REF)(LOGITS, X, TARGET * 100, PROTOS), ValueError,
     "target values must be in"),
]


@pytest.mark.parametrize("call, exc, text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_the_argument(call, exc, text):
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert text in message, message
    assert type(info.value) is exc  # not a subclass: ValueError for values, TypeError for kinds


def test_case_ids_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


def test_errors_say_what_they_got():
    """Messages carry the offending value or shape, not just the argument's name."""
    with pytest.raises(ValueError, match=r"got shape \(4, 3, 3\)"):
        PF.prototype_logits(X[0], PROTOS, backend=REF)
    with pytest.raises(ValueError, match=r"got 'min'"):
        PF.prototype_logits(X, PROTOS, pooling="min", backend=REF)
    with pytest.raises(ValueError, match=r"found minimum -0\.5"):
        PF.contrastive_loss(X, TARGET, PROTOS, torch.full((B, H, W), -0.5), backend=REF)
    with pytest.raises(TypeError, match=r"got dtype torch.float32"):
        PF.contrastive_loss(X, TARGET.float(), PROTOS, backend=REF)


# ----------------------------------------------------------------------------- non-finite input
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_non_finite_features_give_non_finite_loss(bad, reduction):
    x = X.clone()
    valid = (TARGET != 255).nonzero()[0].tolist()  # a labelled pixel
    x[valid[0], :, valid[1], valid[2]] = bad
    loss = PF.contrastive_loss(x, TARGET, PROTOS, reduction=reduction, backend=REF)
    assert not torch.isfinite(loss).all()
    total = PF.push_pull_loss(LOGITS, x, TARGET, PROTOS, reduction=reduction, backend=REF)
    assert not torch.isfinite(total).all()
    if reduction == "none":  # the damage stays at that pixel
        assert torch.isfinite(loss).sum() == loss.numel() - 1
    logits = PF.prototype_logits(x, PROTOS, backend=REF)
    assert not torch.isfinite(logits[valid[0], :, valid[1], valid[2]]).any()


def test_non_finite_logits_give_non_finite_loss():
    logits = LOGITS.clone()
    valid = (TARGET != 255).nonzero()[0].tolist()
    logits[valid[0], 0, valid[1], valid[2]] = math.nan
    assert torch.isnan(PF.push_pull_loss(logits, X, TARGET, PROTOS, backend=REF))


def test_detect_anomaly_flags_non_finite_features():
    x = X.clone()
    valid = (TARGET != 255).nonzero()[0].tolist()
    x[valid[0], :, valid[1], valid[2]] = math.nan
    x.requires_grad_(True)
    crit = PushPullLoss(backend=REF)
    with warnings.catch_warnings(record=True) as caught, torch.autograd.detect_anomaly():
        warnings.simplefilter("always")
        loss = crit(LOGITS, x, TARGET, PROTOS)
        with pytest.raises(RuntimeError, match="returned nan values"):
            loss.backward()
    # the forward traceback it prints points into the contrastive loss
    traces = [str(w.message) for w in caught if "Error detected in" in str(w.message)]
    assert traces and "contrastive_loss" in traces[0], traces


# ----------------------------------------------------------------------------- value checks
BAD_TARGET = TARGET.masked_fill(TARGET == 1, 7)


def _loss(logits, features, target, prototypes, weight):
    return PF.push_pull_loss(logits, features, target, prototypes, weight, backend=REF)


@pytest.mark.parametrize("bad", ["target", "weight"])
def test_value_checks_raise_the_same_error_compiled_and_eager(bad):
    """A label out of range (or a NaN weight) is a ValueError under torch.compile too, with the
    eager message, not a crash inside the generated code. The shapes are the README's (33x33
    features, 129x129 labels): there inductor's own bounds check used to end the process."""
    import torch._inductor.config as inductor_config

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, C, 33, 33, generator=g)
    logits = torch.randn(2, K, 33, 33, generator=g)
    target = torch.randint(0, K, (2, 129, 129), generator=g)
    weight = torch.rand(2, 129, 129, generator=g)
    if bad == "target":
        target[1, 100, 7] = 7
        text = "push_pull_loss: target values must be in [0, 3) or ignore_index=255; found [7]"
    else:
        weight[0, 3, 5] = math.nan
        text = "push_pull_loss: weight must be finite and >= 0 everywhere; found nan"
    with pytest.raises(ValueError) as eager:
        _loss(logits, x, target, PROTOS, weight)
    assert str(eager.value) == text
    torch._dynamo.reset()
    with inductor_config.patch({"compile_threads": 1, "cpp.vec_isa_ok": False}):
        compiled = torch.compile(_loss, backend="inductor", fullgraph=True)
        if bad == "target":
            good = target.clamp(max=K - 1)
            torch.testing.assert_close(compiled(logits, x, good, PROTOS, weight),
                                       _loss(logits, x, good, PROTOS, weight))
        with pytest.raises(ValueError) as info:
            compiled(logits, x, target, PROTOS, weight)
    assert str(info.value) == text


def test_value_checks_can_be_turned_off():
    import torch_ppl
    from torch_ppl import _checks

    assert torch_ppl.value_checks_enabled()
    negative = WEIGHT - 0.5
    with pytest.raises(ValueError, match="weight must be finite and >= 0"):
        PF.contrastive_loss(X, TARGET, PROTOS, negative, backend=REF)
    previous = torch_ppl.set_value_checks(False)
    try:
        assert previous is True and not torch_ppl.value_checks_enabled()
        loss = PF.contrastive_loss(X, TARGET, PROTOS, negative, backend=REF)  # not checked: computed
        assert torch.isfinite(loss)
        out_of_range = TARGET.masked_fill(TARGET == 1, 7)
        assert _checks.labels("f", "target", out_of_range, X, K, 255) is out_of_range
        # shape checks still run
        with pytest.raises(ValueError, match="weight must have the target's shape"):
            PF.contrastive_loss(X, TARGET, PROTOS, negative[:1], backend=REF)
    finally:
        torch_ppl.set_value_checks(previous)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        torch_ppl.set_value_checks(0)


def test_value_checks_env_var_at_import():
    import subprocess
    import sys

    code = "import torch_ppl; print(torch_ppl.value_checks_enabled())"
    env = {**__import__("os").environ, "TORCH_PPL_VALUE_CHECKS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_value_check_on_a_non_cpu_device_does_not_read_the_data(monkeypatch):
    """Off the CPU the check is queued on the device (torch._assert_async): no host sync."""
    from torch_ppl import _checks

    calls = []
    monkeypatch.setattr(torch, "_assert_async", lambda cond, msg: calls.append((cond.shape, msg)))

    class FakeDevice:
        type = "cuda"

    class Labels(torch.Tensor):  # a CPU tensor that reports a CUDA device to the check
        @property
        def device(self):
            return FakeDevice()

    y = BAD_TARGET.as_subclass(Labels)
    _checks._check_values_impl(y, _checks._LABELS, K, 255, "f: target")  # no ValueError: nothing read
    assert calls == [(torch.Size([]), "torch_ppl: f: target: bad values (see the torch_ppl value checks)")]
