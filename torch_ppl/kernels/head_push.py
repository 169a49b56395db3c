"""The head's logits and the push's contrastive loss from one read of the features.

``prototype_logits`` and ``contrastive_loss`` of the same features against the same
prototypes compute the same ``N x P`` similarities ``s``, each op forward and backward. Here
the head's kernels (:mod:`torch_ppl.kernels.similarity`) carry the push as a ``PUSH`` flag, so
one similarity GEMM serves both (see ``docs/kernel-fused.md``):

* ``_logits_fwd_kernel`` with ``PUSH``: besides the pooled logits, the online logsumexp of
  ``z = s / tau`` over all ``P`` prototypes and the positive statistic at the pixel's class
  (logsumexp over its ``M`` prototypes, or the maximum and its index for
  ``positives="nearest"``); it writes the per-pixel loss and ``lse``, ``pos``, ``best``, and
  the head's ``(B, L, K)`` statistic (the winner, or for logsumexp pooling the pooled value).
* ``_logits_bwd_dx_kernel`` with ``PUSH``: ``ds = ds_head + ds_push`` per prototype index, one
  ``du = ds @ Ŵ`` GEMM, one normalisation backward.
* ``_logits_push_bwd_dw_kernel``: flat prototype tiles with all channels, ``s`` recomputed
  once, ``dŴ += (ds_head + ds_push)ᵀ x``; flushed once per program (relaxed atomic, or
  per-split partials in deterministic mode).

Host side: ``torch.library`` ops ``torch_ppl::prototype_logits_contrastive_fwd`` / ``_bwd``
with fake implementations and ``register_autograd``.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import triton
from torch import Tensor

from . import _autotune
from ._common import (FP_CONTRACTION, as_blc, capability, check_dtypes, launch_device, needs_wide_offsets, new_rows,
                      on_gpu)
from .similarity import (_POOL_CODE, _Config, _head_outputs, _joint_dw, _joint_dw_config, _logits_bwd_dx_kernel,
                         _logits_fwd_kernel, prototype_operands)

__all__ = ["prototype_logits_and_contrastive"]


def _config(device: torch.device, c: int, k: int, m: int, x_dtype: torch.dtype,
            channel_stride: int = 1) -> _Config:
    """The head's tiles for the forward and dx kernels, with the changes the push's extra
    per-pixel state needs on the GPU. The forward runs 8 warps (4 spilled 16 bytes per thread
    at voc, NHWC, with Triton 3.8 on sm_90, and 56 bytes on sm_80).

    dx at 257 to 512 channels: on an H100, or a B200 with Triton 3.8 or newer, 32 pixels with
    the tiles of the flat ``P = K*M`` axis that logsumexp pooling's dx takes there
    (``similarity._Config``: 32 prototypes for bfloat16 features, 16 for float16, whose du GEMM
    takes the float32 ``Ŵ``) and one stage, half the reads of ``Ŵ`` from L2 of
    16 pixels (at ade 13 GB instead of 26). The rows are loaded again for the normalisation
    backward at the end (``RELOAD_X``) instead of held across the loop: held, their register
    copy spilled 40 bytes per thread on sm_90 (with class tiles, 144). No spill with Triton 3.3
    and 3.5 to 3.9 (3.4: 8 bytes), NCHW, NHWC and 129 x 129 pixels, nor on sm_100 with 3.8 and
    3.9. 64-prototype tiles, which no warp computes twice over, spilled 16 bytes per thread for
    channels-last bfloat16 features and 24 to 32 for float16 at 32; 64 pixels 712 bytes. The
    same form with 16-prototype tiles serves float16 features on an A100 (sm_80) and both 16-bit
    types on the other sm_8x GPUs (sm_86: no spill with Triton 3.3, 3.5, 3.7, 3.8 and 3.9, NCHW,
    NHWC and 129 x 129 pixels; 32-prototype tiles spilled 16 to 128 bytes or asked for more
    than 99 KB of shared memory), at ade half the
    modelled time of 16 pixels (float16 8.5 -> 4.3 ms, bfloat16 on sm_86 2.9 -> 2.1). The RTX
    50 series (sm_120) spilled 16 to 24 bytes with it and keeps 16 pixels.

    On an A100 with bfloat16 features dx takes 32 pixels at 257 to 512 channels, with 16-class
    tiles and two stages: no spill with Triton 3.4 to 3.9, at 128 x 128 and 129 x 129 pixels,
    NCHW and NHWC (3.3 leaves 8 bytes per thread for NCHW features of 129 x 129 pixels). Other
    GPUs, float32 features and wider ones keep 16 pixels.

    Where logsumexp pooling's dx takes 64 pixels against tiles of 16 prototypes of the flat
    ``P = K*M`` axis (``similarity._Config``: an H100, or a B200 with Triton 3.8 or newer,
    16-bit features of 128 to 256 channels), so does this dx, with the rows loaded again at
    the end on the H100 and held on the B200: half the reads of ``Ŵ`` from L2 of the 32 pixels
    it took (voc, bfloat16: 136 -> 100 us modelled; float16 339 -> 201), a wgmma similarity
    GEMM. No spill with Triton 3.3 to 3.9 at voc, NCHW and NHWC, with the benchmarks' branches
    and the heaviest ones (logsumexp pooling, the nearest positive, a learnable scale), which
    spilled 8 to 56 bytes per thread with the older tiles."""
    cfg = _Config(device, c, k, m, x_dtype, channel_stride)
    if on_gpu(device):
        cfg.num_warps = max(cfg.num_warps, 8)
        if cfg.dx_block_p:
            # logsumexp pooling's flat tiles, pixel tile and choice of reloading the rows
            # (_Config); one stage above 256 channels
            cfg.bwd_block_n = cfg.recompute_block_n
            if cfg.block_c > 256:
                cfg.num_stages = 1
        elif cfg.block_c > 256:
            cfg.bwd_block_n = 16
            arch = capability(device)
            if arch == (8, 0) and x_dtype == torch.bfloat16 and cfg.block_c <= 512:
                cfg.bwd_block_n, cfg.block_k, cfg.num_stages = 32, 16, 2
            elif arch[0] == 8 and cfg.block_c <= 512 and x_dtype in (torch.bfloat16, torch.float16):
                cfg.bwd_block_n, cfg.num_stages, cfg.reload_x, cfg.dx_block_p = 32, 1, True, 16
    return cfg


# ============================================================================ custom ops
@torch.library.custom_op("torch_ppl::prototype_logits_contrastive_fwd", mutates_args=())
def _fwd_op(x: Tensor, w_hat: Tensor, scale: Tensor, bias: Optional[Tensor], target: Tensor, cosine: bool,
            pooling: str, inv_temperature: float, nearest: bool,
            ignore_index: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Logits and per-pixel contrastive loss, and what the backward needs.

    Args:
        x: ``(..., C)`` rows, any strides.
        w_hat: ``(K, M, C)`` float32 prototypes, normalised for cosine.
        scale: 0-d float32; ``bias``: ``(K,)`` or ``None``.
        target: ``(...)`` labels shaped like ``x.shape[:-1]``.

    Returns:
        ``logits`` ``(..., K)`` float32; ``stat`` ``(B, L, K)``, the winners (max pooling) or
        the pooled values (logsumexp), as the head alone saves them; ``inv`` ``(B, L)``
        float32 (cosine); ``loss``, ``lse``, ``pos`` ``(B, L)`` float32 and ``best`` ``(B, L)``
        int32. The tensors a configuration does not use are empty.
    """
    with launch_device(x):
        k, m, c = w_hat.shape
        x3 = as_blc(x)
        nb, nl, _ = x3.shape
        y = target.reshape(nb, nl)
        pool = _POOL_CODE[pooling]
        if nb * nl * k == 0:
            return (*_head_outputs(x, nb, nl, k, m, pool, cosine), *_push_outputs(x, nb, nl))
        cfg = _config(x.device, c, k, m, x.dtype, x3.stride(2))
        w_op = w_hat.to(x.dtype)

        def run(tiles):
            out, stat, inv = _head_outputs(x, nb, nl, k, m, pool, cosine)
            loss, lse, pos, best = _push_outputs(x, nb, nl)
            out3 = as_blc(out)
            _logits_fwd_kernel[(nb * triton.cdiv(nl, tiles["BLOCK_N"]),)](
                x3, w_op, scale, bias, out3, stat if pool != 2 else None, inv if cosine else None,
                y, loss, lse, pos, best,
                nl, c, k, m, ignore_index, inv_temperature,
                *x3.stride(), *out3.stride(), *y.stride(),
                COSINE=cosine, POOL=pool, HAS_BIAS=bias is not None, PRECISION=cfg.precision,
                UPCAST_DOT=cfg.upcast, PUSH=True, NEAREST=nearest, **tiles, **FP_CONTRACTION,
            )
            return out, stat, inv, loss, lse, pos, best

        tiles = dict(BLOCK_N=cfg.block_n, BLOCK_K=cfg.fwd_block_k, BLOCK_C=cfg.block_c, S_CHUNK=cfg.s_chunk,
                     num_warps=cfg.num_warps, num_stages=cfg.fwd_stages, maxnreg=cfg.fwd_maxnreg())
        key = _autotune.problem_key(x3, k, m, cosine, pool, bias is not None, nearest)
        return _autotune.tuned("prototype_logits_and_contrastive.fwd", key, tiles, run, x.device)


