"""Fused head logits: pixel-to-prototype similarity pooled over the prototypes of each class.

``logits[n, k] = scale * pool_m s[n, k, m] (+ bias[k])`` with ``s[n, k, m] = <x̂_n, Ŵ_km>``
(``similarity="cosine"``, ``x̂ = x / max(|x|, eps)``) or ``<x_n, W_km>`` (``"dot"``), and
``pool`` one of max / logsumexp / mean over ``m``. Same contract as
:func:`torch_ppl.reference.prototype_logits`; see ``docs/kernel-similarity.md``.

Layout of the work (one file, Liger-Kernel style):

* ``_logits_fwd_kernel``: one program per block of ``BLOCK_N`` pixels. It loads the pixel rows once
  (all ``C`` channels, ``(B, L, C)`` strides), computes their norms from that same load, then walks over
  *class tiles* of ``BLOCK_K`` classes; for each class tile, one GEMM per prototype index ``m``
  (against the ``m``-th prototype of each of its classes), pooled on the fly (running max and
  winner, online logsumexp, running sum). ``M`` is never padded to a power of two, only ``K`` to the
  class tile. It writes the ``(N, K)`` logits and, for ``pooling="max"``, the winning prototype index
  (int8 when ``M <= 127``), for ``"logsumexp"`` the pooled value (fp32). Nothing of size ``N x P``
  is ever written.
* ``_logits_bwd_dx_slice_kernel`` (max and mean pooling): same walk, one channel slice of ``du = ds
  @ Ŵ`` at a time; ``ds`` needs no similarity (the saved winner, ``1/M``), and neither does the
  normalisation backward: its ``<x̂, du>`` is ``sum_k g (logits - bias)``, read from the forward's
  logits, as is ``dscale`` (per-program partials).
* ``_logits_bwd_dx_kernel`` (logsumexp pooling, and the one-pass head + push): same walk with all
  channels of ``du`` on chip; turns the incoming ``dlogits`` into ``ds`` from the recomputed
  similarities and accumulates ``du = ds @ Ŵ``, then the normalisation backward.
* ``_logits_bwd_dw_kernel`` (max and mean pooling): one program per (prototype tile of the flat
  ``P = K*M`` axis, channel slice, pixel split) reads only its channel slice of ``x`` in its own dtype,
  gathers ``g`` and the winner per prototype, folds the ``1/|x|`` the forward saved (4 bytes per pixel)
  into ``ds`` and accumulates ``dŴ_tile += dsᵀ @ x_slice``.
* ``_logits_push_bwd_dw_kernel`` (logsumexp pooling, whose ``ds`` needs the similarities, and the
  one-pass head + push of ``kernels/head_push.py``): one program per (prototype tile of the flat
  axis, pixel split) recomputes the similarity tile over all channels; ``ds = scale g exp(s -
  pooled)`` with the pooled value the forward saved.
* Both dW kernels flush once per program: a relaxed ``tl.atomic_add``, or, in deterministic
  mode, a per-split partial summed in a fixed order.
* Gradient GEMMs take ``ds`` rounded to bfloat16 for bfloat16 features (16-bit tensor-core
  operands; bfloat16 keeps fp32's exponent range) and fp32 operands otherwise (float16 would
  flush small gradients to zero).
* fp32 features multiply on the CUDA cores, whose GEMM operand registers grow with the
  reduction length: their similarity GEMMs (forward, dx, the flat prototype gradient) walk the
  channels in 64-channel chunks read from memory (``_chunk_similarity``, ``S_CHUNK``) instead of
  one GEMM over the rows held on chip.

The prototypes are normalised (cosine) outside the kernels by plain PyTorch: they are ``P x C``
(tiny), and autograd then carries ``dŴ`` back through ``F.normalize`` to ``W``.

Host side: ``torch.library.custom_op`` ops ``torch_ppl::prototype_logits_fwd`` and
``torch_ppl::prototype_logits_bwd`` with fake implementations and ``register_autograd``, so
``torch.compile`` treats them as single nodes (no graph break, no host sync).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import _autotune
from ._common import (EPS, EPS_C, FP_CONTRACTION, TRITON_VERSION, as_blc, check_dtypes, dot_operand, has_tcgen05,
                      has_wgmma, large_shared, launch_device, needs_wide_offsets, new_rows, next_pow2, on_gpu,
                      opaque_stride, per_iteration, pixel_splits, fp32_precision, upcast_dot, warpgroup_mma)
from .contrastive import NEG, _dz_tile, _label_tile, _pixel_tile


_POOL_CODE = {"max": 0, "logsumexp": 1, "mean": 2}


# ============================================================================ Triton kernels
# Pixel tensors (x, logits, dlogits, dx) are addressed as (B, L, channels) with three strides
# (torch_ppl.kernels._common.as_blc): the pixel stride of NCHW features is 1, which Triton
# specialises, so loads run along pixels there and along channels for channels_last. Offsets
# are int64.
@triton.jit
def _pixel_offsets(b, rows, stride_b, stride_l):
    return b.to(tl.int64) * stride_b + rows.to(tl.int64) * stride_l


@triton.jit
def _load_rows(X, b, l0, L, C, stride_b, stride_l, stride_c,
               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, COSINE: tl.constexpr):
    """Rows ``l0 .. l0+BLOCK_N`` of batch ``b`` (all channels, native dtype) and, for cosine,
    ``inv = 1 / max(|x|, eps)`` computed in fp32 from the same load."""
    rows = l0 + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < L)[:, None] & (cols < C)[None, :]
    ptrs = (X + _pixel_offsets(b, rows, stride_b, stride_l)[:, None]
            + cols.to(tl.int64)[None, :] * stride_c)
    x = tl.load(ptrs, mask=mask, other=0.0)
    if COSINE:
        xf = x.to(tl.float32)
        norm = tl.sqrt(tl.sum(xf * xf, axis=1))
        inv = 1.0 / tl.maximum(norm, EPS_C)
    else:
        norm = tl.full((BLOCK_N,), 1.0, tl.float32)
        inv = tl.full((BLOCK_N,), 1.0, tl.float32)
    return x, norm, inv


@triton.jit
def _load_class_rows(W, ks, m, K, M, C, c0, BLOCK_C: tl.constexpr):
    """Prototype ``m`` of the classes ``ks``: channels ``c0 .. c0+BLOCK_C`` of the rows
    ``ks * M + m`` of the ``(K * M, C)`` tensor ``W``, in its own dtype (classes past ``K``
    are zero)."""
    cols = c0 + tl.arange(0, BLOCK_C)
    ptrs = W + (ks.to(tl.int64) * M + m)[:, None] * C + cols[None, :]
    return tl.load(ptrs, mask=(ks < K)[:, None] & (cols < C)[None, :], other=0.0)


@triton.jit
def _row_ptrs(X, b, rows, cols, stride_b, stride_l, stride_c, WIDE: tl.constexpr):
    """Pointers to channels ``cols`` of rows ``rows`` of image ``b`` of a ``(B, L, C)`` strided
    tensor, ``(len(rows), len(cols))``. Offsets within the image are 32-bit unless ``WIDE`` (an
    image of 2**31 elements or more): 64-bit offsets take two registers per element, and those
    that stay the same from one pixel tile to the next (``col * H * W`` for NCHW) the compiler
    keeps for the whole loop."""
    if WIDE:
        return X + _pixel_offsets(b, rows, stride_b, stride_l)[:, None] + cols.to(tl.int64)[None, :] * stride_c
    return (X + b.to(tl.int64) * stride_b) + (rows[:, None] * stride_l + cols[None, :] * stride_c)


@triton.jit
def _load_half_rows(X, b, l0, L, C, stride_b, stride_l, stride_c,
                    BLOCK_N: tl.constexpr, HALF: tl.constexpr, COSINE: tl.constexpr, WIDE: tl.constexpr):
    """:func:`_load_rows` as two channel halves ``(BLOCK_N, HALF)``, with the norms of the whole
    rows. Offsets within the image are 32-bit unless ``WIDE`` (an image of 2**31 elements or
    more): with 64-bit ones, the column offsets of NCHW features (``col * H * W``, the same for
    every pixel tile) stayed in registers, two per element, and the prototype gradient's
    128-prototype tile spilled 88 to 224 bytes per thread on sm_90."""
    rows = l0 + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, HALF)
    base = _row_ptrs(X, b, rows, cols, stride_b, stride_l, stride_c, WIDE)
    row_in = (rows < L)[:, None]
    x0 = tl.load(base, mask=row_in & (cols < C)[None, :], other=0.0)
    x1 = tl.load(base + HALF * stride_c, mask=row_in & (cols + HALF < C)[None, :], other=0.0)
    if COSINE:
        x0f, x1f = x0.to(tl.float32), x1.to(tl.float32)
        norm = tl.sqrt(tl.sum(x0f * x0f, axis=1) + tl.sum(x1f * x1f, axis=1))
        inv = 1.0 / tl.maximum(norm, EPS_C)
    else:
        norm = tl.full((BLOCK_N,), 1.0, tl.float32)
        inv = tl.full((BLOCK_N,), 1.0, tl.float32)
    return x0, x1, norm, inv


@triton.jit
def _row_norms(X, b, l0, L, C, stride_b, stride_l, stride_c,
               BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, COSINE: tl.constexpr):
    """The ``norm, inv`` of :func:`_load_rows`, walking the channels in chunks of ``CHUNK``
    (nothing of the rows stays live)."""
    if COSINE:
        rows = l0 + tl.arange(0, BLOCK_N)
        base = X + _pixel_offsets(b, rows, stride_b, stride_l)
        sumsq = tl.zeros((BLOCK_N,), tl.float32)
        for c0 in range(0, C, CHUNK):
            cols = c0 + tl.arange(0, CHUNK)
            xf = tl.load(base[:, None] + cols.to(tl.int64)[None, :] * stride_c,
                         mask=(rows < L)[:, None] & (cols < C)[None, :], other=0.0).to(tl.float32)
            sumsq += tl.sum(xf * xf, axis=1)
        norm = tl.sqrt(sumsq)
        inv = 1.0 / tl.maximum(norm, EPS_C)
    else:
        norm = tl.full((BLOCK_N,), 1.0, tl.float32)
        inv = tl.full((BLOCK_N,), 1.0, tl.float32)
    return norm, inv


@triton.jit
def _chunk_similarity(X, b, l0, L, C, stride_b, stride_l, stride_c, WD, ks, m, K, M, inv,
                      PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
    """:func:`_class_similarity` with the rows read from ``X`` in chunks of ``CHUNK`` channels,
    one GEMM step each, instead of held on chip: fp32 GEMMs run on the CUDA cores, whose operand
    registers grow with the reduction length (a 256- or 512-channel step spills), and sm_80's
    mma.sync keeps a GEMM's whole row operand in every warp."""
    rows = l0 + tl.arange(0, BLOCK_N)
    base = X + _pixel_offsets(b, rows, stride_b, stride_l)
    s = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for c0 in range(0, C, CHUNK):
        cols = c0 + tl.arange(0, CHUNK)
        x = tl.load(base[:, None] + cols.to(tl.int64)[None, :] * stride_c,
                    mask=(rows < L)[:, None] & (cols < C)[None, :], other=0.0)
        w = _load_class_rows(WD, ks, m, K, M, C, c0, CHUNK)
        if UPCAST_DOT:
            s = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), s, input_precision="ieee",
                       out_dtype=tl.float32)
        else:
            s = tl.dot(x, tl.trans(w), s, input_precision=PRECISION, out_dtype=tl.float32)
    return s * inv[:, None]


