"""Fused multi-prototype contrastive loss (the push), forward and backward, in Triton.

The math is :func:`torch_ppl.reference.contrastive_loss`. With ``z = s / tau`` over all
``P = K * M`` prototypes and ``y`` the pixel's class:

* ``positives="all"``:     ``l = logsumexp_p z_p - logsumexp_{p in y} z_p``
* ``positives="nearest"``: ``l = logsumexp_p z_p - z_{p*}``, ``p* = argmax_{p in y} z_p`` (first on ties)

and ``l = 0`` (with zero gradient) where ``y == ignore_index``.

How it runs (see ``docs/kernel-contrastive.md``):

* Forward, one program per tile of ``BLOCK_N`` pixels: loop over prototype tiles of
  ``BLOCK_P``, each a GEMM over channel tiles of ``BLOCK_C``; the squared norm of the pixel rows
  is summed in the same channel loop (cosine), the tile of ``z`` is folded into an online
  logsumexp over all prototypes and into the positive term (online logsumexp over the class's
  prototypes, or a running first-index max). Only per-pixel statistics are written:
  ``lse`` (all), ``pos`` (positive logsumexp, or ``z`` at ``p*``) and ``best`` (``p*``).
* Backward, two kernels that recompute ``(BLOCK_N, BLOCK_P)`` tiles of ``z`` from ``x`` and
  the saved statistics: ``_contrastive_bwd_dx_kernel`` (one program per pixel tile, all
  channels on chip, ``dx`` written once in the features' dtype) and
  ``_contrastive_bwd_dw_kernel`` (one program per prototype tile and pixel split, its ``dW``
  tile flushed once: a relaxed atomic, or a partial summed in a fixed order in deterministic
  mode).
* No ``N x P`` tensor exists at any point.
* Both passes are ``torch.library`` custom ops (``torch_ppl::contrastive_loss_fwd`` / ``_bwd``)
  with fake implementations and ``register_autograd``, so ``torch.compile`` traces them whole.

The prototype-side normalisation (``W -> W / max(||W||, eps)``, a ``P x C`` tensor) is plain
PyTorch outside the op, so autograd carries ``dW_hat`` back through it.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import _autotune
from ._common import (EPS, EPS_C, FP_CONTRACTION, TRITON_VERSION, as_blc, capability, check_dtypes, dot_operand,
                      has_tcgen05, has_wgmma, large_shared, launch_device, next_pow2, on_gpu, opaque_stride,
                      per_iteration, pixel_splits, fp32_precision, upcast_dot, warpgroup_mma)

__all__ = ["contrastive_loss"]

# Running maxima start here instead of at -inf: exp(NEG - NEG) = 1 keeps a tile with no
# positive prototype NaN-free, while masked entries (-inf) still contribute exp(-inf) = 0.
# Any finite z is far above it (cosine: |z| <= 1 / tau).
NEG = tl.constexpr(-1.0e30)  # a constexpr: a plain float global fails the GPU compiler

# Tests set this to force small tiles so that every multi-tile path runs on tiny shapes.
_FORCE_BLOCKS = None  # Optional[Tuple[int, int, int]]: (BLOCK_N, BLOCK_P, BLOCK_C); the backward keeps all C


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _z_tile(
    x_rows, valid, w_ptr, offs_p, p_in, C, stride_xc, stride_wp, stride_wc, inv_tau,
    COSINE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One ``(BLOCK_N, BLOCK_P)`` tile of ``z = s / tau`` and the rows' ``1 / max(||x||, eps)``.

    ``acc = x @ W_hat^T`` over channel tiles (fp32 accumulation); for cosine the squared row
    norm is summed in the same loop and ``z = acc * rnorm / tau`` (= ``<x_hat, W_hat> / tau``).
    Rows that are not valid pixels read as zeros, so their tile is finite whatever ``x`` holds.
    Returns ``(z, acc, rnorm, clamped)``; ``clamped`` marks rows with ``||x|| <= eps``.
    """
    acc = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
    sumsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_in = offs_c < C
        x = tl.load(x_rows[:, None] + offs_c[None, :].to(tl.int64) * stride_xc,
                    mask=valid[:, None] & c_in[None, :], other=0.0)
        w = tl.load(w_ptr + offs_p[:, None].to(tl.int64) * stride_wp + offs_c[None, :].to(tl.int64) * stride_wc,
                    mask=p_in[:, None] & c_in[None, :], other=0.0)
        if COSINE:
            xf = x.to(tl.float32)
            sumsq += tl.sum(xf * xf, axis=1)
        acc = tl.dot(dot_operand(x, DOT_DTYPE, UPCAST_DOT), tl.trans(dot_operand(w, DOT_DTYPE, UPCAST_DOT)), acc,
                     input_precision=INPUT_PRECISION)
    if COSINE:
        norm = tl.sqrt(sumsq)
        rnorm = 1.0 / tl.maximum(norm, EPS_C)
        clamped = norm <= EPS_C
    else:
        rnorm = tl.full((BLOCK_N,), 1.0, tl.float32)
        clamped = tl.full((BLOCK_N,), 0, tl.int1)
    z = acc * (rnorm * inv_tau)[:, None]
    z = tl.where(p_in[None, :], z, float("-inf"))
    return z, acc, rnorm, clamped


