"""The math of Push-and-Pull Learning in plain PyTorch: the definition of correctness.

Every function here works on *rows*: features ``x`` of shape ``(..., C)`` where the leading
dimensions are pixels (``(B, H, W)`` for an image batch seen channels-last, or ``(N,)``).
Targets and per-pixel outputs have exactly those leading dimensions. The public wrappers in
:mod:`torch_ppl.functional` check the inputs, move the channel axis last (a view, no copy)
and dispatch here or to the fused Triton kernels, which must agree with this file.

Numerics: everything is computed in float32 (float64 when an input is float64) with autocast
switched off, as segmentation code expects of cosine logits and losses. Gradients come back in
each input's own dtype. This path may materialise the ``N x P`` similarity tensor.

Notation (``docs/math.md``): ``K`` classes, ``M`` prototypes per class, ``P = K * M``, ``C`` channels.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-12  # as F.normalize


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float32, or float64 if any floating input is float64."""
    dtype = torch.float32
    for t in tensors:
        if isinstance(t, Tensor) and t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _autocast_off(fn):
    """Run ``fn`` with autocast disabled on the first tensor argument's device.

    Under autocast the einsums below would run in bf16/fp16; logits and losses are
    fp32 (``docs/math.md``), so the reference opts out and casts explicitly instead.
    """

    @functools.wraps(fn)
    def wrapper(x: Tensor, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, *args, **kwargs)

    return wrapper


def normalize(x: Tensor) -> Tensor:
    """``x / max(||x||_2, eps)`` along the last dimension."""
    return F.normalize(x, p=2.0, dim=-1, eps=EPS)


def prototype_similarity(x: Tensor, prototypes: Tensor, similarity: str = "cosine") -> Tensor:
    """Pixel-to-prototype similarity ``s``.

    Args:
        x: ``(..., C)`` features (already in the compute dtype).
        prototypes: ``(K, M, C)``.
        similarity: ``"cosine"`` (``<x̂, Ŵ>``) or ``"dot"`` (``<x, W>``).

    Returns:
        ``(..., K, M)``.
    """
    if similarity == "cosine":
        x, prototypes = normalize(x), normalize(prototypes)
    return torch.einsum("...c,kmc->...km", x, prototypes)


def pool(s: Tensor, pooling: str) -> Tensor:
    """Pool ``(..., K, M)`` similarities over the ``M`` prototypes of each class -> ``(..., K)``.

    ``"max"`` sends the gradient to the winning prototype only; ``argmax`` returns the first
    maximal index, so ties go to the lowest index (``docs/math.md``).
    """
    if pooling == "max":
        winner = s.argmax(dim=-1, keepdim=True)
        return s.gather(-1, winner).squeeze(-1)
    if pooling == "logsumexp":
        return torch.logsumexp(s, dim=-1)
    if pooling == "mean":
        return s.mean(dim=-1)
    raise ValueError(f"unknown pooling {pooling!r}")


@_autocast_off
def prototype_logits(
    x: Tensor,
    prototypes: Tensor,
    scale: Union[Tensor, float],
    bias: Optional[Tensor],
    *,
    similarity: str,
    pooling: str,
) -> Tensor:
    """Head logits ``scale * pool_m s[..., k, m] (+ bias[k])``.

    Args:
        x: ``(..., C)`` features.
        prototypes: ``(K, M, C)``.
        scale: scalar (float or 0-d tensor, possibly learnable).
        bias: ``(K,)`` or ``None``.

    Returns:
        ``(..., K)`` logits in the compute dtype (float32 unless an input is float64).
    """
    dtype = compute_dtype(x, prototypes)
    s = prototype_similarity(x.to(dtype), prototypes.to(dtype), similarity)
    if isinstance(scale, Tensor):
        scale = scale.to(dtype)
    logits = scale * pool(s, pooling)
    if bias is not None:
        logits = logits + bias.to(dtype)
    return logits


