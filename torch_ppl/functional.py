"""Functional forms of the PPL ops, each with ``backend=``.

Every function checks its inputs (``ValueError`` / ``TypeError`` naming the argument, see
``docs/api.md``), moves the channel axis last (a view, no copy: ``(B, C, H, W)`` becomes
``(B, H, W, C)`` rows), resizes labels to the features' resolution where ``docs/math.md``
says so, and hands the rows to :mod:`torch_ppl.reference` or to the fused kernels in
:mod:`torch_ppl.kernels`, chosen by :mod:`torch_ppl._backend`.
"""
from __future__ import annotations

import functools
import warnings
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend, _checks, reference
from ._distributed import reject_dtensors

__all__ = [
    "prototype_similarity",
    "prototype_logits",
    "prototype_attention",
    "contrastive_loss",
    "prototype_logits_and_contrastive",
    "push_pull_loss",
    "LossTerms",
]


class LossTerms(NamedTuple):
    """What ``push_pull_loss(..., return_terms=True)`` returns: the total and its two terms
    (each already reduced, before ``ce_weight`` / ``contrast_weight``)."""

    total: Tensor
    ce: Tensor
    contrastive: Tensor


def _quiet_when_tracing(fn):
    """Under ``torch.jit.trace`` (and the legacy ONNX exporter, which traces), sizes are 0-d
    tensors, so every input check (``x.shape[1] != C``) and ``math.sqrt(head_dim)`` warns
    ``TracerWarning``. They only compare the example's shapes, or read weight shapes, which are
    constants of the model, so the trace is right and the warnings are noise: silenced while
    tracing, and only inside torch_ppl's own functions."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.jit.is_tracing():
            return fn(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            return fn(*args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------- layout helpers
def _rows(x: Tensor) -> Tensor:
    """``(B, C, H, W) -> (B, H, W, C)`` view, ``(N, C)`` unchanged."""
    # permute with non-negative dims (not movedim(1, -1)): the legacy ONNX exporter writes
    # negative dims into the Transpose's perm, which onnxruntime rejects.
    return x.permute(0, 2, 3, 1) if x.dim() == 4 else x


def _unrows(out: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`_rows` for an output with a new channel count, in ``like``'s memory
    format (channels_last in, channels_last out; contiguous otherwise)."""
    if like.dim() != 4:
        return out
    out = out.permute(0, 3, 1, 2)
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _resize_nearest(t: Optional[Tensor], size) -> Optional[Tensor]:
    """Resize a ``(B, H', W')`` label or weight map to ``size`` with ``mode="nearest"``."""
    if t is None or tuple(t.shape[-2:]) == tuple(size):
        return t
    # float64 holds every int32 label exactly; nearest never mixes values.
    resized = F.interpolate(t[:, None].to(torch.float64), size=tuple(size), mode="nearest")[:, 0]
    return resized.to(t.dtype)


def _label_map(y: object, x: Tensor) -> Optional[Tensor]:
    """``y`` when it has the rank of a label map for ``x`` (3 for 4-D ``x``, 1 for 2-D), else
    ``None``: the batch sizes are compared only then, a wrong rank is reported by
    :func:`torch_ppl._checks.labels`."""
    return y if isinstance(y, Tensor) and y.dim() == (3 if x.dim() == 4 else 1) else None


def _scale(fn: str, scale: Union[float, Tensor]) -> Union[float, Tensor]:
    if isinstance(scale, Tensor):
        if scale.numel() != 1 or not scale.is_floating_point():
            raise ValueError(f"{fn}: scale must be a float or a one-element floating tensor; got {tuple(scale.shape)} {scale.dtype}")
        # A tensor scale (a learnable one) is not range-checked: that would read it back from
        # the device on every call. The constructor checks the initial value.
        return scale.reshape(())
    return _checks.positive_float(fn, "scale", scale)


