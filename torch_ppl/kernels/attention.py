"""Fused feature-to-prototype attention (the pull, docs/math.md) on the *fast form*.

Only ``x`` has ``N`` rows; everything derived from the prototypes is tiny. With ``h`` heads of
``d`` channels, ``W_q = q_weight.view(h, d, C)``, ``W_o = out_weight.view(C, h, d)``::

    k = k_proj(W), v = v_proj(W)                       # (P, h, d), plain PyTorch
    Kt[i, p] = k[p, i] @ W_q[i] / sqrt(d)               # (h, P, C)
    c[i, p]  = k[p, i] . b_q[i] / sqrt(d)               # (h, P)     (absent without q_bias)
    Vt[i, p] = W_o[:, i] @ v[p, i]                      # (h, P, C)

    s[n, i, p] = x[n] . Kt[i, p] + c[i, p]              # = <q[n, i], k[p, i]> / sqrt(d)
    a[n, i, :] = softmax_p(s[n, i, :])                  # prototypes of the own class hidden with exclude=
    o[n]       = sum_i sum_p a[n, i, p] Vt[i, p] + b_o  # = out_proj(concat_i sum_p a v)
    out[n]     = x[n] + gamma * o[n]

``Kt``, ``c`` and ``Vt`` are computed in plain PyTorch (float32) so autograd carries their
gradients back to ``q/k/v/out`` weights, biases and the prototypes. The Triton kernels stream
tiles of pixels against them; no ``N x h*P`` and no ``N x h*d`` tensor ever exists:

* ``_attention_fwd_kernel`` (one program per ``BLOCK_N`` pixels): for each head an online softmax
  over tiles of ``BLOCK_P`` prototypes (running max, rescaled sum and accumulator), then the
  residual. It saves only the per-pixel, per-head log-sum-exp ``lse`` (``N x h`` float32).
* ``_attention_bwd_dx_kernel`` (one program per ``BLOCK_N`` pixels): recomputes ``a`` from ``lse``
  and yields ``dx``, the per-pixel per-head ``delta = sum_p a * da`` needed by the next kernel,
  and per-tile partial sums for ``d(out_bias)`` (and ``dgamma``, when the next kernel does not
  run).
* ``_attention_bwd_dproto_kernel`` (one program per (head, prototype tile, pixel split)): loops over
  the pixel tiles of its split, recomputes ``a`` and ``ds``, and accumulates ``dKt``, ``dc``,
  ``dVt`` on chip (``dVt`` without ``gamma``, ``sum_n a g``, from which the host also forms
  ``dgamma``). Splits are combined by a fixed-order sum of per-split partials when
  ``torch.are_deterministic_algorithms_enabled()``, by ``tl.atomic_add`` otherwise.

Numerics: scores, softmax statistics and accumulators are float32 whatever ``x``'s dtype; the
output and ``dx`` are returned in ``x``'s dtype, the prototype-side gradients flow back through
PyTorch in each parameter's dtype. GEMM precision follows the features (_dot_precision); with
float16 features every product with ``x`` or the output gradient on one side is two TF32
products against the fp32 side's halves (_tf32_halves). float64 inputs are not supported
(``TypeError`` before any launch; use ``backend="reference"``).

With many heads the fast form's GEMMs cost more than the projected form's (``h·P`` rows
against ``P``): on a GPU, :func:`prototype_attention` then runs the projected form
(:mod:`.projected`) instead, when a model of both costs says so.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._common import (FP_CONTRACTION, as_blc, check_dtypes, dot_operand, fp32_precision, has_wgmma, large_shared,
                      launch_device, needs_wide_offsets, on_gpu, opaque_stride, per_iteration, pixel_splits,
                      upcast_dot, warpgroup_mma)
from .. import _backend
from . import _autotune, projected

__all__ = ["prototype_attention", "prototype_side"]

# (major, minor) of the installed Triton: some tiles compile without spilling with one release
# and not with another (_dproto_blocks)
_TRITON = tuple(int(v) for v in triton.__version__.split(".")[:2])
# The narrowest prototype tile of float16 and float32 features (_blocks, _dx_blocks): a tl.dot
# with fp32 operands may be 8 deep from Triton 3.8 on; 3.3 to 3.7 take no side under 16
_NARROW_P = 8 if _TRITON >= (3, 8) else 16
# Shared memory a block may use on an H100 (and a B200)
_LARGEST_SHARED = 227 * 1024

# ============================================================================ Triton kernels
@triton.jit
def _tile_rows(tile, L, BLOCK_N: tl.constexpr):
    """Pixel tile ``tile`` of ``B * cdiv(L, BLOCK_N)``: its image ``b``, its pixels ``offs_l``
    in that image, which of them exist, and their flat indices ``n = b * L + l`` (int64) into
    the dense per-pixel arrays (labels, ``lse``, ``delta``). A tile never straddles two images,
    so the pixel stride, specialised to 1 for NCHW, stays visible to the compiler."""
    tiles_per_image = tl.cdiv(L, BLOCK_N)
    b = (tile // tiles_per_image).to(tl.int64)
    offs_l = (tile % tiles_per_image) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_l < L
    return b, offs_l, mask_n, b * L + offs_l.to(tl.int64)


@triton.jit
def _chunk_offsets(b, offs_l, chan, stride_b, stride_l, stride_c, WIDE: tl.constexpr):
    """Element offsets of pixels ``offs_l`` of image ``b`` and channels ``chan = chunk *
    BLOCK_K + k`` in a ``(B, L, C)`` strided tensor, a ``(NCH, BLOCK_N, BLOCK_K)`` tile. Offsets
    within the image are 32-bit unless ``WIDE`` (an image of more than 2**31 elements): 64-bit
    offsets that do not change from one pixel tile to the next are kept in registers by the
    compiler, two per element, and spilled in the prototype-gradient kernel."""
    l3 = offs_l[None, :, None]
    if WIDE:
        l3 = l3.to(tl.int64)
        chan = chan.to(tl.int64)
    return b * stride_b + (l3 * stride_l + chan * stride_c)


@triton.jit
def _chunked_rows(ptr, b, offs_l, chan, mask, stride_b, stride_l, stride_c, WIDE: tl.constexpr):
    """A ``(NCH, BLOCK_N, BLOCK_K)`` tile of a ``(B, L, C)`` strided tensor in its own dtype,
    zero outside ``mask``."""
    return tl.load(ptr + _chunk_offsets(b, offs_l, chan, stride_b, stride_l, stride_c, WIDE),
                   mask=mask, other=0.0)


@triton.jit
def _proto_rows(ptr, head, p0, offs_pt, chan, P, C):
    """The ``(NCH, BLOCK_P, BLOCK_K)`` tile of one head's prototype rows ``p0 + offs_pt`` of a
    dense ``(h*P, C)`` float32 tensor (``Kt``, ``Vt``), zero outside. The tile's first row is a
    64-bit scalar offset, the offsets within the tile 32-bit: 64-bit offsets per element take
    two registers each."""
    base = ptr + (head * P + p0).to(tl.int64) * C
    return tl.load(base + (offs_pt[None, :, None] * C + chan),
                   mask=((p0 + offs_pt) < P)[None, :, None] & (chan < C), other=0.0)


@triton.jit
def _tf32_halves(t):
    """fp32 ``t`` as ``hi + lo``: ``hi`` its sign, exponent and leading 10 mantissa bits (exact
    in TF32), ``lo = t - hi`` (exact in fp32). A TF32 product reads an fp32 operand to its
    leading 10 mantissa bits, so ``x @ hi + x @ lo`` with an ``x`` exact in TF32 carries 21 or
    more of ``t``'s 24 bits (relative error below 2**-20; float16 itself has 2**-11): two TF32
    products instead of 3xTF32's three, and no split of ``x`` to keep. The interpreter
    multiplies in fp32, where ``hi + lo`` is ``t`` exactly."""
    hi = (t.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return hi, t - hi


@triton.jit
def _dot_exact_lhs(a, b, DOT_PREC: tl.constexpr, EXACT_TF32: tl.constexpr):
    """``a @ b``; with ``EXACT_TF32`` (``a`` holds float16 features or their gradient, exact in
    TF32) two TF32 products against ``b``'s halves (_tf32_halves)."""
    if EXACT_TF32:
        hi, lo = _tf32_halves(b)
        return tl.dot(a, lo, tl.dot(a, hi, input_precision="tf32"), input_precision="tf32")
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _dot_exact_rhs(a, b, DOT_PREC: tl.constexpr, EXACT_TF32: tl.constexpr):
    """``a @ b``; with ``EXACT_TF32`` (``b`` exact in TF32) two TF32 products of ``a``'s halves."""
    if EXACT_TF32:
        hi, lo = _tf32_halves(a)
        return tl.dot(lo, b, tl.dot(hi, b, input_precision="tf32"), input_precision="tf32")
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _score_product(x, kt, DOT_PREC: tl.constexpr, EXACT_TF32: tl.constexpr):
    """``x Kt_tile^T`` of chunked ``x`` and ``Kt`` tiles: one product per chunk, summed."""
    return tl.sum(_dot_exact_lhs(x, tl.permute(kt, (0, 2, 1)), DOT_PREC, EXACT_TF32), 0)


@triton.jit
def _scores(x, kt, c_ptr, head, offs_p, lab, P, M,
            HAS_C: tl.constexpr, HAS_EXCLUDE: tl.constexpr, DOT_PREC: tl.constexpr,
            EXACT_TF32: tl.constexpr):
    """Scores ``s = x Kt_tile^T + c`` of one head's prototype tile and the validity mask of
    each (pixel, prototype)."""
    return _biased_scores(_score_product(x, kt, DOT_PREC, EXACT_TF32), c_ptr, head, offs_p, lab, P, M,
                          HAS_C, HAS_EXCLUDE)


