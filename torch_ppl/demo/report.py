"""Results of a demo run: per-variant aggregates, ``results.json``, ``figure.png`` and the table.

``results.json`` holds ``config`` (data, training, seeds, variants, device), ``environment``,
``wall_s`` (the whole run), ``runs`` (one :class:`~torch_ppl.demo.train.RunResult` per variant
and seed, with its curves), ``summary`` (per variant: mean and sample standard deviation over
the seeds of the final test mIoU, of the whole-run noise rates, coverage and digit claims; ``std`` is
``null`` with a single seed) and ``comparisons`` (test mIoU differences paired per seed, with a
95 % t interval: :func:`paired_comparisons`).
"""
from __future__ import annotations

import json
import math
import platform
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .data import CLASS_NAMES, DigitScenes
from .model import VARIANTS
from .stats import fmt_interval, paired
from .train import RunResult

METRICS = ("test_miou", "noise_rate", "noise_rate_fg", "coverage", "digit_claims", "noise_rate_claims", "wall_s")


def _mean_std(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return {"mean": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) > 1 else None}


def summarize(runs: List[RunResult]) -> Dict[str, dict]:
    """Per variant, in the order first seen: ``seeds`` and ``{metric: {"mean", "std"}}``."""
    summary: Dict[str, dict] = {}
    for name in dict.fromkeys(r.variant for r in runs):
        mine = [r for r in runs if r.variant == name]
        summary[name] = {"description": VARIANTS[name].description, "seeds": [r.seed for r in mine],
                         **{m: _mean_std([getattr(r, m) for r in mine]) for m in METRICS}}
    return summary


# The comparisons the semi-supervised experiment makes, each ``(a, b)``: a - b per seed.
PAIRS = (("pseudo_label", "supervised"), ("prototypes", "pseudo_label"), ("push", "prototypes"),
         ("pull", "prototypes"), ("ppl", "prototypes"), ("ppl_exclude", "prototypes"), ("ppl", "pseudo_label"))


def paired_comparisons(runs: List[RunResult], key: str = "test_miou") -> List[dict]:
    """For each of :data:`PAIRS` whose variants both ran: ``key`` of ``a`` minus that of ``b`` per
    seed, with the mean and 95 % t interval (:func:`~torch_ppl.demo.stats.paired`)."""
    names = {r.variant for r in runs}
    out = []
    for a, b in PAIRS:
        if a in names and b in names:
            va = {r.seed: getattr(r, key) for r in runs if r.variant == a}
            vb = {r.seed: getattr(r, key) for r in runs if r.variant == b}
            out.append({"a": a, "b": b, "metric": key, **paired(va, vb)})
    return out


def format_paired_table(runs: List[RunResult]) -> str:
    """Test mIoU differences paired per seed: mean [95 % interval] and each seed's difference."""
    rows = [("a - b", "test mIoU difference", "per seed")]
    for c in paired_comparisons(runs):
        rows.append((f"{c['a']} - {c['b']}", fmt_interval(c), " ".join(f"{d:+.3f}" for d in c["diffs"])))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) if i != 1 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return ("test mIoU, paired per seed (same seed: same batches and views): mean [95 % t interval]\n"
            + "\n".join(lines))