def _bias(fn: str, bias: Optional[Tensor], prototypes: Tensor) -> Optional[Tensor]:
    if bias is not None:
        bias = _checks.floating(fn, "bias", bias, (1,), f"(K,) = ({prototypes.shape[0]},)")
        if bias.shape[0] != prototypes.shape[0]:
            raise ValueError(f"{fn}: bias must have shape (K,) = ({prototypes.shape[0]},); got {tuple(bias.shape)}")
    return bias


# ----------------------------------------------------------------------------- the head
@_quiet_when_tracing
def prototype_similarity(
    x: Tensor, prototypes: Tensor, *, similarity: str = "cosine", backend: str = "auto"
) -> Tensor:
    """Similarity of every pixel to every prototype, materialised.

    Args:
        x: ``(B, C, H, W)`` or ``(N, C)``.
        prototypes: ``(K, M, C)``.

    Returns:
        ``(B, K, M, H, W)`` or ``(N, K, M)``, float32 (float64 for float64 input).

    This tensor is ``N x P`` by definition, so there is no fused kernel for it: every backend
    computes it with the reference (``backend`` is still checked).
    """
    fn = "prototype_similarity"
    reject_dtensors(fn, x=x, prototypes=prototypes)
    x = _checks.features(fn, x, "x")
    prototypes = _checks.prototypes(fn, prototypes, x.shape[1])
    _checks.choice(fn, "similarity", similarity, _checks.SIMILARITIES)
    _checks.same_device(fn, x=x, prototypes=prototypes)
    _backend.check_backend(backend)
    rows = _rows(x)
    with torch.autocast(x.device.type, enabled=False):
        dtype = reference.compute_dtype(x, prototypes)
        s = reference.prototype_similarity(rows.to(dtype), prototypes.to(dtype), similarity)
    return s.permute(0, 3, 4, 1, 2) if x.dim() == 4 else s