@triton.jit
def _biased_scores(s, c_ptr, head, offs_p, lab, P, M, HAS_C: tl.constexpr, HAS_EXCLUDE: tl.constexpr):
    """``s + c`` of one head's prototype tile and the validity mask of each (pixel, prototype)."""
    mask_p = offs_p < P
    if HAS_C:
        s += tl.load(c_ptr + (head * P + offs_p).to(tl.int64), mask=mask_p, other=0.0)[None, :]
    valid = mask_p[None, :]
    if HAS_EXCLUDE:
        # prototype p belongs to class p // M; a pixel labelled k does not see class k (-1: sees all)
        valid = valid & ((offs_p // M)[None, :] != lab[:, None])
    return s, valid


@triton.jit
def _per_chunk(t, NCH: tl.constexpr):
    """``(rows, cols)`` as the ``(NCH, rows, cols)`` left operand of a product batched over the
    channel chunks."""
    return tl.broadcast_to(t[None, :, :], (NCH, t.shape[0], t.shape[1]))


@triton.jit
def _group_read(acc, alpha, p, vt_ptr, head, p0, offs_pt, chan, P, C, NCH: tl.constexpr, DOT_PREC: tl.constexpr):
    """One channel group's online-softmax accumulator, rescaled by ``alpha``, plus ``p Vt``."""
    vt = _proto_rows(vt_ptr, head, p0, offs_pt, chan, P, C)
    return acc * alpha[None, :, None] + tl.dot(_per_chunk(p, NCH), vt, input_precision=DOT_PREC)


@triton.jit
def _softmax_step(s, m_i, l_i):
    """One prototype tile of the online softmax (flash-attention style): with ``m_i`` the running
    max and ``l_i`` the running sum of ``exp(s - m_i)``, the tile's weights ``p``, the factor
    ``alpha`` that rescales what was summed before, and the new ``l_i`` and ``m_i``. A row that
    has seen only hidden prototypes (``-inf``) so far keeps ``m = -inf``; it shifts by 0 then."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_use[:, None])
    alpha = tl.exp(m_i - m_use)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _softmax_lse(m_i, l_i):
    """``(lse, seen)`` at the end of a head's online softmax: a pixel that saw no prototype (K =
    1 with exclude=) reads nothing, and ``lse = +inf`` makes the backward's ``exp(s - lse)``
    exactly 0 for it."""
    seen = l_i > 0.0
    return tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("inf")), seen


@triton.jit
def _row_offsets(b, offs_l, chan, stride_b, stride_l, stride_c, WIDE: tl.constexpr):
    """Element offsets of pixels ``offs_l`` of image ``b`` and channels ``chan`` in a
    ``(B, L, C)`` strided tensor, a ``(BLOCK_N, len(chan))`` tile (as :func:`_chunk_offsets`)."""
    l2 = offs_l[:, None]
    c2 = chan[None, :]
    if WIDE:
        l2 = l2.to(tl.int64)
        c2 = c2.to(tl.int64)
    return b * stride_b + (l2 * stride_l + c2 * stride_c)


@triton.jit
def _proto_tile(ptr, p0, offs_pt, chan, P, C):
    """The ``(BLOCK_P, BLOCK_C)`` tile of rows ``p0 + offs_pt`` of a dense ``(P, C)`` tensor (one
    head's ``Kt`` or ``Vt``, or a half of ``Kt``; 32-bit offsets: the attention takes ``C <= 512``, and
    ``P * C`` stays far below 2**31), zero outside."""
    return tl.load(ptr + p0 * C + (offs_pt[:, None] * C + chan[None, :]),
                   mask=((p0 + offs_pt) < P)[:, None] & (chan < C)[None, :], other=0.0)


@triton.jit
def _fwd_rows(x_ptr, kthi_ptr, ktlo_ptr, ktscale_ptr, c_ptr, vt_ptr, bo_ptr, gamma_ptr, lab_ptr, out_ptr,
              lse_ptr, L, C, P, M, sx_b, sx_l, sx_c, so_b, so_l, so_c,
              HAS_C: tl.constexpr, HAS_BO: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
              WIDE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
              DOT_PREC: tl.constexpr, OPAQUE: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """The forward of one head on whole-channel tiles, 16-bit features: the ``(BLOCK_N,
    BLOCK_C)`` x tile, the accumulator and ``(BLOCK_P, BLOCK_C)`` prototype tiles as plain 2-D
    operands, so that both GEMMs lower to wgmma on sm_90 (the chunked form's batched 3-D GEMMs
    take mma.sync).

    The scores are two products in the features' dtype, ``scale * (x Kt_hi^T + x Kt_lo^T)``
    (:func:`_16bit_halves`; the scale, a power of two, read from ``ktscale_ptr``). bfloat16: ``Kt`` comes rounded to TF32 (:func:`_kt_operand`) and
    its halves hold it exactly, so the sum is what the other kernels' TF32 products of ``x``
    and ``Kt`` give, up to summation order; float16: the halves hold 22 significant bits, as
    the chunked form's two TF32 products do 21. Either way the backward's recomputed scores
    match the forward's ``lse``. ``x`` stays a 16-bit operand in shared memory: as an fp32
    operand of TF32 products it sat in registers (128 per thread), and the kernel spilled.
    ``a Vt`` is a TF32 product (``DOT_PREC``; float16's chunked form takes 3xTF32 there, whose
    split operands spilled here). The output is formed and stored in two channel halves, with
    offsets recomputed after the loop (``OPAQUE``): a whole-tile epilogue, or offsets held
    across the loop, spilled."""
    b, offs_l, mask_n, n64 = _tile_rows(tl.program_id(0), L, BLOCK_N)
    chan = tl.arange(0, BLOCK_C)
    offs_pt = tl.arange(0, BLOCK_P)
    x = tl.load(x_ptr + _row_offsets(b, offs_l, chan, sx_b, sx_l, sx_c, WIDE),
                mask=mask_n[:, None] & (chan < C)[None, :], other=0.0)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    x = dot_operand(x, DT, UPCAST_DOT)
    # labels as int32 (class indices): held across the loop, int64 ones take twice the registers
    lab = tl.full((BLOCK_N,), -1, tl.int32)
    if HAS_EXCLUDE:
        lab = tl.load(lab_ptr + n64, mask=mask_n, other=-1).to(tl.int32)
    kt_scale = tl.load(ktscale_ptr)
    m_i = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    for p0 in range(0, P, BLOCK_P):
        hi = dot_operand(_proto_tile(kthi_ptr, p0, offs_pt, chan, P, C), DT, UPCAST_DOT)
        lo = dot_operand(_proto_tile(ktlo_ptr, p0, offs_pt, chan, P, C), DT, UPCAST_DOT)
        s = tl.dot(x, tl.trans(lo), tl.dot(x, tl.trans(hi))) * kt_scale
        s, valid = _biased_scores(s, c_ptr, 0, p0 + offs_pt, lab, P, M, HAS_C, HAS_EXCLUDE)
        p, alpha, l_i, m_i = _softmax_step(tl.where(valid, s, float("-inf")), m_i, l_i)
        vt = _proto_tile(vt_ptr, p0, offs_pt, chan, P, C)
        acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision=DOT_PREC)
    lse, seen = _softmax_lse(m_i, l_i)
    tl.store(lse_ptr + n64, lse, mask=mask_n)
    o = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
    # the two channel halves: (BLOCK_N, BLOCK_C) -> (BLOCK_N, 2, BLOCK_C / 2) -> two tiles
    o0, o1 = tl.split(tl.permute(tl.reshape(o, (BLOCK_N, 2, BLOCK_C // 2)), (0, 2, 1)))
    half = tl.arange(0, BLOCK_C // 2)
    sx_l, so_l = per_iteration(sx_l, OPAQUE), per_iteration(so_l, OPAQUE)
    _fwd_rows_out(o0, half, b, offs_l, mask_n, C, x_ptr, sx_b, sx_l, sx_c, bo_ptr, gamma_ptr,
                  out_ptr, so_b, so_l, so_c, HAS_BO, HAS_GAMMA, WIDE)
    _fwd_rows_out(o1, half + BLOCK_C // 2, b, offs_l, mask_n, C, x_ptr, sx_b, sx_l, sx_c, bo_ptr,
                  gamma_ptr, out_ptr, so_b, so_l, so_c, HAS_BO, HAS_GAMMA, WIDE)


@triton.jit
def _fwd_rows_out(o, chan, b, offs_l, mask_n, C, x_ptr, sx_b, sx_l, sx_c, bo_ptr, gamma_ptr,
                  out_ptr, so_b, so_l, so_c, HAS_BO: tl.constexpr, HAS_GAMMA: tl.constexpr, WIDE: tl.constexpr):
    """``x + gamma * (o + b_o)`` of the channels ``chan``, ``x`` read again, stored."""
    mask_c = chan < C
    mask = mask_n[:, None] & mask_c[None, :]
    if HAS_BO:
        o += tl.load(bo_ptr + chan, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_GAMMA:
        o = o * tl.load(gamma_ptr + chan, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    x = tl.load(x_ptr + _row_offsets(b, offs_l, chan, sx_b, sx_l, sx_c, WIDE), mask=mask, other=0.0)
    out = x.to(tl.float32) + o
    tl.store(out_ptr + _row_offsets(b, offs_l, chan, so_b, so_l, so_c, WIDE), out.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _attention_fwd_kernel(
    x_ptr, kt_ptr, ktlo_ptr, ktscale_ptr, c_ptr, vt_ptr, bo_ptr, gamma_ptr, lab_ptr, out_ptr, lse_ptr,
    L, C, P, M, H,
    sx_b, sx_l, sx_c, so_b, so_l, so_c,
    HAS_C: tl.constexpr, HAS_BO: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr, EXACT_TF32: tl.constexpr, GROUPS: tl.constexpr, OUT_SPLIT: tl.constexpr,
    ROWS: tl.constexpr = False, OPAQUE: tl.constexpr = False, UPCAST_DOT: tl.constexpr = False,
):
    # Pixel-side tiles and accumulators are held as NCH = BLOCK_C / BLOCK_K chunks of BLOCK_K
    # channels, (NCH, BLOCK_N, BLOCK_K), prototype tiles as (NCH, BLOCK_P, BLOCK_K), and every
    # GEMM is batched over the chunks: a score is the sum over chunks of BLOCK_K-deep products,
    # which the eight warps split by chunk. One C-deep product for a 16 x 16 score tile left
    # them only the channels to split, and each warp held the whole x tile (see _blocks).
    # EXACT_TF32 (float16 features): x is exact in TF32, the score products take two TF32
    # products against Kt's halves (_tf32_halves); p Vt, whose both sides are fp32, stays
    # 3xTF32 (DOT_PREC).
    # GROUPS (1 or 2): the channels as that many separate groups of NCH chunks (x0, x1, acc0,
    # acc1, and their Kt and Vt tiles), each group a batched product of its own: the x operand
    # of a score product, loaded from shared memory into registers for every prototype tile,
    # is then a group's share of the BLOCK_N x C tile, not all of it. OUT_SPLIT (GROUPS = 2):
    # two programs per pixel tile, both form all the scores, each the output of one group.
    # ROWS (one head, 16-bit features on sm_90): whole-channel 2-D tiles instead, Kt as the
    # 16-bit halves scale * (kt_ptr + ktlo_ptr), the scale at ktscale_ptr (_fwd_rows)
    if ROWS:
        _fwd_rows(x_ptr, kt_ptr, ktlo_ptr, ktscale_ptr, c_ptr, vt_ptr, bo_ptr, gamma_ptr, lab_ptr, out_ptr,
                  lse_ptr, L, C, P, M, sx_b, sx_l, sx_c, so_b, so_l, so_c,
                  HAS_C, HAS_BO, HAS_GAMMA, HAS_EXCLUDE, WIDE, BLOCK_N, BLOCK_P, BLOCK_C, DOT_PREC, OPAQUE,
                  UPCAST_DOT)
    else:
        NCH: tl.constexpr = BLOCK_C // BLOCK_K // GROUPS
        WIDTH: tl.constexpr = NCH * BLOCK_K
        pid = tl.program_id(0)
        part = 0
        if OUT_SPLIT:
            part = pid % 2
            pid = pid // 2
        b, offs_l, mask_n, n64 = _tile_rows(pid, L, BLOCK_N)
        chan0 = tl.arange(0, NCH)[:, None, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, None, :]
        chan_o = chan0 + part * WIDTH
        chan1 = chan0 + WIDTH
        offs_pt = tl.arange(0, BLOCK_P)

        x0 = _chunked_rows(x_ptr, b, offs_l, chan0, mask_n[None, :, None] & (chan0 < C),
                           sx_b, sx_l, sx_c, WIDE).to(tl.float32)
        x1 = x0
        if GROUPS == 2:
            x1 = _chunked_rows(x_ptr, b, offs_l, chan1, mask_n[None, :, None] & (chan1 < C),
                               sx_b, sx_l, sx_c, WIDE).to(tl.float32)
        lab = tl.full((BLOCK_N,), -1, tl.int64)
        if HAS_EXCLUDE:
            lab = tl.load(lab_ptr + n64, mask=mask_n, other=-1)

        o0 = tl.zeros((NCH, BLOCK_N, BLOCK_K), tl.float32)
        o1 = o0
        for head in range(H):
            # online softmax over the P prototypes of this head (flash-attention style):
            #   m = running max, l = running sum of exp(s - m), acc = running sum of exp(s - m) Vt
            m_i = tl.full((BLOCK_N,), float("-inf"), tl.float32)
            l_i = tl.zeros((BLOCK_N,), tl.float32)
            acc0 = tl.zeros((NCH, BLOCK_N, BLOCK_K), tl.float32)
            acc1 = acc0
            for p0 in range(0, P, BLOCK_P):
                offs_p = p0 + offs_pt
                kt = _proto_rows(kt_ptr, head, p0, offs_pt, chan0, P, C)
                s = _score_product(x0, kt, DOT_PREC, EXACT_TF32)
                if GROUPS == 2:
                    kt = _proto_rows(kt_ptr, head, p0, offs_pt, chan1, P, C)
                    s += _score_product(x1, kt, DOT_PREC, EXACT_TF32)
                s, valid = _biased_scores(s, c_ptr, head, offs_p, lab, P, M, HAS_C, HAS_EXCLUDE)
                p, alpha, l_i, m_i = _softmax_step(tl.where(valid, s, float("-inf")), m_i, l_i)
                # chan_o: this program's output channels, chan0 unless the output is split
                acc0 = _group_read(acc0, alpha, p, vt_ptr, head, p0, offs_pt, chan_o, P, C, NCH, DOT_PREC)
                if GROUPS == 2 and not OUT_SPLIT:
                    acc1 = _group_read(acc1, alpha, p, vt_ptr, head, p0, offs_pt, chan1, P, C, NCH, DOT_PREC)
            lse, seen = _softmax_lse(m_i, l_i)
            l_safe = tl.where(seen, l_i, 1.0)[None, :, None]
            o0 += tl.where(seen[None, :, None], acc0 / l_safe, 0.0)
            if GROUPS == 2 and not OUT_SPLIT:
                o1 += tl.where(seen[None, :, None], acc1 / l_safe, 0.0)
            if OUT_SPLIT:  # once per pixel tile
                tl.store(lse_ptr + n64 * H + head, lse, mask=mask_n & ((tl.zeros((BLOCK_N,), tl.int32) + part) == 0))
            else:
                tl.store(lse_ptr + n64 * H + head, lse, mask=mask_n)

        if OUT_SPLIT:
            x_o = _chunked_rows(x_ptr, b, offs_l, chan_o, mask_n[None, :, None] & (chan_o < C),
                                sx_b, sx_l, sx_c, WIDE).to(tl.float32)
            _fwd_out(x_o, o0, chan_o, b, offs_l, mask_n, C, bo_ptr, gamma_ptr, out_ptr, so_b, so_l, so_c,
                     HAS_BO, HAS_GAMMA, WIDE)
        else:
            _fwd_out(x0, o0, chan0, b, offs_l, mask_n, C, bo_ptr, gamma_ptr, out_ptr, so_b, so_l, so_c,
                     HAS_BO, HAS_GAMMA, WIDE)
        if GROUPS == 2 and not OUT_SPLIT:
            _fwd_out(x1, o1, chan1, b, offs_l, mask_n, C, bo_ptr, gamma_ptr, out_ptr, so_b, so_l, so_c,
                     HAS_BO, HAS_GAMMA, WIDE)


@triton.jit
def _fwd_out(x, o, chan, b, offs_l, mask_n, C, bo_ptr, gamma_ptr, out_ptr, so_b, so_l, so_c,
             HAS_BO: tl.constexpr, HAS_GAMMA: tl.constexpr, WIDE: tl.constexpr):
    """The residual ``x + gamma * (o + b_o)`` of the channels ``chan``, stored."""
    mask_c = chan < C
    if HAS_BO:
        o += tl.load(bo_ptr + chan, mask=mask_c, other=0.0).to(tl.float32)
    if HAS_GAMMA:
        o = o * tl.load(gamma_ptr + chan, mask=mask_c, other=0.0).to(tl.float32)
    out = x + o
    out_offs = _chunk_offsets(b, offs_l, chan, so_b, so_l, so_c, WIDE)
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask_n[None, :, None] & mask_c)


@triton.jit
def _attention_bwd_dx_kernel(
    x_ptr, g_ptr, kt_ptr, c_ptr, vt_ptr, gamma_ptr, lab_ptr, lse_ptr,
    dx_ptr, delta_ptr, gread_ptr, gsum_ptr,
    L, C, P, M, H,
    sx_b, sx_l, sx_c, sg_b, sg_l, sg_c, sd_b, sd_l, sd_c,
    HAS_C: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_GREAD: tl.constexpr, NEED_GSUM: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr, EXACT_TF32: tl.constexpr,
):
    # Gradients, with g = d(loss)/d(out) and do = gamma * g (the gradient reaching o):
    #   da[n,i,p]    = do[n] . Vt[i,p]
    #   delta[n,i]   = sum_p a[n,i,p] da[n,i,p]                      (softmax backward)
    #   ds[n,i,p]    = a[n,i,p] (da[n,i,p] - delta[n,i])
    #   dx[n]        = g[n] + sum_i sum_p ds[n,i,p] Kt[i,p]
    #                = g[n] + sum_i ( (a*da)[n,i,:] Kt[i] - delta[n,i] (a[n,i,:] Kt[i]) )
    #     (one pass over the prototype tiles: delta is only known at the end of a head, so the
    #      two products are accumulated separately and combined after the head's last tile)
    #   dgamma       = sum_n g[n] * o[n] = sum_n g[n] * read[n] + b_o * sum_n g[n],
    #                  read[n] = sum_i sum_p a[n,i,p] Vt[i,p]        (partials per tile: gread, gsum)
    #                  sum_n g[n] * read[n] = sum_i sum_p Vt[i,p] * (sum_n a[n,i,p] g[n]): per
    #                  prototype tile a BLOCK_P x C product reduced at once, not a BLOCK_N x C
    #                  accumulator; only when the prototype-gradient kernel does not run, whose
    #                  dVt accumulator is sum_n a g (NEED_GREAD)
    #   d(b_o)       = gamma * sum_n g[n]
    # Tiles are chunked as in the forward. EXACT_TF32 (float16 features and gradient): the
    # products with x or g on one side (s, da, a^T g) are two TF32 products (_tf32_halves);
    # (a*da) Kt and a Kt, fp32 on both sides, stay 3xTF32.
    NCH: tl.constexpr = BLOCK_C // BLOCK_K
    pid = tl.program_id(0)
    b, offs_l, mask_n, n64 = _tile_rows(pid, L, BLOCK_N)
    chan = tl.arange(0, NCH)[:, None, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, None, :]
    offs_pt = tl.arange(0, BLOCK_P)
    mask_c = chan < C
    mask = mask_n[None, :, None] & mask_c

    x = _chunked_rows(x_ptr, b, offs_l, chan, mask, sx_b, sx_l, sx_c, WIDE).to(tl.float32)
    g = _chunked_rows(g_ptr, b, offs_l, chan, mask, sg_b, sg_l, sg_c, WIDE).to(tl.float32)
    # per-tile partials over pixels (rows past N were loaded as 0), summed in fixed order by the
    # host; sum g now rather than after the loop
    chan2 = tl.arange(0, NCH)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    if NEED_GSUM:
        tl.store(gsum_ptr + pid.to(tl.int64) * C + chan2, tl.sum(g, 1), mask=chan2 < C)
    if HAS_GAMMA:
        # da = do . Vt = g . (gamma * Vt): gamma scales each Vt tile, there is no do tile
        gamma = tl.load(gamma_ptr + chan, mask=mask_c, other=0.0).to(tl.float32)
    lab = tl.full((BLOCK_N,), -1, tl.int64)
    if HAS_EXCLUDE:
        lab = tl.load(lab_ptr + n64, mask=mask_n, other=-1)

    # dx is carried by each head's (a*da) Kt accumulator, which starts from it: one
    # BLOCK_N x C tile fewer than a separate accumulator
    dx = g
    gread = tl.zeros((NCH, BLOCK_K), tl.float32)
    for head in range(H):
        lse = tl.load(lse_ptr + n64 * H + head, mask=mask_n, other=float("inf"))
        delta = tl.zeros((BLOCK_N,), tl.float32)
        ada_kt = dx
        a_kt = tl.zeros((NCH, BLOCK_N, BLOCK_K), tl.float32)
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + offs_pt
            kt = _proto_rows(kt_ptr, head, p0, offs_pt, chan, P, C)
            s, valid = _scores(x, kt, c_ptr, head, offs_p, lab, P, M,
                               HAS_C, HAS_EXCLUDE, DOT_PREC, EXACT_TF32)
            a = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
            vt = _proto_rows(vt_ptr, head, p0, offs_pt, chan, P, C)
            vt_do = vt
            if HAS_GAMMA:
                vt_do = vt * gamma
            da = tl.sum(_dot_exact_lhs(g, tl.permute(vt_do, (0, 2, 1)), DOT_PREC, EXACT_TF32), 0)
            ada = a * da
            delta += tl.sum(ada, 1)
            if NEED_DX:
                ada_kt += tl.dot(_per_chunk(ada, NCH), kt, input_precision=DOT_PREC)
                a_kt += tl.dot(_per_chunk(a, NCH), kt, input_precision=DOT_PREC)
            if NEED_GREAD:
                a_g = _dot_exact_rhs(_per_chunk(tl.trans(a), NCH), g, DOT_PREC, EXACT_TF32)
                gread += tl.sum(vt * a_g, 1)
        if NEED_DX:
            dx = ada_kt - delta[None, :, None] * a_kt
        tl.store(delta_ptr + n64 * H + head, delta, mask=mask_n)

    if NEED_DX:
        dx_offs = _chunk_offsets(b, offs_l, chan, sd_b, sd_l, sd_c, WIDE)
        tl.store(dx_ptr + dx_offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_GREAD:
        tl.store(gread_ptr + pid.to(tl.int64) * C + chan2, gread, mask=chan2 < C)


@triton.jit
def _halves(t, UPCAST_DOT: tl.constexpr):
    """fp32 ``t`` as ``hi + lo``, two bfloat16 GEMM operands: 16 of its 24 mantissa bits, finer
    than TF32's 11, at the cost of two 16-bit products (one TF32 product's time). Back to fp32
    under the interpreter (``UPCAST_DOT``), where the products of the rounded values are exact."""
    hi = t.to(tl.bfloat16)
    lo = (t - hi.to(tl.float32)).to(tl.bfloat16)
    if UPCAST_DOT:
        return hi.to(tl.float32), lo.to(tl.float32)
    return hi, lo


@triton.jit
def _attention_bwd_dproto_kernel(
    x_ptr, g_ptr, kt_ptr, c_ptr, vt_ptr, gamma_ptr, lab_ptr, lse_ptr, delta_ptr,
    dkt_ptr, dc_ptr, dvt_ptr,
    L, C, P, M, H, TILES_PER_HEAD, NUM_N_TILES, SPLITS,
    sx_b, sx_l, sx_c, sg_b, sg_l, sg_c,
    HAS_C: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
    DETERMINISTIC: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr, SPLIT16: tl.constexpr, SPLIT_TF32: tl.constexpr, UPCAST_DOT: tl.constexpr,
    OPAQUE_X: tl.constexpr, OPAQUE_G: tl.constexpr,
):
    # Gradients of the prototype-side tensors, reductions over pixels:
    #   dKt[i,p] = sum_n ds[n,i,p] x[n]
    #   dc[i,p]  = sum_n ds[n,i,p]
    #   dVt[i,p] = sum_n a[n,i,p] do[n] = gamma * sum_n a[n,i,p] g[n]
    # (written without the gamma: the host scales it, see the end)
    # This program owns prototypes p0 .. p0+BLOCK_P of one head and the pixel tiles
    # split, split + SPLITS, split + 2*SPLITS, ...; its sums stay on chip until the end.
    #
    # Every tile is held as NCH = BLOCK_C / BLOCK_K chunks of BLOCK_K channels, (NCH, rows,
    # BLOCK_K), and the GEMMs are batched over the chunks: the scores are a sum over chunks of
    # C / NCH deep products, the two gradients are NCH independent BLOCK_K-wide products. With
    # one C-deep product per score (C = 256 or 512 in fp32 operands) each warp's share of the
    # x tile alone filled its registers next to the two BLOCK_P x C accumulators, and the
    # kernel spilled at BLOCK_P = 16; chunked, BLOCK_P = 32 fits at C = 256 (docs/kernels.md).
    #
    # SPLIT16 (bfloat16 features): x and g are GEMM operands as loaded (exact), and the fp32
    # side of each product (Kt, Vt, a, ds) is split into two bfloat16 halves (_halves). The
    # products are finer than TF32 and the x and g tiles take half the registers of fp32 ones.
    # SPLIT_TF32 (float16 features and gradient): x and g are exact in TF32, and the fp32 side
    # is split into TF32 halves (_tf32_halves): two TF32 products per GEMM instead of 3xTF32's
    # three, and no split x and g tiles to hold (with 3xTF32 the kernel spilled 40 to 120 bytes
    # per thread; split, 32 prototypes fit at C = 256).
    NCH: tl.constexpr = BLOCK_C // BLOCK_K
    pid_p = tl.program_id(0)
    split = tl.program_id(1)
    head = pid_p // TILES_PER_HEAD
    offs_p = (pid_p % TILES_PER_HEAD) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    chan = tl.arange(0, NCH)[:, None, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, None, :]
    mask_c = chan < C
    rows = (head * P + offs_p).to(tl.int64)
    mask_pc = mask_p[None, :, None] & mask_c
    offs_pc = rows[None, :, None] * C + chan
    kt = tl.load(kt_ptr + offs_pc, mask=mask_pc, other=0.0)
    vt = tl.load(vt_ptr + offs_pc, mask=mask_pc, other=0.0)
    if HAS_GAMMA:
        # do = gamma * g enters as da = do . Vt = g . (gamma * Vt): gamma scales Vt here, not
        # every g tile in the loop
        gamma = tl.load(gamma_ptr + chan, mask=mask_c, other=0.0).to(tl.float32)
        vt = vt * gamma
    # (NCH, BLOCK_K, BLOCK_P): the right-hand side of the chunked score products
    kt_t = tl.permute(kt, (0, 2, 1))
    vt_t = tl.permute(vt, (0, 2, 1))
    if SPLIT16:
        kt_hi, kt_lo = _halves(kt_t, UPCAST_DOT)
        vt_hi, vt_lo = _halves(vt_t, UPCAST_DOT)
    if SPLIT_TF32:
        kt_hi, kt_lo = _tf32_halves(kt_t)
        vt_hi, vt_lo = _tf32_halves(vt_t)
    c_p = tl.zeros((BLOCK_P,), tl.float32)
    if HAS_C:
        c_p = tl.load(c_ptr + rows, mask=mask_p, other=0.0)

    dkt = tl.zeros((NCH, BLOCK_P, BLOCK_K), tl.float32)
    dvt = tl.zeros((NCH, BLOCK_P, BLOCK_K), tl.float32)
    dc = tl.zeros((BLOCK_P,), tl.float32)
    for t in range(split, NUM_N_TILES, SPLITS):
        b, offs_l, mask_n, n64 = _tile_rows(t, L, BLOCK_N)
        mask = mask_n[None, :, None] & mask_c
        # unaligned channel strides: offsets recomputed per tile, not held (opaque_stride)
        x = _chunked_rows(x_ptr, b, offs_l, chan, mask, sx_b, sx_l, per_iteration(sx_c, OPAQUE_X), WIDE)
        g = _chunked_rows(g_ptr, b, offs_l, chan, mask, sg_b, sg_l, per_iteration(sg_c, OPAQUE_G), WIDE)
        if SPLIT16:
            if UPCAST_DOT:
                x, g = x.to(tl.float32), g.to(tl.float32)
            s = tl.sum(tl.dot(x, kt_lo, tl.dot(x, kt_hi)), 0) + c_p[None, :]
            da = tl.sum(tl.dot(g, vt_lo, tl.dot(g, vt_hi)), 0)
        elif SPLIT_TF32:
            x, g = x.to(tl.float32), g.to(tl.float32)
            s = tl.sum(tl.dot(x, kt_lo, tl.dot(x, kt_hi, input_precision="tf32"), input_precision="tf32"), 0)
            s += c_p[None, :]
            da = tl.sum(tl.dot(g, vt_lo, tl.dot(g, vt_hi, input_precision="tf32"), input_precision="tf32"), 0)
        else:
            x, g = x.to(tl.float32), g.to(tl.float32)
            s = tl.sum(tl.dot(x, kt_t, input_precision=DOT_PREC), 0) + c_p[None, :]
            da = tl.sum(tl.dot(g, vt_t, input_precision=DOT_PREC), 0)
        lse = tl.load(lse_ptr + n64 * H + head, mask=mask_n, other=float("inf"))
        delta = tl.load(delta_ptr + n64 * H + head, mask=mask_n, other=0.0)
        valid = mask_p[None, :]
        if HAS_EXCLUDE:
            # prototype p belongs to class p // M; a pixel labelled k does not see class k
            lab = tl.load(lab_ptr + n64, mask=mask_n, other=-1)
            valid = valid & ((offs_p // M)[None, :] != lab[:, None])
        # rows past N: lse = +inf gives a = 0, so they add nothing
        a = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        ds = a * (da - delta[:, None])
        if SPLIT16:
            ds_hi, ds_lo = _halves(tl.trans(ds), UPCAST_DOT)
            a_hi, a_lo = _halves(tl.trans(a), UPCAST_DOT)
            dkt = tl.dot(_per_chunk(ds_hi, NCH), x, dkt)
            dkt = tl.dot(_per_chunk(ds_lo, NCH), x, dkt)
            dvt = tl.dot(_per_chunk(a_hi, NCH), g, dvt)
            dvt = tl.dot(_per_chunk(a_lo, NCH), g, dvt)
        elif SPLIT_TF32:
            ds_hi, ds_lo = _tf32_halves(tl.trans(ds))
            a_hi, a_lo = _tf32_halves(tl.trans(a))
            dkt = tl.dot(_per_chunk(ds_hi, NCH), x, dkt, input_precision="tf32")
            dkt = tl.dot(_per_chunk(ds_lo, NCH), x, dkt, input_precision="tf32")
            dvt = tl.dot(_per_chunk(a_hi, NCH), g, dvt, input_precision="tf32")
            dvt = tl.dot(_per_chunk(a_lo, NCH), g, dvt, input_precision="tf32")
        else:
            ds_t = _per_chunk(tl.trans(ds), NCH)
            a_t = _per_chunk(tl.trans(a), NCH)
            dkt += tl.dot(ds_t, x, input_precision=DOT_PREC)
            dvt += tl.dot(a_t, g, input_precision=DOT_PREC)
        dc += tl.sum(ds, 0)
    # dvt leaves as sum_n a g, without gamma: the host scales it, and also forms d(gamma)'s
    # sum_n g * read = sum_p Vt * (sum_n a g) from it, a GEMM the dx kernel then skips

    if DETERMINISTIC:
        # stage one of a two-stage reduction: this split's partial, summed in order by the host
        base = split.to(tl.int64) * H * P * C
        tl.store(dkt_ptr + base + offs_pc, dkt, mask=mask_pc)
        tl.store(dvt_ptr + base + offs_pc, dvt, mask=mask_pc)
        if HAS_C:
            tl.store(dc_ptr + split.to(tl.int64) * H * P + rows, dc, mask=mask_p)
    else:
        tl.atomic_add(dkt_ptr + offs_pc, dkt, mask=mask_pc, sem="relaxed")  # only the sums matter
        tl.atomic_add(dvt_ptr + offs_pc, dvt, mask=mask_pc, sem="relaxed")
        if HAS_C:
            tl.atomic_add(dc_ptr + rows, dc, mask=mask_p, sem="relaxed")


# ============================================================================ launch helpers
def _blocks(device: torch.device, num_protos: int, channels: int,
            dtype: torch.dtype, strides: Tuple[int, ...] = ()) -> Tuple[int, int, int, int]:
    """``(BLOCK_N, BLOCK_P, BLOCK_C, BLOCK_K)`` of the forward. The whole channel axis of a pixel
    tile stays on chip (``BLOCK_C = next_power_of_2(C)``), as ``BLOCK_C / BLOCK_K`` chunks of
    ``BLOCK_K`` channels (see the kernels). On the CPU interpreter blocks are small (Python runs
    each program), ``BLOCK_P = 16`` so that tests with more than 16 prototypes per head exercise
    the online softmax across tiles, and chunks are 16 wide so that the tests' channel counts
    make several of them.

    On a GPU the tiles shrink as ``C`` grows, to bound the on-chip ``BLOCK_N x BLOCK_C`` float32
    tiles and accumulators. Chosen from the code compiled for sm_90 and sm_80 at the benchmark
    shapes (``python -m benchmarks compile``, Triton 3.8 and 3.9; 8 warps), not tuned on
    hardware; none of these spills:

    * ``C <= 128``: 32 x 16, chunks of 32 (64 x 64 bfloat16 and 32 x 32 float16/float32 tiles
      spilled 8 to 1500 bytes per thread in the forward or ``dx``).
    * ``C = 256``: 32 x 32 for bfloat16, 16 x 16 for float16 and float32; chunks of 32.
    * ``C = 512``: 16 x 16 for bfloat16, 16 x 8 for float16 and float32 (fp32 ``tl.dot``
      operands may be 8 deep; 16 before Triton 3.8, which took nothing narrower); chunks of 16.
      16 float32 prototypes spilled up to 232 bytes with a layer scale (``gamma``).
    * bfloat16 where :func:`_wide_pixel_tiles` (Triton 3.9, 163 KB of shared memory or more):
      64 x 16 in chunks of 64 at ``C = 256`` (chunks of 32 spilled 8 to 16 bytes with NHWC
      features, 32 prototypes 56 bytes); at ``C = 512`` 64 x 16 in chunks of 128 (8
      prototypes below 227 KB) with two channel groups and two programs per pixel tile
      (:func:`_fwd_groups`). Each program streams all of ``Kt`` and ``Vt`` from L2: the pixels
      per program set the forward's L2 traffic.

    Unchunked, the 16 x 16 score tile of a C-deep product left the eight warps nothing to split
    but the channels, every warp held the whole ``x`` tile as an operand, and the float16 and
    float32 kernels spilled 0.4 to 7.6 KB per thread. The forward and ``dx`` read ``x`` once
    whatever the tile; fewer prototypes per tile pad ``P`` less (210 to 216 rather than 224)."""
    block_c = max(16, triton.next_power_of_2(channels))
    if not on_gpu(device):
        return 16, 16, block_c, min(16, block_c)
    wide = dtype != torch.bfloat16  # fp32 GEMM operands: 3xTF32 (float16) or IEEE (float32)
    if not wide and 128 < block_c <= 512 and _wide_pixel_tiles(device, channels, strides):
        # 64 pixels (_wide_pixel_tiles); at C = 512 with the channels in two groups and two
        # programs per pixel tile (_fwd_groups), 8 prototypes where a block may use less than
        # 227 KB of shared memory (16 asked for 184 KB)
        if block_c <= 256:
            block_n, block_p, block_k = 64, 16, 64
        else:
            block_n, block_p, block_k = 64, 16 if _largest_shared(device) else 8, 128
        block_p = min(block_p, max(_NARROW_P if block_p < 16 else 16, triton.next_power_of_2(num_protos)))
        return block_n, block_p, block_c, block_k
    if block_c <= 128:
        block_n, block_p = 32, 16
    elif block_c <= 256:
        block_n, block_p = (16, 16) if wide else (32, 32)
    else:
        block_n, block_p = (16, _NARROW_P) if wide else (16, 16)
    block_p = min(block_p, max(_NARROW_P if wide else 16, triton.next_power_of_2(num_protos)))
    return block_n, block_p, block_c, min(block_c, 32 if block_c <= 256 else 16)


def _wide_pixel_tiles(device: torch.device, channels: int, strides: Tuple[int, ...]) -> bool:
    """Whether the bfloat16 forward and ``dx`` take their wider pixel tiles at ``C = 256`` and
    ``512`` (_blocks, _dx_blocks, _fwd_groups): each program streams all of ``Kt`` and ``Vt``
    from L2, so the pixels per program set the L2 traffic. Compiled without spilling with
    Triton 3.9, where a block may use 163 KB of shared memory or more, but for features (or
    gradients) whose channel ``strides`` have no alignment (opaque_stride; NCHW features of an
    odd height x width at 512 channels: 16 to 32 bytes per thread spilled)."""
    return (_TRITON >= (3, 9) and large_shared(device)
            and not any(opaque_stride(device, stride, channels) for stride in strides))


def _largest_shared(device: torch.device) -> bool:
    """Whether a block may use as much shared memory as an H100's (227 KB)."""
    return _backend.gpu_properties(device)[1] >= _LARGEST_SHARED