def environment(device: torch.device) -> dict:
    from torch_ppl import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "torch_ppl": __version__,
            "platform": platform.platform(), "processor": platform.machine(),
            "torch_threads": torch.get_num_threads(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def write_json(path: Path, config: dict, runs: List[RunResult], summary: Dict[str, dict], wall_s: float,
               device: torch.device) -> dict:
    doc = jsonable({"config": config, "environment": environment(device), "wall_s": wall_s,
                    "runs": [r.to_json() for r in runs], "summary": summary,
                    "comparisons": paired_comparisons(runs)})
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return doc


def jsonable(obj):
    """NaN (a class absent from a split) becomes ``null``: strict JSON has no NaN."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def _fmt(stat: Dict[str, Optional[float]], digits: int = 3, percent: bool = False) -> str:
    mean, std = stat["mean"], stat["std"]
    if mean is None:
        return "-"
    scale = 100.0 if percent else 1.0
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if std is not None else "")


TABLE_KEY = """\
noise %: share of the confident pseudo-labels that are wrong; noise % (digits): the same over
pixels whose true class is a digit ("-" when no run of the variant claimed any digit pixel:
every confident digit pixel was then called background, 100 % by construction); coverage %:
share of unlabelled pixels confident enough to be used; digit claims %: share of unlabelled
pixels confidently pseudo-labelled as a digit. All over the whole run."""


def format_table(summary: Dict[str, dict]) -> str:
    """A plain-text table, one row per variant (:data:`TABLE_KEY` explains the columns)."""
    head = ("variant", "seeds", "test mIoU", "noise %", "noise % (digits)", "coverage %", "digit claims %",
            "s / run")
    rows = [head]
    for name, s in summary.items():
        claimed = bool(s["digit_claims"]["mean"])  # None or 0: no digit pixel was ever claimed
        rows.append((name, str(len(s["seeds"])), _fmt(s["test_miou"]), _fmt(s["noise_rate"], 2, True),
                     _fmt(s["noise_rate_fg"], 1, True) if claimed else "-", _fmt(s["coverage"], 1, True),
                     _fmt(s["digit_claims"], 2, True),
                     f"{s['wall_s']['mean']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _class_colors():
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    tab10 = colormaps["tab10"].colors
    return ListedColormap([(0.0, 0.0, 0.0)] + list(tab10))  # background black, digit d in tab10[d]


def make_figure(path: Path, runs: List[RunResult], scenes: DigitScenes, samples: int = 3) -> None:
    """Top: curves (mean over seeds, band = min..max) of test mIoU, noise rate and digit-pixel
    noise rate, the variants' legend to their right. The digit-pixel noise rate is drawn only
    where some digit pixel was claimed (before that it is 1 by construction: every confident
    digit pixel is called background); a panel with nothing to draw says so. Bottom: the first
    test scenes, their truth and each variant's prediction (lowest seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names = list(dict.fromkeys(r.variant for r in runs))
    samples = min(samples, min(r.samples.shape[0] for r in runs))
    cols = 2 + len(names)
    fig = plt.figure(figsize=(max(12, 1.6 * cols), 4.2 + 1.7 * samples), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[3.2, 1.7 * samples])

    axes = top.subplots(1, 3)
    panels = (("test_miou", "test mIoU (first test scenes)"),
              ("noise_rate", "pseudo-label noise rate\n(wrong share of confident pixels)"),
              ("noise_rate_fg", "noise rate on digit pixels\n(once some digit pixel is claimed)"))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def value(h: dict, key: str) -> float:
        if h[key] is None or (key == "noise_rate_fg" and not h.get("digit_claims")):
            return math.nan
        return h[key]

    for ax, (key, title) in zip(axes, panels):
        drawn = False
        for i, name in enumerate(names):
            curves = [r.history for r in runs if r.variant == name]
            steps = [h["step"] for h in curves[0]]
            values = [[value(h, key) for h in c] for c in curves]
            drawn = drawn or any(not math.isnan(v) for c in values for v in c)
            by_step = list(zip(*values))
            mean = [statistics.fmean(v) if not any(map(math.isnan, v)) else math.nan for v in by_step]
            ax.plot(steps, mean, color=colors[i % len(colors)], label=name, lw=1.6)
            if len(curves) > 1:
                ax.fill_between(steps, [min(v) for v in by_step], [max(v) for v in by_step],
                                color=colors[i % len(colors)], alpha=0.15, lw=0)
        if not drawn:
            ax.text(0.5, 0.5, "nothing to draw yet:\nno run has claimed a digit pixel\n(a longer run fills this panel)",
                    ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.35")
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    top.legend(handles, labels, loc="outside right upper", fontsize=8, title="variant")

    cmap = _class_colors()
    grid = bottom.subplots(samples, cols, squeeze=False)
    first = {name: min((r for r in runs if r.variant == name), key=lambda r: r.seed) for name in names}
    for row in range(samples):
        panels_row = [("image", scenes.test.images[row, 0].numpy(), "gray"), ("truth", scenes.test.labels[row].numpy(), cmap)]
        panels_row += [(name, first[name].samples[row].numpy(), cmap) for name in names]
        for ax, (title, img, cm) in zip(grid[row], panels_row):
            if cm == "gray":
                ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img, cmap=cm, vmin=0, vmax=len(CLASS_NAMES) - 1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
    bottom.legend(handles=[Patch(color=cmap(i), label=c) for i, c in enumerate(CLASS_NAMES)],
                  loc="outside right center", fontsize=8, title="class")
    fig.savefig(path, dpi=90)
    plt.close(fig)