@triton.jit
def _store_half_rows(DX, dx, b, l0, c0, L, C, stride_b, stride_l, stride_c,
                     BLOCK_N: tl.constexpr, HALF: tl.constexpr, WIDE: tl.constexpr):
    """``dx`` into channels ``c0 .. c0+HALF`` of rows ``l0 .. l0+BLOCK_N`` of image ``b``, in
    ``DX``'s dtype, through :func:`_row_ptrs`: with an unaligned channel stride (NCHW, odd
    ``H * W``) nothing is vectorised, and 64-bit offsets took two registers per element (the
    head's dx spilled 40 bytes per thread at 512 channels on 129 x 129 pixels)."""
    rows = l0 + tl.arange(0, BLOCK_N)
    cols = c0 + tl.arange(0, HALF)
    tl.store(_row_ptrs(DX, b, rows, cols, stride_b, stride_l, stride_c, WIDE), dx.to(DX.dtype.element_ty), mask=(rows < L)[:, None] & (cols < C)[None, :])


@triton.jit
def _class_similarity(x, w, inv, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``s[n, k] = <x_n, Ŵ_km> / |x_n|`` for one prototype index ``m`` of a class tile, fp32,
    ``(BLOCK_N, BLOCK_K)``: the dot on the raw rows (exact in their dtype), the norm after, as
    in the reference."""
    if UPCAST_DOT:
        s = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee", out_dtype=tl.float32)
    else:
        s = tl.dot(x, tl.trans(w), input_precision=PRECISION, out_dtype=tl.float32)
    return s * inv[:, None]


@triton.jit
def _half_similarity(x0, x1, w0, w1, inv, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """:func:`_class_similarity` with rows and prototypes given as two channel halves."""
    if UPCAST_DOT:
        s = tl.dot(x0.to(tl.float32), tl.trans(w0.to(tl.float32)), input_precision="ieee", out_dtype=tl.float32)
        s = tl.dot(x1.to(tl.float32), tl.trans(w1.to(tl.float32)), s, input_precision="ieee", out_dtype=tl.float32)
    else:
        s = tl.dot(x0, tl.trans(w0), input_precision=PRECISION, out_dtype=tl.float32)
        s = tl.dot(x1, tl.trans(w1), s, input_precision=PRECISION, out_dtype=tl.float32)
    return s * inv[:, None]


@triton.jit
def _half_similarity_t(x0, x1, w0, w1, inv, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """:func:`_half_similarity` computed as ``(Ŵ xᵀ)ᵀ``: the prototypes are the GEMM's rows, so a
    tile of 64 or more of them makes it a wgmma on sm_90 (16 pixel rows make it an mma.sync)."""
    if UPCAST_DOT:
        x0, x1, w0, w1 = x0.to(tl.float32), x1.to(tl.float32), w0.to(tl.float32), w1.to(tl.float32)
        st = tl.dot(w0, tl.trans(x0), input_precision="ieee", out_dtype=tl.float32)
        st = tl.dot(w1, tl.trans(x1), st, input_precision="ieee", out_dtype=tl.float32)
    else:
        st = tl.dot(w0, tl.trans(x0), input_precision=PRECISION, out_dtype=tl.float32)
        st = tl.dot(w1, tl.trans(x1), st, input_precision=PRECISION, out_dtype=tl.float32)
    return tl.trans(st) * inv[:, None]


@triton.jit
def _push_fwd_update(s, ks, K, y, m, M, inv_tau, m_all, l_all, m_pos, l_pos, p_best, NEAREST: tl.constexpr):
    """Folds the similarities ``s`` ``(BLOCK_N, BLOCK_K)`` of prototype index ``m`` of a class
    tile into the push's per-pixel statistics over ``z = s / tau``: the online logsumexp over
    all prototypes (``m_all``, ``l_all``) and, at the pixel's class ``y`` (-1 where ignored),
    the online logsumexp over its prototypes (``m_pos``, ``l_pos``) or, for ``NEAREST``, the
    running maximum and its flat index ``p_best`` (strict ``>`` over increasing ``m``: the
    first maximum, as ``torch.argmax``)."""
    z = tl.where((ks < K)[None, :], s * inv_tau, float("-inf"))
    m_new = tl.maximum(m_all, tl.max(z, axis=1))
    l_all = l_all * tl.exp(m_all - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
    # a class tile holds the pixel's class at most once: -inf where it does not
    z_y = tl.max(tl.where(ks[None, :] == y[:, None], z, float("-inf")), axis=1)
    if NEAREST:
        better = z_y > m_pos
        p_best = tl.where(better, (y * M + m).to(tl.int32), p_best)
        m_pos = tl.where(better, z_y, m_pos)
    else:
        m_pos_new = tl.maximum(m_pos, z_y)
        l_pos = l_pos * tl.exp(m_pos - m_pos_new) + tl.exp(z_y - m_pos_new)
        m_pos = m_pos_new
    return m_new, l_all, m_pos, l_pos, p_best


@triton.jit
def _logits_fwd_kernel(
    X, WD, SCALE, BIAS, OUT, STAT, INV,
    Y, LOSS, LSE, POS, BEST,
    L, C, K, M, ignore_index, inv_tau,
    stride_xb, stride_xl, stride_xc,
    stride_ob, stride_ol, stride_ok,
    stride_yb, stride_yl,
    COSINE: tl.constexpr, POOL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, PUSH: tl.constexpr, NEAREST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, S_CHUNK: tl.constexpr,
):
    # PUSH: the contrastive loss of the same pixels rides on the same similarity tiles
    # (_push_fwd_update). Its per-pixel loss and what its backward needs (lse, pos, best, as
    # the contrastive kernel saves them) are written next to the logits. STAT, a contiguous
    # (B, L, K) buffer, gets what the backward needs of each pixel and class: the winner for
    # max pooling, the pooled value for logsumexp (the flat prototype gradient,
    # _logits_push_bwd_dw_kernel, cannot recompute it from its prototype tile).
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(L, BLOCK_N)
    b = pid // num_blocks
    l0 = (pid % num_blocks) * BLOCK_N
    if S_CHUNK == 0:
        x, norm, inv = _load_rows(X, b, l0, L, C, stride_xb, stride_xl, stride_xc,
                                  BLOCK_N, BLOCK_C, COSINE)
    else:
        # the similarity GEMMs read the rows in chunks of S_CHUNK channels (_chunk_similarity)
        norm, inv = _row_norms(X, b, l0, L, C, stride_xb, stride_xl, stride_xc, BLOCK_N, S_CHUNK, COSINE)
    scale = tl.load(SCALE).to(tl.float32)

    rows = l0 + tl.arange(0, BLOCK_N)
    if COSINE:
        # 4 bytes per pixel, so that the prototype gradient needs no full-row read for the norm
        tl.store(INV + b.to(tl.int64) * L + rows, inv, mask=rows < L)
    if PUSH:
        _, _, _, valid, y = _label_tile(pid, L, Y, ignore_index, stride_yb, stride_yl, BLOCK_N)
        m_all = tl.full((BLOCK_N,), NEG, tl.float32)
        l_all = tl.zeros((BLOCK_N,), tl.float32)
        m_pos = tl.full((BLOCK_N,), NEG, tl.float32)
        l_pos = tl.zeros((BLOCK_N,), tl.float32)
        p_best = tl.full((BLOCK_N,), -1, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        # One GEMM per prototype index m against the m-th prototype of BLOCK_K classes, pooled
        # on the fly: M is never padded to a power of two, only K to the class tile.
        best = tl.full((BLOCK_N, BLOCK_K), float("-inf"), tl.float32)
        pooled = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        winner = tl.zeros((BLOCK_N, BLOCK_K), tl.int32)
        total = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for m in range(M):
            if S_CHUNK == 0:
                w = _load_class_rows(WD, ks, m, K, M, C, 0, BLOCK_C)
                s = _class_similarity(x, w, inv, PRECISION, UPCAST_DOT)
            else:
                s = _chunk_similarity(X, b, l0, L, C, stride_xb, stride_xl, stride_xc, WD, ks, m, K, M, inv,
                                      PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_K, S_CHUNK)
            if POOL == 0:
                # running max, first maximal index on ties (strict >), as torch.argmax. NaN
                # ranks above everything, as in torch.argmax, so a NaN feature makes a NaN
                # logit whatever the hardware max does with NaN.
                key = tl.where(s != s, float("inf"), s)
                better = (key > best) | (m == 0)
                best = tl.where(better, key, best)
                pooled = tl.where(better, s, pooled)
                winner = tl.where(better, m, winner)
            elif POOL == 1:
                # online logsumexp: best = running max, total = sum of exp(s - best)
                peak = tl.where(m == 0, s, tl.maximum(best, s))
                total = tl.where(m == 0, 1.0, total * tl.exp(best - peak) + tl.exp(s - peak))
                best = peak
            else:
                total += s
            if PUSH:
                m_all, l_all, m_pos, l_pos, p_best = _push_fwd_update(s, ks, K, y, m, M, inv_tau, m_all, l_all,
                                                                      m_pos, l_pos, p_best, NEAREST)
        if POOL == 1:
            pooled = best + tl.log(total)
        elif POOL == 2:
            pooled = total / M
        logits = scale * pooled
        if HAS_BIAS:
            logits += tl.load(BIAS + ks, mask=ks < K, other=0.0).to(tl.float32)[None, :]
        mask = (rows < L)[:, None] & (ks < K)[None, :]
        out_ptrs = (OUT + _pixel_offsets(b, rows, stride_ob, stride_ol)[:, None]
                    + ks.to(tl.int64)[None, :] * stride_ok)
        tl.store(out_ptrs, logits, mask=mask)
        if POOL != 2:
            stat_ptrs = STAT + (b.to(tl.int64) * L + rows.to(tl.int64))[:, None] * K + ks[None, :]
            if POOL == 0:
                tl.store(stat_ptrs, winner.to(STAT.dtype.element_ty), mask=mask)
            else:
                tl.store(stat_ptrs, pooled, mask=mask)
    if PUSH:
        lse = m_all + tl.log(l_all)
        if NEAREST:
            pos = m_pos
        else:
            # an ignored pixel has no positive (l_pos = 0): keep pos finite, not log(0)
            pos = m_pos + tl.log(tl.where(valid, l_pos, 1.0))
        # where, not a product: an ignored pixel's loss is exactly 0 whatever its features
        stat = b.to(tl.int64) * L + rows
        row_in = rows < L
        tl.store(LOSS + stat, tl.where(valid, lse - pos, 0.0), mask=row_in)
        tl.store(LSE + stat, lse, mask=row_in)
        tl.store(POS + stat, pos, mask=row_in)
        tl.store(BEST + stat, p_best, mask=row_in)


@triton.jit
def _push_ds(s, ks, K, m, M, y, valid, lse, pos, p_best, g_tau, inv_tau, NEAREST: tl.constexpr):
    """The push's ``ds`` for prototype index ``m`` of a class tile, ``(BLOCK_N, BLOCK_K)``:
    ``g / tau * (softmax_P z - q)`` with ``q = exp(z - pos)`` at the pixel's class (all
    positives) or the one-hot of the forward's nearest positive; 0 at ignored pixels and
    padding classes."""
    z = s * inv_tau
    prob = tl.exp(z - lse[:, None])
    hit = ks[None, :] == y[:, None]
    if NEAREST:
        q = tl.where(hit & ((y * M + m) == p_best)[:, None], 1.0, 0.0)
    else:
        q = tl.where(hit, tl.exp(z - pos[:, None]), 0.0)
    return tl.where(valid[:, None] & (ks < K)[None, :], g_tau[:, None] * (prob - q), 0.0)


@triton.jit
def _du_step(du0, du1, ds, wd0, wd1, W, ks, m, K, M, C, HALF: tl.constexpr, GRAD_FROM_WD: tl.constexpr,
             GRAD_DTYPE: tl.constexpr, GRAD_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``du += ds Ŵ`` (``s = u Ŵᵀ``) in two channel halves, for the prototype rows ``ks * M + m``
    whose similarities ``ds`` differentiates. bfloat16 features: ``ds`` rounded to bfloat16
    (fp32's exponent range, so no gradient underflows) against the ``Ŵ`` the forward multiplied
    (``wd0``, ``wd1``), a 16-bit GEMM; otherwise fp32 operands (float16 would flush small ``ds``
    to zero) against fp32 ``Ŵ`` (for fp32 features the forward's, already loaded)."""
    if GRAD_FROM_WD:
        w0, w1 = wd0, wd1
    else:
        w0 = _load_class_rows(W, ks, m, K, M, C, 0, HALF)
        w1 = _load_class_rows(W, ks, m, K, M, C, HALF, HALF)
    ds_op = dot_operand(ds, GRAD_DTYPE, UPCAST_DOT)
    du0 = tl.dot(ds_op, dot_operand(w0, GRAD_DTYPE, UPCAST_DOT), du0, input_precision=GRAD_PRECISION,
                 out_dtype=tl.float32)
    du1 = tl.dot(ds_op, dot_operand(w1, GRAD_DTYPE, UPCAST_DOT), du1, input_precision=GRAD_PRECISION,
                 out_dtype=tl.float32)
    return du0, du1