@_autocast_off
def contrastive_loss(
    x: Tensor,
    prototypes: Tensor,
    target: Tensor,
    *,
    temperature: float,
    positives: str,
    similarity: str,
    ignore_index: int,
) -> Tensor:
    """Per-pixel multi-prototype contrastive loss (the push), before weighting and reduction.

    With ``z = s / temperature`` over all ``P = K * M`` prototypes:

    * ``positives="all"``:     ``l = logsumexp_{k,m} z - logsumexp_m z[y, m]``
    * ``positives="nearest"``: ``l = logsumexp_{k,m} z - z[y, m*]``, ``m* = argmax_m z[y, m]``

    Args:
        x: ``(..., C)`` features.
        prototypes: ``(K, M, C)``.
        target: ``(...)`` integer labels in ``[0, K)`` or ``ignore_index``.

    Returns:
        ``(...)`` per-pixel losses in the compute dtype, exactly 0 at ignored pixels (and with
        zero gradient there).
    """
    dtype = compute_dtype(x, prototypes)
    z = prototype_similarity(x.to(dtype), prototypes.to(dtype), similarity) / temperature
    num_protos = z.shape[-1]
    lse_all = torch.logsumexp(z.flatten(-2), dim=-1)

    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
    index = safe_target[..., None, None].expand(*safe_target.shape, 1, num_protos)
    z_pos = z.gather(-2, index).squeeze(-2)  # (..., M): the positive class's prototypes
    if positives == "all":
        pos = torch.logsumexp(z_pos, dim=-1)
    elif positives == "nearest":
        nearest = z_pos.detach().argmax(dim=-1, keepdim=True)
        pos = z_pos.gather(-1, nearest).squeeze(-1)
    else:
        raise ValueError(f"unknown positives {positives!r}")
    # torch.where (not multiplication by a mask) so that ignored pixels get an exact zero
    # gradient even if their loss would be non-finite.
    return torch.where(valid, lse_all - pos, torch.zeros((), dtype=dtype, device=x.device))


def prototype_logits_and_contrastive(
    x: Tensor,
    prototypes: Tensor,
    target: Tensor,
    scale: Union[Tensor, float],
    bias: Optional[Tensor],
    *,
    similarity: str,
    pooling: str,
    temperature: float,
    positives: str,
    ignore_index: int,
):
    """The head's logits and the push's per-pixel loss of the same rows: :func:`prototype_logits`
    and :func:`contrastive_loss`, one after the other (the fused kernels compute both from one
    similarity GEMM).

    Args:
        x: ``(..., C)`` features.
        prototypes: ``(K, M, C)``.
        target: ``(...)`` integer labels in ``[0, K)`` or ``ignore_index``.
        scale: scalar (float or 0-d tensor); ``bias``: ``(K,)`` or ``None``.

    Returns:
        ``((..., K) logits, (...) per-pixel losses)``, both in the compute dtype.
    """
    logits = prototype_logits(x, prototypes, scale, bias, similarity=similarity, pooling=pooling)
    loss = contrastive_loss(x, prototypes, target, temperature=temperature, positives=positives,
                            similarity=similarity, ignore_index=ignore_index)
    return logits, loss


def reduce_loss(
    loss: Tensor, valid: Tensor, weight: Optional[Tensor], reduction: str
) -> Tensor:
    """The UniMatch reduction of a per-pixel loss.

    ``"mean"`` is ``sum(w * l) / max(#valid, 1)``: a confidence mask lowers the loss, it does
    not renormalise it. ``"sum"`` is ``sum(w * l)``. ``"none"`` returns ``w * l`` with 0 at
    ignored pixels. A batch with no valid pixel gives exactly 0 with zero gradients.

    Args:
        loss: ``(...)`` per-pixel losses, 0 at ignored pixels.
        valid: ``(...)`` bool, ``target != ignore_index``.
        weight: ``(...)`` non-negative per-pixel weights, or ``None``.
    """
    if weight is not None:
        loss = torch.where(valid, loss * weight.to(loss.dtype), torch.zeros_like(loss))
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / valid.sum().clamp_min(1).to(total.dtype)
    raise ValueError(f"unknown reduction {reduction!r}")


