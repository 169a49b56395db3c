"""Timing and peak memory of one pass.

On CUDA the time is ``triton.testing.do_bench`` (CUDA events around each call, the L2 cache
flushed between calls, ``.grad`` of the leaves reset to ``None`` before each call) with
quantiles 0.5 / 0.2 / 0.8, and the memory is the peak of ``torch.cuda.max_memory_allocated``
over one call minus what was allocated before it. On the CPU (the smoke test) a plain
``time.perf_counter`` loop stands in and no memory is reported: those numbers only check the
plumbing and are never results.

Passes:

* ``fwd``: the forward with autograd recording (what training runs), output dropped each call.
* ``bwd``: one forward outside the timed region, then ``out.backward(grad, retain_graph=True)``.
* ``fwdbwd``: forward and backward together.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor


def output_grad(out: Tensor, seed: int = 0) -> Tensor:
    """The gradient fed to ``backward``: 1 for a scalar loss, else a fixed random tensor."""
    if out.dim() == 0:
        return torch.ones_like(out)
    g = torch.Generator(device=out.device).manual_seed(seed)
    return torch.randn(out.shape, generator=g, device=out.device, dtype=torch.float32).to(out.dtype)


def _step(fn: Callable[[], Tensor], pass_: str, grad: Tensor, leaves: List[Tensor]) -> Callable[[], object]:
    if pass_ == "fwd":
        return fn
    if pass_ == "fwdbwd":
        return lambda: fn().backward(grad)
    if pass_ == "bwd":
        out = fn()
        return lambda: out.backward(grad, retain_graph=True)
    raise ValueError(f"unknown pass {pass_!r}")


def _clear(leaves: List[Tensor]) -> None:
    for t in leaves:
        t.grad = None


def _peak_cuda(step: Callable[[], object], leaves: List[Tensor]) -> int:
    _clear(leaves)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    keep = step()  # kept alive until the peak is read: a forward's output and saved tensors count
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del keep
    _clear(leaves)
    return int(peak)


def _time_cpu(step: Callable[[], object], leaves: List[Tensor], reps: int) -> List[float]:
    times = []
    for _ in range(reps):
        _clear(leaves)
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure(fn: Callable[[], Tensor], pass_: str, grad: Tensor, leaves: List[Tensor], device: torch.device,
            *, warmup_ms: float = 25, rep_ms: float = 100, cpu_reps: int = 3) -> Dict[str, Optional[float]]:
    """``median_ms``, ``p20_ms``, ``p80_ms`` and ``peak_mem_bytes`` of one ``pass_`` of ``fn``."""
    step = _step(fn, pass_, grad, leaves)
    step()  # warm-up: compiles (torch.compile, Triton autotuning) happen here, not in the timing
    if device.type == "cuda":
        import triton.testing

        peak: Optional[int] = _peak_cuda(step, leaves)
        median, p20, p80 = triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms, grad_to_none=leaves,
                                                   quantiles=[0.5, 0.2, 0.8])
    else:
        peak = None
        times = sorted(_time_cpu(step, leaves, cpu_reps))
        median = statistics.median(times)
        p20, p80 = _quantile(times, 0.2), _quantile(times, 0.8)
    _clear(leaves)
    return dict(median_ms=float(median), p20_ms=float(p20), p80_ms=float(p80), peak_mem_bytes=peak)


def _quantile(sorted_times: List[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    pos = q * (len(sorted_times) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_times) - 1)
    return sorted_times[lo] + (sorted_times[hi] - sorted_times[lo]) * (pos - lo)