def _fwd_groups(device: torch.device, channels: int, dtype: torch.dtype,
                strides: Tuple[int, ...] = ()) -> Tuple[int, bool]:
    """``(GROUPS, OUT_SPLIT)`` of the forward (see the kernel): at ``C = 512`` with bfloat16
    features (_wide_pixel_tiles) the channels in two groups and two programs per 64-pixel tile,
    each forming every score but the output of one half of the channels: the two read
    ``3 P C`` floats of ``Kt``/``Vt`` for 64 pixels, two 32-pixel programs ``4 P C`` (one
    program of 64 pixels and all the channels spilled 8 to 16 bytes at best on sm_90: two
    groups, chunks of 256). The score products are formed twice: 1.5 times the forward's
    GEMM work. Else one group, one program per tile."""
    block_c = triton.next_power_of_2(channels)
    if (on_gpu(device) and dtype == torch.bfloat16 and 256 < block_c <= 512
            and _wide_pixel_tiles(device, channels, strides)):
        return 2, True
    return 1, False


def _rows_tiles(device: torch.device, num_protos: int, channels: int, dtype: torch.dtype, num_heads: int,
                strides: Tuple[int, ...] = ()) -> Optional[Tuple[int, int]]:
    """``(BLOCK_N, BLOCK_P)`` of the forward's whole-channel form (:func:`_fwd_rows`), or
    ``None`` for the chunked form. One head, 16-bit features (its score products take them as
    operands), wgmma (sm_90) and ``C <= 256``: 64 pixels against 16-prototype tiles on
    8 warps, two stages, every GEMM on wgmma and no spill with NCHW and NHWC features, with and
    without ``exclude=`` and a layer scale (172 to 190 registers; 32 prototypes took 234 to 255
    and spilled 16 to 24 bytes per thread with ``exclude=`` and NCHW features). On the
    interpreter channels-last 16-bit features of one head take it (16 x 16), so that the
    tests run both forms. float16 features: the same tiles and registers, no spill, with Triton
    3.8 and 3.9 (a 3xTF32 ``a Vt``, as the chunked form has, spilled 32 to 96 bytes)."""
    if num_heads != 1:
        return None
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    if not on_gpu(device):
        return (16, 16) if strides[:1] == (1,) else None
    block_c = triton.next_power_of_2(channels)
    if warpgroup_mma(device) and 16 < block_c <= 256:
        return 64, 16
    return None