@triton.jit
def _label_tile(tile, L, y_ptr, ignore_index, stride_yb, stride_yl, BLOCK_N: tl.constexpr):
    """Pixel tile ``tile`` of ``B * cdiv(L, BLOCK_N)`` (a tile never straddles two images, so
    the pixel stride stays visible to the compiler): its image, rows (int64), which rows exist,
    which are valid pixels, and their labels, -1 where ignored (no positive prototype)."""
    num_lblocks = tl.cdiv(L, BLOCK_N)
    b = (tile // num_lblocks).to(tl.int64)
    offs_n = (tile % num_lblocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = offs_n < L
    rows64 = offs_n.to(tl.int64)
    y = tl.load(y_ptr + b * stride_yb + rows64 * stride_yl, mask=row_in, other=ignore_index).to(tl.int64)
    valid = row_in & (y != ignore_index)
    return b, rows64, row_in, valid, tl.where(valid, y, -1)


@triton.jit
def _contrastive_fwd_kernel(
    x_ptr, w_ptr, y_ptr, loss_ptr, lse_ptr, pos_ptr, best_ptr,
    L, C, P, M, ignore_index, inv_tau,
    stride_xb, stride_xl, stride_xc, stride_wp, stride_wc, stride_yb, stride_yl,
    COSINE: tl.constexpr, NEAREST: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b, rows64, row_in, valid, y = _label_tile(tl.program_id(0), L, y_ptr, ignore_index, stride_yb, stride_yl,
                                              BLOCK_N)
    x_rows = x_ptr + b * stride_xb + rows64 * stride_xl

    m_all = tl.full((BLOCK_N,), NEG, tl.float32)  # running max of z over all prototypes
    l_all = tl.zeros((BLOCK_N,), dtype=tl.float32)  # running sum of exp(z - m_all)
    m_pos = tl.full((BLOCK_N,), NEG, tl.float32)  # the same over the positive class ("all"),
    l_pos = tl.zeros((BLOCK_N,), dtype=tl.float32)  # or the best positive z ("nearest")
    best = tl.full((BLOCK_N,), -1, tl.int32)  # p*, the first index reaching m_pos ("nearest")
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_in = offs_p < P
        z, acc, rnorm, clamped = _z_tile(
            x_rows, valid, w_ptr, offs_p, p_in, C, stride_xc, stride_wp, stride_wc, inv_tau,
            COSINE, DOT_DTYPE, INPUT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_P, BLOCK_C)
        # online logsumexp over all prototypes (masked columns are -inf: exp(-inf) = 0)
        m_new = tl.maximum(m_all, tl.max(z, axis=1))
        l_all = l_all * tl.exp(m_all - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_all = m_new
        # positive prototypes of the pixel's class: p // M == y
        is_pos = ((offs_p // M)[None, :] == y[:, None]) & p_in[None, :]
        z_pos = tl.where(is_pos, z, float("-inf"))
        tile_max = tl.max(z_pos, axis=1)
        if NEAREST:
            # first index of the maximum inside the tile; a later tile wins only if strictly greater
            tile_arg = tl.min(tl.where(z_pos == tile_max[:, None], offs_p[None, :], P), axis=1)
            better = tile_max > m_pos
            best = tl.where(better, tile_arg, best)
            m_pos = tl.where(better, tile_max, m_pos)
        else:
            m_new = tl.maximum(m_pos, tile_max)
            l_pos = l_pos * tl.exp(m_pos - m_new) + tl.sum(tl.exp(z_pos - m_new[:, None]), axis=1)
            m_pos = m_new

    lse = m_all + tl.log(l_all)
    if NEAREST:
        pos = m_pos
    else:
        # an ignored pixel has no positive (l_pos = 0): keep pos finite (NEG), not log(0) = -inf
        pos = m_pos + tl.log(tl.where(valid, l_pos, 1.0))
    # where, not a multiplication: an ignored pixel's loss is exactly 0 whatever its features
    loss = tl.where(valid, lse - pos, 0.0)
    out = b * L + rows64
    tl.store(loss_ptr + out, loss, mask=row_in)
    tl.store(lse_ptr + out, lse, mask=row_in)
    tl.store(pos_ptr + out, pos, mask=row_in)
    tl.store(best_ptr + out, best, mask=row_in)


# Backward gradient math, per valid pixel n with upstream gradient g_n (0 at ignored pixels):
#   dl/dz_p = softmax_p(z) - q_p,  softmax_p = exp(z_p - lse)
#     q_p = exp(z_p - pos) for p in class y ("all"),  q_p = [p == p*] ("nearest")
#   ds_p = g_n / tau * dz_p                                     (z = s / tau, dz = dl/dz)
# cosine (x_hat = x * rnorm, rnorm = 1 / max(||x||, eps), acc = x . W_hat, s = rnorm * acc):
#   dx_hat = sum_p ds_p W_hat_p
#   dx     = rnorm * (dx_hat - (x_hat . dx_hat) x_hat)   if ||x|| > eps, else rnorm * dx_hat
#          = row_scale * (sum_p dz_p W_hat_p) - row_scale * rnorm^2 * (sum_p dz_p acc_p) * x
#     with row_scale = g / tau * rnorm, since x_hat . dx_hat = rnorm * sum_p ds_p acc_p
#   dW_hat_p = sum_n ds_np x_hat_n = sum_n dz_np (row_scale_n x_n)
# dot: rnorm = 1 and no projection term.
# dz lies in [-1, 1]: it is the tensor-core operand; the per-pixel factor row_scale is applied
# in fp32 outside the GEMMs (no fp16 overflow).
@triton.jit
def _pixel_tile(tile, L, y_ptr, g_ptr, lse_ptr, pos_ptr, best_ptr, ignore_index, inv_tau,
                stride_yb, stride_yl, stride_gb, stride_gl, BLOCK_N: tl.constexpr):
    """:func:`_label_tile`, with the forward's saved statistics and ``g / tau`` (exactly 0 at
    ignored pixels, whatever the upstream gradient)."""
    b, rows64, row_in, valid, y = _label_tile(tile, L, y_ptr, ignore_index, stride_yb, stride_yl, BLOCK_N)
    stat = b * L + rows64
    lse = tl.load(lse_ptr + stat, mask=valid, other=0.0)
    pos = tl.load(pos_ptr + stat, mask=valid, other=0.0)
    best = tl.load(best_ptr + stat, mask=valid, other=-1)
    g = tl.load(g_ptr + b * stride_gb + rows64 * stride_gl, mask=valid, other=0.0).to(tl.float32)
    g_tau = tl.where(valid, g * inv_tau, 0.0)
    return b, rows64, row_in, valid, y, lse, pos, best, g_tau


@triton.jit
def _rows_full(x_ptr, b, rows64, valid, offs_c, c_in, stride_xb, stride_xl, stride_xc, COSINE: tl.constexpr):
    """All ``C`` channels of the tile's rows (native dtype, zero at invalid pixels) and, for
    cosine, ``rnorm = 1 / max(||x||, eps)`` and which rows are clamped."""
    x = tl.load(x_ptr + b * stride_xb + rows64[:, None] * stride_xl + offs_c[None, :].to(tl.int64) * stride_xc,
                mask=valid[:, None] & c_in[None, :], other=0.0)
    if COSINE:
        xf = x.to(tl.float32)
        norm = tl.sqrt(tl.sum(xf * xf, axis=1))
        rnorm = 1.0 / tl.maximum(norm, EPS_C)
        clamped = norm <= EPS_C
    else:
        rnorm = tl.full((x.shape[0],), 1.0, tl.float32)
        clamped = tl.full((x.shape[0],), 0, tl.int1)
    return x, rnorm, clamped


@triton.jit
def _dz_tile(acc, rnorm, inv_tau, offs_p, p_in, valid, y, lse, pos, best, M, NEAREST: tl.constexpr):
    """``dl/dz`` of one ``(BLOCK_N, BLOCK_P)`` tile from the recomputed ``acc = x . W_hat`` and
    the forward's statistics; 0 at ignored pixels and padding prototypes."""
    z = acc * (rnorm * inv_tau)[:, None]
    z = tl.where(p_in[None, :], z, float("-inf"))
    prob = tl.exp(z - lse[:, None])  # softmax over all P (masked columns: exp(-inf) = 0)
    if NEAREST:
        q = tl.where(offs_p[None, :] == best[:, None], 1.0, 0.0)
    else:
        is_pos = ((offs_p // M)[None, :] == y[:, None]) & p_in[None, :]
        q = tl.exp(tl.where(is_pos, z - pos[:, None], float("-inf")))
    return tl.where(valid[:, None] & p_in[None, :], prob - q, 0.0)


@triton.jit
def _x_half(x_rows, valid, offs_h, C, stride_xc, HALF_INDEX: tl.constexpr, HALF: tl.constexpr):
    """Channels ``[HALF_INDEX * HALF, (HALF_INDEX + 1) * HALF)`` of the tile's rows (native
    dtype, zero at invalid pixels)."""
    cols = HALF_INDEX * HALF + offs_h
    return tl.load(x_rows[:, None] + cols[None, :].to(tl.int64) * stride_xc,
                   mask=valid[:, None] & (cols < C)[None, :], other=0.0)


@triton.jit
def _w_half(w_ptr, offs_p, p_in, C, stride_wp, stride_wc, offs_h, HALF_INDEX: tl.constexpr, HALF: tl.constexpr):
    """The same channels of the prototype tile ``offs_p`` (zero past ``P`` and ``C``)."""
    cols = HALF_INDEX * HALF + offs_h
    return tl.load(w_ptr + offs_p[:, None].to(tl.int64) * stride_wp + cols[None, :].to(tl.int64) * stride_wc,
                   mask=p_in[:, None] & (cols < C)[None, :], other=0.0)


@triton.jit
def _store_dx_half(dx_ptr, dx_rows, row_in, dxh, row_scale, radial, x_rows, valid, offs_h, C, stride_xc,
                   stride_dxc, COSINE: tl.constexpr, HALF_INDEX: tl.constexpr, HALF: tl.constexpr):
    """One channel half of ``dx = row_scale * dx_hat_sum - radial * x``, with that half of ``x``
    read again (from L2: the tile was read moments before) rather than held across the
    prototype loop."""
    dx = dxh * row_scale[:, None]
    if COSINE:
        dx -= radial[:, None] * _x_half(x_rows, valid, offs_h, C, stride_xc, HALF_INDEX, HALF).to(tl.float32)
    cols = HALF_INDEX * HALF + offs_h
    tl.store(dx_rows[:, None] + cols[None, :].to(tl.int64) * stride_dxc, dx.to(dx_ptr.dtype.element_ty),
             mask=row_in[:, None] & (cols < C)[None, :])


@triton.jit
def _contrastive_bwd_dx_kernel(
    g_ptr, x_ptr, w_ptr, y_ptr, lse_ptr, pos_ptr, best_ptr, dx_ptr,
    L, C, P, M, ignore_index, inv_tau,
    stride_gb, stride_gl, stride_xb, stride_xl, stride_xc, stride_wp, stride_wc, stride_yb, stride_yl,
    stride_dxb, stride_dxl, stride_dxc,
    COSINE: tl.constexpr, NEAREST: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    Z_CHUNK: tl.constexpr, HALVES: tl.constexpr, OPAQUE: tl.constexpr,
):
    # One program per pixel tile, all C channels on chip (BLOCK_C >= C): the x tile is read
    # once, dx is accumulated over the prototype tiles in fp32 and written once, in x's dtype.
    # Z_CHUNK > 0 (fp32 features, whose GEMMs run on the CUDA cores with operand registers for
    # the whole reduction): the z GEMM walks the channels in chunks of Z_CHUNK read from memory
    # (_z_tile, as the forward), the rows on chip serve the dx GEMM and the projection only.
    # HALVES (64-pixel tiles on sm_90, _bwd_configs): x, W_hat and the dx accumulator as two
    # channel halves, and x read again, a half at a time, for the normalisation backward at
    # the end; OPAQUE keeps the compiler from merging that read with the first.
    b, rows64, row_in, valid, y, lse, pos, best, g_tau = _pixel_tile(
        tl.program_id(0), L, y_ptr, g_ptr, lse_ptr, pos_ptr, best_ptr, ignore_index, inv_tau,
        stride_yb, stride_yl, stride_gb, stride_gl, BLOCK_N)
    x_rows = x_ptr + b * stride_xb + rows64 * stride_xl
    if HALVES:
        HALF: tl.constexpr = BLOCK_C // 2
        offs_h = tl.arange(0, HALF)
        x0 = _x_half(x_rows, valid, offs_h, C, stride_xc, 0, HALF)
        x1 = _x_half(x_rows, valid, offs_h, C, stride_xc, 1, HALF)
        if COSINE:
            x0f, x1f = x0.to(tl.float32), x1.to(tl.float32)
            norm = tl.sqrt(tl.sum(x0f * x0f, axis=1) + tl.sum(x1f * x1f, axis=1))
            rnorm = 1.0 / tl.maximum(norm, EPS_C)
            clamped = norm <= EPS_C
        else:
            rnorm = tl.full((BLOCK_N,), 1.0, tl.float32)
            clamped = tl.full((BLOCK_N,), 0, tl.int1)
        x0, x1 = dot_operand(x0, DOT_DTYPE, UPCAST_DOT), dot_operand(x1, DOT_DTYPE, UPCAST_DOT)
        dxh0 = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)  # sum_p dz_p W_hat_p, channel halves
        dxh1 = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
        proj = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum_p dz_p acc_p
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_in = offs_p < P
            w0 = dot_operand(_w_half(w_ptr, offs_p, p_in, C, stride_wp, stride_wc, offs_h, 0, HALF),
                             DOT_DTYPE, UPCAST_DOT)
            w1 = dot_operand(_w_half(w_ptr, offs_p, p_in, C, stride_wp, stride_wc, offs_h, 1, HALF),
                             DOT_DTYPE, UPCAST_DOT)
            acc = tl.dot(x0, tl.trans(w0), input_precision=INPUT_PRECISION)
            acc = tl.dot(x1, tl.trans(w1), acc, input_precision=INPUT_PRECISION)
            dz = _dz_tile(acc, rnorm, inv_tau, offs_p, p_in, valid, y, lse, pos, best, M, NEAREST)
            dz_op = dot_operand(dz, DOT_DTYPE, UPCAST_DOT)
            dxh0 = tl.dot(dz_op, w0, dxh0, input_precision=INPUT_PRECISION)
            dxh1 = tl.dot(dz_op, w1, dxh1, input_precision=INPUT_PRECISION)
            if COSINE:
                proj += tl.sum(dz * acc, axis=1)
        row_scale = g_tau * rnorm
        radial = tl.where(clamped, 0.0, row_scale * rnorm * rnorm * proj)
        # x again: strides and mask made opaque, so that nothing of the first read (its
        # pointers, its mask, its fp32 copy) is held across the loop
        x_again = x_ptr + b * stride_xb + rows64 * per_iteration(stride_xl, OPAQUE)
        v_again = valid & (per_iteration(1, OPAQUE) != 0)
        sxc = per_iteration(stride_xc, OPAQUE)
        dx_rows = dx_ptr + b * stride_dxb + rows64 * stride_dxl
        _store_dx_half(dx_ptr, dx_rows, row_in, dxh0, row_scale, radial, x_again, v_again, offs_h, C, sxc,
                       stride_dxc, COSINE, 0, HALF)
        _store_dx_half(dx_ptr, dx_rows, row_in, dxh1, row_scale, radial, x_again, v_again, offs_h, C, sxc,
                       stride_dxc, COSINE, 1, HALF)
    else:
        offs_c = tl.arange(0, BLOCK_C)
        c_in = offs_c < C
        x, rnorm, clamped = _rows_full(x_ptr, b, rows64, valid, offs_c, c_in, stride_xb, stride_xl, stride_xc,
                                       COSINE)
        x_op = dot_operand(x, DOT_DTYPE, UPCAST_DOT)
        dxh = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)  # sum_p dz_p W_hat_p
        proj = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum_p dz_p acc_p
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_in = offs_p < P
            w = tl.load(w_ptr + offs_p[:, None].to(tl.int64) * stride_wp + offs_c[None, :].to(tl.int64) * stride_wc,
                        mask=p_in[:, None] & c_in[None, :], other=0.0)
            w_op = dot_operand(w, DOT_DTYPE, UPCAST_DOT)
            if Z_CHUNK == 0:
                acc = tl.dot(x_op, tl.trans(w_op), input_precision=INPUT_PRECISION)
            else:
                _, acc, _, _ = _z_tile(x_rows, valid, w_ptr, offs_p, p_in, C, stride_xc, stride_wp, stride_wc,
                                       inv_tau, False, DOT_DTYPE, INPUT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_P,
                                       Z_CHUNK)
            dz = _dz_tile(acc, rnorm, inv_tau, offs_p, p_in, valid, y, lse, pos, best, M, NEAREST)
            dxh = tl.dot(dot_operand(dz, DOT_DTYPE, UPCAST_DOT), w_op, dxh, input_precision=INPUT_PRECISION)
            if COSINE:
                proj += tl.sum(dz * acc, axis=1)
        row_scale = g_tau * rnorm
        dx = dxh * row_scale[:, None]
        if COSINE:
            radial = tl.where(clamped, 0.0, row_scale * rnorm * rnorm * proj)
            dx -= radial[:, None] * x.to(tl.float32)
        tl.store(dx_ptr + b * stride_dxb + rows64[:, None] * stride_dxl + offs_c[None, :].to(tl.int64) * stride_dxc,
                 dx.to(dx_ptr.dtype.element_ty), mask=row_in[:, None] & c_in[None, :])


@triton.jit
def _contrastive_bwd_dw_kernel(
    g_ptr, x_ptr, w_ptr, y_ptr, lse_ptr, pos_ptr, best_ptr, dw_ptr,
    B, L, C, P, M, ignore_index, inv_tau,
    stride_gb, stride_gl, stride_xb, stride_xl, stride_xc, stride_wp, stride_wc, stride_yb, stride_yl,
    COSINE: tl.constexpr, NEAREST: tl.constexpr, DOT_DTYPE: tl.constexpr, DW_DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, Z_CHUNK: tl.constexpr,
    OPAQUE_X: tl.constexpr, S_TRANSPOSED: tl.constexpr = False,
):
    # Program (prototype tile, split) owns BLOCK_P prototypes, all C channels, and the pixel
    # tiles split, split + SPLITS, ...: its dW_hat tile stays on chip and is flushed once, by
    # a relaxed atomic add, or, in deterministic mode, into its own slice of a partial buffer
    # that the host sums in a fixed order. Z_CHUNK > 0 (_bwd_configs): the z GEMM walks the
    # channels in chunks of Z_CHUNK read from memory (_z_tile, as the forward) instead of one
    # GEMM over the prototype tile and the rows held on chip; the rows are loaded whole for the
    # dW GEMM only. S_TRANSPOSED: the z GEMM as (Ŵ xᵀ)ᵀ, the prototypes its rows, so that a
    # 128-prototype tile is a wgmma whose Ŵ operand stays in shared memory (_bwd_configs).
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_in = offs_p < P
    offs_c = tl.arange(0, BLOCK_C)
    c_in = offs_c < C
    if Z_CHUNK == 0:
        w = tl.load(w_ptr + offs_p[:, None].to(tl.int64) * stride_wp + offs_c[None, :].to(tl.int64) * stride_wc,
                    mask=p_in[:, None] & c_in[None, :], other=0.0)
        w_op = dot_operand(w, DOT_DTYPE, UPCAST_DOT)
    dw = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for tile in range(split, B * tl.cdiv(L, BLOCK_N), splits):
        b, rows64, row_in, valid, y, lse, pos, best, g_tau = _pixel_tile(
            tile, L, y_ptr, g_ptr, lse_ptr, pos_ptr, best_ptr, ignore_index, inv_tau,
            stride_yb, stride_yl, stride_gb, stride_gl, BLOCK_N)
        # an unaligned channel stride: the offsets recomputed per tile, not held (opaque_stride)
        sxc = per_iteration(stride_xc, OPAQUE_X)
        if Z_CHUNK == 0:
            x, rnorm, clamped = _rows_full(x_ptr, b, rows64, valid, offs_c, c_in, stride_xb, stride_xl, sxc, COSINE)
            if S_TRANSPOSED:
                acc = tl.trans(tl.dot(w_op, tl.trans(dot_operand(x, DOT_DTYPE, UPCAST_DOT)),
                                      input_precision=INPUT_PRECISION))
            else:
                acc = tl.dot(dot_operand(x, DOT_DTYPE, UPCAST_DOT), tl.trans(w_op), input_precision=INPUT_PRECISION)
        else:
            _, acc, rnorm, _ = _z_tile(x_ptr + b * stride_xb + rows64 * stride_xl, valid, w_ptr, offs_p, p_in, C,
                                       sxc, stride_wp, stride_wc, inv_tau, COSINE, DOT_DTYPE, INPUT_PRECISION,
                                       UPCAST_DOT, BLOCK_N, BLOCK_P, Z_CHUNK)
            x = tl.load(x_ptr + b * stride_xb + rows64[:, None] * stride_xl
                        + offs_c[None, :].to(tl.int64) * sxc, mask=valid[:, None] & c_in[None, :], other=0.0)
        dz = _dz_tile(acc, rnorm, inv_tau, offs_p, p_in, valid, y, lse, pos, best, M, NEAREST)
        # dW_hat += (dz * row_scale)^T x: the per-pixel factor goes on the small dz tile, so the
        # x tile is the GEMM operand as loaded (row_scale = g / tau * rnorm; the fp16 case,
        # whose range it may pass, multiplies in fp32, see _dot_dtypes)
        dzs = dot_operand(dz * (g_tau * rnorm)[:, None], DW_DOT_DTYPE, UPCAST_DOT)
        dw = tl.dot(tl.trans(dzs), dot_operand(x, DW_DOT_DTYPE, UPCAST_DOT), dw, input_precision=INPUT_PRECISION)
    offs = offs_p[:, None].to(tl.int64) * C + offs_c[None, :].to(tl.int64)
    mask = p_in[:, None] & c_in[None, :]
    if DETERMINISTIC:
        tl.store(dw_ptr + split.to(tl.int64) * P * C + offs, dw, mask=mask)
    else:
        # relaxed: only the sum matters, not its order against other memory
        tl.atomic_add(dw_ptr + offs, dw, mask=mask, sem="relaxed")


# ----------------------------------------------------------------------------- host side
_DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _input_precision(x_dtype: torch.dtype, channels: int) -> str:
    """``tl.dot`` precision of the GEMMs with fp32 operands: those of float32 features follow
    PyTorch's float32 matmul setting (fp32_precision) up to 512 channels; wider, where the ``dx``
    kernel holds 1024 fp32 channels per pixel, its TF32 operands spilled 1.1 KB per thread at
    720 channels on sm_90 (exact: 184 bytes), so the op stays exact (forward and backward alike:
    the backward recomputes the forward's ``z`` bit for bit). float16 features' dW GEMM (fp32
    operands, see _dot_dtypes) stays exact."""
    return fp32_precision() if x_dtype == torch.float32 and channels <= 512 else "ieee"


def _dot_dtypes(x_dtype: torch.dtype):
    """GEMM operand dtypes: the features' own 16-bit type (fp32 accumulation), else fp32 in IEEE
    precision. The dW GEMM multiplies by ``g / tau * x_hat``, which may pass fp16's range, so
    fp16 features use fp32 there (bf16 has fp32's range)."""
    dot = _DOT_DTYPES[x_dtype]
    dw_dot = tl.bfloat16 if x_dtype == torch.bfloat16 else tl.float32
    return dot, dw_dot


def _blocks(device: torch.device, L: int, P: int, C: int, itemsize: int) -> Tuple[int, int, int]:
    """Forward tiles ``(BLOCK_N, BLOCK_P, BLOCK_C)``; the channel axis is looped over."""
    if _FORCE_BLOCKS is not None:
        return _FORCE_BLOCKS
    if on_gpu(device):
        # Every program streams all of Ŵ, so the pixel tile sets the reads from L2: 128 pixels
        # (two warpgroups, _fwd_options) halve those of 64 (at ade 3.4 GB instead of 6.6; one
        # GEMM per pass over Ŵ needs about 110 pixels to run at the bfloat16 peak from L2,
        # docs/decisions.md). fp32 features multiply on the CUDA cores, whose register tiles
        # are larger: 64^3 tiles spilled 5.6 KB per thread on sm_90
        cap_n, cap_p, cap_c = (128, 64, 64) if itemsize < 4 else (16, 32, 32)
    else:  # the interpreter: few, large tiles (each tile op is one numpy call)
        cap_n, cap_p, cap_c = 128, 128, 128
    return min(cap_n, next_pow2(L)), min(cap_p, next_pow2(P)), min(cap_c, next_pow2(C))


def _fwd_options(device: torch.device, dtype: torch.dtype) -> dict:
    """Launch options of the forward besides Triton's defaults (4 warps, 3 stages): 8 warps for
    16-bit features, whose 128-pixel tiles (:func:`_blocks`) are two warpgroups' wgmma tiles
    (with 4 warps they took 223 registers on sm_90, one warpgroup running both); on sm_80, and
    for fp32 features, a budget of 255 registers (``maxnreg``). Left to itself ptxas held the
    kernel to 168 registers (three blocks per SM) and spilled 8 to 24 bytes per thread on sm_80
    (bf16, fp16 and fp32 at voc, 16-bit at ade; Triton 3.8 also fp32 on sm_90); with the budget
    it takes 185 to 215 (two blocks per SM; modelled time -3 to +3 %, wave quantisation)."""
    if not on_gpu(device):
        return {}
    options = {} if dtype == torch.float32 else dict(num_warps=8)
    if dtype == torch.float32 or not has_wgmma(device):
        options["maxnreg"] = 255
    return options


def _bwd_configs(device: torch.device, L: int, P: int, C: int, dtype: torch.dtype,
                 channel_stride: int = 1) -> Tuple[dict, dict]:
    """Tiles of the two backward kernels ``(dx, dW)``. All channels stay on chip
    (``BLOCK_C = next_pow2(C)``): the dx program reads its x tile once and writes dx once; the
    dW program keeps a ``BLOCK_P x C`` fp32 accumulator. On a GPU, 8 warps and the largest
    tiles that compile without spilling for sm_90 and sm_80 at C = 256 and 512, bf16, fp16 and
    fp32 features (docs/kernels.md). dx takes 64-pixel tiles on sm_90 (wgmma) at up to 256
    channels, in channel halves (``HALVES``); elsewhere, and at 512 channels, where 64 rows
    spilled 48 B to 1.7 KB per thread, 32 or 16 on mma.sync. The dW GEMM (64 or 128 prototype
    rows) lowers to wgmma.

    ``Z_CHUNK`` > 0: the z GEMM walks the channels in chunks of that many, read from memory
    (``_z_tile``, as the forward), instead of one GEMM over the tile held on chip. fp32 features
    take it in both kernels: an fp32 GEMM runs on the CUDA cores, which keep operand registers
    for the whole reduction (all 512 channels spilled 3.3 to 3.4 KB per thread in dW at ade,
    0.3 to 0.5 KB at voc, and 136 to 168 B in dx on sm_80 at ade), and with 32-channel chunks,
    as the forward's, dx one stage and a 255-register budget, nothing spills. On sm_80, bf16 at
    C = 512 takes it in dW (mma.sync keeps the z GEMM's ``x`` operand, all 512 channels, in each
    warp's registers: 120 to 224 B spilled; one stage). The re-read chunks come from L1 or L2;
    the model (``benchmarks/roofline.py``) charges them to L2."""
    block_c = next_pow2(C)
    fp32 = dtype == torch.float32
    # chunked z GEMMs for fp32 features on the interpreter too, so that tests cover them
    z_chunk = 16 if fp32 else 0
    if _FORCE_BLOCKS is not None:
        cfg = dict(BLOCK_N=_FORCE_BLOCKS[0], BLOCK_P=_FORCE_BLOCKS[1], BLOCK_C=block_c, Z_CHUNK=z_chunk)
        return dict(cfg, HALVES=False), cfg
    if not on_gpu(device):
        cfg = dict(BLOCK_N=min(128, next_pow2(L)), BLOCK_P=min(128, next_pow2(P)), BLOCK_C=block_c,
                   Z_CHUNK=z_chunk)
        # dx in channel halves wherever they are 16 wide or more, and dW's z GEMM transposed
        # for channels-last bfloat16 features, so that tests run both forms of each (the forced
        # tiles above take the whole rows and the plain z GEMM)
        return (dict(cfg, HALVES=not fp32 and block_c >= 32),
                dict(cfg, S_TRANSPOSED=dtype == torch.bfloat16 and channel_stride == 1))
    gpu = dict(BLOCK_C=block_c, Z_CHUNK=0, num_warps=8, num_stages=2)
    if block_c > 512:
        # wider features (torch_ppl._backend.MAX_TRITON_CHANNELS): with the tiles below, 720 to
        # 1024 channels asked for 196 to 295 KB of shared memory, over an H100's 227 and an
        # A100's 163; 16 prototypes and one stage need 64 to 132 KB
        wide = dict(gpu, BLOCK_N=16, BLOCK_P=min(16, next_pow2(P)), num_stages=1)
        if fp32:
            wide.update(Z_CHUNK=32, maxnreg=255)
        dw = dict(wide)
        if dtype == torch.float16 and not large_shared(device):
            # 99 KB of shared memory per block (sm_86, sm_89, sm_120): with the x tile held for
            # the z GEMM, dW asked for 129 KB at 1024 channels. Chunked, it fits but spills
            # 1.4 KB per thread (3.3 KB without the register budget): its dW GEMM takes fp32
            # operands as wide as the features
            dw.update(Z_CHUNK=32, maxnreg=255)
        return wide, dw
    if fp32:
        # fp32 GEMMs run on the CUDA cores, whose register tiles are larger: the bf16 tiles
        # spilled 2 to 10 KB per thread on sm_90
        dx = dict(gpu, BLOCK_N=16, BLOCK_P=min(32, next_pow2(P)), Z_CHUNK=32, num_stages=1, maxnreg=255)
        dw = dict(gpu, BLOCK_N=16, BLOCK_P=16, Z_CHUNK=32)
        if _input_precision(dtype, C) == "tf32" and (large_shared(device) or block_c <= 256):
            # TF32 on the tensor cores: 64 prototypes per program (a quarter of the re-reads of
            # x: 3.9 GB of modelled traffic at voc, 1.1 with them) compile without spilling on
            # sm_90, with one stage; at 512 channels they need 128 KB of shared memory
            dw.update(BLOCK_P=min(64, next_pow2(P)), num_stages=1)
        return dx, dw
    dx = dict(gpu, BLOCK_N=32, BLOCK_P=min(64, next_pow2(P)))
    tcgen05 = has_tcgen05(device) and TRITON_VERSION >= (3, 8)
    if warpgroup_mma(device) and 32 <= block_c <= 256 and C % 16 == 0 and TRITON_VERSION >= (3, 6):
        # 64 pixels, on wgmma, half the reads of Ŵ from L2 of 32 (voc: 0.73 GB instead of
        # 1.18): x, Ŵ and the accumulator as two channel halves, and x read again for the
        # normalisation backward, compile without spilling from Triton 3.6 on (3.5: 16 B).
        # Held across the loop, the fp32 copy of x took 64 registers per thread and the whole
        # rows spilled 48 to 160 B; 128 pixels spilled 1.5 KB for NCHW features; a channel
        # count that is not a multiple of 16 (rows misaligned for asynchronous copies) 464 B;
        # 32-prototype tiles 80 B. The 64-row z tile is computed twice over (8 warps on its
        # rows, docs/decisions.md), which the time saved on L2 outweighs.
        # So on sm_100 (tcgen05) with Triton 3.8 and 3.9: 132 -> 99 us modelled at voc
        dx.update(BLOCK_N=64, BLOCK_P=64, HALVES=True)
        if channel_stride == 1 and not tcgen05:  # (on sm_100, 128 pixels spilled 16 B with 3.8)
            # channels_last features: 128 pixels with 32-prototype tiles compile clean too
            # (NCHW: 1.5 KB spilled; 64 prototypes 24 B), a third fewer reads of Ŵ and a z
            # tile of 128 rows, which the two warpgroups split
            dx.update(BLOCK_N=128, BLOCK_P=32)
    if block_c > 256:
        # dx streams all of Ŵ through every pixel tile, so its reads from L2 halve with each
        # doubling of BLOCK_N (docs/decisions.md). At C = 512, 32 pixels fit beside their
        # 32 x C accumulator with 32 prototypes per tile and one stage, from Triton 3.6 on.
        # The z tile is as wide as the prototype tile, and the z GEMM feeds the dx GEMM, so
        # Triton lays both out over 8 warps side by side, 8 columns each: a 32 x 16 z tile is
        # computed four times over (2.5 times the tensor-core work of the two GEMMs), 32 x 32
        # twice (1.5 times), 32 x 64 once. Spilled, per thread: 64 prototypes 56 to 88 B; 32
        # with two stages 8 B; 64 pixels 1.7 to 2.5 KB with 8 or 16 warps, 4 warps more; Triton
        # 3.3 to 3.5 8 to 328 B; NCHW features with an unaligned channel stride (opaque_stride)
        # 120 B. Those keep 16 pixels. With Triton 3.6 and 3.7 each GPU but sm_90 spilled with
        # one tile or the other; it takes the one that spilled less there (32 x 16 with three
        # stages, four times over, otherwise): 3.6, 32 x 32 clean on sm_80, 8 to 24 B on sm_86,
        # sm_100 and sm_120, where 32 x 16 is clean; 3.7, 32 x 32 clean on sm_86 and sm_100
        # and 8 B on sm_120 (32 x 16: 24, 64 to 88 B), 8 B on sm_80 (32 x 16 clean).
        if TRITON_VERSION >= (3, 6) and not opaque_stride(device, channel_stride, C):
            arch = capability(device)
            if TRITON_VERSION >= (3, 8) or arch == (9, 0):
                twice_over = True
            elif TRITON_VERSION >= (3, 7):
                twice_over = arch != (8, 0)
            else:
                twice_over = arch == (8, 0)
            if twice_over:
                dx.update(BLOCK_P=min(32, next_pow2(P)), num_stages=1)
            else:
                dx.update(BLOCK_P=min(16, next_pow2(P)), num_stages=3)
        else:
            dx.update(BLOCK_N=16)
    dw = dict(gpu, BLOCK_N=16, BLOCK_P=min(64, next_pow2(P)))
    if has_wgmma(device) and dtype == torch.bfloat16:
        if block_c <= 256:
            # every prototype tile re-reads x: 128 prototypes per program halve that (voc: 286
            # MB of traffic instead of 571); sixteen warps and one stage hold the 128 x C
            # accumulator without spilling on sm_90 (at C = 512 that tile does not compile;
            # float16 features, whose dW GEMM takes fp32 operands, spilled 72 B with it)
            dw.update(BLOCK_P=min(128, next_pow2(P)), num_warps=16, num_stages=1)
            if dw["BLOCK_P"] == 128 and TRITON_VERSION >= (3, 4):
                # the z GEMM transposed, (Ŵ xᵀ)ᵀ: the 128 prototypes are the rows of a wgmma on
                # two warpgroups, Ŵ's tile stays in shared memory, and 8 warps hold the 128 x C
                # accumulator without spilling (NCHW and NHWC, Triton 3.4 to 3.9): every GEMM
                # of the kernel on wgmma, where 16-pixel rows took mma.sync. 64 prototypes
                # repeat its rows on the two warpgroups and spilled 16 B; Triton 3.3 spilled
                # 168 B (72 with the plain form)
                dw.update(num_warps=8, S_TRANSPOSED=True)
        else:
            # C = 512: the 64 x C accumulator with a second pipeline stage spilled 176 to 224 B
            # per thread for channels_last features (Triton 3.8 and 3.9); with one, none
            dw.update(num_stages=1)
    elif (has_tcgen05(device) and dtype == torch.bfloat16 and block_c <= 256 and next_pow2(P) >= 128
          and TRITON_VERSION >= (3, 9)):
        # sm_100 (B200): the same transposed 128-prototype tile, on tcgen05 with 8 warps and one
        # stage, halves the re-reads of x of 64 prototypes (voc: 171 -> 85 us modelled) without
        # spilling, NCHW and NHWC (Triton 3.8: 144 B; two stages 144 B for NHWC)
        dw.update(BLOCK_P=128, num_stages=1, S_TRANSPOSED=True)
    elif dtype == torch.float16:
        # the dW GEMM takes fp32 operands (CUDA cores) beside the 64 x C accumulator: two stages
        # spilled 16 B (voc, NHWC) to 440 B (ade) per thread on sm_90, where one does not. On
        # sm_80 one still spilled 168 B at ade; 32 prototypes do not, and the fp32 GEMM's time
        # hides their second read of x in the model
        if has_wgmma(device):
            dw.update(num_stages=1)
        else:
            dw.update(BLOCK_P=min(32, next_pow2(P)))
    elif block_c > 256:
        # sm_80, bf16, C = 512: the z GEMM over 32-channel chunks and one stage (see above); 32
        # prototypes would not spill either, at twice the re-reads of x from HBM
        dw.update(Z_CHUNK=32, num_stages=1)
    return dx, dw


@torch.library.custom_op("torch_ppl::contrastive_loss_fwd", mutates_args=())
def _fwd_op(
    x: Tensor, w_hat: Tensor, target: Tensor, num_per_class: int, inv_temperature: float,
    cosine: bool, nearest: bool, ignore_index: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-pixel loss and statistics.

    Args:
        x: ``(B, L, C)`` features, any strides, float32/bfloat16/float16.
        w_hat: ``(P, C)`` float32 prototypes, already normalised for cosine.
        target: ``(B, L)`` integer labels.

    Returns:
        ``loss, lse, pos`` float32 and ``best`` int32, each ``(B, L)``.
    """
    with launch_device(x):
        B, L, C = x.shape
        P = w_hat.shape[0]
        if B * L == 0:
            loss = torch.empty((B, L), device=x.device, dtype=torch.float32)
            best = torch.empty((B, L), device=x.device, dtype=torch.int32)
            return loss, torch.empty_like(loss), torch.empty_like(loss), best
        block_n, block_p, block_c = _blocks(x.device, L, P, C, x.element_size())
        dot, _ = _dot_dtypes(x.dtype)
        # The GEMM operand, rounded once here, and the same rounding in the backward: the
        # backward's recomputed z must be the forward's bit for bit.
        w_op = w_hat.to(x.dtype)

        def run(tiles):
            loss = torch.empty((B, L), device=x.device, dtype=torch.float32)
            lse, pos = torch.empty_like(loss), torch.empty_like(loss)
            best = torch.empty((B, L), device=x.device, dtype=torch.int32)
            _contrastive_fwd_kernel[(B * triton.cdiv(L, tiles["BLOCK_N"]),)](
                x, w_op, target, loss, lse, pos, best,
                L, C, P, num_per_class, ignore_index, inv_temperature,
                x.stride(0), x.stride(1), x.stride(2), w_op.stride(0), w_op.stride(1),
                target.stride(0), target.stride(1),
                COSINE=cosine, NEAREST=nearest, DOT_DTYPE=dot, INPUT_PRECISION=_input_precision(x.dtype, C),
                UPCAST_DOT=upcast_dot(), **tiles, **FP_CONTRACTION,
            )
            return loss, lse, pos, best

        tiles = dict(BLOCK_N=block_n, BLOCK_P=block_p, BLOCK_C=block_c, **_fwd_options(x.device, x.dtype))
        return _autotune.tuned("contrastive_loss.fwd", _autotune.problem_key(x, P, cosine, nearest), tiles, run,
                               x.device)


@torch.library.custom_op("torch_ppl::contrastive_loss_bwd", mutates_args=())
def _bwd_op(
    grad: Tensor, x: Tensor, w_hat: Tensor, target: Tensor, lse: Tensor, pos: Tensor, best: Tensor,
    num_per_class: int, inv_temperature: float, cosine: bool, nearest: bool, ignore_index: int,
    deterministic: bool, need_dx: bool, need_dw: bool,
) -> Tuple[Tensor, Tensor]:
    """``(dx, dw_hat)``: ``dx`` like ``x`` (its dtype and strides), ``dw_hat`` ``(P, C)`` float32.
    A gradient that is not asked for is not computed and comes back as an empty ``(0,)``
    tensor."""
    with launch_device(x):
        B, L, C = x.shape
        P = w_hat.shape[0]
        dx, dw = x.new_empty((0,)), w_hat.new_empty((0,))
        if B * L == 0:
            if need_dx:
                dx = torch.empty_like(x)
            if need_dw:
                dw = torch.zeros((P, C), device=x.device, dtype=torch.float32)
            return dx, dw
        dx_cfg, dw_cfg = _bwd_configs(x.device, L, P, C, x.dtype, x.stride(2))
        dot, dw_dot = _dot_dtypes(x.dtype)
        w_op = w_hat.to(x.dtype)  # the forward's GEMM operand, rounded alike
        common = (grad.stride(0), grad.stride(1), x.stride(0), x.stride(1), x.stride(2),
                  w_op.stride(0), w_op.stride(1), target.stride(0), target.stride(1))
        flags = dict(COSINE=cosine, NEAREST=nearest, DOT_DTYPE=dot, INPUT_PRECISION=_input_precision(x.dtype, C),
                     UPCAST_DOT=upcast_dot())
        key = _autotune.problem_key(x, P, cosine, nearest)

        def run_dx(tiles):
            dx = torch.empty_like(x)
            _contrastive_bwd_dx_kernel[(B * triton.cdiv(L, tiles["BLOCK_N"]),)](
                grad, x, w_op, target, lse, pos, best, dx,
                L, C, P, num_per_class, ignore_index, inv_temperature,
                *common, dx.stride(0), dx.stride(1), dx.stride(2), **flags, **{"HALVES": False, **tiles},
                OPAQUE=on_gpu(x.device), **FP_CONTRACTION,
            )
            return dx

        def run_dw(tiles):
            num_tiles = B * triton.cdiv(L, tiles["BLOCK_N"])
            p_tiles = triton.cdiv(P, tiles["BLOCK_P"])
            splits = pixel_splits(x.device, p_tiles, num_tiles)
            out = (torch.empty((splits, P, C), device=x.device, dtype=torch.float32) if deterministic
                   else torch.zeros((P, C), device=x.device, dtype=torch.float32))
            _contrastive_bwd_dw_kernel[(p_tiles, splits)](
                grad, x, w_op, target, lse, pos, best, out,
                B, L, C, P, num_per_class, ignore_index, inv_temperature,
                *common, DW_DOT_DTYPE=dw_dot, DETERMINISTIC=deterministic,
                OPAQUE_X=opaque_stride(x.device, x.stride(2), C), **flags, **tiles, **FP_CONTRACTION,
            )
            # deterministic: stage two, the splits' partials added in a fixed order
            return out.sum(0) if deterministic else out

        if need_dx:
            dx = _autotune.tuned("contrastive_loss.bwd_dx", key, dx_cfg, run_dx, x.device)
        if need_dw:
            dw = _autotune.tuned("contrastive_loss.bwd_dw", key, dw_cfg, run_dw, x.device)
        return dx, dw


@_fwd_op.register_fake
def _fwd_fake(x, w_hat, target, num_per_class, inv_temperature, cosine, nearest, ignore_index):
    loss = x.new_empty(x.shape[:2], dtype=torch.float32)
    return loss, torch.empty_like(loss), torch.empty_like(loss), torch.empty_like(loss, dtype=torch.int32)


@_bwd_op.register_fake
def _bwd_fake(grad, x, w_hat, target, lse, pos, best, num_per_class, inv_temperature, cosine, nearest,
      ignore_index, deterministic, need_dx, need_dw):
    dx = torch.empty_like(x) if need_dx else x.new_empty((0,))
    dw = w_hat.new_empty(w_hat.shape, dtype=torch.float32) if need_dw else w_hat.new_empty((0,))
    return dx, dw


def _setup_context(ctx, inputs, output) -> None:
    x, w_hat, target, num_per_class, inv_temperature, cosine, nearest, ignore_index = inputs
    _, lse, pos, best = output
    ctx.save_for_backward(x, w_hat, target, lse, pos, best)
    ctx.options = (num_per_class, inv_temperature, cosine, nearest, ignore_index)
    ctx.mark_non_differentiable(lse, pos, best)


def _backward(ctx, grad_loss, *_stat_grads):
    x, w_hat, target, lse, pos, best = ctx.saved_tensors
    num_per_class, inv_temperature, cosine, nearest, ignore_index = ctx.options
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = torch.ops.torch_ppl.contrastive_loss_bwd(
        grad_loss, x, w_hat, target, lse, pos, best, num_per_class, inv_temperature, cosine, nearest,
        ignore_index, torch.are_deterministic_algorithms_enabled(), need_dx, need_dw,
    )
    return (dx if need_dx else None, dw if need_dw else None, None, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public function
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
    """Fused :func:`torch_ppl.reference.contrastive_loss`: same arguments, same result.

    Args:
        x: ``(..., C)`` float32/bfloat16/float16 features (any strides).
        prototypes: ``(K, M, C)`` float32/bfloat16/float16.
        target: ``(...)`` integer labels in ``[0, K)`` or ``ignore_index``.

    Returns:
        ``(...)`` float32 per-pixel losses, exactly 0 (with zero gradient) at ignored pixels.

    Raises:
        TypeError: float64 ``x`` or ``prototypes`` (use ``backend="reference"``).
    """
    check_dtypes("contrastive_loss", x=x, prototypes=prototypes)  # the options: checked by the caller
    K, M, C = prototypes.shape
    cosine = similarity == "cosine"
    with torch.autocast(x.device.type, enabled=False):
        # The P x C prototype side in plain torch: autograd takes dW_hat back through it.
        w = prototypes.reshape(K * M, C).float()
        w_hat = F.normalize(w, p=2.0, dim=-1, eps=EPS) if cosine else w
        x3 = as_blc(x)
        loss, _, _, _ = torch.ops.torch_ppl.contrastive_loss_fwd(
            x3, w_hat, target.reshape(x3.shape[:2]), M, 1.0 / float(temperature), cosine,
            positives == "nearest", int(ignore_index),
        )
    return loss.reshape(target.shape)