@triton.jit
def _logits_bwd_dx_kernel(
    X, W, WD, SCALE, G, STAT, DX, DSCALE,
    Y, GL, LSE, POS, BEST,
    L, C, K, M, ignore_index, inv_tau,
    stride_xb, stride_xl, stride_xc,
    stride_gb, stride_gl, stride_gk,
    stride_db, stride_dl, stride_dc,
    stride_yb, stride_yl, stride_lb, stride_ll,
    COSINE: tl.constexpr, POOL: tl.constexpr, PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr,
    GRAD_DTYPE: tl.constexpr, GRAD_FROM_WD: tl.constexpr, UPCAST_DOT: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DSCALE: tl.constexpr, PUSH: tl.constexpr, NEAREST: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, S_CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr = 0, RELOAD_X: tl.constexpr = False, OPAQUE: tl.constexpr = False,
):
    # ds[n, k, m] = scale * g[n, k] * dpool[n, k, m] and du = sum_{k,m} ds[n, k, m] Ŵ[k, m], one
    # GEMM per (class tile, m) as in the forward. dpool needs no similarity for max (the saved
    # winner) and mean (1/M) pooling: s is recomputed only for logsumexp (its softmax weights
    # exp(s - pooled), with the pooled value the forward saved) and when dscale (sum g *
    # pooled) is asked for. STAT is the forward's (B, L, K) statistic: the winner for max
    # pooling, the pooled value for logsumexp.
    # The channels are held as two halves (du0, du1; x0, x1): the normalisation backward at
    # the end then needs one half of x next to du at a time, which kept 64 x 256 tiles from
    # spilling on sm_90.
    # PUSH adds the contrastive loss's ds (_push_ds, from the recomputed s and the forward's
    # per-pixel statistics) to the head's before the one du GEMM, so dx of both costs one pass.
    # RELOAD_X: the rows are loaded again for the normalisation backward at the end rather than
    # held across the loop (their strides made opaque, OPAQUE on a GPU, so that the compiler
    # cannot merge the two loads): the register copy of the held rows next to the accumulators
    # spilled 40 bytes per thread with 32 x 512 tiles on sm_90 (head_push._config).
    # BLOCK_P > 0: the loop walks the flat P = K*M prototype axis in tiles of BLOCK_P instead
    # (one GEMM per tile, g and the statistic gathered per prototype, as in
    # _logits_push_bwd_dw_kernel): wider GEMM tiles than BLOCK_K classes, so that 8 warps
    # split a 32-row tile without repeating work or 32 rows fit at all (sm_90, bfloat16, up
    # to 256 channels: _Config for logsumexp pooling, head_push._config for the one pass).
    NEED_S: tl.constexpr = ((POOL == 1) or NEED_DSCALE) or PUSH  # Triton 3.3 refuses a chained `or`
    HALF: tl.constexpr = BLOCK_C // 2
    # S_CHUNK > 0: the recomputed similarities walk the channels in chunks read from X
    # (_chunk_similarity), and x is loaded whole only for the normalisation backward
    HOLD_X: tl.constexpr = NEED_S and S_CHUNK == 0
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(L, BLOCK_N)
    b = pid // num_blocks
    l0 = (pid % num_blocks) * BLOCK_N
    rows = l0 + tl.arange(0, BLOCK_N)
    scale = tl.load(SCALE).to(tl.float32)
    if HOLD_X:
        x0, x1, norm, inv = _load_half_rows(X, b, l0, L, C, stride_xb, stride_xl, stride_xc, BLOCK_N, HALF, COSINE, WIDE)
    elif NEED_S:
        norm, inv = _row_norms(X, b, l0, L, C, stride_xb, stride_xl, stride_xc, BLOCK_N, S_CHUNK, COSINE)
    if PUSH:
        _, _, _, valid, y, lse, pos, p_best, g_tau = _pixel_tile(
            pid, L, Y, GL, LSE, POS, BEST, ignore_index, inv_tau, stride_yb, stride_yl, stride_lb, stride_ll, BLOCK_N)

    du0 = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)  # dL/du, u = x̂ (cosine) or x (dot)
    du1 = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
    gp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if BLOCK_P > 0:
        P = K * M
        for p0 in range(0, P, BLOCK_P):
            protos = p0 + tl.arange(0, BLOCK_P)
            p_in = protos < P
            k_of = protos // M
            m_of = protos % M
            mask = (rows < L)[:, None] & p_in[None, :]
            # g[n, k] once per prototype of class k: repeated addresses, served by L1
            g = tl.load(G + _pixel_offsets(b, rows, stride_gb, stride_gl)[:, None] + k_of.to(tl.int64)[None, :] * stride_gk,
                        mask=mask, other=0.0).to(tl.float32)
            sg = scale * g
            stat = (b.to(tl.int64) * L + rows.to(tl.int64))[:, None] * K + k_of[None, :]
            wd0 = _load_class_rows(WD, protos, 0, P, 1, C, 0, HALF)
            wd1 = _load_class_rows(WD, protos, 0, P, 1, C, HALF, HALF)
            if HOLD_X:
                s = _half_similarity(x0, x1, wd0, wd1, inv, PRECISION, UPCAST_DOT)
            elif NEED_S:
                s = _chunk_similarity(X, b, l0, L, C, stride_xb, stride_xl, stride_xc, WD, protos, 0, P, 1, inv,
                                      PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_P, S_CHUNK)
            if POOL == 0:
                hit = tl.load(STAT + stat, mask=mask, other=-1).to(tl.int32) == m_of[None, :]
                ds = tl.where(hit, sg, 0.0)
                if NEED_DSCALE:
                    gp += tl.sum(tl.where(hit & mask, g * s, 0.0), axis=1)
            elif POOL == 1:
                pooled = tl.load(STAT + stat, mask=mask, other=0.0)
                ds = sg * tl.exp(s - pooled)
                if NEED_DSCALE:  # g * pooled once per class: at its first prototype
                    gp += tl.sum(tl.where(mask & (m_of == 0)[None, :], g * pooled, 0.0), axis=1)
            else:
                ds = sg / M
                if NEED_DSCALE:
                    gp += tl.sum(tl.where(mask, g * s, 0.0), axis=1) / M
            if PUSH:
                ds += g_tau[:, None] * _dz_tile(s, tl.full((BLOCK_N,), 1.0, tl.float32), inv_tau, protos, p_in, valid,
                                                y, lse, pos, p_best, M, NEAREST)
            if NEED_DX:
                du0, du1 = _du_step(du0, du1, ds, wd0, wd1, W, protos, 0, P, 1, C, HALF, GRAD_FROM_WD,
                                    GRAD_DTYPE, GRAD_PRECISION, UPCAST_DOT)
    else:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask = (rows < L)[:, None] & (ks < K)[None, :]
            g = tl.load(G + _pixel_offsets(b, rows, stride_gb, stride_gl)[:, None] + ks.to(tl.int64)[None, :] * stride_gk,
                        mask=mask, other=0.0).to(tl.float32)
            sg = scale * g
            stat = (b.to(tl.int64) * L + rows.to(tl.int64))[:, None] * K + ks[None, :]
            if POOL == 0:
                winner = tl.load(STAT + stat, mask=mask, other=-1).to(tl.int32)
            pooled = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
            if POOL == 1:
                pooled = tl.load(STAT + stat, mask=mask, other=0.0)
            for m in range(M):
                wd0 = _load_class_rows(WD, ks, m, K, M, C, 0, HALF)
                wd1 = _load_class_rows(WD, ks, m, K, M, C, HALF, HALF)
                if HOLD_X:
                    s = _half_similarity(x0, x1, wd0, wd1, inv, PRECISION, UPCAST_DOT)
                elif NEED_S:
                    s = _chunk_similarity(X, b, l0, L, C, stride_xb, stride_xl, stride_xc, WD, ks, m, K, M, inv,
                                          PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_K, S_CHUNK)
                if POOL == 0:
                    hit = winner == m
                    ds = tl.where(hit, sg, 0.0)
                    if NEED_DSCALE:
                        pooled += tl.where(hit, s, 0.0)
                elif POOL == 1:
                    ds = sg * tl.exp(s - pooled)
                else:
                    ds = sg / M
                    if NEED_DSCALE:
                        pooled += s / M
                if PUSH:
                    ds += _push_ds(s, ks, K, m, M, y, valid, lse, pos, p_best, g_tau, inv_tau, NEAREST)
                if NEED_DX:
                    du0, du1 = _du_step(du0, du1, ds, wd0, wd1, W, ks, m, K, M, C, HALF, GRAD_FROM_WD,
                                        GRAD_DTYPE, GRAD_PRECISION, UPCAST_DOT)
            if NEED_DSCALE:
                gp += tl.sum(tl.where(mask, g * pooled, 0.0), axis=1)

    if NEED_DX:
        if not NEED_S:
            # max / mean without dscale: x is needed only here, for the normalisation backward
            x0, x1, norm, inv = _load_half_rows(X, b, l0, L, C, stride_xb, stride_xl, stride_xc, BLOCK_N, HALF, COSINE, WIDE)
        elif not HOLD_X or RELOAD_X:
            # the norms of the start, from which s was scaled
            OPAQUE_ROWS: tl.constexpr = RELOAD_X and OPAQUE
            x0, x1, _, _ = _load_half_rows(X, b, l0, L, C, stride_xb, per_iteration(stride_xl, OPAQUE_ROWS),
                                           per_iteration(stride_xc, OPAQUE_ROWS), BLOCK_N, HALF, COSINE, WIDE)
        if COSINE:
            # u = x / max(|x|, eps):
            #   |x| > eps:  dx = (du - u <u, du>) / |x|  = (du - x <x, du> inv²) inv
            #   |x| <= eps: dx = du / eps           (the clamp is constant there)
            x0f = x0.to(tl.float32)
            radial = tl.sum(x0f * du0, axis=1)
            x1f = x1.to(tl.float32)
            radial = (radial + tl.sum(x1f * du1, axis=1)) * inv * inv
            radial = tl.where(norm > EPS_C, radial, 0.0)
            du0 = (du0 - x0f * radial[:, None]) * inv[:, None]
            du1 = (du1 - x1f * radial[:, None]) * inv[:, None]
        _store_half_rows(DX, du0, b, l0, 0, L, C, stride_db, stride_dl, stride_dc, BLOCK_N, HALF, WIDE)
        _store_half_rows(DX, du1, b, l0, HALF, L, C, stride_db, stride_dl, stride_dc, BLOCK_N, HALF, WIDE)
    if NEED_DSCALE:
        # dscale = sum_{n,k} g[n,k] * pooled[n,k]; one partial per program, summed on the host
        # side in a fixed order.
        tl.store(DSCALE + pid, tl.sum(gp, axis=0))


