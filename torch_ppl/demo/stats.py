"""Paired per-seed comparisons with a 95 % interval (Student's t), for both experiments.

Two variants trained with the same seed share their batches, their augmentations and (in the
noise experiment) their label noise, so the per-seed difference removes what the seed does to
both; its mean and a t interval over the seeds is the comparison the demo reports.
"""
from __future__ import annotations

import math
import statistics
from typing import Dict, Optional, Sequence

# Two-sided 95 % quantiles of Student's t, t_{0.975, df}, for df = 1..30 (the demo's seed
# counts); larger df use the normal quantile, 1.960, which is within 0.03 of t from df = 30 on.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (``df >= 1``)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.960


def interval(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    """Mean, sample standard deviation and 95 % t interval of the mean of ``values``
    (``None``/NaN left out); ``n``; ``std``, ``low`` and ``high`` are ``None`` below two values."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    out: Dict[str, Optional[float]] = {"n": len(vals), "mean": statistics.fmean(vals) if vals else None,
                                       "std": None, "low": None, "high": None}
    if len(vals) > 1:
        std = statistics.stdev(vals)
        half = t975(len(vals) - 1) * std / math.sqrt(len(vals))
        out.update(std=std, low=out["mean"] - half, high=out["mean"] + half)
    return out


def paired(a: Dict[int, float], b: Dict[int, float]) -> Dict[str, object]:
    """``a - b`` per seed (the seeds both have), with :func:`interval` of the differences."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    return {"seeds": seeds, "diffs": diffs, **interval(diffs)}


def fmt_interval(stat: Dict[str, object], digits: int = 3, signed: bool = True) -> str:
    """``+0.012 [-0.004, +0.028]`` (mean and 95 % interval), or the mean alone with one value."""
    mean = stat.get("mean")
    if mean is None:
        return "-"
    sign = "+" if signed else ""
    text = f"{mean:{sign}.{digits}f}"
    if stat.get("low") is not None:
        text += f" [{stat['low']:{sign}.{digits}f}, {stat['high']:{sign}.{digits}f}]"
    return text
