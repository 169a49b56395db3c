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
    """Attention in the fast form (docs/math.md): per pixel two GEMMs against ``h P`` rows of width
    ``C`` (``4 N h P C``), plus the prototype side (``k``, ``v`` projections and the folded
    ``K~``, ``V~``: ``8 P C h d``). The backward is 2.5x the per-pixel forward, as in flash
    attention (recompute scores, ``dA = dO V~^T``, ``dx``, ``dK~``, ``dV~``), and twice the
    prototype side. Bytes: ``x`` in and out (plus ``dout`` and ``dx`` backward), per-pixel
    softmax statistics, and the small weights."""
    xb, wb = _elem(s.feature_dtype), _elem(s.prototype_dtype)
    n, c, p, h = s.N, s.C, s.P, s.heads
    hd = c  # head_dim defaults to C // heads, so h * d = C
    small = p * c * wb + 4 * hd * c * wb
    fwd_bytes = 2 * n * c * xb + 2 * n * h * 4 + small
    bwd_bytes = 3 * n * c * xb + 2 * n * h * 4 + 2 * small
    proto_side = 8 * p * c * hd
    return (dict(fwd=fwd_bytes, bwd=bwd_bytes),
            dict(fwd=4 * n * h * p * c + proto_side, bwd=10 * n * h * p * c + 2 * proto_side))


def _step(s: Shape) -> Tuple[Dict[str, int], Dict[str, int]]:
    """The PPL step = attention, then head logits and contrastive loss on its output, plus the
    cross-entropy on the ``N x K`` logits (already counted as the head's output)."""
    parts = [_attention(s), _logits(s), _contrastive(s)]
    return ({k: sum(b[k] for b, _ in parts) for k in ("fwd", "bwd")},
            {k: sum(f[k] for _, f in parts) for k in ("fwd", "bwd")})


_MODELS = {"prototype_logits": _logits, "contrastive_loss": _contrastive,
           "prototype_attention": _attention, "ppl_step": _step}


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
