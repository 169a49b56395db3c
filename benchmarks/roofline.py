"""Bytes and FLOPs models of each op, the devices' peak numbers, and the roofline fraction.

The models count the *minimal* work of the op as the fused kernels do it (docs/math.md): every
``N``-sized tensor crosses HBM once per pass, nothing ``N x P`` is stored, the backward
recomputes the similarities. Every provider is charged the same model, so achieved GB/s,
TFLOP/s and the roofline fraction are *effective* rates that compare providers fairly (a
provider that materialises ``N x P`` does more traffic than it is credited for; that shows up
as a lower fraction, which is the point).

``roofline_fraction = max(bytes / peak_bandwidth, flops / peak_tensor_flops) / measured_time``:
the time an ideal kernel would need on this device divided by the time measured, so 1.0 is
the roofline and the larger of the two terms says whether the op is memory- or compute-bound.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch

from .shapes import Shape

OPS = ("prototype_logits", "contrastive_loss", "prototype_attention", "ppl_step")
PASSES = ("fwd", "bwd", "fwdbwd")


def _elem(dtype) -> int:
    return dtype.itemsize


def _logits(s: Shape) -> Tuple[Dict[str, int], Dict[str, int]]:
    """Head logits with max pooling: ``2 N P C`` for the similarities; the backward recomputes
    them to find the winners, then ``dx`` and ``dW`` each cost ``2 N K C`` (one winner per class)."""
    xb, wb = _elem(s.feature_dtype), _elem(s.prototype_dtype)
    n, c, p, k = s.N, s.C, s.P, s.K
    fwd_bytes = n * c * xb + p * c * wb + n * k * 4
    bwd_bytes = n * c * xb + p * c * wb + n * k * 4 + n * c * xb + p * c * wb
    return (dict(fwd=fwd_bytes, bwd=bwd_bytes),
            dict(fwd=2 * n * p * c, bwd=2 * n * p * c + 4 * n * k * c))


def _contrastive(s: Shape) -> Tuple[Dict[str, int], Dict[str, int]]:
    """Contrastive loss: ``2 N P C`` forward (loss and per-pixel logsumexp saved, ``N`` floats
    each); backward recomputes ``s`` (``2 N P C``) and forms ``dx = dZ W`` and ``dW = dZ^T x``
    (``2 N P C`` each). Targets are int64."""
    xb, wb = _elem(s.feature_dtype), _elem(s.prototype_dtype)
    n, c, p = s.N, s.C, s.P
    fwd_bytes = n * c * xb + p * c * wb + n * 8 + 2 * n * 4
    bwd_bytes = n * c * xb + p * c * wb + n * 8 + n * 4 + n * 4 + n * c * xb + p * c * wb
    return dict(fwd=fwd_bytes, bwd=bwd_bytes), dict(fwd=2 * n * p * c, bwd=6 * n * p * c)


def _attention(s: Shape) -> Tuple[Dict[str, int], Dict[str, int]]:
    """Attention FLOPs in the cheaper of its two forms. The fast form (docs/math.md): per pixel
    two GEMMs against ``h P`` rows of width ``C`` (``4 N h P C``), plus the prototype side (``k``,
    ``v`` projections and the folded ``K~``, ``V~``: ``8 P C h d``); the backward is 2.5x the
    per-pixel forward, as in flash attention (recompute scores, ``dA = dO V~^T``, ``dx``,
    ``dK~``, ``dV~``), and twice the prototype side. The projected form: ``q_proj``,
    ``out_proj`` and an attention of ``d``-wide heads per pixel. Bytes: the fast form's (the
    fewer), ``x`` in and out (plus ``dout`` and ``dx`` backward), per-pixel softmax statistics,
    and the small weights."""
    xb, wb = _elem(s.feature_dtype), _elem(s.prototype_dtype)
    n, c, p, h = s.N, s.C, s.P, s.heads
    hd = c  # head_dim defaults to C // heads, so h * d = C
    small = p * c * wb + 4 * hd * c * wb
    fwd_bytes = 2 * n * c * xb + 2 * n * h * 4 + small
    bwd_bytes = 3 * n * c * xb + 2 * n * h * 4 + 2 * small
    proto_side = 8 * p * c * hd
    fast = dict(fwd=4 * n * h * p * c + proto_side, bwd=10 * n * h * p * c + 2 * proto_side)
    # The projected form: q_proj and out_proj per pixel (4 N C hd forward, twice that backward)
    # and the attention over P keys of d channels per head (4 N P hd, 2.5x backward). With
    # several heads it needs fewer FLOPs than the fast form; the op's roofline is the cheaper.
    small_side = 4 * p * c * hd
    projected = dict(fwd=4 * n * c * hd + 4 * n * p * hd + small_side,
                     bwd=8 * n * c * hd + 10 * n * p * hd + 2 * small_side)
    return (dict(fwd=fwd_bytes, bwd=bwd_bytes), {k: min(fast[k], projected[k]) for k in fast})


def _logits_contrastive(s: Shape) -> Tuple[Dict[str, int], Dict[str, int]]:
    """Head logits (max pooling) and contrastive loss of the same features in one op: ``x`` read
    once per pass and one similarity GEMM (``2 N P C``) forward; backward recomputes it once and
    forms ``dx`` and ``dW`` from the one summed ``ds``, which the push makes dense over all ``P``
    (``2 N P C`` each)."""
    xb, wb = _elem(s.feature_dtype), _elem(s.prototype_dtype)
    n, c, p, k = s.N, s.C, s.P, s.K
    per_pixel = 8 + 3 * 4  # label; loss, lse, pos written forward and read backward (or dloss)
    fwd_bytes = n * c * xb + p * c * wb + n * k * 4 + n * k + n * per_pixel
    bwd_bytes = 2 * n * c * xb + 2 * p * c * wb + n * k * 4 + n * k + n * (per_pixel + 4)
    return dict(fwd=fwd_bytes, bwd=bwd_bytes), dict(fwd=2 * n * p * c, bwd=6 * n * p * c)


def _step(s: Shape) -> Tuple[Dict[str, int], Dict[str, int]]:
    """The PPL step = attention, then head logits and contrastive loss on its output, plus the
    cross-entropy on the ``N x K`` logits (already counted as the head's output)."""
    parts = [_attention(s), _logits(s), _contrastive(s)]
    return ({k: sum(b[k] for b, _ in parts) for k in ("fwd", "bwd")},
            {k: sum(f[k] for _, f in parts) for k in ("fwd", "bwd")})


_MODELS = {"prototype_logits": _logits, "contrastive_loss": _contrastive,
           "prototype_attention": _attention, "ppl_step": _step,
           "prototype_logits_and_contrastive": _logits_contrastive}
# Ops with a work model: the benchmarked ops and the one-pass head + push, which
# `python -m benchmarks compile` models kernel by kernel.
MODELLED_OPS = (*OPS, "prototype_logits_and_contrastive")


def work(op: str, shape: Shape, pass_: str) -> Tuple[int, int]:
    """``(bytes, flops)`` of ``op`` at ``shape`` for one pass (``fwdbwd`` = ``fwd + bwd``)."""
    bytes_, flops = _MODELS[op](shape)
    if pass_ == "fwdbwd":
        return bytes_["fwd"] + bytes_["bwd"], flops["fwd"] + flops["bwd"]
    return bytes_[pass_], flops[pass_]


@dataclasses.dataclass(frozen=True)
class DevicePeak:
    """Peak HBM bandwidth (bytes/s) and dense bf16 tensor-core throughput (FLOP/s)."""

    name: str
    bandwidth: float
    tensor_flops: float
    source: str


# Matched against torch.cuda.get_device_name() in order (first substring match wins).
# Dense bf16 = half of the datasheets' "with sparsity" figure.
PEAKS: Tuple[Tuple[str, DevicePeak], ...] = (
    ("H200 NVL", DevicePeak("H200 NVL", 4.8e12, 835e12,
                            "NVIDIA H200 datasheet: 4.8 TB/s HBM3e, 1,671 TFLOPS bf16 with sparsity")),
    ("H200", DevicePeak("H200 SXM", 4.8e12, 989e12,
                        "NVIDIA H200 datasheet: 4.8 TB/s HBM3e, 1,979 TFLOPS bf16 with sparsity")),
    ("H100 NVL", DevicePeak("H100 NVL", 3.9e12, 835e12,
                            "NVIDIA H100 datasheet: 3.9 TB/s HBM3, 1,671 TFLOPS bf16 with sparsity")),
    ("H100 PCIe", DevicePeak("H100 PCIe", 2.0e12, 756e12,
                             "NVIDIA H100 datasheet: 2 TB/s HBM2e, 1,513 TFLOPS bf16 with sparsity")),
    ("H100", DevicePeak("H100 SXM", 3.35e12, 989e12,
                        "NVIDIA H100 datasheet: 3.35 TB/s HBM3, 1,979 TFLOPS bf16 with sparsity")),
    ("A100-SXM4-80GB", DevicePeak("A100 SXM 80GB", 2.039e12, 312e12,
                                  "NVIDIA A100 datasheet: 2,039 GB/s HBM2e, 312 TFLOPS bf16 dense")),
)


def device_peak(device_name: str, bandwidth: Optional[float] = None,
                tensor_flops: Optional[float] = None) -> Optional[DevicePeak]:
    """The peak numbers of ``device_name``; explicit ``bandwidth`` and ``tensor_flops`` (both)
    override the table. ``None`` for an unknown device (the roofline is then not reported)."""
    if bandwidth is not None and tensor_flops is not None:
        return DevicePeak(device_name, bandwidth, tensor_flops, "given on the command line")
    for key, peak in PEAKS:
        if key.lower() in device_name.lower():
            return peak
    return None


def rates(bytes_: int, flops: int, median_ms: float, peak: Optional[DevicePeak]) -> Dict[str, Optional[float]]:
    """Achieved GB/s and TFLOP/s, the roofline fraction and which bound is the binding one."""
    seconds = median_ms * 1e-3
    out: Dict[str, Optional[float]] = dict(
        achieved_gbps=bytes_ / seconds / 1e9, achieved_tflops=flops / seconds / 1e12,
        roofline_fraction=None, bound=None)
    if peak is not None:
        t_mem, t_flop = bytes_ / peak.bandwidth, flops / peak.tensor_flops
        out["roofline_fraction"] = max(t_mem, t_flop) / seconds
        out["bound"] = "memory" if t_mem >= t_flop else "compute"
    return out


# ----------------------------------------------------------------------------- per-kernel model
# What each launched kernel moves and computes with its actual tiling (python -m benchmarks
# compile records the grid and the block sizes of every launch), so that re-reads, recomputed
# GEMMs, padded tiles and slower GEMM precisions show. Assumptions, stated once:
# * HBM traffic: every N-sized tensor a program set reads is charged each time a distinct
#   program reads it (a kernel whose grid splits the prototypes re-reads x once per prototype
#   tile); the small prototype-side tensors are charged once (they live in L2).
# * L2 traffic: what the programs read from L2 in all, the HBM traffic plus every program's
#   own pass over the prototype-side tensors: a kernel that tiles the pixels streams all of
#   Ŵ (or K~ and V~) through every program, so its L2 bytes per FLOP fall with the pixel tile
#   (a GEMM's operand re-read per output tile). Nothing is assumed to stay in L1.
# * FLOPs: 2·m·n·k per GEMM on the padded tile sizes, at the peak of its operand precision:
#   16-bit operands at the dense bf16/fp16 tensor peak, TF32 at half of it, 3xTF32 at a sixth,
#   IEEE fp32 at the CUDA-core fp32 peak. mma.sync is charged like wgmma (optimistic: on
#   Hopper mma.sync reaches well below the wgmma peak).
# * A kernel's ideal time is max(bytes / bandwidth, L2 bytes / L2 bandwidth, Σ flops / peak),
#   divided by its grid's wave
#   efficiency when the compiled kernel is known (benchmarks/compile.py: a partial last wave
#   leaves SMs idle); kernels run one after another; launch overheads and the small torch ops
#   around the kernels are left out.
# The result is a prediction from a model, not a measurement.
H100_FP32_FLOPS = 67e12  # H100 SXM datasheet, FP32 (CUDA cores)
# L2 -> SM bandwidth. NVIDIA publishes none; 9.0 TB/s is the high end of the public figures for
# an H100 (8,986 GB/s in a published table of GH100's full 144-SM configuration; microbenchmarks
# of an H100 PCIe measure less), so the L2 bound it gives is optimistic, like the rest.
H100_L2_BANDWIDTH = 9.0e12
_PRECISION_SHARE = {"16-bit": 1.0, "tf32": 0.5, "tf32x3": 1.0 / 6.0}


def _pad(n: int, block: int) -> int:
    return -(-n // block) * block


def _precision(meta: Dict[str, object], key: str, feature_dtype) -> str:
    """The precision class of a GEMM: the operand dtype for 16-bit operands, else the
    ``input_precision`` the kernel was launched with."""
    prec = str(meta.get(key, "ieee"))
    if prec in ("tf32", "tf32x3"):
        return prec
    return "16-bit" if feature_dtype.itemsize == 2 else "ieee"


def kernel_work(kernel: str, grid: Tuple[int, ...], meta: Dict[str, object], s: Shape) -> Dict[str, object]:
    """``bytes`` (HBM), ``l2_bytes`` (read from L2 by all programs) and ``flops`` (by precision
    class) of one launch at shape ``s``."""
    xb = _elem(s.feature_dtype)
    n, c, k, p, h = s.N, s.C, s.K, s.P, s.heads
    flops: Dict[str, float] = {}
    programs = 1
    for g in grid:
        programs *= int(g)
    stream = 0  # prototype-side bytes each program of a pixel-tiled kernel reads through L2
    l2_extra = 0  # what a program re-reads of its own pixels' tiles, from L2

    def gemm(amount: float, precision: str) -> None:
        flops[precision] = flops.get(precision, 0.0) + amount

    if kernel.startswith("_logits_"):
        if meta.get("BLOCK_P"):  # the flat prototype axis
            p_pad = _pad(p, int(meta["BLOCK_P"]))
        else:  # one GEMM per prototype index m against a tile of BLOCK_K classes
            p_pad = _pad(k, int(meta["BLOCK_K"])) * (p // k)
        x16 = _precision(meta, "PRECISION", s.feature_dtype)
        if str(meta.get("GRAD_DTYPE")) in ("bf16", "fp16"):  # ds rounded to a 16-bit operand
            grad = "16-bit"
        else:
            grad = _precision(meta, "GRAD_PRECISION", s.feature_dtype)
        push = bool(meta.get("PUSH"))
        # the push's per pixel: the label (int64), loss or its gradient, lse, pos, best
        push_bytes = n * (8 + 4 * 4) if push else 0
        # the (B, L, K) statistic the forward saves: the max winner (int8), the logsumexp pooled
        # value (fp32), nothing for mean pooling
        stat = {0: n * k, 1: n * k * 4}.get(meta.get("POOL"), 0)
        if kernel == "_logits_fwd_kernel":
            bytes_ = once = n * c * xb + p * c * xb + n * k * 4 + stat + push_bytes
            stream = p * c * xb
            gemm(2 * n * p_pad * c, x16)
        elif kernel == "_logits_bwd_dx_kernel":
            bytes_ = once = 2 * n * c * xb + n * k * 4 + stat + 2 * p * c * 4 + push_bytes
            # similarities recomputed only for logsumexp, for dscale and for the push
            recompute = int(meta.get("POOL") == 1 or bool(meta.get("NEED_DSCALE")) or push)
            # Ŵ in the features' dtype for the recomputed s and, but for float16 features,
            # for dx's GEMM; float16's dx multiplies the float32 Ŵ
            need_dx, from_wd = bool(meta.get("NEED_DX", True)), bool(meta.get("GRAD_FROM_WD", True))
            stream = p * c * (xb * (recompute or (need_dx and from_wd)) + 4 * (need_dx and not from_wd))
            if recompute:
                gemm(recompute * 2 * n * p_pad * c, x16)
                if meta.get("S_CHUNK"):
                    # the rows are not held: each prototype tile's (or class tile and prototype
                    # index's) similarity reads chunks of x and of Ŵ, then dx's GEMM its tile of
                    # Ŵ again; the norms take a pass over x for cosine, and the rows are loaded
                    # once more at the end (that one counted in HBM)
                    steps = p_pad // int(meta.get("BLOCK_P") or meta["BLOCK_K"])
                    l2_extra = (steps + bool(meta.get("COSINE"))) * n * c * xb
                    stream = p * c * (xb + (xb if from_wd else 4) * need_dx)
                elif meta.get("RELOAD_X") and need_dx:
                    # the rows held for the similarities are loaded again at the end, from L2
                    l2_extra = n * c * xb
            if meta.get("NEED_DX", True):
                gemm(2 * n * p_pad * c, grad)
        elif kernel == "_logits_bwd_dx_slice_kernel":  # max / mean: channel slices, no recompute
            need_dx = bool(meta.get("NEED_DX", True))
            cosine = bool(meta.get("COSINE"))
            need_r = cosine or bool(meta.get("NEED_DSCALE"))
            slices = -(-c // int(meta["BLOCK_C"])) if need_dx else 0
            wb = 4 if s.feature_dtype == torch.float16 else xb  # fp16: ds against the fp32 Ŵ
            # R from g and the logits, then each channel slice reads g and the winners: HBM
            # once, again from L2 (a program's own tiles, read moments before)
            g_reads, stat_reads = need_r + slices, slices
            bytes_ = once = (n * k * 4 * (need_r + bool(g_reads)) + stat * bool(stat_reads) + n * 4 * cosine
                             + (n * c * xb * (1 + cosine) + p * c * wb) * need_dx)
            l2_extra = max(g_reads - 1, 0) * n * k * 4 + max(stat_reads - 1, 0) * stat
            stream = p * c * wb * need_dx  # all of Ŵ, per program
            if need_dx:
                gemm(2 * n * p_pad * c, grad)
        elif kernel == "_logits_bwd_dw_kernel":  # max / mean: no recompute, channel slices
            p_tiles, c_slices = grid[0], grid[1]
            bytes_ = p_tiles * (n * c * xb + c_slices * n * 4) + c_slices * (n * k * 4 + stat) + p * c * 4
            once = n * c * xb + n * 4 + n * k * 4 + stat + p * c * 4
            gemm(2 * n * p_pad * c, grad)
        elif kernel == "_logits_push_bwd_dw_kernel":
            # every prototype tile re-reads all of x and the push's per-pixel values and
            # recomputes s; g and the winners (or pooled values) of its classes once in all.
            # Without the push (the head's logsumexp pooling alone) no per-pixel values.
            tiles = grid[0]
            head = n * k * 4 + stat
            per_pixel = n * (8 + 4 * 4) if meta.get("PUSH", True) else 0
            bytes_ = tiles * (n * c * xb + per_pixel) + head + p * c * xb + p * c * 4
            once = n * c * xb + per_pixel + head + p * c * xb + p * c * 4
            if meta.get("S_CHUNK"):
                # the similarity reads chunks of x and of the program's Ŵ tile for each pixel
                # tile, then the rows are loaded whole for the dŴ GEMM
                l2_extra = tiles * n * c * xb + -(-n // int(meta["BLOCK_N"])) * p_pad * c * xb
            gemm(2 * n * p_pad * c, x16)
            gemm(2 * n * p_pad * c, grad)
        else:
            raise KeyError(f"no traffic model for kernel {kernel!r}")
    elif kernel.startswith("_contrastive_"):
        p_pad = _pad(p, int(meta["BLOCK_P"]))
        dot = _precision(meta, "INPUT_PRECISION", s.feature_dtype)  # the features' own dtype
        # fp16 features: fp32 dW GEMM, exact
        dw_dot = dot if s.feature_dtype != torch.float16 else "ieee"
        per_pixel = 8 + 4 * 4  # label, upstream gradient or loss, lse, pos, best
        if kernel == "_contrastive_fwd_kernel":
            bytes_ = once = n * c * xb + p * c * xb + n * per_pixel
            stream = p * c * xb
            gemm(2 * n * p_pad * c, dot)
        elif kernel == "_contrastive_bwd_dx_kernel":
            bytes_ = once = 2 * n * c * xb + p * c * xb + n * per_pixel
            stream = p * c * xb  # one pass over Ŵ serves both GEMMs
            if meta.get("HALVES") and meta.get("COSINE"):
                l2_extra = n * c * xb  # x again, for the normalisation backward at the end
            if meta.get("Z_CHUNK"):
                # the z GEMM reads chunks of x and of Ŵ for each prototype tile, besides the
                # rows and the Ŵ tile the dx GEMM holds
                l2_extra += (p_pad // int(meta["BLOCK_P"])) * n * c * xb
                stream = 2 * p * c * xb
            gemm(4 * n * p_pad * c, dot)
        else:  # _contrastive_bwd_dw_kernel: every prototype tile re-reads all of x
            tiles = grid[0]
            bytes_ = tiles * (n * c * xb + n * per_pixel) + p * c * xb + p * c * 4
            once = n * c * xb + n * per_pixel + p * c * xb + p * c * 4
            if meta.get("Z_CHUNK"):
                # the z GEMM reads chunks of x and of the program's Ŵ tile for each pixel tile,
                # then the rows are loaded whole for the dŴ GEMM
                l2_extra = tiles * n * c * xb + -(-n // int(meta["BLOCK_N"])) * p_pad * c * xb
            gemm(2 * n * p_pad * c, dot)
            gemm(2 * n * p_pad * c, dw_dot)
    elif kernel.startswith("_attention_"):
        p_pad = _pad(p, int(meta["BLOCK_P"]))
        prec = _precision(meta, "DOT_PREC", s.feature_dtype)
        small = 2 * h * p * c * 4
        # EXACT_TF32 / SPLIT_TF32 (float16 features): a product with an x or dout side, exact in
        # TF32, runs as two TF32 products against the fp32 side's halves; the others at prec
        split = "tf32" if meta.get("EXACT_TF32") or meta.get("SPLIT_TF32") else None
        if kernel == "_attention_fwd_kernel":
            bytes_ = once = 2 * n * c * xb + n * h * 4 + small
            stream = small  # Kt and Vt, float32
            exact, other = 1, 1  # s = x Kt, o = a Vt
            if meta.get("OUT_SPLIT"):
                # two programs per pixel tile: each reads x and Kt whole and forms every
                # score, and reads the half of Vt its half of the output needs
                bytes_ += n * c * xb
                stream = small * 3 // 4
                exact = 2
            if meta.get("ROWS"):  # s as two bfloat16 products against Kt's halves
                gemm(2 * 2 * exact * n * h * p_pad * c, "16-bit")
                exact = 0
        elif kernel == "_attention_bwd_dx_kernel":
            bytes_ = once = 3 * n * c * xb + 2 * n * h * 4 + small
            stream = small
            exact = 2 + bool(meta.get("NEED_GREAD"))  # s, da = dout Vt, and a^T dout for d(gamma)
            other = bool(meta.get("NEED_DX")) * 2  # (a da) Kt, a Kt
        else:  # _attention_bwd_dproto_kernel: every (head, prototype tile) re-reads x and dout
            tiles = grid[0]
            bytes_ = tiles * (2 * n * c * xb + 2 * n * 4) + 3 * small
            once = 2 * n * c * xb + 2 * n * 4 + 3 * small
            exact, other = 4, 0
            if meta.get("SPLIT16"):  # each product as two 16-bit ones (hi + lo halves)
                exact, split = 0, None
                gemm(2 * 8 * n * h * p_pad * c, "16-bit")
        if split:
            gemm(2 * 2 * exact * n * h * p_pad * c, split)
        else:
            other += exact
        if other:
            gemm(2 * other * n * h * p_pad * c, prec)
    else:
        raise KeyError(f"no traffic model for kernel {kernel!r}")
    # bytes_once: the same launch if L2 served every re-read (programs that re-read a tile run
    # side by side in launch order, so some of it will be): the optimistic end of the range
    # L2: the HBM traffic (re-reads included: a re-read served by L2 still crosses it) and the
    # prototype side once more for every program past the first
    l2 = bytes_ + max(programs - 1, 0) * stream + l2_extra
    return dict(bytes=int(bytes_), bytes_once=int(once), l2_bytes=int(l2),
                flops={key: int(v) for key, v in flops.items()})


def ideal_seconds(work_: Dict[str, object], peak: DevicePeak, reread_from_l2: bool = False) -> float:
    """``max(bytes / bandwidth, L2 bytes / L2 bandwidth, Σ flops / peak of their precision)`` of
    one launch, over its grid's wave efficiency when the compiled kernel gave one; with
    ``reread_from_l2`` the re-reads cost no HBM traffic (they still cross L2). The tensor-core
    FLOPs count as often as the compiled code issues them (``mma_replication``: warps that
    compute the same products, from the compiled layouts)."""
    t_flops = 0.0
    for precision, amount in work_["flops"].items():
        if precision == "ieee":
            t_flops += amount / H100_FP32_FLOPS
        else:
            rate = peak.tensor_flops * _PRECISION_SHARE[precision]
            t_flops += amount * work_.get("mma_replication", 1.0) / rate
    t_l2 = work_.get("l2_bytes", 0) / H100_L2_BANDWIDTH
    t_bound = max(work_["bytes_once" if reread_from_l2 else "bytes"] / peak.bandwidth, t_l2, t_flops)
    return t_bound / work_.get("wave_efficiency", 1.0)


def predicted_fraction(op: str, shape: Shape, launches_work, peak: DevicePeak) -> Dict[str, float]:
    """The op's own roofline time (its minimal bytes and FLOPs, :func:`work`, fwd + bwd) over the
    sum of its kernels' ideal times: the share of the roofline the kernels could reach if each
    ran at its own bound."""
    min_bytes, min_flops = work(op, shape, "fwdbwd")
    t_min = max(min_bytes / peak.bandwidth, min_flops / peak.tensor_flops)
    t_kernels = sum(ideal_seconds(w, peak) for w in launches_work)
    t_l2 = sum(ideal_seconds(w, peak, reread_from_l2=True) for w in launches_work)
    return dict(t_min_us=t_min * 1e6, t_kernels_us=t_kernels * 1e6, t_kernels_l2_us=t_l2 * 1e6,
                fraction=t_min / t_kernels, fraction_l2=t_min / t_l2)
