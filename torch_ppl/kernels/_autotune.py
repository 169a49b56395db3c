"""Opt-in autotuning: the kernels' tiles timed on the GPU at hand.

Every launcher picks its tiles by rules (``_Config``, ``_bwd_configs``, ``_blocks``, ...) drawn
from the code the compiler makes of them for sm_90 and sm_80 (``docs/kernels.md``), not from
timings. With autotuning on (:func:`torch_ppl.set_autotune` or ``TORCH_PPL_AUTOTUNE=1``), the
first launch of a kernel for a problem (:func:`tuned`'s ``key``) times the rule's tiles against
their neighbours on the call's own inputs: each tunable size one step smaller and one step
larger, one at a time (:func:`neighbours`). The fastest is kept for the rest of the process,
and across processes in the JSON file named by ``TORCH_PPL_AUTOTUNE_CACHE``.

A candidate is dropped when it does not compile or launch (too much shared memory, say), or
when its results differ from the rule's by more than summation order can explain
(:func:`_agree`): a tile is a performance choice, never a numerical one.

Autotuning never runs when ``torch.are_deterministic_algorithms_enabled()`` (the tiles set
the order of the sums, and a choice made by timings would differ from run to run), while a
CUDA graph is being captured (the timings launch kernels that the capture would record;
a choice already made still applies), on CPU tensors (the interpreter), nor while
``python -m benchmarks compile`` compiles for a named GPU.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.testing
from torch import Tensor

from .. import _backend
from ._common import compile_target

__all__ = ["tuned", "neighbours", "problem_key", "KNOBS", "clear"]

LOG = logging.getLogger("torch_ppl.autotune")
CACHE_ENV = "TORCH_PPL_AUTOTUNE_CACHE"

# The launch arguments a candidate may change, and the values each may take (a candidate moves
# one of them one step from the rule's value). Block sizes are powers of two, at least 16 (the
# smallest side of a tl.dot), at most twice the rule's: a tile changes speed, not the result.
KNOBS: Dict[str, Tuple[int, ...]] = {
    "BLOCK_N": (16, 32, 64, 128, 256),
    "BLOCK_P": (16, 32, 64, 128, 256),
    "num_warps": (4, 8, 16),
    "num_stages": (1, 2, 3),
}

# (site, device, Triton version, key) -> the chosen arguments
_CHOSEN: Dict[str, Dict[str, object]] = {}
# site -> the arguments its last tuned call ran (what ``python -m benchmarks`` records)
LAST: Dict[str, Dict[str, object]] = {}
_LOADED_FROM: Optional[str] = None


def clear() -> None:
    """Forget every choice made in this process (the cache file, if any, is read again)."""
    global _LOADED_FROM
    _CHOSEN.clear()
    LAST.clear()
    _LOADED_FROM = None


def neighbours(default: Dict[str, object], knobs: Sequence[str] = tuple(KNOBS)) -> list:
    """The candidates besides ``default``: for each of ``knobs`` that ``default`` sets to one of
    the values in :data:`KNOBS`, ``default`` with that one argument a step down and a step up."""
    out = []
    for name in knobs:
        values = KNOBS[name]
        value = default.get(name)
        if value not in values:
            continue
        i = values.index(value)
        for j in (i - 1, i + 1):
            if 0 <= j < len(values):
                out.append(dict(default, **{name: values[j]}))
    return out


def problem_key(x: Tensor, *extra) -> Tuple:
    """What a kernel's speed depends on beyond its arguments' values: the features' dtype,
    channels and layout (which axis of the ``(B, L, C)`` view is contiguous, and whether the
    channel stride is 16-aligned), the number of pixels rounded up to a power of two, and
    ``extra`` (prototypes, flags)."""
    layout = "nhwc" if x.stride(2) == 1 else ("nchw" if x.stride(1) == 1 else "strided")
    aligned = x.stride(2) % 16 == 0 or x.stride(2) == 1
    n = x.shape[0] * x.shape[1]
    return (str(x.dtype).replace("torch.", ""), x.shape[2], layout, aligned,
            triton.next_power_of_2(max(n, 1)), *extra)


def _active(device: torch.device) -> bool:
    return (_backend.autotune_enabled() and device.type == "cuda" and compile_target() is None
            and not torch.are_deterministic_algorithms_enabled()
            and not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()))


def _cache_key(site: str, device: torch.device, key: Tuple) -> str:
    where = device.type
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where = f"{torch.cuda.get_device_name(device)}|sm_{major}{minor}"
    return f"{site}|{where}|triton {triton.__version__}|{key!r}"


def _load() -> None:
    """Read the cache file once (its choices join those of this process)."""
    global _LOADED_FROM
    path = os.environ.get(CACHE_ENV)
    if not path or path == _LOADED_FROM:
        return
    _LOADED_FROM = path
    try:
        with open(path) as f:
            stored = json.load(f)
    except FileNotFoundError:
        return
    except (OSError, ValueError) as err:
        LOG.warning("ignoring the autotuning cache %s: %s", path, err)
        return
    for k, v in stored.items():
        _CHOSEN.setdefault(k, v)


def _save() -> None:
    path = os.environ.get(CACHE_ENV)
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(_CHOSEN, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # whole files only, also with several processes writing
    except OSError as err:
        LOG.warning("could not write the autotuning cache %s: %s", path, err)


def _tensors(result) -> list:
    if isinstance(result, Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in _tensors(r)]
    return []


def _agree(candidate, reference, tol: float = 2.0 ** -6, chunk: int = 1 << 24) -> bool:
    """Whether a candidate's floating-point results are the rule's up to summation order: the
    same shapes, non-finite values in the same places, and ``|a - b| <= tol * |b|`` in norm
    (16-bit results differ by a rounding or two; a wrong tile by far more). Read in chunks:
    the results can be as large as the features."""
    a_list, b_list = _tensors(candidate), _tensors(reference)
    if len(a_list) != len(b_list):
        return False
    for a, b in zip(a_list, b_list):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if not (a.is_floating_point() and a.numel()):
            continue
        a, b = a.reshape(-1), b.reshape(-1)
        diff2 = norm2 = 0.0
        for i in range(0, a.numel(), chunk):
            ai, bi = a[i:i + chunk].float(), b[i:i + chunk].float()
            finite = torch.isfinite(bi)
            if not bool((finite == torch.isfinite(ai)).all()):
                return False
            if not torch.equal(ai[~finite].nan_to_num(), bi[~finite].nan_to_num()):
                return False  # NaN for inf, or an infinity of the other sign
            ai, bi = ai[finite], bi[finite]
            diff2 += float(torch.linalg.vector_norm(ai - bi)) ** 2
            norm2 += float(torch.linalg.vector_norm(bi)) ** 2
        if diff2 > tol ** 2 * norm2:
            return False
    return True


def _measure(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` (CUDA events, the L2 cache flushed between runs)."""
    return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))


