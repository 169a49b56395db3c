"""Results of the label-noise experiment: aggregates, paired comparisons, the table, the figure.

Every comparison is a paired per-seed difference with its 95 % t interval
(:mod:`~torch_ppl.demo.stats`): variants trained with the same seed share the batches, the
initialisation stream and the label noise. ``drop`` is the clean test mIoU minus the noisy one,
per seed and variant; the primary comparison is a difference of drops between two variants.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from .noise import LEVELS, NOISE_VARIANTS, NoiseRunResult, drops, per_seed
from .report import environment, jsonable
from .stats import fmt_interval, interval, paired

# The comparisons fixed before the first full run (docs/demo.md, "pre-registration"): the
# clean-to-noisy drop of ppl and of pull against the head alone, at class flips p = 0.25.
PRIMARY_LEVEL = "flip 0.25"
PRIMARY = (("ppl", "prototypes"), ("pull", "prototypes"))
# Reported too, as secondary: every other variant against the head alone, and the head against
# the 1x1 conv.
SECONDARY = (("push", "prototypes"), ("prototypes", "conv"), ("ppl", "conv"), ("pull", "conv"))
MEMO_KEYS = ("memorised", "corrected")


def summarize_noise(runs: List[NoiseRunResult]) -> Dict[str, Dict[str, dict]]:
    """``{variant: {level: {metric: interval}}}`` over the seeds."""
    out: Dict[str, Dict[str, dict]] = {}
    for v in dict.fromkeys(r.variant for r in runs):
        out[v] = {}
        for lv in dict.fromkeys(r.level for r in runs):
            mine = [r for r in runs if r.variant == v and r.level == lv]
            out[v][lv] = {k: interval([getattr(r, k) for r in mine])
                          for k in ("test_miou", "memorised", "corrected", "train_clean_acc", "corrupted_pixels",
                                    "flip_rate", "wall_s")}
    return out


def comparisons(runs: List[NoiseRunResult]) -> List[dict]:
    """The drop per variant and level, then the primary and secondary differences of drops and of
    memorisation, each a :func:`~torch_ppl.demo.stats.paired` dict with its labels."""
    variants = list(dict.fromkeys(r.variant for r in runs))
    noisy = [lv for lv in dict.fromkeys(r.level for r in runs) if lv != "clean"]
    out: List[dict] = []
    if not any(r.level == "clean" for r in runs):
        return out
    for lv in noisy:
        for v in variants:
            out.append({"kind": "drop", "a": v, "b": None, "level": lv,
                        **paired(per_seed(runs, v, "clean"), per_seed(runs, v, lv))})
    for lv in noisy:
        for role, pairs in (("primary", PRIMARY), ("secondary", SECONDARY)):
            for a, b in pairs:
                if a not in variants or b not in variants:
                    continue
                kind = role if lv == PRIMARY_LEVEL and role == "primary" else "secondary"
                out.append({"kind": f"{kind} drop difference", "a": a, "b": b, "level": lv,
                            **paired(drops(runs, a, lv), drops(runs, b, lv))})
                out.append({"kind": "memorised difference", "a": a, "b": b, "level": lv,
                            **paired(per_seed(runs, a, lv, "memorised"), per_seed(runs, b, lv, "memorised"))})
    return out


def write_noise_json(path: Path, config: dict, runs: List[NoiseRunResult], wall_s: float,
                     device: torch.device) -> dict:
    doc = jsonable({"config": config, "environment": environment(device), "wall_s": wall_s,
                    "runs": [r.to_json() for r in runs], "summary": summarize_noise(runs),
                    "comparisons": comparisons(runs)})
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return doc


def _grid(header: Sequence[str], rows: List[Sequence[str]]) -> str:
    rows = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _ms(stat: dict, digits: int = 3, percent: bool = False) -> str:
    if stat["mean"] is None:
        return "-"
    k = 100.0 if percent else 1.0
    return f"{k * stat['mean']:.{digits}f}" + (f" ± {k * stat['std']:.{digits}f}" if stat["std"] is not None else "")


def format_noise_tables(runs: List[NoiseRunResult]) -> str:
    """Test mIoU per variant and level (mean ± std), the drops and the paired comparisons
    (mean [95 % interval]), and the memorisation rates."""
    summary = summarize_noise(runs)
    levels = list(dict.fromkeys(r.level for r in runs))
    noisy = [lv for lv in levels if lv != "clean"]
    parts = ["test mIoU (clean test labels), mean ± std over seeds",
             _grid(["variant"] + levels, [[v] + [_ms(s[lv]["test_miou"]) for lv in levels] for v, s in summary.items()])]
    comps = comparisons(runs)
    if comps and noisy:
        drop = {(c["a"], c["level"]): c for c in comps if c["kind"] == "drop"}
        parts += ["", "drop = clean - noisy test mIoU, paired per seed: mean [95 % interval]",
                  _grid(["variant"] + noisy, [[v] + [fmt_interval(drop[(v, lv)]) for lv in noisy] for v in summary])]
        diffs = [c for c in comps if c["kind"].endswith("drop difference")]
        memo = {(c["a"], c["b"], c["level"]): c for c in comps if c["kind"] == "memorised difference"}
        rows = [[("* " if c["kind"].startswith("primary") else "  ") + f"{c['a']} - {c['b']}", c["level"],
                 fmt_interval(c), fmt_interval(memo[(c["a"], c["b"], c["level"])], 3)] for c in diffs]
        if rows:
            parts += ["", "paired differences per seed, mean [95 % interval] (* = pre-registered primary test; "
                          "a negative drop difference: a loses less to the noise than b)",
                      _grid(["a - b", "level", "drop difference", "memorised difference"], rows)]
        parts += ["", "memorised: share of the corrupted training pixels predicted with their corrupted label "
                      "(corrected: with the true one), %, mean ± std",
                  _grid(["variant"] + noisy,
                        [[v] + [f"{_ms(s[lv]['memorised'], 1, True)} ({_ms(s[lv]['corrected'], 1, True)})"
                                for lv in noisy] for v, s in summary.items()])]
    return "\n".join(parts)


def make_noise_figure(path: Path, runs: List[NoiseRunResult]) -> None:
    """Left: test mIoU against the noise level per variant, every seed a point, the mean a line.
    Middle: each variant's drop minus the head alone's (paired per seed, 95 % interval), per noisy
    level: below 0, the variant loses less to the noise. Right: the memorisation rate (corrupted
    training pixels predicted with their corrupted label) per variant and noisy level, per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r.variant for r in runs))
    levels = [lv for lv in LEVELS if any(r.level == lv for r in runs)]
    noisy = [lv for lv in levels if lv != "clean"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {v: colors[i % len(colors)] for i, v in enumerate(NOISE_VARIANTS)}
    width = 0.7 / max(len(variants), 1)

    def xs(j: int, i: int) -> float:
        return j + (i - (len(variants) - 1) / 2) * width

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), layout="constrained")
    ax = axes[0]
    for i, v in enumerate(variants):
        means = []
        for j, lv in enumerate(levels):
            vals = list(per_seed(runs, v, lv).values())
            ax.scatter([xs(j, i)] * len(vals), vals, s=9, color=color[v], alpha=0.45, lw=0)
            means.append(sum(vals) / len(vals) if vals else math.nan)
        ax.plot([xs(j, i) for j in range(len(levels))], means, "-o", color=color[v], ms=4, lw=1.4, label=v)
    ax.set_xticks(range(len(levels)), levels)
    ax.set_ylabel("test mIoU (clean test labels)")
    ax.set_title("test mIoU against training-label noise\n(points: seeds; line: mean)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="variant")

    ax = axes[1]
    ref = "prototypes"
    drawn: List[Tuple[str, float]] = []
    for i, v in enumerate(variants):
        if v == ref or ref not in variants or "clean" not in levels:
            continue
        for j, lv in enumerate(noisy):
            c = paired(drops(runs, v, lv), drops(runs, ref, lv))
            if c["mean"] is None:
                continue
            ax.scatter([xs(j, i)] * len(c["diffs"]), c["diffs"], s=9, color=color[v], alpha=0.45, lw=0)
            err = [[c["mean"] - c["low"]], [c["high"] - c["mean"]]] if c["low"] is not None else None
            ax.errorbar([xs(j, i)], [c["mean"]], yerr=err, fmt="o", color=color[v], ms=5, capsize=3,
                        label=v if j == 0 else None)
            drawn.append((v, c["mean"]))
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xticks(range(len(noisy)), noisy)
    ax.set_ylabel(f"drop − drop of {ref} (mIoU)")
    ax.set_title("clean→noisy drop minus the head alone's, per seed\n(mean, 95 % interval; < 0: loses less)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)

    ax = axes[2]
    for i, v in enumerate(variants):
        for j, lv in enumerate(noisy):
            vals = list(per_seed(runs, v, lv, "memorised").values())
            ax.scatter([xs(j, i)] * len(vals), vals, s=9, color=color[v], alpha=0.45, lw=0)
            if vals:
                ax.plot([xs(j, i) - width / 2.5, xs(j, i) + width / 2.5], [sum(vals) / len(vals)] * 2,
                        color=color[v], lw=2, label=v if j == 0 else None)
    ax.set_xticks(range(len(noisy)), noisy)
    ax.set_ylabel("memorised share of corrupted pixels")
    ax.set_title("memorisation: corrupted training pixels predicted\nwith their corrupted label (bar: mean)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)