def exclusion_mask(exclude: Tensor, num_prototypes: int, protos_per_class: int) -> Tensor:
    """``(..., P)`` bool: prototype ``p`` is hidden from a pixel whose label is ``p // M``.

    ``exclude`` holds one label per pixel, ``-1`` where nothing is excluded.
    """
    proto_class = torch.arange(num_prototypes, device=exclude.device) // protos_per_class
    return exclude[..., None] == proto_class


@_autocast_off
def prototype_attention(
    x: Tensor,
    prototypes: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    v_weight: Tensor,
    out_weight: Tensor,
    q_bias: Optional[Tensor],
    k_bias: Optional[Tensor],
    v_bias: Optional[Tensor],
    out_bias: Optional[Tensor],
    gamma: Optional[Tensor],
    *,
    num_heads: int,
    exclude: Optional[Tensor] = None,
    protos_per_class: int = 1,
) -> Tensor:
    """Feature-to-prototype attention (the pull), computed the plain way.

    ``q = q_proj(x)`` per pixel, ``k = k_proj(W)``, ``v = v_proj(W)``, split into ``h`` heads
    of ``d`` channels; each head attends over all ``P`` prototypes::

        a[n, i, p] = softmax_p(<q[n, i], k[p, i]> / sqrt(d))
        x_out[n]   = x[n] + gamma * out_proj(concat_i sum_p a[n, i, p] v[p, i])

    Args:
        x: ``(..., C)`` features.
        prototypes: ``(P, C)``.
        q_weight, k_weight, v_weight: ``(h*d, C)``; biases ``(h*d,)`` or ``None``.
        out_weight: ``(C, h*d)``; ``out_bias`` ``(C,)`` or ``None``.
        gamma: ``(C,)`` layer scale or ``None`` (meaning 1).
        exclude: ``(...)`` int64 label per pixel (``-1``: exclude nothing); hides the
            prototypes ``p`` with ``p // protos_per_class == label`` from that pixel. A pixel
            that would see no prototype at all (only possible with ``K = 1``) reads nothing.

    Returns:
        ``(..., C)`` in ``x``'s dtype.
    """
    dtype = compute_dtype(x, prototypes, q_weight, k_weight, v_weight, out_weight)

    def cast(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.to(dtype)

    head_dim = q_weight.shape[0] // num_heads
    q = F.linear(x.to(dtype), cast(q_weight), cast(q_bias)).unflatten(-1, (num_heads, head_dim))
    w = prototypes.to(dtype)
    k = F.linear(w, cast(k_weight), cast(k_bias)).unflatten(-1, (num_heads, head_dim))
    v = F.linear(w, cast(v_weight), cast(v_bias)).unflatten(-1, (num_heads, head_dim))

    scores = torch.einsum("...hd,phd->...hp", q, k) / math.sqrt(head_dim)
    if exclude is not None:
        hidden = exclusion_mask(exclude, w.shape[0], protos_per_class).unsqueeze(-2)
        sees_nothing = hidden.all(dim=-1, keepdim=True)
        # A finite fill keeps softmax NaN-free when every prototype is hidden; those rows
        # are then zeroed, which also zeroes their gradient.
        scores = scores.masked_fill(hidden, torch.finfo(dtype).min)
        attn = torch.softmax(scores, dim=-1).masked_fill(sees_nothing, 0.0)
    else:
        attn = torch.softmax(scores, dim=-1)
    read = torch.einsum("...hp,phd->...hd", attn, v).flatten(-2)
    out = F.linear(read, cast(out_weight), cast(out_bias))
    if gamma is not None:
        out = gamma.to(dtype) * out
    return (x.to(dtype) + out).to(x.dtype)