def tuned(site: str, key: Tuple, default: Dict[str, object], run: Callable[[Dict[str, object]], object],
          device: torch.device, knobs: Sequence[str] = tuple(KNOBS)):
    """``run(arguments)``: one launch (or a few) of ``site``'s kernel with those launch
    arguments, returning its results (new tensors, whatever their shapes depend on reduced
    inside ``run``). Without autotuning, ``run(default)``. With it, the first call for
    ``(site, key)`` on this GPU and Triton runs :func:`neighbours` of ``default`` too, keeps the
    fastest whose results :func:`_agree` with ``default``'s, and returns its results; later
    calls run the kept arguments."""
    if not _active(device):
        return run(default)
    _load()
    cache_key = _cache_key(site, device, key)
    chosen = _CHOSEN.get(cache_key)
    if chosen is not None:
        LAST[site] = chosen
        return run(dict(default, **chosen))
    reference = run(default)
    if not all(bool(torch.isfinite(t).all()) for t in _tensors(reference) if t.is_floating_point()):
        return reference  # inputs that make non-finite results tell nothing about speed
    best, best_ms, best_result = default, _measure(lambda: run(default)), reference
    timings = {"default": best_ms}
    for candidate in neighbours(default, knobs):
        changed = {k: v for k, v in candidate.items() if default.get(k) != v}
        try:
            result = run(candidate)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # a launch error surfaces here, not later
        except Exception as err:  # noqa: BLE001 - does not compile or launch here: not a candidate
            LOG.debug("%s %s: %s", site, changed, err)
            continue
        if not _agree(result, reference):
            LOG.warning("%s: the tiles %s give other results than %s; not used", site, changed, default)
            continue
        ms = _measure(lambda: run(candidate))
        timings[repr(changed)] = ms
        if ms < best_ms:
            best, best_ms, best_result = candidate, ms, result
    choice = {k: v for k, v in best.items() if k in knobs}
    _CHOSEN[cache_key] = LAST[site] = choice
    LOG.info("%s %r: %s (%s)", site, key, choice, ", ".join(f"{k} {v:.3f} ms" for k, v in timings.items()))
    _save()
    return best_result