@_fwd_op.register_fake
def _fwd_fake(x, w_hat, scale, bias, target, cosine, pooling, inv_temperature, nearest, ignore_index):
    k, m, _ = w_hat.shape
    nb, nl, _ = as_blc(x).shape
    return (*_head_outputs(x, nb, nl, k, m, _POOL_CODE[pooling], cosine), *_push_outputs(x, nb, nl))


def _push_outputs(x: Tensor, nb: int, nl: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """New per-pixel ``(loss, lse, pos, best)`` of the forward: float32 and int32 ``(B, L)``."""
    loss = x.new_empty((nb, nl), dtype=torch.float32)
    return loss, torch.empty_like(loss), torch.empty_like(loss), x.new_empty((nb, nl), dtype=torch.int32)


@torch.library.custom_op("torch_ppl::prototype_logits_contrastive_bwd", mutates_args=())
def _bwd_op(grad_logits: Tensor, grad_loss: Tensor, x: Tensor, w_hat: Tensor, scale: Tensor, target: Tensor,
            stat: Tensor, lse: Tensor, pos: Tensor, best: Tensor, cosine: bool, pooling: str,
            inv_temperature: float, nearest: bool, ignore_index: int, deterministic: bool, need_dx: bool,
            need_dw: bool, need_dscale: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dx in x.dtype, dŴ (K, M, C) fp32, dscale 0-d fp32)`` of ``logits`` and ``loss``
    together; ``grad_logits`` ``(..., K)`` and ``grad_loss`` ``(B, L)``, any strides. A gradient
    that is not asked for is not computed: dx and dŴ come back as empty ``(0,)`` tensors,
    dscale as 0."""
    with launch_device(x):
        k, m, c = w_hat.shape
        dx, dw = x.new_empty((0,)), w_hat.new_empty((0,))  # what is not asked for
        dscale = torch.zeros((), dtype=torch.float32, device=x.device)
        x3, g3 = as_blc(x), as_blc(grad_logits)
        nb, nl, _ = x3.shape
        y = target.reshape(nb, nl)
        pool = _POOL_CODE[pooling]
        stat = stat if pool != 2 else None
        if x.numel() == 0 or k == 0:
            if need_dx:
                dx = new_rows(x, x.shape[-1], x.dtype).zero_()
            if need_dw:
                dw = torch.zeros_like(w_hat)
            return dx, dw, dscale
        cfg = _config(x.device, c, k, m, x.dtype, x3.stride(2))
        w_dot = w_hat.to(x.dtype)  # the forward's GEMM operand, so ``s`` is recomputed from the same rounding
        push = (y, grad_loss, lse, pos, best)
        key = _autotune.problem_key(x3, k, m, cosine, pool, nearest, need_dx, need_dscale)

        def run_dx(tiles):
            dx = new_rows(x, x.shape[-1], x.dtype) if need_dx else x.new_empty((0,))
            dx3 = as_blc(dx) if need_dx else None
            n_blocks = nb * triton.cdiv(nl, tiles["BLOCK_N"])
            partial = torch.empty((n_blocks,), dtype=torch.float32, device=x.device) if need_dscale else None
            # without dx the push adds nothing (dscale is the head's alone)
            _logits_bwd_dx_kernel[(n_blocks,)](
                x3, w_hat, w_dot, scale, g3, stat, dx3, partial,
                *(push if need_dx else (None,) * 5),
                nl, c, k, m, ignore_index, inv_temperature,
                *x3.stride(), *g3.stride(), *(dx3.stride() if need_dx else (0, 0, 0)), *y.stride(), *grad_loss.stride(),
                COSINE=cosine, POOL=pool, PRECISION=cfg.precision, GRAD_PRECISION=cfg.grad_precision,
                GRAD_DTYPE=cfg.grad_dtype, GRAD_FROM_WD=x.dtype != torch.float16, UPCAST_DOT=cfg.upcast,
                NEED_DX=need_dx, NEED_DSCALE=need_dscale, PUSH=need_dx, NEAREST=nearest,
                WIDE=needs_wide_offsets(x3, *([dx3] if need_dx else [])),
                BLOCK_K=cfg.block_k, BLOCK_C=max(32, cfg.block_c), S_CHUNK=cfg.dx_s_chunk,
                RELOAD_X=cfg.reload_x, OPAQUE=on_gpu(x.device), **tiles, **FP_CONTRACTION,
            )
            return dx, partial.sum() if need_dscale else dscale

        if need_dx or need_dscale:
            tiles = dict(BLOCK_N=cfg.bwd_block_n, BLOCK_P=cfg.dx_block_p, num_warps=cfg.bwd_num_warps,
                         num_stages=cfg.num_stages, maxnreg=cfg.maxnreg)
            dx, dscale = _autotune.tuned("prototype_logits_and_contrastive.bwd_dx", key, tiles, run_dx, x.device)
        if need_dw:
            dw = _autotune.tuned(
                "prototype_logits_and_contrastive.bwd_dw", key,
                _joint_dw_config(x.device, c, x.dtype, x3.stride(2), lse_push=pool == _POOL_CODE["logsumexp"]),
                lambda tiles: _joint_dw(tiles, x3, w_dot, w_hat, scale, g3, stat, cfg, cosine, pool, deterministic,
                                        push, ignore_index, inv_temperature, nearest),
                x.device)
        return dx, dw, dscale


@_bwd_op.register_fake
def _bwd_fake(grad_logits, grad_loss, x, w_hat, scale, target, stat, lse, pos, best, cosine, pooling,
              inv_temperature, nearest, ignore_index, deterministic, need_dx, need_dw, need_dscale):
    dx = new_rows(x, x.shape[-1], x.dtype) if need_dx else x.new_empty((0,))
    dw = torch.empty_like(w_hat) if need_dw else w_hat.new_empty((0,))
    return dx, dw, x.new_empty((), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, w_hat, scale, bias, target, cosine, pooling, inv_temperature, nearest, ignore_index = inputs
    _, stat, _, _, lse, pos, best = output
    ctx.save_for_backward(x, w_hat, scale, target, stat, lse, pos, best)
    ctx.mark_non_differentiable(*output[1:3], *output[4:])
    ctx.options = (cosine, pooling, inv_temperature, nearest, ignore_index)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_logits, _g_stat, _g_inv, grad_loss, *_g_stats):
    x, w_hat, scale, target, stat, lse, pos, best = ctx.saved_tensors
    cosine, pooling, inv_temperature, nearest, ignore_index = ctx.options
    need_dx, need_dw, need_dscale, need_dbias = ctx.needs_input_grad[:4]
    dx = dw = dscale = dbias = None
    if need_dx or need_dw or need_dscale:
        dx, dw, dscale = torch.ops.torch_ppl.prototype_logits_contrastive_bwd(
            grad_logits, grad_loss, x, w_hat, scale, target, stat, lse, pos, best, cosine, pooling,
            inv_temperature, nearest, ignore_index, torch.are_deterministic_algorithms_enabled(),
            bool(need_dx), bool(need_dw), bool(need_dscale))
        dx = dx if need_dx else None
        dw = dw if need_dw else None
        dscale = dscale.to(scale.dtype) if need_dscale else None
    if need_dbias:
        dbias = grad_logits.sum(dim=tuple(range(grad_logits.dim() - 1)), dtype=torch.float32).to(ctx.bias_dtype)
    return dx, dw, dscale, dbias, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ============================================================================ public function
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
) -> Tuple[Tensor, Tensor]:
    """Fused :func:`torch_ppl.reference.prototype_logits` and
    :func:`torch_ppl.reference.contrastive_loss` of the same rows.

    Args:
        x: ``(..., C)`` rows, any strides, float32/bfloat16/float16.
        prototypes: ``(K, M, C)``.
        target: ``(...)`` integer labels in ``[0, K)`` or ``ignore_index``, shaped like
            ``x.shape[:-1]``.
        scale: float or 0-d tensor (may require grad); ``bias``: ``(K,)`` or ``None``.

    Returns:
        ``(..., K)`` float32 logits and ``(...)`` float32 per-pixel losses (exactly 0, with zero
        gradient, at ignored pixels).

    Raises:
        TypeError: float64 inputs (use ``backend="reference"``).
    """
    check_dtypes("prototype_logits_and_contrastive", x=x, prototypes=prototypes, bias=bias,
                 scale=scale if isinstance(scale, Tensor) else None)
    with torch.autocast(x.device.type, enabled=False):
        w_hat, scale_t = prototype_operands(prototypes, scale, similarity, x.device)
        logits, _, _, loss, _, _, _ = torch.ops.torch_ppl.prototype_logits_contrastive_fwd(
            x, w_hat, scale_t, bias, target.reshape(x.shape[:-1]), similarity == "cosine", pooling,
            1.0 / float(temperature), positives == "nearest", int(ignore_index))
    return logits, loss.reshape(target.shape)