def _fwd_stages(device: torch.device, dtype: torch.dtype) -> int:
    """Software-pipelining depth of the forward: 2, and 1 for float32 features, whose
    double-buffered ``Kt``/``Vt`` tiles doubled the registers at ``C = 256`` (about 120 to 240)
    and spilled 56 bytes per thread at ``C = 512`` on sm_90, and on GPUs with 99 KB of shared
    memory per block (with two stages the bfloat16 forward asked for 100 KB at ``C = 256``)."""
    return 1 if dtype == torch.float32 or not large_shared(device) else 2


def _dx_blocks(device: torch.device, num_protos: int, channels: int,
               dtype: torch.dtype, strides: Tuple[int, ...] = ()) -> Tuple[int, int, int, int]:
    """``(BLOCK_N, BLOCK_P, BLOCK_C, BLOCK_K)`` of the ``dx`` kernel: the forward's, with at most
    16 pixels from ``C = 256`` on (besides ``x`` it holds ``g`` and two per-head accumulators:
    32 pixels spilled 32 to 40 bytes at ``C = 256`` on sm_90) and 8 prototypes for float16 and
    float32 features (16 spilled nothing at ``C = 256`` but 8 to 120 bytes at ``C = 512``;
    16 before Triton 3.8, which took no fewer). bfloat16 where :func:`_wide_pixel_tiles`:
    ``C = 256``: 64 x 8 in chunks of 128 on sm_90 (the fp32 ``x`` and ``g`` tiles staged in
    192 KB of shared memory with NCHW features; 32-wide chunks spilled 8 bytes, 16 prototypes
    48 bytes with NHWC ones; 8 to 16 bytes on sm_100), else 32 x 16 in chunks of 64;
    ``C = 512``: 32 x 8 in chunks of 16 where a block may use 227 KB (192 KB on an A100 with
    NCHW features, 16 x 16 there; 32 x 16 spilled 64 to 208 bytes on sm_90)."""
    block_n, block_p, block_c, block_k = _blocks(device, num_protos, channels, dtype, strides)
    if on_gpu(device) and block_c >= 256:
        if dtype == torch.bfloat16 and block_c <= 512 and _wide_pixel_tiles(device, channels, strides):
            large = _largest_shared(device)
            if block_c <= 256:
                block_n, block_p, block_k = (64, 8, 128) if large and has_wgmma(device) else (32, 16, 64)
            else:
                block_n, block_p, block_k = (32, 8, 16) if large else (16, 16, 16)
            block_p = min(block_p, max(_NARROW_P if block_p < 16 else 16, triton.next_power_of_2(num_protos)))
            return block_n, block_p, block_c, block_k
        block_n = min(block_n, 16)
        if dtype != torch.bfloat16:
            block_p = min(block_p, _NARROW_P)
    return block_n, block_p, block_c, block_k


