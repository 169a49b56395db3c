"""The attention's projected form, for many heads on a GPU.

The fused kernels (:mod:`.attention`) work on the fast form: per pixel, GEMMs against ``h·P``
rows of ``C`` channels, so their cost grows with the number of heads ``h``. The projected form
(``q_proj`` per pixel, each head attending over ``P`` keys of ``d`` channels, ``out_proj``)
costs the same at any ``h``. Here it is PyTorch's GEMMs and
:func:`torch.nn.functional.scaled_dot_product_attention`, which on CUDA is a fused attention
(FlashAttention or the memory-efficient kernel) that never holds an ``N × h·P`` tensor.
It computes what the reference computes, in float32 with autocast off, so it is at least as
accurate as the fused kernels; what it costs is memory: ``q`` and the read-out (``N × h·d``
each) are kept for the backward, where the fast form keeps ``N × h`` softmax statistics.

:func:`choose_form` picks between the two from a model of their GEMM time (forward and
backward, each multiply-add weighted by the rate of the precision it runs in). Only a clear
modelled win switches to the projected form: float32 features with a few heads or more, or
16-bit features with very many.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference import compute_dtype
from ._common import fp32_precision

# The time of one multiply-add in each precision, relative to a 16-bit tensor-core one, from an
# H100's dense peaks: 989 TFLOP/s for 16-bit operands, 494 for TF32, 67 for float32 on the
# CUDA cores.
TF32 = 2.0
IEEE = 989.0 / 67.0

# The fast form's weighted multiply-adds per pixel, head, prototype and channel, forward and
# backward, by the features' dtype. bfloat16: 2 TF32 GEMMs forward, 4 in dx, and 4 in the
# prototype gradient as 8 16-bit products (hi + lo halves). float16: the products with a
# float16 side as two TF32 products, those with two float32 sides in 3xTF32 (10 forward, 20
# in dx, 16 in the prototype gradient). float32: 10 GEMMs on the CUDA cores, or in TF32 where
# PyTorch's float32 matmuls may use it (as bfloat16's, unsplit).
FAST_UNITS = {torch.bfloat16: 20.0, torch.float16: 46.0, torch.float32: 10 * IEEE}
FAST_UNITS_FP32_TF32 = 10 * TF32

# GEMMs of the projected form, forward and backward: q_proj and out_proj 3 each (output,
# input gradient, weight gradient) of C × h·d per pixel; the fused attention 7 of P × h·d
# (scores and read-out forward; scores again, then dV, dP, dQ, dK backward).
PROJECTION_GEMMS = 6
ATTENTION_GEMMS = 7

# Overrides the choice: "fast" keeps the fused kernels (whose backward keeps no N × h·d tensor),
# "projected" takes the projected form wherever it applies; "auto" (or unset) is the model's.
FORM_ENV_VAR = "TORCH_PPL_ATTENTION_FORM"
FORMS = ("auto", "fast", "projected")

# How much cheaper the projected form must be, in the model, to be taken: it keeps two
# N × h·d float32 tensors for the backward that the fast form does not, and its rates are the
# H100's peaks, not measurements of either form.
MIN_GAIN = 2.0


def form_costs(num_heads: int, num_protos: int, channels: int, inner: int, x_dtype: torch.dtype,
               tf32_matmul: bool) -> Tuple[float, float]:
    """Modelled GEMM time per pixel, forward and backward, of ``(fast, projected)``, in units
    of one 16-bit tensor-core multiply-add. ``tf32_matmul``: PyTorch's float32 matmuls may use
    TF32, and so do the fused kernels' GEMMs of float32 features. The projected form computes in
    float32: its projections in TF32 when allowed, else on the CUDA cores; its fused attention
    on the CUDA cores (the rate that PyTorch's float32 attention kernels reach at most, without
    TF32)."""
    units = FAST_UNITS_FP32_TF32 if (x_dtype == torch.float32 and tf32_matmul) else FAST_UNITS[x_dtype]
    fast = units * num_heads * num_protos * channels
    projections = PROJECTION_GEMMS * channels * inner * (TF32 if tf32_matmul else IEEE)
    attention = ATTENTION_GEMMS * num_protos * inner * IEEE
    return fast, projections + attention


def choose_form(device: torch.device, x_dtype: torch.dtype, channels: int, num_heads: int, num_protos: int,
                inner: int, exclude: bool) -> str:
    """``"fast"`` (the fused kernels) or ``"projected"`` (:func:`prototype_attention`) for
    features of ``x_dtype`` and ``channels`` on ``device``, ``num_protos`` prototypes and
    ``h·d = inner``, with or without ``exclude=``.

    ``exclude=`` always takes the fast form (the projected form would need an ``N × P`` mask).
    Otherwise the environment variable ``TORCH_PPL_ATTENTION_FORM`` (``fast`` or ``projected``)
    decides where it is set. By default, the fast form unless all of these hold: the features
    are on a CUDA GPU (the CPU interpreter runs the kernels, which is how they are tested);
    deterministic algorithms are off (the fused kernels' deterministic reduction is tested,
    PyTorch's attention backward is not deterministic on every version); ``d`` is a multiple of
    8 (PyTorch's fused attention kernels take such heads, other widths fall back to an attention
    that holds ``N × h·P``); and :func:`form_costs` models the projected form at least
    :data:`MIN_GAIN` times cheaper.

    Raises:
        ValueError: ``TORCH_PPL_ATTENTION_FORM`` set to something else than ``auto``, ``fast``
            or ``projected``.
    """
    if exclude:
        return "fast"
    forced = os.environ.get(FORM_ENV_VAR, "").strip() or "auto"
    if forced not in FORMS:
        raise ValueError(f"environment variable {FORM_ENV_VAR} must be one of {FORMS}; got {forced!r}")
    if forced != "auto":
        return forced
    if device.type != "cuda" or torch.are_deterministic_algorithms_enabled() or (inner // num_heads) % 8:
        return "fast"
    fast, projected = form_costs(num_heads, num_protos, channels, inner, x_dtype, fp32_precision() == "tf32")
    return "projected" if MIN_GAIN * projected <= fast else "fast"


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
) -> Tensor:
    """The attention in the projected form: :func:`torch_ppl.reference.prototype_attention`
    without ``exclude``, with the scores, softmax and read-out of each head in one
    ``scaled_dot_product_attention``.

    Args:
        x: ``(..., C)`` features.
        prototypes: ``(P, C)``.
        q_weight, k_weight, v_weight: ``(h*d, C)``; biases ``(h*d,)`` or ``None``.
        out_weight: ``(C, h*d)``; ``out_bias``, ``gamma``: ``(C,)`` or ``None``.

    Returns:
        ``(..., C)`` in ``x``'s dtype.
    """
    with torch.autocast(x.device.type, enabled=False):
        dtype = compute_dtype(x, prototypes, q_weight, k_weight, v_weight, out_weight)

        def cast(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.to(dtype)

        inner = q_weight.shape[0]
        head_dim = inner // num_heads
        num_protos = prototypes.shape[0]
        xc = x.to(dtype)
        # q_proj as a batched product over the images' (L, C) rows, not F.linear: linear copies
        # rows that are not contiguous (the channel-last view of NCHW features) and keeps the
        # copy for its weight gradient (N x C floats); bmm takes the strided rows as they are
        # and keeps the features themselves
        x3 = xc.unsqueeze(0) if xc.dim() == 2 else xc.flatten(1, -2)
        q = torch.bmm(x3, cast(q_weight).t().expand(x3.shape[0], -1, -1))
        if q_bias is not None:
            q = q + cast(q_bias)
        # (1, h, N, d) queries against (1, h, P, d) keys: one attention batch per head, every
        # pixel of every image a query row.
        q = q.reshape(1, -1, num_heads, head_dim).transpose(1, 2)
        w = prototypes.to(dtype)
        k = F.linear(w, cast(k_weight), cast(k_bias)).view(1, num_protos, num_heads, head_dim).transpose(1, 2)
        v = F.linear(w, cast(v_weight), cast(v_bias)).view(1, num_protos, num_heads, head_dim).transpose(1, 2)
        read = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(head_dim))
        read = read.transpose(1, 2).reshape(*x.shape[:-1], inner)
        out = F.linear(read, cast(out_weight), cast(out_bias))
        if gamma is not None:
            out = gamma.to(dtype) * out
        return (xc + out).to(x.dtype)
