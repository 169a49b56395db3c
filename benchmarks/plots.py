"""Plots of a results file: speed-up over the eager reference and peak memory, per op and
shape group, for one pass (``fwdbwd`` by default). Each figure names the device.

Sweeps (``sweep-N``, ``sweep-P``) are drawn as lines against N or P on log axes; the other
groups as grouped bars, one per shape. A y axis turns logarithmic when its values span more
than 10x.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Sequence

SWEEP_AXIS = {"sweep-N": "N", "sweep-P": "P"}
BASELINE = "reference"


def _ok(rows: Sequence[Dict], pass_: str) -> List[Dict]:
    return [r for r in rows if r["status"] == "ok" and r["pass"] == pass_]


def plot(rows: Sequence[Dict], out_dir, pass_: str = "fwdbwd") -> List[Path]:
    """Write one PNG per (op, group) with measured rows; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells: Dict = defaultdict(dict)  # (op, group) -> {(shape, provider): row}
    for r in _ok(rows, pass_):
        cells[(r["op"], r["group"])][(r["shape"], r["provider"])] = r
    devices = sorted({r["device"] for r in rows})
    written = []
    for (op, group), table in sorted(cells.items()):
        shapes = list(dict.fromkeys(s for s, _ in table))  # file order
        providers = list(dict.fromkeys(p for _, p in table))
        fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
        axis = SWEEP_AXIS.get(group)
        xs = ([table[next(k for k in table if k[0] == s)]["dims"][axis] for s in shapes] if axis
              else list(range(len(shapes))))
        width = 0.8 / max(len(providers), 1)
        all_speed, all_mem = [], []
        for i, provider in enumerate(providers):
            speed, mem, where = [], [], []
            for x, shape in zip(xs, shapes):
                row, base = table.get((shape, provider)), table.get((shape, BASELINE))
                if row is None:
                    continue
                where.append(x)
                speed.append(base["median_ms"] / row["median_ms"] if base else float("nan"))
                mem.append(row["peak_mem_bytes"] / 2**20 if row["peak_mem_bytes"] is not None else float("nan"))
            all_speed += [v for v in speed if v == v]
            all_mem += [v for v in mem if v == v and v > 0]
            if axis:
                ax_speed.plot(where, speed, marker="o", label=provider)
                ax_mem.plot(where, mem, marker="o", label=provider)
            else:
                offset = [w - 0.4 + width * (i + 0.5) for w in where]
                ax_speed.bar(offset, speed, width, label=provider)
                ax_mem.bar(offset, mem, width, label=provider)
        for ax, label in ((ax_speed, f"speed-up over eager {BASELINE} (x)"), (ax_mem, "peak memory delta (MiB)")):
            ax.set_ylabel(label)
            if axis:
                ax.set_xscale("log")
                ax.set_xlabel(axis)
            else:
                ax.set_xticks(xs)
                ax.set_xticklabels(shapes, rotation=20)
            ax.grid(alpha=0.3)
        # Speed-ups and memory can span orders of magnitude (a fused kernel vs N x P tensors).
        if all_speed and max(all_speed) / min(all_speed) > 10:
            ax_speed.set_yscale("log")
        if all_mem and max(all_mem) / min(all_mem) > 10:
            ax_mem.set_yscale("log")
        if not all_mem:
            ax_mem.text(0.5, 0.5, "no memory figures (not a CUDA run)", ha="center", va="center",
                        transform=ax_mem.transAxes)
        ax_speed.axhline(1.0, color="black", linewidth=0.8)
        ax_speed.legend(fontsize=8)
        fig.suptitle(f"{op}, {group}, {pass_} — {', '.join(devices)}")
        fig.tight_layout()
        path = out_dir / f"{op}_{group}_{pass_}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