def _dproto_blocks(device: torch.device, num_protos: int, block_c: int,
                   dtype: torch.dtype) -> Tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_P, BLOCK_K)`` of the prototype-gradient kernel. Each program re-reads
    ``x`` and ``dout`` once per prototype tile, so ``BLOCK_P`` sets the traffic; the two
    ``BLOCK_P x C`` float32 accumulators bound it. Channel chunks of ``BLOCK_K`` (see the
    kernel) keep the score products small. Compiled for sm_90 and sm_80 at the benchmark shapes
    (8 warps, one stage):

    * ``C = 256``: 16 x 32 x 32 does not spill with Triton 3.8 and 3.9, on sm_90 nor sm_80,
      but for float16 features on sm_90 with Triton 3.9 when ``exclude=`` and a layer scale are
      both given (8 bytes): 64-wide chunks there (which spill 232 bytes with Triton 3.8, and
      float32 16 bytes on sm_86). For bfloat16 features 64 prototypes spilled 24 to 376 bytes
      (chunks of 32 to 256). For float16 and float32 features 32 prototypes halve the re-reads
      of the 16 x 16 x 64 tiles they had (float16: once its products are split, see the
      kernel; with 3xTF32 products 16 prototypes spilled up to 120 bytes with Triton 3.8).
    * bfloat16, ``C = 512`` (the split products, whose x and g tiles are 16-bit): 16 x 32 x 128
      does not spill with Triton 3.9, and halves the re-reads of 16 prototypes; with Triton 3.8
      it spilled 544 bytes (64-wide chunks 16 to 24 bytes), and on sm_80 it needs 164 KB of
      shared memory, more than an A100 block may use: 16 x 16 x 64 there.
    * float16 / float32 features, ``C = 512``: 16 x 16 x 64 (with float16 features 32
      prototypes asked for 272 KB of shared memory).

    * up to 128 channels, with Triton 3.9: the same accumulator budget, 64 prototypes at
      ``C = 128`` and 128 at ``C = 64`` (64 at ``C = 32``, where 128 spilled 8 to 16 bytes),
      half or a quarter of the re-reads of 32, without spilling on sm_80, sm_86, sm_90, sm_100
      and sm_120, for every dtype that takes 32 at ``C = 256``, NCHW and NHWC, with ``exclude=``
      and a layer scale (32 had spilled 8 to 16 bytes at ``C = 128`` for channels-last features
      on sm_90). Triton 3.8 spilled 144 bytes to 2 KB per thread with them (sm_80 at
      ``C = 64``: 8 to 11 KB) and keeps 32.

    * GPUs with 99 KB of shared memory per block (sm_86, sm_89, sm_120), which take the
      attention up to ``C = 256``: 16 prototypes for float16 and float32 features (32 asked
      for 128 to 136 KB).

    On the interpreter 16-wide chunks, so that the tests' channel counts make several of them."""
    if not on_gpu(device):
        return 16, 16, min(16, block_c)
    if block_c <= 256:
        narrow = dtype != torch.bfloat16 and not large_shared(device)
        block_n, block_p = 16, 16 if narrow else 32
        if not narrow and _TRITON >= (3, 9):
            # the two accumulators' 32 x 256 also hold 64 x 128 and 128 x 64
            block_p = {128: 64, 64: 128, 32: 64}.get(block_c, 32)
        block_k = 64 if dtype == torch.float16 and has_wgmma(device) and _TRITON >= (3, 9) else 32
    elif dtype == torch.bfloat16 and block_c == 512 and has_wgmma(device) and _TRITON >= (3, 9):
        block_n, block_p, block_k = 16, 32, 128
    else:
        block_n, block_p, block_k = 16, 16, 64
    block_p = min(block_p, max(16, triton.next_power_of_2(num_protos)))
    return block_n, block_p, min(block_k, block_c)