@triton.jit
def _logits_bwd_dx_slice_kernel(
    X, INV, W, SCALE, G, STAT, LOGITS, BIAS, DX, DSCALE,
    L, C, K, M,
    stride_xb, stride_xl, stride_xc,
    stride_gb, stride_gl, stride_gk,
    stride_ob, stride_ol, stride_ok,
    stride_db, stride_dl, stride_dc,
    COSINE: tl.constexpr, POOL: tl.constexpr, HAS_BIAS: tl.constexpr, NEED_DX: tl.constexpr,
    NEED_DSCALE: tl.constexpr, GRAD_DTYPE: tl.constexpr, GRAD_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Max and mean pooling. ds needs no similarity (the saved winner, 1/M), so du = ds Ŵ splits
    # over the channels, and so does the normalisation backward once its one row reduction is
    # known without du:
    #   <x̂, du> = sum_{k,m} ds[n,k,m] ŝ[n,k,m] = sum_k g[n,k] scale pool_m ŝ[n,k,m]
    #           = sum_k g[n,k] (logits[n,k] - bias[k])                          (= R[n])
    # since the pooling is linear in the similarities it selects (the winner, or all of them
    # with 1/M). Then dx = (du - x R inv) inv, with inv = 1 / max(|x|, eps) from the forward.
    # A program takes BLOCK_N pixels and walks the channels in slices of BLOCK_C, holding one
    # slice of du at a time: a BLOCK_N x C accumulator spilled at 64 pixels, and the pixel tile
    # sets how often each Ŵ tile is streamed through L2 (once per program). R comes first, from
    # one read of g and the logits; each slice reads g and the winners again, from L1 or L2.
    # dscale = sum_n R[n] / scale (the host divides), a partial per program.
    NEED_R: tl.constexpr = COSINE or NEED_DSCALE
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(L, BLOCK_N)
    b = pid // num_blocks
    l0 = (pid % num_blocks) * BLOCK_N
    rows = l0 + tl.arange(0, BLOCK_N)
    row_in = rows < L
    scale = tl.load(SCALE).to(tl.float32)
    if POOL == 2:
        scale = scale / M
    g_rows = G + _pixel_offsets(b, rows, stride_gb, stride_gl)
    stat_rows = (b.to(tl.int64) * L + rows.to(tl.int64)) * K

    r = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if NEED_R:
        o_rows = LOGITS + _pixel_offsets(b, rows, stride_ob, stride_ol)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask = row_in[:, None] & (ks < K)[None, :]
            g = tl.load(g_rows[:, None] + ks.to(tl.int64)[None, :] * stride_gk, mask=mask, other=0.0).to(tl.float32)
            # scale * pool_m ŝ: the logits without their bias
            scaled = tl.load(o_rows[:, None] + ks.to(tl.int64)[None, :] * stride_ok, mask=mask, other=0.0)
            if HAS_BIAS:
                scaled -= tl.load(BIAS + ks, mask=ks < K, other=0.0).to(tl.float32)[None, :]
            r += tl.sum(g * scaled, axis=1)
    if NEED_DSCALE:
        tl.store(DSCALE + pid, tl.sum(r, axis=0))

    if NEED_DX:
        if COSINE:
            inv = tl.load(INV + b.to(tl.int64) * L + rows, mask=row_in, other=0.0)
            # |x| <= eps (inv = 1 / eps): the clamp is constant there, dx = du / eps
            radial = tl.where(inv < 1.0 / EPS_C, r * inv, 0.0)
        for c0 in range(0, C, BLOCK_C):
            du = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                mask = row_in[:, None] & (ks < K)[None, :]
                sg = scale * tl.load(g_rows[:, None] + ks.to(tl.int64)[None, :] * stride_gk,
                                     mask=mask, other=0.0).to(tl.float32)
                if POOL == 0:
                    winner = tl.load(STAT + stat_rows[:, None] + ks[None, :], mask=mask, other=-1).to(tl.int32)
                for m in range(M):
                    if POOL == 0:
                        ds = tl.where(winner == m, sg, 0.0)
                    else:
                        ds = sg
                    w = _load_class_rows(W, ks, m, K, M, C, c0, BLOCK_C)
                    du = tl.dot(dot_operand(ds, GRAD_DTYPE, UPCAST_DOT), dot_operand(w, GRAD_DTYPE, UPCAST_DOT), du,
                                input_precision=GRAD_PRECISION, out_dtype=tl.float32)
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = row_in[:, None] & (cols < C)[None, :]
            if COSINE:
                x = tl.load(_row_ptrs(X, b, rows, cols, stride_xb, stride_xl, stride_xc, WIDE),
                            mask=mask, other=0.0).to(tl.float32)
                du = (du - x * radial[:, None]) * inv[:, None]
            tl.store(_row_ptrs(DX, b, rows, cols, stride_db, stride_dl, stride_dc, WIDE),
                     du.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _flush_dw(DW, dw, offs, mask, split, P, C, DETERMINISTIC: tl.constexpr):
    """Adds a program's ``dŴ`` tile (element offsets ``offs`` into ``(P, C)``) to ``DW``: a
    relaxed atomic add (only the sum matters), or, in deterministic mode, a store into this
    split's own slice of the ``(num_splits, P, C)`` partials, summed later in a fixed order."""
    if DETERMINISTIC:
        tl.store(DW + split.to(tl.int64) * P * C + offs, dw, mask=mask)
    else:
        tl.atomic_add(DW + offs, dw, mask=mask, sem="relaxed")


@triton.jit
def _logits_bwd_dw_kernel(
    X, INV, SCALE, G, ARGMAX, DW,
    B, L, C, K, M,
    stride_xb, stride_xl, stride_xc,
    stride_gb, stride_gl, stride_gk,
    COSINE: tl.constexpr, POOL: tl.constexpr, GRAD_DTYPE: tl.constexpr, GRAD_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, OPAQUE_X: tl.constexpr,
):
    # Max and mean pooling: ds does not depend on s (the winner is saved, the mean is 1/M), so
    # the prototype gradient needs no similarity and no full row:
    #   dŴ[p, c] = sum_n ds[n, p] * inv[n] * x[n, c],   ds[n, k*M + m] = scale * g[n, k] * dpool[n, k, m]
    # Program (prototype tile, channel slice, pixel split) owns BLOCK_P prototypes of the flat
    # P = K*M axis (classes may straddle tiles: g and the winner are gathered per prototype, so
    # only P is padded, not every class to a power of two) x BLOCK_C channels, and reads only
    # its channel slice of x, in its own dtype: the 1/|x| of cosine similarity is folded into
    # ds, so a bfloat16 x is an exact GEMM operand.
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    protos = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_in = protos < K * M
    k_of = protos // M
    m_of = protos % M
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = cols < C
    scale = tl.load(SCALE).to(tl.float32)
    if POOL == 2:
        scale = scale / M
    num_blocks = tl.cdiv(L, BLOCK_N)

    dw = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for blk in range(split, B * num_blocks, num_splits):
        b = (blk // num_blocks).to(tl.int64)
        rows = (blk % num_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_in = rows < L
        # an unaligned channel stride: the offsets recomputed per tile, not held (opaque_stride)
        sxc = per_iteration(stride_xc, OPAQUE_X)
        x = tl.load(X + b * stride_xb + rows.to(tl.int64)[:, None] * stride_xl + cols.to(tl.int64)[None, :] * sxc,
                    mask=row_in[:, None] & c_in[None, :], other=0.0)
        mask = row_in[:, None] & p_in[None, :]
        # g[n, k] once per prototype of class k: repeated addresses, served by L1
        ds = tl.load(G + _pixel_offsets(b, rows, stride_gb, stride_gl)[:, None] + k_of.to(tl.int64)[None, :] * stride_gk,
                     mask=mask, other=0.0).to(tl.float32) * scale
        if POOL == 0:
            winner = tl.load(ARGMAX + (b * L + rows.to(tl.int64))[:, None] * K + k_of[None, :],
                             mask=mask, other=-1).to(tl.int32)
            ds = tl.where(winner == m_of[None, :], ds, 0.0)
        if COSINE:
            ds = ds * tl.load(INV + b * L + rows, mask=row_in, other=0.0)[:, None]
        dw = tl.dot(tl.trans(dot_operand(ds, GRAD_DTYPE, UPCAST_DOT)), dot_operand(x, GRAD_DTYPE, UPCAST_DOT), dw,
                    input_precision=GRAD_PRECISION, out_dtype=tl.float32)

    offs = protos.to(tl.int64)[:, None] * C + cols[None, :]  # DW is (K, M, C): row p = k*M + m
    mask = p_in[:, None] & c_in[None, :]
    _flush_dw(DW, dw, offs, mask, split, K * M, C, DETERMINISTIC)


@triton.jit
def _logits_push_bwd_dw_kernel(
    X, WD, SCALE, G, STAT, Y, GL, LSE, POS, BEST, DW,
    B, L, C, K, M, ignore_index, inv_tau,
    stride_xb, stride_xl, stride_xc,
    stride_gb, stride_gl, stride_gk,
    stride_yb, stride_yl, stride_lb, stride_ll,
    COSINE: tl.constexpr, POOL: tl.constexpr, NEAREST: tl.constexpr, PRECISION: tl.constexpr,
    GRAD_DTYPE: tl.constexpr, GRAD_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DETERMINISTIC: tl.constexpr, PUSH: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, S_CHUNK: tl.constexpr,
    S_TRANSPOSED: tl.constexpr, OPAQUE_X: tl.constexpr,
):
    # The prototype gradient of the head and the push together (without PUSH, the head's
    # alone: logsumexp pooling, whose ds needs the similarities, runs here too): the push's ds needs the
    # similarities, so this kernel recomputes them, as the contrastive dW kernel does, over a
    # tile of BLOCK_P prototypes of the flat P = K*M axis with all C channels on chip, and
    # adds the head's ds, gathered per prototype as in _logits_bwd_dw_kernel:
    #   ds[n, p] = scale * g[n, k] * dpool[n, p]  +  gl[n] / tau * (softmax_P z[n] - q[n])[p]
    #   dŴ[p]   += sum_n ds[n, p] * inv[n] * x[n]        (one GEMM for both)
    # with k = p // M, dpool the forward's winner (max), exp(s - pooled) with the forward's
    # saved pooled value (logsumexp) or 1/M (mean). Every pixel feeds the head, only the
    # labelled ones the push (_dz_tile is 0 elsewhere).
    # All C channels are held as two halves (x0, x1; dŴ0, dŴ1), as in _logits_bwd_dx_kernel:
    # fewer registers live at once (with 128-prototype tiles on sm_90, whole rows spilled 120
    # bytes per thread, halves 72). S_CHUNK > 0 (fp32 features, sm_80 at C = 512;
    # _joint_dw_config): the similarity GEMM walks the channels in chunks read from X and WD,
    # nothing of WD stays on chip, and the rows, loaded whole after it, feed one dŴ GEMM.
    # S_TRANSPOSED: the similarity is computed as (Ŵ xᵀ)ᵀ, BLOCK_P rows deep enough for wgmma,
    # whose operands stay in shared memory; as x Ŵᵀ its 16 pixel rows take mma.sync, which holds
    # the whole BLOCK_P x C tile of Ŵ in every warp's registers.
    HALF: tl.constexpr = BLOCK_C // 2
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    num_blocks = tl.cdiv(L, BLOCK_N)
    protos = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_in = protos < K * M
    k_of = protos // M
    m_of = protos % M
    if S_CHUNK == 0:
        wd0 = _load_class_rows(WD, protos, 0, K * M, 1, C, 0, HALF)
        wd1 = _load_class_rows(WD, protos, 0, K * M, 1, C, HALF, HALF)
    scale = tl.load(SCALE).to(tl.float32)
    if POOL == 2:
        scale = scale / M
    ones = tl.full((BLOCK_N,), 1.0, tl.float32)

    if S_CHUNK == 0:
        dw0 = tl.zeros((BLOCK_P, HALF), dtype=tl.float32)
        dw1 = tl.zeros((BLOCK_P, HALF), dtype=tl.float32)
    else:
        dw = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for tile in range(split, B * num_blocks, splits):
        if PUSH:
            b, rows64, row_in, valid, y, lse, pos, p_best, g_tau = _pixel_tile(
                tile, L, Y, GL, LSE, POS, BEST, ignore_index, inv_tau, stride_yb, stride_yl, stride_lb, stride_ll,
                BLOCK_N)
        else:
            b = (tile // num_blocks).to(tl.int64)
            rows64 = ((tile % num_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
            row_in = rows64 < L
        l0 = (tile % num_blocks) * BLOCK_N
        # an unaligned channel stride: the offsets recomputed per tile, not held (opaque_stride)
        sxc = per_iteration(stride_xc, OPAQUE_X)
        if S_CHUNK == 0:
            x0, x1, _, inv = _load_half_rows(X, b, l0, L, C, stride_xb, stride_xl, sxc, BLOCK_N, HALF, COSINE, WIDE)
            if S_TRANSPOSED:
                s = _half_similarity_t(x0, x1, wd0, wd1, inv, PRECISION, UPCAST_DOT)
            else:
                s = _half_similarity(x0, x1, wd0, wd1, inv, PRECISION, UPCAST_DOT)
        else:
            s = _chunk_similarity(X, b, l0, L, C, stride_xb, stride_xl, sxc, WD, protos, 0, K * M, 1, ones,
                                  PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_P, S_CHUNK)
            x, _, inv = _load_rows(X, b, l0, L, C, stride_xb, stride_xl, sxc, BLOCK_N, BLOCK_C, COSINE)
            s = s * inv[:, None]
        if PUSH:
            ds = g_tau[:, None] * _dz_tile(s, ones, inv_tau, protos, p_in, valid, y, lse, pos, p_best, M, NEAREST)
        else:
            ds = tl.zeros((BLOCK_N, BLOCK_P), tl.float32)
        mask = row_in[:, None] & p_in[None, :]
        # g[n, k] once per prototype of class k: repeated addresses, served by L1
        g = tl.load((G + b * stride_gb + rows64 * stride_gl)[:, None] + k_of.to(tl.int64)[None, :] * stride_gk,
                    mask=mask, other=0.0).to(tl.float32) * scale
        stat = ((b * L + rows64) * K)[:, None] + k_of[None, :]
        if POOL == 0:
            winner = tl.load(STAT + stat, mask=mask, other=-1).to(tl.int32)
            g = tl.where(winner == m_of[None, :], g, 0.0)
        elif POOL == 1:
            g = g * tl.exp(s - tl.load(STAT + stat, mask=mask, other=0.0))
        # s = u Ŵᵀ  =>  dŴ += dsᵀ u = (ds * inv)ᵀ x: x stays the GEMM operand as loaded
        ds = tl.trans(dot_operand((ds + g) * inv[:, None], GRAD_DTYPE, UPCAST_DOT))
        if S_CHUNK == 0:
            dw0 = tl.dot(ds, dot_operand(x0, GRAD_DTYPE, UPCAST_DOT), dw0, input_precision=GRAD_PRECISION,
                         out_dtype=tl.float32)
            dw1 = tl.dot(ds, dot_operand(x1, GRAD_DTYPE, UPCAST_DOT), dw1, input_precision=GRAD_PRECISION,
                         out_dtype=tl.float32)
        else:
            dw = tl.dot(ds, dot_operand(x, GRAD_DTYPE, UPCAST_DOT), dw, input_precision=GRAD_PRECISION,
                        out_dtype=tl.float32)

    if S_CHUNK == 0:
        cols = tl.arange(0, HALF)
        offs = protos.to(tl.int64)[:, None] * C + cols[None, :]
        _flush_dw(DW, dw0, offs, p_in[:, None] & (cols < C)[None, :], split, K * M, C, DETERMINISTIC)
        _flush_dw(DW, dw1, offs + HALF, p_in[:, None] & (cols + HALF < C)[None, :], split, K * M, C, DETERMINISTIC)
    else:
        cols = tl.arange(0, BLOCK_C)
        offs = protos.to(tl.int64)[:, None] * C + cols[None, :]
        _flush_dw(DW, dw, offs, p_in[:, None] & (cols < C)[None, :], split, K * M, C, DETERMINISTIC)


# ============================================================================ host helpers
def _joint_dw_config(device: torch.device, c: int, x_dtype: torch.dtype, channel_stride: int,
                     lse_push: bool = False) -> dict:
    """Tiles of :func:`_logits_push_bwd_dw_kernel`: ``BLOCK_P`` prototypes of the flat axis x all
    ``C`` channels of fp32 accumulator, ``BLOCK_N`` pixels per step; ``channel_stride`` is that
    of the ``(B, L, C)`` features (1: channels-last); ``lse_push``: the push beside logsumexp
    pooling (the head + push in one op), the kernel's heaviest form.

    ``OPAQUE_X`` (:func:`~torch_ppl.kernels._common.opaque_stride`) for 16-bit features: at 512
    channels on 129 x 129 pixels (NCHW) it took the spill from 48 to 24 bytes per thread. Not
    for fp32 features, whose chunked tile never spilled for it: there it freed registers to
    two blocks per SM, which the grid, sized for one (``pixel_splits``), fills worse.

    On the GPU, 64 prototypes, 8 warps and one stage: compiled for sm_90 and sm_80 at voc
    (C = 256) and ade (C = 512) with bf16 features, NCHW and NHWC, with Triton 3.9 and 3.8
    (``python -m benchmarks compile``, docs/kernel-fused.md), without spills on sm_90. 128
    prototypes, which halve the re-reads of ``x`` at voc, spilled 72 bytes per thread on sm_90
    (16 warps, the head's ``g`` and winner gathered per prototype on top of the contrastive dW
    kernel's tile), two stages 320 bytes at ade.

    bfloat16 features on sm_90 up to 256 channels take 128 prototypes, with the similarity
    transposed (``S_TRANSPOSED``): as a wgmma, ``Ŵ``'s tile stays in shared memory instead of
    every warp's registers, and 8 warps hold the ``128 x C`` accumulator without spilling (voc,
    NCHW and channels-last, Triton 3.8 and 3.9): a modelled 94 µs instead of 179 at voc. So do
    they on sm_100 (B200), where the products lower to tcgen05 (18 MMAs, no spill, Triton 3.9)
    instead of 64 prototypes on mma.sync. With the push beside logsumexp pooling (three
    exponentials per similarity) and NCHW features that tile spilled 16 to 96 bytes per thread
    on sm_90 (voc and cityscapes, Triton 3.8 and 3.9; 128 x 128 pixels: 0 and 24), 56 to 64
    with the channel offsets recomputed per tile (``OPAQUE_X``); 64 prototypes with them do not
    spill, with Triton 3.3 to 3.9, at twice the re-reads of ``x`` (a modelled 99 -> 184 µs at
    voc). Channels-last features keep 128, and so does sm_100, whose accumulator lives in tensor
    memory (no spill). float16 features there (64 prototypes, the plain similarity) spilled 40
    bytes per thread (NCHW, Triton 3.9); the transposed similarity does not, with 3.3 to 3.9,
    NCHW and NHWC, at the same modelled time (it spilled 24 to 72 bytes with max pooling and
    no push, which keeps the plain form).
    float16 features, whose gradient GEMM takes fp32 operands, spilled 32 bytes per thread
    with Triton 3.8. NCHW features spilled 88 to 224 bytes per thread with this tile while
    ``x`` was addressed with 64-bit offsets: the column part (``col * H * W``), the same for
    every pixel tile, was kept in registers, two per element; 32-bit offsets within the image
    (``_load_half_rows``, ``WIDE``) removed it. On the interpreter the transposed form runs for
    channels-last features and the halves for NCHW, so that the tests run both.

    On sm_80 at C = 512 (ade) that tile spilled 40 to 96 bytes per thread with bf16 and fp16
    features (Triton 3.9; 48 to 128 with 3.8): its ``64 x 512`` fp32 accumulator takes 128 of
    the 255 registers in the mma.sync layout, and the similarity GEMM's ``x`` operand, all 256
    channels of a half, is held by every warp. There the similarity walks the channels in
    chunks of 64 read from memory (``S_CHUNK``; the rows are then loaded whole, for the dW GEMM
    only, into one ``64 x C`` accumulator): 0 to 16 bytes are left (see docs/kernel-fused.md).
    Also tried: a 255-register budget, 16 warps (at most 128 registers each), 16-, 32- or
    128-channel chunks, two stages, channel halves with chunks, the norms summed from the
    chunks: worst cases 24 to 184 bytes. 32 prototypes do not spill but read ``x`` twice as often (a
    modelled 3.9 ms instead of 2.0 at ade; 4.3 with the chunks' re-reads charged to L2, which
    L1 is likely to serve: docs/decisions.md).

    fp32 features: 16 prototypes, the similarity over 64-channel chunks (held halves spilled 32
    bytes per thread at ade on sm_90: fp32 GEMMs run on the CUDA cores, whose operand registers
    grow with the reduction length) and a 255-register budget (ptxas's own choice, 128
    registers, spilled 8 to 32 bytes). In TF32 more prototypes (_joint_dw_tiles), but 16 with an
    unaligned NCHW channel stride above 256 channels."""
    block_c = next_pow2(c, 32)  # two halves, each a GEMM side of >= 16
    channels_last = channel_stride == 1
    config = _joint_dw_tiles(device, block_c, x_dtype, channels_last)
    unaligned = opaque_stride(device, channel_stride, c)
    config["OPAQUE_X"] = x_dtype != torch.float32 and unaligned
    if lse_push and has_wgmma(device) and block_c <= 256:
        if x_dtype == torch.bfloat16 and not channels_last:
            config["BLOCK_P"], config["OPAQUE_X"] = 64, True
        elif x_dtype == torch.float16:
            config["S_TRANSPOSED"] = True
    if x_dtype == torch.float32 and unaligned:
        # the TF32 tiles with a stride that has no 16-element alignment: 32 prototypes spilled
        # 168 to 232 bytes per thread at 512 channels on 129 x 129 pixels (sm_90); 16 do not
        config["BLOCK_P"] = min(config["BLOCK_P"], 16)
    return config


def _joint_dw_tiles(device: torch.device, block_c: int, x_dtype: torch.dtype, channels_last: bool) -> dict:
    """The tiles of :func:`_joint_dw_config`, which says why."""
    if not on_gpu(device):
        # small tiles on the interpreter, so that tests cross prototype tiles mid-class; the
        # transposed similarity with channels-last features, as on sm_90, so that tests run it
        return dict(BLOCK_N=16, BLOCK_P=16, BLOCK_C=block_c, S_CHUNK=16 if x_dtype == torch.float32 else 0,
                    S_TRANSPOSED=channels_last and x_dtype == torch.bfloat16, num_warps=4, num_stages=1)
    if x_dtype == torch.float32:
        # fp32 GEMMs run on the CUDA cores, whose register tiles are larger: small prototype
        # tiles, the similarity over channel chunks. In TF32 (fp32_precision), on the tensor
        # cores, 64 prototypes (a quarter of the re-reads of x) up to 256 channels and 32 at
        # 512 (64 spilled 8 to 32 bytes per thread there on sm_90) compile without spilling
        block_p = 16
        if fp32_precision() == "tf32" and block_c <= 512 and (large_shared(device) or block_c <= 256):
            block_p = 64 if block_c <= 256 else 32
        return dict(BLOCK_N=16, BLOCK_P=block_p, BLOCK_C=block_c, S_CHUNK=64, S_TRANSPOSED=False, num_warps=8,
                    num_stages=1, maxnreg=255)
    if block_c > 512:
        # wider features (up to 1024 channels): 64 prototypes asked for 168 to 197 KB of shared
        # memory, over an A100's 163
        return dict(BLOCK_N=16, BLOCK_P=16, BLOCK_C=block_c, S_CHUNK=0, S_TRANSPOSED=False, num_warps=8,
                    num_stages=1)
    if x_dtype == torch.bfloat16 and (has_wgmma(device) or has_tcgen05(device)) and block_c <= 256:
        # 128 prototypes, half the re-reads of x, with the similarity on wgmma (tcgen05 on sm_100)
        return dict(BLOCK_N=16, BLOCK_P=128, BLOCK_C=block_c, S_CHUNK=0, S_TRANSPOSED=True, num_warps=8,
                    num_stages=1)
    # sm_80 at C = 512: the similarity over channel chunks, beside one 64 x C accumulator
    chunk = 64 if not has_wgmma(device) and block_c > 256 else 0
    return dict(BLOCK_N=16, BLOCK_P=64, BLOCK_C=block_c, S_CHUNK=chunk, S_TRANSPOSED=False, num_warps=8,
                num_stages=1)


# The push's pointers of the forward and dx kernels (labels, loss or its gradient, lse, pos,
# best), absent from the head alone.
_NO_PUSH = (None,) * 5


def _joint_dw(tiles: dict, x3: Tensor, w_dot: Tensor, w_hat: Tensor, scale: Tensor, g3: Tensor, stat: Optional[Tensor],
              cfg: "_Config", cosine: bool, pool: int, deterministic: bool, push: Optional[Tuple[Tensor, ...]] = None,
              ignore_index: int = 0, inv_temperature: float = 1.0, nearest: bool = False) -> Tensor:
    """dŴ ``(K, M, C)`` float32 from the joint kernel (:func:`_logits_push_bwd_dw_kernel`) with
    the launch arguments ``tiles``: the head's alone (logsumexp pooling, ``push=None``) or the
    head's and the push's (``push = (y, grad_loss, lse, pos, best)``, ``(B, L)`` each). In
    deterministic mode the splits' partials are added in a fixed order."""
    k, m, c = w_hat.shape
    nb, nl, _ = x3.shape
    p_tiles = triton.cdiv(k * m, tiles["BLOCK_P"])
    grid = (p_tiles, pixel_splits(x3.device, p_tiles, nb * triton.cdiv(nl, tiles["BLOCK_N"])))
    out = w_hat.new_empty((grid[1], k, m, c)) if deterministic else torch.zeros_like(w_hat)
    push_strides = (0, 0, 0, 0) if push is None else (*push[0].stride(), *push[1].stride())
    _logits_push_bwd_dw_kernel[grid](
        x3, w_dot, scale, g3, stat, *(push or _NO_PUSH), out,
        nb, nl, c, k, m, ignore_index, inv_temperature,
        *x3.stride(), *g3.stride(), *push_strides,
        COSINE=cosine, POOL=pool, NEAREST=nearest, PRECISION=cfg.precision, GRAD_DTYPE=cfg.grad_dtype,
        GRAD_PRECISION=cfg.grad_precision, UPCAST_DOT=cfg.upcast, DETERMINISTIC=deterministic,
        PUSH=push is not None, WIDE=needs_wide_offsets(x3), **tiles, **FP_CONTRACTION,
    )
    return out.sum(0) if deterministic else out


def _argmax_dtype(m: int) -> torch.dtype:
    return torch.int8 if m <= 127 else (torch.int16 if m <= 32767 else torch.int32)


def _class_tile(k: int) -> int:
    """Classes per tile of the forward and dx kernels: the tile is a GEMM side (>= 16), and of
    16 and 32 the larger unless 16 pads ``K`` less (K = 21: 32; K = 100: 16 pads to 112).

    Not 64: it never pads less than 32 (only as much, K = 49 to 64 or 113 to 128), and with 64
    classes the forward spilled 190 to 360 bytes per thread at K = 60 on sm_90 (C = 64 to 256,
    bf16), the one-pass dx up to 210."""
    return min((16, 32), key=lambda t: (triton.cdiv(k, t) * t, -t))


class _Config:
    """Block sizes. On the CPU interpreter small tiles keep the (numpy) work and the number of
    launched programs modest. On the GPU the tiles are sized so that a row block (all ``C``
    channels) and a class tile fit on chip. These sizes have not been tuned on a GPU; they are
    chosen from the code the compiler makes of them for sm_90 and sm_80 (registers, spills,
    shared memory, tensor cores; docs/kernels.md, ``python -m benchmarks compile``): every
    kernel compiles without spilling for bf16, fp16 and fp32 features at voc and ade, NCHW and
    NHWC, with Triton 3.9, except the one-pass head + push prototype gradient on sm_80 at
    C = 512 (see :func:`_joint_dw_config`).

    fp32 features multiply on the CUDA cores (an IEEE fp32 ``tl.dot`` lowers to FMAs), whose
    operand registers grow with the GEMM's reduction length: a GEMM over the 256 or 512
    channels of rows held on chip spilled 0.3 to 6.7 KB per thread in dx. For them the
    similarity GEMMs of the forward, of dx and of the logsumexp / one-pass prototype gradient
    walk the channels in chunks of 64 read from memory (``_chunk_similarity``; the rows are
    loaded once more, from L1 or L2, per class tile and prototype index), with one pipeline
    stage (two spilled 8 to 32 bytes per thread in the forward, up to 0.5 KB in the one-pass
    dx). Modelled times move by -25 to +33 %, wave quantisation of the grids (``ideal_us``,
    docs/kernels.md)."""

    def __init__(self, device: torch.device, c: int, k: int, m: int, x_dtype: torch.dtype,
                 channel_stride: int = 1):
        # channel_stride: the features' (the forward's tiles depend on its alignment)
        self.block_c = max(16, triton.next_power_of_2(c))
        gpu = on_gpu(device)
        fp32 = x_dtype == torch.float32
        # forward and dx: BLOCK_K classes per GEMM, one GEMM per prototype index m
        self.block_k = _class_tile(k) if gpu else 16
        self.fwd_block_k = self.block_k  # the forward's own where it differs (16 at C = 512, sm_90)
        # channels per step of the similarity GEMMs of the forward and dx (fp32 features), 0:
        # one GEMM over the rows held on chip (16-bit features: tensor cores). On the
        # interpreter 16-channel chunks, so that tests cross several.
        self.s_chunk = (64 if gpu else 16) if fp32 else 0
        # the register budget ptxas is given (``maxnreg``), None: its own choice. Left to
        # itself it holds some 8-warp kernels to 128 registers, two blocks per SM, and spills
        # (8 to 48 bytes per thread here); 255 lets them take what they need, one block per
        # SM, as the grids (pixel_splits) already assume. Not on sm_90 with 16-bit features,
        # which compile without spills as they are.
        self.maxnreg = self.dw_maxnreg = None
        if gpu:
            sm80 = not has_wgmma(device)
            # 64 rows: one warpgroup's wgmma tile on sm_90. On GPUs without wgmma 8 warps: with
            # 4, two blocks per SM, the forward spilled 96 bytes per thread on sm_120
            self.block_n = 64
            self.num_warps = 4 if self.block_c <= 256 and not sm80 else 8
            self.bwd_block_n = 32
            self.bwd_num_warps = 8
            # dx of max / mean pooling (_logits_bwd_dx_slice_kernel): 128 pixels, 8 warps, channel
            # slices of 128 against 16-class tiles; with NCHW features of an unaligned pixel
            # count (voc's 129 x 129) those spilled 80 bytes per thread on sm_90 (32 classes:
            # 240), which slices of 64 do not
            aligned = channel_stride == 1 or channel_stride % 16 == 0
            self.slice_block_n, self.slice_num_warps, self.slice_stages = 128, 8, 2
            self.slice_block_c, self.slice_block_k = (128, 16) if aligned else (64, self.block_k)
            if not large_shared(device):
                # sm_86, sm_89, sm_120: 128 pixels spilled 8 to 40 bytes per thread on sm_120
                self.slice_block_n = 64
            if x_dtype == torch.float32:
                # CUDA-core GEMMs (FLOP-bound whatever the tile): 128 x 128 spilled 40 to 336
                # bytes per thread on sm_80; 64 x 64 none, at the same modelled time
                self.slice_block_n, self.slice_block_c, self.slice_block_k = 64, 64, 16
            self.slice_block_c = min(self.slice_block_c, self.block_c)
            if m == 1 and has_tcgen05(device) and x_dtype != torch.float32:
                # one prototype per class, which Triton specialises (the loop over m unrolled): on
                # sm_100 two stages spilled 32 to 488 bytes per thread (16-bit features, NCHW and
                # channels-last, 128 to 384 channels); one stage none
                self.slice_stages = 1
            # dx when it recomputes the similarities (logsumexp pooling, the one-pass head + push):
            # with 32 rows and two stages those spilled 16 B per thread at voc and 40 to 192 B at
            # ade on sm_90; 16 rows and one stage compile without spilling
            self.recompute_block_n, self.recompute_stages = 16, 1
            # the recomputing dx's flat prototype tile (0: one GEMM per class tile and
            # prototype index) and its similarity's channel chunks (below; the one-pass dx:
            # head_push._config)
            self.dx_block_p, self.dx_s_chunk = 0, self.s_chunk
            # whether the recomputing dx loads the rows again at the end instead of holding them
            # across its loop (257 to 512 channels, below; the one-pass dx: head_push._config)
            self.reload_x = False
            # stages of the forward, of dx without recomputed similarities and of the one-pass
            # dx; on sm_80 one in dx (two spilled 8 bytes per thread for fp16 at ade)
            self.fwd_stages = 2
            if self.block_c > 256 and not large_shared(device):
                # 99 KB of shared memory per block (sm_86, sm_89, sm_120): with one prototype per
                # class (M = 1, which Triton specialises: the loop over m is unrolled) the
                # two-stage forward asked for 104 KB at 257 to 512 channels. One stage: 80 KB
                self.fwd_stages = 1
            self.num_stages = 1 if sm80 else 2
            wide_tile = (has_wgmma(device) and not fp32 and TRITON_VERSION >= (3, 5)
                         and not opaque_stride(device, channel_stride, c))
            if wide_tile:
                # every program of the forward streams all of Ŵ, so the pixel tile sets its
                # reads from L2 (docs/decisions.md): 128 pixels, two warpgroups, halve those of
                # 64 (at ade 3.6 GB instead of 6.8). All C channels of the tile stay in shared
                # memory; at C = 512 with one stage for Ŵ and 16-class tiles (144 KB; with 32
                # classes 8 B per thread spilled for channels_last). These tiles spilled, per
                # thread: 8 to 256 B on sm_80 and sm_100, 104 to 144 B with Triton 3.3 and 3.4,
                # 176 to 408 B for NCHW features with an unaligned channel stride
                # (opaque_stride), which keep 64 pixels
                self.block_n, self.num_warps = 128, 8
                if self.block_c > 256:
                    self.fwd_stages, self.fwd_block_k = 1, 16
            if warpgroup_mma(device) and not fp32 and 128 <= self.block_c <= 256:
                # logsumexp pooling's dx on sm_90, bfloat16 and float16: 64 pixels against tiles
                # of 16 prototypes of the flat P = K*M axis, two stages, the rows loaded again at
                # the end (reload_x, below): every program streams all of Ŵ, so 64 pixels halve
                # the reads from L2 of 32 (voc 137 -> 101 us modelled; float16, which took 16
                # pixels, 636 -> 202), and the similarity GEMM is a wgmma. Its 64 x 16 tile is
                # computed by both warpgroups (1.5x the tensor-core work). No spill with Triton
                # 3.3 to 3.9, NCHW and NHWC, cityscapes, 60 classes of 5, dot products, 128
                # channels. Before, for bfloat16: 32 pixels against 32 prototypes (class tiles
                # of 32 pixels made 32 x 16 similarity tiles, computed four times over; 64
                # prototypes spilled 8 to 32 bytes per thread for NHWC features). On sm_100
                # (tcgen05, accumulators in tensor memory) the rows are held: no spill
                self.recompute_block_n, self.dx_block_p, self.recompute_stages = 64, 16, 2
                self.reload_x = has_wgmma(device)
            if warpgroup_mma(device) and not fp32 and 256 < self.block_c <= 512:
                # and at 257 to 512 channels, bfloat16 and float16 (whose dx GEMM takes the
                # float32 Ŵ: 16-prototype tiles), with the rows loaded again at the end instead
                # of held (reload_x), whose register copy next to the accumulators made these
                # tiles spill: half the reads of Ŵ from L2 of 16 pixels (at ade 2.9 -> 1.5 ms
                # modelled). No spill with Triton 3.4 to 3.9 (3.3: 16 bytes per thread), NCHW,
                # NHWC and 129 x 129 pixels, on sm_90 and, with 3.8 and 3.9, sm_100. One stage
                # spilled 8 to 16 bytes, 64 prototypes 24 to 40, float16 with 32 40 to 48
                self.recompute_block_n, self.recompute_stages, self.reload_x = 32, 2, True
                self.dx_block_p = 32 if x_dtype == torch.bfloat16 else 16
            if fp32:
                # fp32 GEMMs run on the CUDA cores (fma), whose register tiles are far larger:
                # 64-row tiles spilled 21 KB per thread at C = 256 on sm_90, and 32 rows of 512
                # channels needed 193 KB of shared memory, over an A100's 163 KB. The chunked
                # forward runs 8 warps (4 spilled 8 to 24 bytes at voc) and one stage.
                self.block_n = self.bwd_block_n = 16
                self.num_warps, self.fwd_stages, self.num_stages = 8, 1, 1
            if fp32 or sm80:
                self.maxnreg = 255
            # the sliced prototype gradient (max / mean pooling): BLOCK_P prototypes of the flat
            # P axis x BLOCK_C channels of fp32 accumulator per program, as wide as sixteen warps
            # hold without spilling with Triton 3.9 (x is re-read once per prototype tile, g and
            # the winners once per channel slice). Triton 3.8 spills 8 bytes per thread at voc,
            # NCHW, on sm_90; 128 prototypes or 64 channels avoid it at 70 or 30 % more
            # modelled traffic.
            self.dw_block_p = min(256, next_pow2(k * m, 64))
            self.dw_block_n = 16
            self.dw_stages = 2
            if not sm80 and x_dtype == torch.bfloat16:
                self.dw_block_c, self.dw_num_warps = min(128, self.block_c), 16
            else:
                # mma.sync (sm_80) and fp32 operands hold more per accumulator element: 128
                # channels spilled 0.4 to 0.5 KB per thread there
                self.dw_block_c, self.dw_num_warps = min(64, self.block_c), 8
                if fp32 and sm80:
                    # two stages spilled 16 to 88 bytes per thread; one and a 255-register
                    # budget do not, at the same modelled time
                    self.dw_stages, self.dw_maxnreg = 1, 255
                    if fp32_precision() == "tf32":
                        # TF32 mma.sync operands: 64 channels spilled 8 to 40 bytes per
                        # thread (voc and ade, NHWC); 32 do not, at 30 % more modelled time
                        # (128 prototypes: 70 %)
                        self.dw_block_c = min(32, self.block_c)
                elif fp32 and self.block_c <= 256:
                    # sm_90, voc: 256 prototypes spilled 16 to 104 bytes per thread (NCHW); 128
                    # read x twice, which the fp32 GEMM's time hides in the model. At C = 512
                    # 256 do not spill, while 128 or one stage fit two blocks per SM, which the
                    # grid, sized for one (pixel_splits), fills worse: 33 % more modelled time.
                    self.dw_block_p = min(128, self.dw_block_p)
                elif sm80 and self.block_c > 256 and not has_tcgen05(device):
                    # 16-bit features at C = 512: 8 warps spilled 8 to 16 bytes per thread.
                    # Not on sm_100, where 8 warps keep the accumulator in tensor memory
                    # (tcgen05, no spill; 16 warps ran mma.sync there)
                    self.dw_num_warps = 16
            if TRITON_VERSION < (3, 9) and opaque_stride(device, channel_stride, c):
                # the opaque stride (inline PTX) in a pipelined loop: Triton 3.3 to 3.8 failed to
                # compile it for sm_90 with fp32 features and, from 3.4, for sm_100 with 16-bit
                # ones ("pipeliner doesn't know how to predicate this op")
                self.dw_stages = 1
        else:
            self.block_n = self.bwd_block_n = self.recompute_block_n = 16
            self.num_warps = self.bwd_num_warps = 4
            self.num_stages = self.recompute_stages = self.fwd_stages = self.dw_stages = 1
            # small tiles on the interpreter, so tests cross several prototype tiles (classes
            # straddling them) and channel slices
            self.dw_block_p, self.dw_block_c, self.dw_block_n = 16, 16, 16
            self.dw_num_warps = 4
            self.slice_block_n, self.slice_block_c, self.slice_block_k = 16, 16, 16
            self.slice_num_warps, self.slice_stages = 4, 1
            # channels-last features take the flat prototype tiles of the recomputing dx, and
            # load its rows again at the end, so that the tests run both of its loops and both
            # ends (16 prototypes: classes straddle the tiles)
            self.dx_block_p, self.dx_s_chunk = (16 if channel_stride == 1 else 0), self.s_chunk
            self.reload_x = channel_stride == 1
        # fp32 features: exact fp32 GEMMs, as PyTorch's by default, or TF32 where PyTorch's
        # float32 matmuls may use it (fp32_precision); for bf16/fp16 operands the precision
        # argument is unused (fp32 accumulation).
        self.precision = fp32_precision() if fp32 else "ieee"
        # Gradient GEMMs: bfloat16 features round ds to bfloat16 (16-bit tensor-core operands;
        # bfloat16 has fp32's exponent range, so small gradients survive). float16 would flush
        # them to zero: fp32 operands in TF32 there; fp32 features as their forward.
        self.grad_dtype = tl.bfloat16 if x_dtype == torch.bfloat16 else tl.float32
        self.grad_precision = self.precision if fp32 else "tf32"
        self.upcast = not fp32 and upcast_dot()
        if gpu and self.block_c > 512:
            # wider features (torch_ppl._backend.MAX_TRITON_CHANNELS): at 720 to 1024 channels
            # the forward's 64 rows, 32-class tiles and two stages asked for 192 KB of shared
            # memory, over an A100's 163; these need 96 to 131 KB
            self.block_n, self.block_k = min(self.block_n, 32), 16
            self.fwd_block_k = 16
            self.fwd_stages = self.num_stages = 1
            self.bwd_block_n = 16

    def fwd_maxnreg(self) -> Optional[int]:
        """``maxnreg`` of the forward: with 4 warps ptxas's own choice (a 255-register budget
        there only takes a block's worth of registers from the SM)."""
        return self.maxnreg if self.num_warps >= 8 else None


# ============================================================================ custom ops
@torch.library.custom_op("torch_ppl::prototype_logits_fwd", mutates_args=())
def _fwd_op(x: Tensor, w_hat: Tensor, scale: Tensor, bias: Optional[Tensor], cosine: bool,
            pooling: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Logits ``(..., K)`` float32; ``stat`` ``(B, L, K)``, what the prototype gradient needs of
    each pixel and class: the winner (int8/16/32) for ``pooling="max"``, the pooled logsumexp
    of the similarities (float32) for ``"logsumexp"``; for cosine similarity each pixel's
    ``1 / max(|x|, eps)`` ``(B, L)`` float32 (empty tensors otherwise). ``w_hat`` is the
    ``(K, M, C)`` fp32 prototype tensor, already normalised for cosine."""
    with launch_device(x):
        k, m, c = w_hat.shape
        x3 = as_blc(x)
        nb, nl, _ = x3.shape
        pool = _POOL_CODE[pooling]
        if nb * nl * k == 0:
            return _head_outputs(x, nb, nl, k, m, pool, cosine)
        cfg = _Config(x.device, c, k, m, x.dtype, x3.stride(2))
        w_op = w_hat.to(x.dtype)

        def run(tiles):
            out, stat, inv = _head_outputs(x, nb, nl, k, m, pool, cosine)
            out3 = as_blc(out)
            _logits_fwd_kernel[(nb * triton.cdiv(nl, tiles["BLOCK_N"]),)](
                x3, w_op, scale, bias, out3, stat if pool != 2 else None, inv if cosine else None,
                *_NO_PUSH,
                nl, c, k, m, 0, 1.0,
                *x3.stride(), *out3.stride(), 0, 0,
                COSINE=cosine, POOL=pool, HAS_BIAS=bias is not None, PRECISION=cfg.precision,
                UPCAST_DOT=cfg.upcast, PUSH=False, NEAREST=False, **tiles, **FP_CONTRACTION,
            )
            return out, stat, inv

        tiles = dict(BLOCK_N=cfg.block_n, BLOCK_K=cfg.fwd_block_k, BLOCK_C=cfg.block_c, S_CHUNK=cfg.s_chunk,
                     num_warps=cfg.num_warps, num_stages=cfg.fwd_stages, maxnreg=cfg.fwd_maxnreg())
        key = _autotune.problem_key(x3, k, m, cosine, pool, bias is not None)
        return _autotune.tuned("prototype_logits.fwd", key, tiles, run, x.device)


def _head_outputs(x: Tensor, nb: int, nl: int, k: int, m: int, pool: int,
                  cosine: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """New ``(logits, stat, inv)`` of the forward (:func:`_fwd_op`): logits laid out like ``x``."""
    return (new_rows(x, k, torch.float32), _new_stat(x, nb, nl, k, m, pool),
            x.new_empty((nb, nl) if cosine else (0,), dtype=torch.float32))


def _new_stat(x: Tensor, nb: int, nl: int, k: int, m: int, pool: int) -> Tensor:
    """The forward's per-(pixel, class) statistic for the prototype gradient: the winner of max
    pooling, the pooled value of logsumexp pooling, nothing for mean pooling."""
    if pool == 0:
        return x.new_empty((nb, nl, k), dtype=_argmax_dtype(m))
    if pool == 1:
        return x.new_empty((nb, nl, k), dtype=torch.float32)
    return x.new_empty((0,), dtype=_argmax_dtype(m))


@_fwd_op.register_fake
def _fwd_fake(x, w_hat, scale, bias, cosine, pooling):
    k, m, _ = w_hat.shape
    nb, nl, _ = as_blc(x).shape
    return _head_outputs(x, nb, nl, k, m, _POOL_CODE[pooling], cosine)


@torch.library.custom_op("torch_ppl::prototype_logits_bwd", mutates_args=())
def _bwd_op(grad: Tensor, x: Tensor, w_hat: Tensor, scale: Tensor, stat: Tensor, inv: Tensor,
            logits: Optional[Tensor], bias: Optional[Tensor], cosine: bool, pooling: str, need_dx: bool,
            need_dw: bool, need_dscale: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dx in x.dtype, dŴ (K, M, C) fp32, dscale 0-d fp32)``. A gradient that is not asked
    for is not computed: dx and dŴ come back as empty ``(0,)`` tensors, dscale as 0.
    ``logits`` (the forward's output) and ``bias``: what max and mean pooling read for cosine
    similarity and for ``dscale`` (:func:`_needs_logits`), else ``None``."""
    with launch_device(x):
        k, m, c = w_hat.shape
        dx, dw = x.new_empty((0,)), w_hat.new_empty((0,))  # what is not asked for
        dscale = torch.zeros((), dtype=torch.float32, device=x.device)
        x3, g3 = as_blc(x), as_blc(grad)
        nb, nl, _ = x3.shape
        pool = _POOL_CODE[pooling]
        winners = stat if pool == 0 else None
        if x.numel() == 0 or k == 0:
            if need_dx:
                dx = new_rows(x, x.shape[-1], x.dtype).zero_()
            if need_dw:
                dw = torch.zeros_like(w_hat)
            return dx, dw, dscale
        cfg = _Config(x.device, c, k, m, x.dtype, x3.stride(2))
        w_dot = w_hat.to(x.dtype)  # the forward's GEMM operand, so ``s`` is recomputed bit for bit
        common = dict(COSINE=cosine, POOL=pool, PRECISION=cfg.precision, GRAD_PRECISION=cfg.grad_precision,
                      GRAD_DTYPE=cfg.grad_dtype, UPCAST_DOT=cfg.upcast)
        key = _autotune.problem_key(x3, k, m, cosine, pool, bias is not None, need_dx, need_dscale)

        def new_dx():
            dx = new_rows(x, x.shape[-1], x.dtype) if need_dx else x.new_empty((0,))
            return dx, as_blc(dx) if need_dx else None

        def run_slice(tiles):
            # max / mean pooling: dx a channel slice at a time, R from the logits (no similarity)
            dx, dx3 = new_dx()
            n_blocks = nb * triton.cdiv(nl, tiles["BLOCK_N"])
            partial = torch.empty((n_blocks,), dtype=torch.float32, device=x.device) if need_dscale else None
            o3 = as_blc(logits) if (cosine or need_dscale) else None
            # bfloat16 and float32 features: the forward's Ŵ; float16: fp32 Ŵ (fp32 ds operands)
            w_grad = w_hat if x.dtype == torch.float16 else w_dot
            _logits_bwd_dx_slice_kernel[(n_blocks,)](
                x3, inv if cosine else None, w_grad, scale, g3, winners, o3, bias, dx3, partial,
                nl, c, k, m,
                *x3.stride(), *g3.stride(), *(o3.stride() if o3 is not None else (0, 0, 0)),
                *(dx3.stride() if need_dx else (0, 0, 0)),
                COSINE=cosine, POOL=pool, HAS_BIAS=bias is not None, NEED_DX=need_dx, NEED_DSCALE=need_dscale,
                GRAD_DTYPE=cfg.grad_dtype, GRAD_PRECISION=cfg.grad_precision, UPCAST_DOT=cfg.upcast,
                WIDE=needs_wide_offsets(x3, *([dx3] if need_dx else [])), **tiles, **FP_CONTRACTION,
            )
            # sum_n R[n] = scale * sum g * pool_m s
            return dx, partial.sum() / scale if need_dscale else dscale

        def run_recompute(tiles):
            # logsumexp pooling: the similarities are recomputed for its softmax weights
            dx, dx3 = new_dx()
            n_blocks = nb * triton.cdiv(nl, tiles["BLOCK_N"])
            partial = torch.empty((n_blocks,), dtype=torch.float32, device=x.device) if need_dscale else None
            _logits_bwd_dx_kernel[(n_blocks,)](
                x3, w_hat, w_dot, scale, g3, stat, dx3, partial,
                *_NO_PUSH,
                nl, c, k, m, 0, 1.0,
                *x3.stride(), *g3.stride(), *(dx3.stride() if need_dx else (0, 0, 0)), 0, 0, 0, 0,
                # fp32 features: w_dot is w_hat itself
                NEED_DX=need_dx, NEED_DSCALE=need_dscale, GRAD_FROM_WD=x.dtype != torch.float16,
                PUSH=False, NEAREST=False, WIDE=needs_wide_offsets(x3, *([dx3] if need_dx else [])),
                BLOCK_K=cfg.block_k, BLOCK_C=max(32, cfg.block_c), S_CHUNK=cfg.dx_s_chunk,
                RELOAD_X=cfg.reload_x, OPAQUE=on_gpu(x.device), **common, **tiles, **FP_CONTRACTION,
            )
            return dx, partial.sum() if need_dscale else dscale

        if pool != 1 and (need_dx or need_dscale):
            tiles = dict(BLOCK_N=cfg.slice_block_n, BLOCK_K=cfg.slice_block_k, BLOCK_C=cfg.slice_block_c,
                         num_warps=cfg.slice_num_warps, num_stages=cfg.slice_stages, maxnreg=cfg.maxnreg)
            dx, dscale = _autotune.tuned("prototype_logits.bwd_dx_slice", key, tiles, run_slice, x.device)
        elif need_dx or need_dscale:
            tiles = dict(BLOCK_N=cfg.recompute_block_n, BLOCK_P=cfg.dx_block_p,
                         num_warps=cfg.bwd_num_warps, num_stages=cfg.recompute_stages, maxnreg=cfg.maxnreg)
            dx, dscale = _autotune.tuned("prototype_logits.bwd_dx", key, tiles, run_recompute, x.device)

        if need_dw:
            deterministic = torch.are_deterministic_algorithms_enabled()
            if pool == 1:
                # logsumexp: ds = scale g exp(s - pooled) needs the similarities, recomputed over all
                # channels per flat prototype tile by the joint kernel without the push
                dw = _autotune.tuned(
                    "prototype_logits.bwd_dw_joint", key, _joint_dw_config(x.device, c, x.dtype, x3.stride(2)),
                    lambda tiles: _joint_dw(tiles, x3, w_dot, w_hat, scale, g3, stat, cfg, cosine, pool,
                                            deterministic),
                    x.device)
            else:
                def run_dw(tiles):
                    p_tiles, c_slices = triton.cdiv(k * m, tiles["BLOCK_P"]), triton.cdiv(c, tiles["BLOCK_C"])
                    pixel_tiles = nb * triton.cdiv(nl, tiles["BLOCK_N"])
                    grid = (p_tiles, c_slices, pixel_splits(x.device, p_tiles * c_slices, pixel_tiles))
                    out = w_hat.new_empty((grid[2], k, m, c)) if deterministic else torch.zeros_like(w_hat)
                    _logits_bwd_dw_kernel[grid](
                        x3, inv if cosine else None, scale, g3, winners, out,
                        nb, nl, c, k, m,
                        *x3.stride(), *g3.stride(),
                        COSINE=cosine, POOL=pool, GRAD_DTYPE=cfg.grad_dtype, GRAD_PRECISION=cfg.grad_precision,
                        UPCAST_DOT=cfg.upcast, DETERMINISTIC=deterministic,
                        OPAQUE_X=opaque_stride(x.device, x3.stride(2), c), **tiles, **FP_CONTRACTION,
                    )
                    return out.sum(0) if deterministic else out  # the splits' partials in a fixed order

                tiles = dict(BLOCK_N=cfg.dw_block_n, BLOCK_P=cfg.dw_block_p, BLOCK_C=cfg.dw_block_c,
                             num_warps=cfg.dw_num_warps, num_stages=cfg.dw_stages, maxnreg=cfg.dw_maxnreg)
                dw = _autotune.tuned("prototype_logits.bwd_dw", key, tiles, run_dw, x.device)
        return dx, dw, dscale


@_bwd_op.register_fake
def _bwd_fake(grad, x, w_hat, scale, stat, inv, logits, bias, cosine, pooling, need_dx, need_dw, need_dscale):
    dx = new_rows(x, x.shape[-1], x.dtype) if need_dx else x.new_empty((0,))
    dw = torch.empty_like(w_hat) if need_dw else w_hat.new_empty((0,))
    return dx, dw, x.new_empty((), dtype=torch.float32)


def _needs_logits(cosine: bool, pooling: str, need_scale_grad: bool) -> bool:
    """Whether the backward reads the forward's logits: max and mean pooling form the
    normalisation backward's ``<x̂, du>`` and ``dscale`` from them (``sum_k g (logits - bias)``)
    instead of recomputing the similarities."""
    return pooling != "logsumexp" and (cosine or need_scale_grad)


def _setup_context(ctx, inputs, output):
    x, w_hat, scale, bias, cosine, pooling = inputs
    logits, stat, inv = output
    # the logits only where the backward reads them: a dot-product head (the 1x1 conv it
    # replaces) keeps nothing of its output
    keep = _needs_logits(cosine, pooling, scale.requires_grad)
    ctx.save_for_backward(x, w_hat, scale, stat, inv, logits if keep else None, bias if keep else None)
    ctx.mark_non_differentiable(stat, inv)
    ctx.cosine, ctx.pooling = cosine, pooling
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad, _grad_stat, _grad_inv):
    x, w_hat, scale, stat, inv, logits, bias = ctx.saved_tensors
    need_dx, need_dw, need_dscale, need_dbias = ctx.needs_input_grad[:4]
    dx = dw = dscale = dbias = None
    if need_dx or need_dw or need_dscale:
        dx, dw, dscale = torch.ops.torch_ppl.prototype_logits_bwd(
            grad, x, w_hat, scale, stat, inv, logits, bias, ctx.cosine, ctx.pooling,
            bool(need_dx), bool(need_dw), bool(need_dscale))
        dx = dx if need_dx else None
        dw = dw if need_dw else None
        dscale = dscale.to(scale.dtype) if need_dscale else None
    if need_dbias:
        dbias = grad.sum(dim=tuple(range(grad.dim() - 1)), dtype=torch.float32).to(ctx.bias_dtype)
    return dx, dw, dscale, dbias, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ============================================================================ public function
def prototype_logits(
    x: Tensor,
    prototypes: Tensor,
    scale: Union[Tensor, float],
    bias: Optional[Tensor],
    *,
    similarity: str,
    pooling: str,
) -> Tensor:
    """Fused :func:`torch_ppl.reference.prototype_logits`: ``(..., K)`` float32 logits.

    Args:
        x: ``(..., C)`` rows, any strides (a channel-last view of NCHW, channels_last, crops):
            up to four dimensions they reach the kernels as views, never copied.
        prototypes: ``(K, M, C)``.
        scale: float or 0-d tensor (may require grad).
        bias: ``(K,)`` or ``None``.

    Raises:
        TypeError: an input is float64 (or another non-supported dtype); the fused path takes
            float32 / bfloat16 / float16, ``backend="reference"`` takes float64.
    """
    check_dtypes("prototype_logits", x=x, prototypes=prototypes, bias=bias,
                 scale=scale if isinstance(scale, Tensor) else None)
    with torch.autocast(x.device.type, enabled=False):
        w_hat, scale_t = prototype_operands(prototypes, scale, similarity, x.device)
        logits, _, _ = torch.ops.torch_ppl.prototype_logits_fwd(
            x, w_hat, scale_t, bias, similarity == "cosine", pooling)
    return logits


def prototype_operands(prototypes: Tensor, scale: Union[Tensor, float], similarity: str,
                       device: torch.device) -> Tuple[Tensor, Tensor]:
    """What the kernels take of the prototypes and the scale (call with autocast off): ``Ŵ``
    ``(K, M, C)`` float32, normalised for cosine, and the scale as a 0-d float32 tensor. Plain
    PyTorch on ``P x C`` (tiny), so autograd carries ``dŴ`` back through the normalisation and
    ``dscale`` to a scale tensor."""
    w = prototypes.to(torch.float32)
    w_hat = (F.normalize(w, p=2.0, dim=-1, eps=EPS) if similarity == "cosine" else w).contiguous()
    if isinstance(scale, Tensor):
        return w_hat, scale.reshape(()).to(device)  # a no-op for the head's own scale
    return w_hat, torch.full((), float(scale), dtype=torch.float32, device=device)