@_quiet_when_tracing
def prototype_logits(
    x: Tensor,
    prototypes: Tensor,
    *,
    similarity: str = "cosine",
    pooling: str = "max",
    scale: Union[float, Tensor] = 10.0,
    bias: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """Class logits of the multi-prototype head: ``scale * pool_m s[n, k, m] (+ bias[k])``.

    Args:
        x: features ``(B, C, H, W)`` or ``(N, C)``; any strides (channels_last included).
        prototypes: ``(K, M, C)``.
        similarity: ``"cosine"`` or ``"dot"``.
        pooling: ``"max"``, ``"logsumexp"`` or ``"mean"`` over the ``M`` prototypes of a class.
        scale: a float ``> 0``, or a one-element tensor (may require grad; not range-checked).
        bias: ``(K,)`` or ``None``.

    Returns:
        ``(B, K, H, W)`` or ``(N, K)`` logits, float32 (float64 for float64 input), also
        under autocast.
    """
    fn = "prototype_logits"
    reject_dtensors(fn, x=x, prototypes=prototypes, scale=scale, bias=bias)
    x = _checks.features(fn, x, "x")
    prototypes = _checks.prototypes(fn, prototypes, x.shape[1])
    _checks.choice(fn, "similarity", similarity, _checks.SIMILARITIES)
    _checks.choice(fn, "pooling", pooling, _checks.POOLINGS)
    scale = _scale(fn, scale)
    bias = _bias(fn, bias, prototypes)
    _checks.same_device(fn, x=x, prototypes=prototypes, bias=bias)
    resolved = _backend.resolve(backend, x, prototypes, bias, op=fn, channels=x.shape[1])
    impl = _backend.implementation(fn, resolved)
    out = impl(_rows(x), prototypes, scale, bias, similarity=similarity, pooling=pooling)
    return _unrows(out, x)


# ----------------------------------------------------------------------------- the pull
@_quiet_when_tracing
def prototype_attention(
    x: Tensor,
    prototypes: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    v_weight: Tensor,
    out_weight: Tensor,
    q_bias: Optional[Tensor] = None,
    k_bias: Optional[Tensor] = None,
    v_bias: Optional[Tensor] = None,
    out_bias: Optional[Tensor] = None,
    *,
    num_heads: int = 1,
    gamma: Optional[Tensor] = None,
    exclude: Optional[Tensor] = None,
    ignore_index: int = 255,
    backend: str = "auto",
) -> Tensor:
    """Feature-to-prototype attention (the pull): ``x + gamma * out_proj(attend(q_proj(x), k, v))``.

    Args:
        x: features ``(B, C, H, W)`` or ``(N, C)``.
        prototypes: ``(K, M, C)`` or ``(P, C)``.
        q_weight: ``(h*d, C)``, the query projection.
        k_weight: ``(h*d, C)``, the key projection (applied to the prototypes).
        v_weight: ``(h*d, C)``, the value projection (applied to the prototypes).
        out_weight: ``(C, h*d)``, the output projection.
        q_bias: ``(h*d,)`` or ``None``.
        k_bias: ``(h*d,)`` or ``None``.
        v_bias: ``(h*d,)`` or ``None``.
        out_bias: ``(C,)`` or ``None``.
        num_heads: ``h``; ``h*d`` must be divisible by it.
        gamma: ``(C,)`` layer scale, ``None`` for 1.
        exclude: optional label map ``(B, H', W')`` (``(N,)`` for 2-D ``x``), resized to ``x``'s
            resolution with ``mode="nearest"``: each pixel does not attend to the prototypes of
            its own class; ``ignore_index`` pixels attend to all. Needs ``(K, M, C)`` prototypes.

    Returns:
        Same shape, dtype and memory format as ``x``.
    """
    fn = "prototype_attention"
    reject_dtensors(fn, x=x, prototypes=prototypes, q_weight=q_weight, k_weight=k_weight, v_weight=v_weight,
                    out_weight=out_weight, q_bias=q_bias, k_bias=k_bias, v_bias=v_bias, out_bias=out_bias,
                    gamma=gamma, exclude=exclude)
    x = _checks.features(fn, x, "x")
    channels = x.shape[1]
    prototypes = _checks.prototypes(fn, prototypes, channels, allow_flat=True)
    num_heads = _checks.positive_int(fn, "num_heads", num_heads)
    q_weight = _checks.floating(fn, "q_weight", q_weight, (2,), "(h*d, C)")
    inner = q_weight.shape[0]
    if q_weight.shape[1] != channels or inner == 0 or inner % num_heads:
        raise ValueError(
            f"{fn}: q_weight must have shape (h*d, C) with C={channels} and h*d divisible by "
            f"num_heads={num_heads}; got {tuple(q_weight.shape)}"
        )
    # The expected forms are formatted only when raising: under torch.compile with dynamic
    # shapes the sizes are symbolic, and formatting them while tracing breaks the graph.
    expected = {"k_weight": ((inner, channels), "(h*d, C)"), "v_weight": ((inner, channels), "(h*d, C)"),
                "out_weight": ((channels, inner), "(C, h*d)")}
    for name, w in (("k_weight", k_weight), ("v_weight", v_weight), ("out_weight", out_weight)):
        shape, form = expected[name]
        w = _checks.floating(fn, name, w, (2,), form)
        if tuple(w.shape) != shape:
            raise ValueError(f"{fn}: {name} must have shape {shape}; got {tuple(w.shape)}")
    for name, b, size, form in (("q_bias", q_bias, inner, "(h*d,)"), ("k_bias", k_bias, inner, "(h*d,)"),
                                ("v_bias", v_bias, inner, "(h*d,)"), ("out_bias", out_bias, channels, "(C,)"),
                                ("gamma", gamma, channels, "(C,)")):
        if b is not None:
            b = _checks.floating(fn, name, b, (1,), form)
            if b.shape[0] != size:
                raise ValueError(f"{fn}: {name} must have shape ({size},); got {tuple(b.shape)}")
    ignore = _checks.ignore_index(fn, ignore_index)
    protos_per_class = 1
    if exclude is not None:
        if prototypes.dim() != 3:
            raise ValueError(
                f"{fn}: exclude= needs prototypes shaped (K, M, C) to know each prototype's class; "
                f"got {tuple(prototypes.shape)}"
            )
        _checks.same_batch(fn, x=x, exclude=_label_map(exclude, x))
        exclude = _checks.labels(fn, "exclude", exclude, x, prototypes.shape[0], ignore)
        protos_per_class = prototypes.shape[1]
    tensors = dict(x=x, prototypes=prototypes, q_weight=q_weight, k_weight=k_weight, v_weight=v_weight,
                   out_weight=out_weight, q_bias=q_bias, k_bias=k_bias, v_bias=v_bias, out_bias=out_bias,
                   gamma=gamma, exclude=exclude)
    _checks.same_device(fn, **tensors)
    resolved = _backend.resolve(backend, *tensors.values(), op=fn, channels=x.shape[1])
    impl = _backend.implementation(fn, resolved)

    if exclude is not None:
        if x.dim() == 4:
            exclude = _resize_nearest(exclude, x.shape[2:])
        exclude = torch.where(exclude == ignore, -1, exclude).long()
    out = impl(
        _rows(x), prototypes.reshape(-1, channels),
        q_weight, k_weight, v_weight, out_weight, q_bias, k_bias, v_bias, out_bias, gamma,
        num_heads=num_heads, exclude=exclude, protos_per_class=protos_per_class,
    )
    return _unrows(out, x)


# ----------------------------------------------------------------------------- the push
def _check_loss_options(fn: str, temperature, positives, similarity, ignore_index, reduction) -> None:
    _checks.positive_float(fn, "temperature", temperature)
    _checks.choice(fn, "positives", positives, _checks.POSITIVES)
    _checks.choice(fn, "similarity", similarity, _checks.SIMILARITIES)
    _checks.ignore_index(fn, ignore_index)
    _checks.choice(fn, "reduction", reduction, _checks.REDUCTIONS)


def _contrastive(features, target, prototypes, weight, *, temperature, positives, similarity,
                 ignore_index, reduction, backend, fn) -> Tensor:
    """contrastive_loss after the checks: resize labels, dispatch, reduce."""
    if features.dim() == 4:
        target = _resize_nearest(target, features.shape[2:])
        weight = _resize_nearest(weight, features.shape[2:])
    resolved = _backend.resolve(backend, features, prototypes, target, weight, op=fn,
                                channels=features.shape[1], kernel="contrastive_loss")
    impl = _backend.implementation("contrastive_loss", resolved)
    per_pixel = impl(_rows(features), prototypes, target, temperature=temperature, positives=positives,
                     similarity=similarity, ignore_index=ignore_index)
    return reference.reduce_loss(per_pixel, target != ignore_index, weight, reduction)


@_quiet_when_tracing
def contrastive_loss(
    features: Tensor,
    target: Tensor,
    prototypes: Tensor,
    weight: Optional[Tensor] = None,
    *,
    temperature: float = 0.1,
    positives: str = "all",
    similarity: str = "cosine",
    ignore_index: int = 255,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Multi-prototype contrastive loss (the push), at the features' resolution.

    Args:
        features: ``(B, C, H, W)`` or ``(N, C)``.
        target: ``(B, H', W')`` (``(N,)`` for 2-D features) int64 in ``[0, K)`` or
            ``ignore_index``; resized to ``(H, W)`` with ``mode="nearest"``.
        prototypes: ``(K, M, C)``.
        weight: optional per-pixel weight shaped like ``target``, finite and ``>= 0``.
        temperature: ``tau`` in ``z = s / tau``.
        positives: ``"all"`` (logsumexp over the class's prototypes) or ``"nearest"``.
        reduction: ``"mean"`` (``sum(w l) / max(#valid, 1)``), ``"sum"`` or ``"none"``.

    Returns:
        A float32 scalar, or ``(B, H, W)`` / ``(N,)`` per-pixel losses for ``"none"``.
    """
    fn = "contrastive_loss"
    reject_dtensors(fn, features=features, target=target, prototypes=prototypes, weight=weight)
    features = _checks.features(fn, features)
    prototypes = _checks.prototypes(fn, prototypes, features.shape[1])
    _check_loss_options(fn, temperature, positives, similarity, ignore_index, reduction)
    _checks.same_batch(fn, features=features, target=_label_map(target, features))
    target = _checks.labels(fn, "target", target, features, prototypes.shape[0], ignore_index)
    weight = _checks.weight(fn, weight, target)
    _checks.same_device(fn, features=features, prototypes=prototypes, target=target, weight=weight)
    _backend.check_backend(backend)
    return _contrastive(features, target, prototypes, weight, temperature=temperature, positives=positives,
                        similarity=similarity, ignore_index=ignore_index, reduction=reduction,
                        backend=backend, fn=fn)


@_quiet_when_tracing
def prototype_logits_and_contrastive(
    x: Tensor,
    prototypes: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    *,
    similarity: str = "cosine",
    pooling: str = "max",
    scale: Union[float, Tensor] = 10.0,
    bias: Optional[Tensor] = None,
    temperature: float = 0.1,
    positives: str = "all",
    ignore_index: int = 255,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """The head's logits and the push of the same features in one op: what
    ``prototype_logits(x, prototypes, similarity=, pooling=, scale=, bias=)`` and
    ``contrastive_loss(x, target, prototypes, weight, temperature=, positives=, similarity=,
    ignore_index=, reduction=)`` return, with the same checks. On ``backend="triton"`` one
    read of the features and one similarity GEMM serve both, forward and backward.

    Args:
        x: features ``(B, C, H, W)`` or ``(N, C)``; any strides (channels_last included).
        prototypes: ``(K, M, C)``.
        target: ``(B, H', W')`` (``(N,)`` for 2-D ``x``) int64 in ``[0, K)`` or
            ``ignore_index``; resized to ``(H, W)`` with ``mode="nearest"`` for the loss.
        weight: optional per-pixel weight shaped like ``target``, finite and ``>= 0``.
        similarity: ``"cosine"`` or ``"dot"``, for both.
        pooling: ``"max"``, ``"logsumexp"`` or ``"mean"`` (the logits).
        scale: a float ``> 0``, or a one-element tensor (may require grad; not range-checked).
        bias: ``(K,)`` or ``None``.
        temperature: ``tau`` of the loss, ``z = s / tau`` (the raw similarity, not the logits).
        positives: ``"all"`` or ``"nearest"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (the loss).

    Returns:
        ``(logits, loss)``: ``(B, K, H, W)`` or ``(N, K)`` float32 logits (float64 for float64
        input) in ``x``'s memory format, and a float32 scalar or, for ``"none"``, ``(B, H, W)``
        / ``(N,)`` per-pixel losses at the features' resolution.
    """
    fn = "prototype_logits_and_contrastive"
    reject_dtensors(fn, x=x, prototypes=prototypes, target=target, weight=weight, scale=scale, bias=bias)
    x = _checks.features(fn, x, "x")
    prototypes = _checks.prototypes(fn, prototypes, x.shape[1])
    _checks.choice(fn, "pooling", pooling, _checks.POOLINGS)
    scale = _scale(fn, scale)
    bias = _bias(fn, bias, prototypes)
    _check_loss_options(fn, temperature, positives, similarity, ignore_index, reduction)
    _checks.same_batch(fn, x=x, target=_label_map(target, x))
    target = _checks.labels(fn, "target", target, x, prototypes.shape[0], ignore_index)
    weight = _checks.weight(fn, weight, target)
    _checks.same_device(fn, x=x, prototypes=prototypes, bias=bias, target=target, weight=weight)
    _backend.check_backend(backend)
    if x.dim() == 4:
        target = _resize_nearest(target, x.shape[2:])
        weight = _resize_nearest(weight, x.shape[2:])
    resolved = _backend.resolve(backend, x, prototypes, bias, target, weight, op=fn, channels=x.shape[1])
    impl = _backend.implementation(fn, resolved)
    logits, per_pixel = impl(_rows(x), prototypes, target, scale, bias, similarity=similarity, pooling=pooling,
                             temperature=temperature, positives=positives, ignore_index=ignore_index)
    return _unrows(logits, x), reference.reduce_loss(per_pixel, target != ignore_index, weight, reduction)


def _check_push_pull(fn, logits, features, target, prototypes, weight, *, temperature, contrast_weight,
                     ce_weight, positives, similarity, ignore_index, reduction, backend):
    """Every check of :func:`push_pull_loss`, in the order a user would want to hear about
    them. Returns ``(logits, features, target, prototypes, weight, ce_weight, contrast_weight,
    use_ce, use_contrast)``; the tensors are the checked ones (under ``torch.compile`` the value
    checks tie ``target`` and ``weight`` to the check, see :mod:`torch_ppl._checks`)."""
    _check_loss_options(fn, temperature, positives, similarity, ignore_index, reduction)
    ce_weight = _checks.non_negative_float(fn, "ce_weight", ce_weight)
    contrast_weight = _checks.non_negative_float(fn, "contrast_weight", contrast_weight)
    _backend.check_backend(backend)
    use_ce, use_contrast = ce_weight != 0.0 or logits is not None, contrast_weight != 0.0 or features is not None
    if use_ce:
        logits = _checks.floating(fn, "logits", logits, (2, 4), "(B, K, h, w) or (N, K)")
    if use_contrast:
        features = _checks.features(fn, features)
        prototypes = _checks.prototypes(fn, prototypes, features.shape[1])
    if not (use_ce or use_contrast):
        raise ValueError(f"{fn}: logits and features are both None; give at least one")
    num_classes = prototypes.shape[0] if use_contrast else logits.shape[1]
    if use_ce and logits.shape[1] != num_classes:
        raise ValueError(
            f"{fn}: logits have K={logits.shape[1]} classes but prototypes have K={num_classes}; "
            f"got logits {tuple(logits.shape)}, prototypes {tuple(prototypes.shape)}"
        )
    if use_ce and use_contrast and logits.dim() != features.dim():
        raise ValueError(f"{fn}: logits and features must both be 4-D or both 2-D; got {tuple(logits.shape)} and {tuple(features.shape)}")
    like = features if use_contrast else logits
    _checks.same_batch(fn, logits=logits if use_ce else None, features=features if use_contrast else None,
                       target=_label_map(target, like))
    target = _checks.labels(fn, "target", target, like, num_classes, ignore_index)
    weight = _checks.weight(fn, weight, target)
    _checks.same_device(fn, logits=logits, features=features, target=target, prototypes=prototypes, weight=weight)
    if reduction == "none" and use_ce and use_contrast and features.dim() == 4 and features.shape[2:] != target.shape[1:]:
        raise ValueError(
            f"{fn}: reduction='none' adds per-pixel maps, so features must be at the target's resolution "
            f"{tuple(target.shape[1:])}; got features {tuple(features.shape)}. Use 'mean' or 'sum', or call "
            f"contrastive_loss(..., reduction='none') for the contrastive map at the features' resolution."
        )
    return logits, features, target, prototypes, weight, ce_weight, contrast_weight, use_ce, use_contrast


@_quiet_when_tracing
def push_pull_loss(
    logits: Optional[Tensor],
    features: Optional[Tensor],
    target: Tensor,
    prototypes: Optional[Tensor],
    weight: Optional[Tensor] = None,
    *,
    temperature: float = 0.1,
    contrast_weight: float = 1.0,
    ce_weight: float = 1.0,
    positives: str = "all",
    similarity: str = "cosine",
    ignore_index: int = 255,
    reduction: str = "mean",
    backend: str = "auto",
    return_terms: bool = False,
) -> Union[Tensor, LossTerms]:
    """``ce_weight * CE(logits, target) + contrast_weight * contrastive(features, target, prototypes)``.

    Args:
        logits: ``(B, K, h, w)`` or ``(N, K)``; resized to the target's resolution with
            ``mode="bilinear", align_corners=False`` when it differs. May be ``None`` when
            ``ce_weight == 0``. When given, the CE term is computed even with ``ce_weight == 0``
            so that ``return_terms=True`` can report it (pass ``None`` to skip that work).
        features: ``(B, C, H, W)`` or ``(N, C)``; the contrastive term is computed at this
            resolution (target and weight resized with ``mode="nearest"``). May be ``None``
            (with ``prototypes``) when ``contrast_weight == 0``.
        target: ``(B, H', W')`` or ``(N,)`` int64 in ``[0, K)`` or ``ignore_index``.
        prototypes: ``(K, M, C)``.
        weight: optional per-pixel weight shaped like ``target``, finite and ``>= 0`` (e.g. a
            pseudo-label confidence mask). Both terms use the UniMatch reduction.
        temperature: ``tau`` of the contrastive term, ``> 0``.
        contrast_weight: weight of the contrastive term, finite and ``>= 0``.
        ce_weight: weight of the CE term, finite and ``>= 0``.
        positives: ``"all"`` or ``"nearest"``.
        similarity: ``"cosine"`` or ``"dot"``, for the contrastive term.
        ignore_index: label of pixels left out of both terms.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``. ``"none"`` returns one per-pixel map at
            the target's resolution, so when both terms are used the features must be at the
            target's resolution too; with coarser features (the usual 1/4-resolution decoder
            output against full-size labels) it raises ``ValueError``. For the two maps at
            their own resolutions call ``contrastive_loss(..., reduction="none")`` and
            ``push_pull_loss(logits, None, target, None, contrast_weight=0, reduction="none")``.
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.
        return_terms: also return the two reduced terms, as :class:`LossTerms`.

    Returns:
        The float32 total, or ``LossTerms(total, ce, contrastive)``.
    """
    fn = "push_pull_loss"
    reject_dtensors(fn, logits=logits, features=features, target=target, prototypes=prototypes, weight=weight)
    (logits, features, target, prototypes, weight, ce_weight, contrast_weight, use_ce,
     use_contrast) = _check_push_pull(
        fn, logits, features, target, prototypes, weight, temperature=temperature,
        contrast_weight=contrast_weight, ce_weight=ce_weight, positives=positives, similarity=similarity,
        ignore_index=ignore_index, reduction=reduction, backend=backend)

    valid = target != ignore_index
    zero = torch.zeros(target.shape if reduction == "none" else (), device=target.device)
    ce = contrastive = zero
    if use_ce:
        if logits.dim() == 4 and logits.shape[2:] != target.shape[1:]:
            logits = F.interpolate(logits, size=tuple(target.shape[1:]), mode="bilinear", align_corners=False)
        # float32 (float64 for float64 logits), also under autocast, like the contrastive term.
        logits = logits.to(reference.compute_dtype(logits))
        per_pixel = F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="none")
        ce = reference.reduce_loss(per_pixel, valid, weight, reduction)
    if use_contrast:
        contrastive = _contrastive(features, target, prototypes, weight, temperature=temperature,
                                   positives=positives, similarity=similarity, ignore_index=ignore_index,
                                   reduction=reduction, backend=backend, fn=fn)
    total = ce_weight * ce + contrast_weight * contrastive
    return LossTerms(total, ce, contrastive) if return_terms else total