def _dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision. Every GEMM here takes fp32 operands (16-bit ``x`` is exact in
    them; ``Kt``/``Vt`` are fp32): for float32 features exact IEEE products, or TF32 where
    PyTorch's float32 matmuls may use it (fp32_precision); TF32 for bfloat16
    (a 10-bit mantissa, finer than bf16's 7) and 3xTF32 for float16 (plain TF32 would be as
    coarse as float16 itself). With float16 features only the products with both sides fp32
    take 3xTF32; those with ``x`` or the output gradient on one side are split by hand into two
    TF32 products (_tf32_halves), as the bfloat16 prototype gradient is into 16-bit ones.

    16-bit operands (``Kt``, ``Vt``, the probabilities rounded to the features' dtype, as flash
    attention does) were tried for the GEMMs: with bfloat16 ``Kt`` or ``Vt``, or float16
    ``Vt``, the projection gradients came out less accurate than PyTorch's own autograd in the
    same dtype on some inputs, which the tests do not allow (``tests/test_kernel_attention.py``,
    ``test_low_precision_no_worse_than_reference``). The CPU interpreter ignores the setting
    (fp32 products)."""
    return {torch.bfloat16: "tf32", torch.float16: "tf32x3"}.get(dtype) or fp32_precision()


def _fp32_in_tf32(dtype: torch.dtype) -> bool:
    """Whether the GEMMs run in TF32 on float32 features (fp32_precision)."""
    return dtype == torch.float32 and fp32_precision() == "tf32"


def _dproto_precision(device: torch.device, dtype: torch.dtype, block_c: int) -> str:
    """The prototype gradient's ``tl.dot`` precision: :func:`_dot_precision`'s, but IEEE for
    float32 features wider than 256 channels where a block may use less shared memory than an
    H100's (227 KB): its TF32 products stage the ``x``, ``g``, ``Kt`` and ``Vt`` tiles in shared
    memory, ``x`` and ``g`` once per operand side, 192 KB at ``C = 512``, more than an A100's
    163 KB (16-row tiles are the smallest ``tl.dot`` takes)."""
    if _fp32_in_tf32(dtype) and block_c > 256 and on_gpu(device):
        if not _largest_shared(device):
            return "ieee"
    return _dot_precision(dtype)


def _launch_options(device: torch.device, num_stages: int, tf32_fp32: bool = False) -> dict:
    """GPU launch options. Software-pipelining depth bounds shared memory (Triton's default of
    3 stages asked for up to 264 KiB in the fp16 backward). Eight warps: with four, the
    full-channel fp32 tiles spilled in every kernel at C = 256 (80 to 5600 bytes of stack per
    thread on sm_90). Sixteen (at most 128 registers per thread) spilled 1 to 6 KB in the
    unchunked forward and ``dx`` with float16 and float32 features, and with the present tiles
    still 8 to 56 bytes in ``dx`` or the prototype gradient at C = 256 and 512 on sm_90.
    ``tf32_fp32`` (float32 features multiplied in TF32): a 255-register budget; left to itself
    ptxas held the forward and ``dx`` to 128 registers (two blocks per SM) and spilled 8 to 16
    bytes per thread with ``exclude=`` and a layer scale at ``C = 256`` on sm_90 (NHWC).
    ``python -m benchmarks compile`` shows what each choice compiles to."""
    if not on_gpu(device):
        return {}
    return {"num_stages": num_stages, "num_warps": 8, "maxnreg": 255 if tf32_fp32 else None}


def _dense(*tensors: Optional[Tensor]):
    """The small inputs (``Kt``, ``c``, ``Vt``, biases, ``gamma``, labels, ``lse``) are indexed
    as dense rows by the kernels; only ``x`` and gradients of its shape are read by stride."""
    return [None if t is None else t.contiguous() for t in tensors]


def _kt_operand(kt: Tensor, x_dtype: torch.dtype) -> Tensor:
    """``Kt`` as the kernels multiply it. For bfloat16 features its GEMMs run in TF32, and it is
    rounded to TF32 here (to nearest even, NaN kept) once for every kernel: each of them then
    multiplies exactly the same values, whether in TF32 (forward, ``dx``), as the two bfloat16
    halves that hold a TF32 value exactly (the whole-channel forward, :func:`_fwd_rows`), or as
    the prototype gradient's bfloat16 ``hi + lo`` split. The forward's ``lse`` and the
    backward's recomputed scores agree up to summation order. The gradient flows to ``Kt`` as if
    unrounded, as through any low-precision GEMM operand."""
    if x_dtype != torch.bfloat16:
        return kt
    bits = kt.view(torch.int32)
    rounded = ((bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32)
    return torch.where(torch.isnan(kt), kt, rounded)


def _16bit_halves(kt: Tensor, x_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """``(hi, lo, scale)``: ``Kt`` as two GEMM operands in the features' 16-bit dtype, with
    ``scale * (hi + lo)`` its value (``scale``: a one-element float32 tensor, a power of two).

    bfloat16: ``Kt`` comes rounded to TF32 (:func:`_kt_operand`), and ``hi`` holds its leading
    8 significant bits, ``lo`` the other 3: exact, ``scale = 1``. float16 (11 significant bits
    and a narrow exponent range): ``Kt`` is first scaled by a power of two that puts its largest
    magnitude at 2**10, so that neither half overflows and ``lo`` stays in float16's range
    down to 2**-11 of that; ``hi + lo`` then holds 22 significant bits of each value (about
    the float16 chunked form's two TF32 products), and ``scale`` undoes the power of two. The
    scale is found on the device, with no host sync (a forward captured in a CUDA graph must
    not read values back)."""
    scale = torch.ones((1,), device=kt.device, dtype=torch.float32)
    if x_dtype == torch.float16 and kt.numel():
        peak = kt.abs().amax().reshape(1)
        usable = torch.isfinite(peak) & (peak > 0)
        # peak / scale in [2**10, 2**11): scale = 2**(e - 11) for peak = m * 2**e, m in [0.5, 1)
        exponent = torch.frexp(torch.where(usable, peak, 1.0)).exponent
        scale = torch.where(usable, torch.ldexp(scale, exponent - 11), scale)
    scaled = kt / scale if x_dtype == torch.float16 else kt  # bfloat16: scale 1
    hi = scaled.to(x_dtype)
    return hi, (scaled - hi.float()).to(x_dtype), scale


# ============================================================================ torch.library ops
@torch.library.custom_op("torch_ppl::prototype_attention_fwd", mutates_args=())
def _fwd_op(
    x: Tensor, kt: Tensor, c: Optional[Tensor], vt: Tensor, out_bias: Optional[Tensor],
    gamma: Optional[Tensor], exclude: Optional[Tensor], num_heads: int, protos_per_class: int,
) -> Tuple[Tensor, Tensor]:
    """x ``(B, L, C)`` any strides; kt, vt ``(h*P, C)`` float32; c ``(h*P,)`` float32;
    exclude ``(B*L,)`` int64. Returns ``out`` (like ``x``) and ``lse`` ``(B*L, h)`` float32."""
    with launch_device(x):
        kt, c, vt, out_bias, gamma, exclude = _dense(kt, c, vt, out_bias, gamma, exclude)
        batch, length, channels = x.shape
        n = batch * length
        num_protos = kt.shape[0] // num_heads
        if n == 0:
            return torch.empty_like(x), torch.empty((n, num_heads), device=x.device, dtype=torch.float32)
        block_n, block_p, block_c, block_k = _blocks(x.device, num_protos, channels, x.dtype, (x.stride(2),))
        groups, out_split = _fwd_groups(x.device, channels, x.dtype, (x.stride(2),))
        rows = _rows_tiles(x.device, num_protos, channels, x.dtype, num_heads, (x.stride(2),))
        if rows is not None:  # the whole-channel form (_fwd_rows)
            (block_n, block_p), block_k, groups, out_split = rows, block_c, 1, False

        kt = _kt_operand(kt, x.dtype)
        kt_lo = kt_scale = None
        if rows is not None:
            kt, kt_lo, kt_scale = _16bit_halves(kt, x.dtype)

        def run(tiles):
            out = torch.empty_like(x)
            lse = torch.empty((n, num_heads), device=x.device, dtype=torch.float32)
            _attention_fwd_kernel[(batch * triton.cdiv(length, tiles["BLOCK_N"]) * (2 if out_split else 1),)](
                x, kt, kt_lo, kt_scale, c, vt, out_bias, gamma, exclude, out, lse,
                length, channels, num_protos, protos_per_class, num_heads,
                *x.stride(), *out.stride(),
                HAS_C=c is not None, HAS_BO=out_bias is not None, HAS_GAMMA=gamma is not None,
                HAS_EXCLUDE=exclude is not None, WIDE=needs_wide_offsets(x, out),
                # the whole-channel form's a Vt: TF32 for float16 too (_fwd_rows)
                DOT_PREC="tf32" if rows is not None else _dot_precision(x.dtype),
                EXACT_TF32=x.dtype == torch.float16,
                GROUPS=groups, OUT_SPLIT=out_split, ROWS=rows is not None, OPAQUE=on_gpu(x.device),
                UPCAST_DOT=upcast_dot(), **tiles, **FP_CONTRACTION,
            )
            return out, lse

        tiles = dict(BLOCK_N=block_n, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_K=block_k,
                     **_launch_options(x.device, num_stages=_fwd_stages(x.device, x.dtype),
                                       tf32_fp32=_fp32_in_tf32(x.dtype)))
        key = _autotune.problem_key(x, num_heads, num_protos, c is not None, out_bias is not None,
                                    gamma is not None, exclude is not None)
        return _autotune.tuned("prototype_attention.fwd", key, tiles, run, x.device)


@_fwd_op.register_fake
def _fwd_fake(x, kt, c, vt, out_bias, gamma, exclude, num_heads, protos_per_class):
    n = x.shape[0] * x.shape[1]
    return torch.empty_like(x), x.new_empty((n, num_heads), dtype=torch.float32)


@torch.library.custom_op("torch_ppl::prototype_attention_bwd", mutates_args=())
def _bwd_op(
    grad: Tensor, x: Tensor, kt: Tensor, c: Optional[Tensor], vt: Tensor, gamma: Optional[Tensor],
    exclude: Optional[Tensor], lse: Tensor, num_heads: int, protos_per_class: int,
    need_dx: bool, need_gread: bool, need_gsum: bool, need_dproto: bool, deterministic: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``dx`` (like ``x``), ``dkt``, ``dc``, ``dvt`` (float32, shaped like ``kt``, ``c``
    or ``(h*P,)``, ``vt``), and ``sum_n g*read``, ``sum_n g`` (``(C,)`` float32). Outputs that
    were not asked for are empty tensors."""
    with launch_device(x):
        kt, c, vt, gamma, exclude, lse = _dense(kt, c, vt, gamma, exclude, lse)
        kt = _kt_operand(kt, x.dtype)  # the values the forward multiplied
        batch, length, channels = x.shape
        n = batch * length
        rows_hp = kt.shape[0]
        num_protos = rows_hp // num_heads
        dev = x.device
        f32 = dict(device=dev, dtype=torch.float32)
        block_n, block_p, block_c, block_k = _dx_blocks(dev, num_protos, channels, x.dtype,
                                                        (x.stride(2), grad.stride(2)))
        # float16 features and gradient: exact in TF32 (_tf32_halves)
        exact_tf32 = x.dtype == torch.float16 and grad.dtype == torch.float16

        def empty() -> Tensor:  # a fresh one each time: outputs of a custom op may not alias
            return torch.empty((0,), **f32)

        if n == 0:
            return (torch.empty_like(x) if need_dx else x.new_empty((0,)),
                    torch.zeros_like(kt) if need_dproto else empty(),
                    torch.zeros((rows_hp,), **f32) if need_dproto else empty(),
                    torch.zeros_like(vt) if need_dproto else empty(),
                    torch.zeros((channels,), **f32) if need_gread else empty(),
                    torch.zeros((channels,), **f32) if need_gsum else empty())
        # d(gamma)'s sum_n g * read = sum_p Vt * (sum_n a g): the prototype-gradient kernel holds
        # sum_n a g as dVt / gamma, so the dx kernel forms it (one GEMM per tile) only without that one
        gread_in_dx = need_gread and not need_dproto
        common = dict(HAS_C=c is not None, HAS_GAMMA=gamma is not None, HAS_EXCLUDE=exclude is not None,
                      BLOCK_C=block_c, DOT_PREC=_dot_precision(x.dtype))
        key = _autotune.problem_key(x, num_heads, num_protos, c is not None, gamma is not None,
                                    exclude is not None, grad.stride(2) == 1)

        def run_dx(tiles):
            num_n_tiles = batch * triton.cdiv(length, tiles["BLOCK_N"])  # tiles never straddle two images
            dx = torch.empty_like(x) if need_dx else x.new_empty((0,))
            delta = torch.empty((n, num_heads), **f32)
            # per-tile partials, summed in a fixed order below
            gread = torch.empty((num_n_tiles, channels), **f32) if gread_in_dx else empty()
            gsum = torch.empty((num_n_tiles, channels), **f32) if need_gsum else empty()
            _attention_bwd_dx_kernel[(num_n_tiles,)](
                x, grad, kt, c, vt, gamma, exclude, lse,
                dx if need_dx else None, delta, gread if gread_in_dx else None, gsum if need_gsum else None,
                length, channels, num_protos, protos_per_class, num_heads,
                *x.stride(), *grad.stride(), *(dx.stride() if need_dx else x.stride()),
                NEED_DX=need_dx, NEED_GREAD=gread_in_dx, NEED_GSUM=need_gsum,
                WIDE=needs_wide_offsets(x, grad, *([dx] if need_dx else [])),
                EXACT_TF32=exact_tf32, **common, **tiles, **FP_CONTRACTION,
            )
            return dx, delta, gread.sum(0) if gread_in_dx else gread, gsum.sum(0) if need_gsum else gsum

        dx, delta, gread, gsum = _autotune.tuned(
            "prototype_attention.bwd_dx", key, dict(BLOCK_N=block_n, BLOCK_P=block_p, BLOCK_K=block_k,
                                                    **_launch_options(dev, num_stages=1,
                                                                      tf32_fp32=_fp32_in_tf32(x.dtype))),
            run_dx, dev)
        if not need_dproto:
            return dx, empty(), empty(), empty(), gread, gsum

        block_n, block_p, block_k = _dproto_blocks(dev, num_protos, block_c, x.dtype)
        dproto_common = dict(common, WIDE=needs_wide_offsets(x, grad),
                             DOT_PREC=_dproto_precision(dev, x.dtype, block_c))

        def run_dproto(tiles):
            num_n_tiles = batch * triton.cdiv(length, tiles["BLOCK_N"])
            tiles_per_head = triton.cdiv(num_protos, tiles["BLOCK_P"])
            num_p_programs = num_heads * tiles_per_head
            splits = pixel_splits(dev, num_p_programs, num_n_tiles)
            if deterministic:
                dkt = torch.empty((splits, rows_hp, channels), **f32)
                dvt = torch.empty((splits, rows_hp, channels), **f32)
                dc = torch.empty((splits, rows_hp), **f32)
            else:
                dkt = torch.zeros((rows_hp, channels), **f32)
                dvt = torch.zeros((rows_hp, channels), **f32)
                dc = torch.zeros((rows_hp,), **f32)
            _attention_bwd_dproto_kernel[(num_p_programs, splits)](
                x, grad, kt, c, vt, gamma, exclude, lse, delta, dkt, dc, dvt,
                length, channels, num_protos, protos_per_class, num_heads, tiles_per_head, num_n_tiles, splits,
                *x.stride(), *grad.stride(),
                DETERMINISTIC=deterministic, SPLIT16=x.dtype == torch.bfloat16,
                SPLIT_TF32=exact_tf32, UPCAST_DOT=upcast_dot(),
                OPAQUE_X=opaque_stride(dev, x.stride(2), channels),
                OPAQUE_G=opaque_stride(dev, grad.stride(2), channels),
                **dproto_common, **tiles, **FP_CONTRACTION,
            )
            if deterministic:
                # stage two: a fixed-order sum over the splits (no atomics anywhere)
                return dkt.sum(0), dvt.sum(0), dc.sum(0)
            return dkt, dvt, dc

        dkt, dvt, dc = _autotune.tuned(
            "prototype_attention.bwd_dproto", key,
            dict(BLOCK_N=block_n, BLOCK_P=block_p, BLOCK_K=block_k, **_launch_options(dev, num_stages=1)),
            run_dproto, dev)
        # the kernel leaves dVt without its gamma: sum_n a g
        if need_gread:
            gread = (vt * dvt).sum(0)
        if gamma is not None:
            dvt = dvt * gamma.float()
        if c is None:
            dc = torch.zeros((rows_hp,), **f32)
        return dx, dkt, dc, dvt, gread, gsum


@_bwd_op.register_fake
def _bwd_fake(grad, x, kt, c, vt, gamma, exclude, lse, num_heads, protos_per_class,
                        need_dx, need_gread, need_gsum, need_dproto, deterministic):
    channels = x.shape[-1]
    f32 = dict(device=x.device, dtype=torch.float32)

    def empty() -> Tensor:
        return torch.empty((0,), **f32)

    return (
        torch.empty_like(x) if need_dx else x.new_empty((0,)),
        torch.empty_like(kt) if need_dproto else empty(),
        torch.empty((kt.shape[0],), **f32) if need_dproto else empty(),
        torch.empty_like(vt) if need_dproto else empty(),
        torch.empty((channels,), **f32) if need_gread else empty(),
        torch.empty((channels,), **f32) if need_gsum else empty(),
    )


def _setup_context(ctx, inputs, output):
    x, kt, c, vt, out_bias, gamma, exclude, num_heads, protos_per_class = inputs
    _, lse = output
    ctx.save_for_backward(x, kt, c, vt, out_bias, gamma, exclude, lse)
    ctx.num_heads = num_heads
    ctx.protos_per_class = protos_per_class
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    x, kt, c, vt, out_bias, gamma, exclude, lse = ctx.saved_tensors
    need_dx, need_kt, need_c, need_vt, need_bo, need_gamma = ctx.needs_input_grad[:6]
    need_dproto = need_kt or need_c or need_vt
    need_gsum = need_bo or (need_gamma and out_bias is not None)
    if grad_out is None or not (need_dx or need_dproto or need_gsum or need_gamma):
        return (None,) * 9
    dx, dkt, dc, dvt, gread, gsum = torch.ops.torch_ppl.prototype_attention_bwd(
        grad_out, x, kt, c, vt, gamma, exclude, lse, ctx.num_heads, ctx.protos_per_class,
        need_dx, need_gamma, need_gsum, need_dproto, torch.are_deterministic_algorithms_enabled(),
    )
    d_bo = d_gamma = None
    if need_bo:
        d_bo = (gsum * gamma.float() if gamma is not None else gsum).to(out_bias.dtype)
    if need_gamma:
        d_gamma = gread + gsum * out_bias.float() if out_bias is not None else gread
        d_gamma = d_gamma.to(gamma.dtype)
    return (
        dx if need_dx else None,
        dkt if need_kt else None,
        dc if need_c else None,
        dvt if need_vt else None,
        d_bo, d_gamma, None, None, None,
    )


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ============================================================================ public function
def prototype_side(
    prototypes: Tensor, q_weight: Tensor, k_weight: Tensor, v_weight: Tensor, out_weight: Tensor,
    q_bias: Optional[Tensor], k_bias: Optional[Tensor], v_bias: Optional[Tensor], num_heads: int,
) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """The fast form's prototype-side tensors, in float32 plain PyTorch (autograd flows):
    ``Kt`` ``(h*P, C)``, ``c`` ``(h*P,)`` (``None`` without ``q_bias``) and ``Vt`` ``(h*P, C)``,
    rows ordered head-major (row ``i * P + p``)."""
    f32 = torch.float32

    def cast(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.to(f32)

    with torch.autocast(prototypes.device.type, enabled=False):
        num_protos, channels = prototypes.shape
        inner = q_weight.shape[0]
        head_dim = inner // num_heads
        w = prototypes.to(f32)
        k = F.linear(w, cast(k_weight), cast(k_bias)).view(num_protos, num_heads, head_dim)
        v = F.linear(w, cast(v_weight), cast(v_bias)).view(num_protos, num_heads, head_dim)
        scale = 1.0 / math.sqrt(head_dim)
        w_q = cast(q_weight).view(num_heads, head_dim, channels)
        kt = torch.einsum("phd,hdc->hpc", k, w_q).mul(scale).reshape(num_heads * num_protos, channels)
        c = None
        if q_bias is not None:
            c = torch.einsum("phd,hd->hp", k, cast(q_bias).view(num_heads, head_dim)).mul(scale).reshape(-1)
        w_o = cast(out_weight).view(channels, num_heads, head_dim)
        vt = torch.einsum("phd,chd->hpc", v, w_o).reshape(num_heads * num_protos, channels)
    return kt, c, vt


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
    """Fused counterpart of :func:`torch_ppl.reference.prototype_attention` (same signature,
    same result: ``(..., C)`` in ``x``'s dtype). Runs the projected form instead where
    :func:`.projected.choose_form` says it is cheaper.

    Args:
        x: ``(..., C)`` rows, any strides (the channels-last view of NCHW features is read in
            place).
        prototypes: ``(P, C)``.
        q_weight, k_weight, v_weight: ``(h*d, C)``; biases ``(h*d,)`` or ``None``.
        out_weight: ``(C, h*d)``; ``out_bias``, ``gamma``: ``(C,)`` or ``None``.
        exclude: ``(...)`` int64 label per pixel, ``-1`` excluding nothing.

    Raises:
        TypeError: a float64 (or other unsupported) floating input.
    """
    check_dtypes("prototype_attention", x=x, prototypes=prototypes, q_weight=q_weight, k_weight=k_weight,
                 v_weight=v_weight, out_weight=out_weight, q_bias=q_bias, k_bias=k_bias, v_bias=v_bias,
                 out_bias=out_bias, gamma=gamma)
    form = projected.choose_form(x.device, x.dtype, x.shape[-1], num_heads, prototypes.shape[0], q_weight.shape[0],
                                 exclude is not None)
    if form == "projected":
        return projected.prototype_attention(x, prototypes, q_weight, k_weight, v_weight, out_weight, q_bias,
                                             k_bias, v_bias, out_bias, gamma, num_heads=num_heads)
    kt, c, vt = prototype_side(prototypes, q_weight, k_weight, v_weight, out_weight, q_bias, k_bias, v_bias,
                               num_heads)
    x3 = as_blc(x)
    if exclude is not None:
        exclude = exclude.reshape(-1).to(torch.int64)
    out, _ = torch.ops.torch_ppl.prototype_attention_fwd(
        x3, kt, c, vt, out_bias, gamma, exclude, num_heads, protos_per_class)
    return out.reshape(x.shape)  # a view: out has x3's strides
