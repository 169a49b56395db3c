"""``python -m torch_ppl.demo [noise]``: segmentation of handwritten-digit scenes.

Two experiments: semi-supervised learning with pseudo-labels (the default mode) and, with
``noise``, fully supervised learning from corrupted training labels. The command line is
described by :data:`DESCRIPTION` (what ``--help`` prints); the results of one full run of each
are in ``docs/demo.md``.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .data import DataConfig, make_scenes
from .model import VARIANTS
from .noise import LEVELS, NOISE_DATA, NOISE_VARIANTS, train_noise_run
from .noise_report import format_noise_tables, make_noise_figure, write_noise_json
from .report import TABLE_KEY, format_paired_table, format_table, make_figure, summarize, write_json
from .train import RunResult, TrainConfig, train_variant
from .workers import run_in_workers


@dataclass(frozen=True)
class Preset:
    data: DataConfig
    train: TrainConfig
    seeds: int


# The training setting was fixed once (FixMatch/UniMatch choices, the library's defaults for the
# PPL modules) and the number of steps chosen from the time budget and from the supervised
# variant alone; see docs/demo.md. It was not tuned on the semi-supervised results.
DEFAULT = Preset(DataConfig(), TrainConfig(steps=1500, eval_every=50), seeds=3)
QUICK = Preset(DataConfig(num_train=256, num_test=64),
               TrainConfig(steps=80, eval_every=20, curve_test_scenes=32), seeds=1)
NOISE_STEPS, NOISE_BATCH, NOISE_SEEDS, NOISE_MINUTES = 2000, 4, 6, "15-25 minutes"
# The noise experiment: its steps, batch and seeds were fixed from the time budget and a pilot
# before its first full run, and written down in docs/demo.md with the test they serve.
NOISE_DEFAULT = Preset(NOISE_DATA, TrainConfig(steps=NOISE_STEPS, batch_labelled=NOISE_BATCH), seeds=NOISE_SEEDS)
NOISE_QUICK = Preset(replace(NOISE_DATA, num_train=64, num_test=32), TrainConfig(steps=40, batch_labelled=4), seeds=1)


# The demo extra: checked before any work, so that a missing package does not end a run at
# its figure after minutes of training.
DEMO_PACKAGES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}
FULL_RUN = "docs/demo.md (table) and docs/demo/figure.png in the torch_ppl repository"
NOISE_FULL_RUN = "docs/demo.md (label noise) and docs/demo/noise/ in the torch_ppl repository"
DESCRIPTION = f"""python -m torch_ppl.demo [noise]: segmentation of handwritten-digit scenes.

Default mode (semi): semi-supervised learning with pseudo-labels. Trains every variant
(supervised, pseudo_label, prototypes, push, pull, ppl, ppl_exclude) with each seed on the
same scenes.

noise: fully supervised learning from corrupted training labels (clean test labels). Trains
every variant (conv, prototypes, push, pull, ppl) at every noise level ({", ".join(LEVELS)}),
each seed drawing its own noise, and compares how much each variant loses to the noise.

Both print tables and write results.json and figure.png under --out. Needs the demo extra:
pip install "torch_ppl[demo]".

  python -m torch_ppl.demo --quick         # smoke test: every variant trains, well under a minute on 2 CPU cores
  python -m torch_ppl.demo                 # the full run: 3 seeds, 1500 steps, about 11 minutes on 2 CPU cores
  python -m torch_ppl.demo noise --quick   # smoke test of the noise experiment
  python -m torch_ppl.demo noise           # its full run: {NOISE_SEEDS} seeds, {NOISE_STEPS} steps, {NOISE_MINUTES} on 2 cores
  python -m torch_ppl.demo --device cuda --variants pseudo_label,ppl --seeds 5 --steps 2000
"""


def missing_packages() -> List[str]:
    """The pip names of the demo extra's packages that do not import here."""
    return [pip for module, pip in DEMO_PACKAGES.items() if importlib.util.find_spec(module) is None]


def _variants(text: str) -> List[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no variant in {text!r}")
    return names


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may run on (Linux)
    except AttributeError:
        return os.cpu_count() or 1


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m torch_ppl.demo", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="semi", choices=("semi", "noise"),
                   help="semi: semi-supervised learning with pseudo-labels (default); "
                        "noise: supervised learning from corrupted labels")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke test: smaller data, {QUICK.train.steps} steps, {QUICK.seeds} seed; checks "
                        "that every variant trains, far too short to compare them")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu (default), cuda, cuda:1")
    p.add_argument("--seeds", type=_positive, default=None,
                   help=f"number of seeds, 0..N-1 (default {DEFAULT.seeds}, noise: {NOISE_DEFAULT.seeds}; "
                        f"{QUICK.seeds} with --quick)")
    p.add_argument("--steps", type=_positive, default=None,
                   help=f"training steps per run (default {DEFAULT.train.steps}, noise: {NOISE_DEFAULT.train.steps}; "
                        f"{QUICK.train.steps}, noise: {NOISE_QUICK.train.steps} with --quick)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default demo_out/, noise: demo_out/noise/)")
    p.add_argument("--variants", type=_variants, default=None,
                   help=f"comma-separated subset of: {', '.join(VARIANTS)}; noise: {', '.join(NOISE_VARIANTS)} "
                        "(default all)")
    p.add_argument("--workers", type=_positive, default=None,
                   help="runs trained at once in worker processes, one torch thread each (CPU only; "
                        "default: the number of CPU cores, at most the number of runs)")
    p.add_argument("--labelled-fraction", type=_fraction, default=None,
                   help=f"semi: share of the training scenes that are labelled (default {DEFAULT.data.labelled_fraction:g})")
    p.add_argument("--digit-threshold", type=_fraction, default=None,
                   help=f"semi: confidence threshold for pseudo-labels that name a digit (default: the same as "
                        f"background, {DEFAULT.train.threshold})")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = p.parse_args(argv)
    if args.mode == "noise" and (args.labelled_fraction is not None or args.digit_threshold is not None):
        p.error("--labelled-fraction and --digit-threshold apply to the semi-supervised mode only")
    known = NOISE_VARIANTS if args.mode == "noise" else VARIANTS
    if args.variants is None:
        args.variants = list(known)
    unknown = [v for v in args.variants if v not in known]
    if unknown:
        p.error(f"unknown variant(s) {unknown} for mode {args.mode}; choose from {', '.join(known)}")
    if args.out is None:
        args.out = Path("demo_out") / "noise" if args.mode == "noise" else Path("demo_out")
    return args


def _print_footer(num_runs: int, wall_s: float, device: torch.device, workers: int, out: Path) -> None:
    """The closing line of both experiments: runs, wall time, where, and the files written."""
    threads = "1 thread each" if workers > 1 else f"{torch.get_num_threads()} threads"
    print(f"\n{num_runs} runs in {wall_s:.1f} s on {device} ({workers} worker(s), {threads}); "
          f"wrote {out / 'results.json'} and {out / 'figure.png'}")


def run(data_cfg: DataConfig, train_cfg: TrainConfig, variants: Sequence[str], seeds: Sequence[int],
        device: torch.device, out: Path, progress: bool = True, workers: int = 1, quick: bool = False) -> dict:
    """Train every variant with every seed, write ``results.json`` and ``figure.png`` under
    ``out``, print the table; returns the JSON document.

    ``workers > 1`` (CPU only) trains that many runs at once in worker processes with one torch
    thread each: the demo's tensors are too small for intra-op threads to pay (one thread per
    run is faster than two here), so separate runs use the cores far better. Every run seeds
    itself, so the results do not depend on how runs are spread over workers (up to the
    floating-point order of a different thread count). ``quick`` only changes what is printed:
    a smoke test's numbers are labelled as such."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    scenes = make_scenes(data_cfg)
    jobs = [(name, seed) for seed in seeds for name in variants]
    bar = tqdm(total=len(jobs) * train_cfg.steps, unit="step", disable=not progress, dynamic_ncols=True)
    with bar:
        if workers <= 1:
            runs: List[RunResult] = []
            for name, seed in jobs:
                bar.set_description(f"{name} seed {seed}")
                runs.append(train_variant(VARIANTS[name], scenes, train_cfg, seed, device,
                                          on_step=lambda: bar.update()))
                bar.set_postfix_str(f"last mIoU {runs[-1].test_miou:.3f}")
        else:
            bar.set_description(f"{len(jobs)} runs, {workers} workers")
            runs = run_in_workers(jobs, scenes, train_cfg, workers, bar)
    summary = summarize(runs)
    make_figure(out / "figure.png", runs, scenes)
    wall_s = time.perf_counter() - start
    config = {"data": asdict(data_cfg), "train": asdict(train_cfg), "variants": list(variants),
              "seeds": list(seeds), "device": str(device), "workers": workers}
    doc = write_json(out / "results.json", config, runs, summary, wall_s, device)
    print(format_table(summary))
    print()
    print(TABLE_KEY)
    if len(seeds) > 1:
        print()
        print(format_paired_table(runs))
    _print_footer(len(runs), wall_s, device, workers, out)
    if quick:
        print(f"\nThis was --quick, a smoke test: every variant trained for {train_cfg.steps} steps without error.\n"
              "Its numbers compare nothing: a model trained this briefly still calls most pixels background\n"
              "(calling every pixel background scores a test mIoU of 0.076 on these scenes). Run without\n"
              "--quick for the comparison (about 11 minutes on 2 CPU cores); the results of one full run:\n"
              f"{FULL_RUN}.")
    return doc


def run_noise(data_cfg: DataConfig, train_cfg: TrainConfig, variants: Sequence[str], levels: Sequence[str],
              seeds: Sequence[int], device: torch.device, out: Path, progress: bool = True, workers: int = 1,
              quick: bool = False) -> dict:
    """The label-noise experiment: every variant at every level with every seed; writes
    ``results.json`` and ``figure.png`` under ``out``, prints the tables; returns the JSON."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    scenes = make_scenes(data_cfg)
    jobs = [(name, level, seed) for seed in seeds for level in levels for name in variants]
    bar = tqdm(total=len(jobs) * train_cfg.steps, unit="step", disable=not progress, dynamic_ncols=True)
    with bar:
        if workers <= 1:
            runs = []
            for name, level, seed in jobs:
                bar.set_description(f"{name} {level} seed {seed}")
                runs.append(train_noise_run(name, level, seed, scenes, train_cfg, device, on_step=lambda: bar.update()))
                bar.set_postfix_str(f"last mIoU {runs[-1].test_miou:.3f}")
        else:
            bar.set_description(f"{len(jobs)} runs, {workers} workers")
            runs = run_in_workers(jobs, scenes, train_cfg, workers, bar, fn=train_noise_run)
    make_noise_figure(out / "figure.png", runs)
    wall_s = time.perf_counter() - start
    config = {"data": asdict(data_cfg), "train": asdict(train_cfg), "variants": list(variants),
              "levels": {lv: asdict(LEVELS[lv]) for lv in levels}, "seeds": list(seeds), "device": str(device),
              "workers": workers}
    doc = write_noise_json(out / "results.json", config, runs, wall_s, device)
    print(format_noise_tables(runs))
    _print_footer(len(runs), wall_s, device, workers, out)
    if quick:
        print(f"\nThis was noise --quick, a smoke test: every variant trained for {train_cfg.steps} steps at every "
              f"noise level without error.\nIts numbers compare nothing. Run without --quick for the comparison "
              f"({NOISE_MINUTES} on 2 CPU cores); the results of one full run:\n{NOISE_FULL_RUN}.")
    return doc


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    missing = missing_packages()
    if missing:
        print(f"error: the demo needs the packages of torch_ppl's demo extra; missing: {', '.join(missing)}.\n"
              f"Install them with: pip install \"torch_ppl[demo]\"  (from a checkout: pip install -e \".[demo]\")",
              file=sys.stderr)
        return 2
    if args.mode == "noise":
        preset = NOISE_QUICK if args.quick else NOISE_DEFAULT
    else:
        preset = QUICK if args.quick else DEFAULT
    train_cfg, data_cfg = preset.train, preset.data
    if args.labelled_fraction is not None:
        data_cfg = replace(data_cfg, labelled_fraction=args.labelled_fraction)
    if args.digit_threshold is not None:
        train_cfg = replace(train_cfg, threshold_digits=args.digit_threshold)
    if args.steps is not None:
        train_cfg = replace(train_cfg, steps=args.steps, eval_every=min(train_cfg.eval_every, args.steps))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    seeds = list(range(args.seeds if args.seeds is not None else preset.seeds))
    if device.type != "cpu":
        if args.workers not in (None, 1):
            print("error: --workers applies to --device cpu only", file=sys.stderr)
            return 2
        workers = 1
    else:
        per_seed = len(args.variants) * (len(LEVELS) if args.mode == "noise" else 1)
        workers = args.workers or min(_usable_cores(), len(seeds) * per_seed)
    if args.mode == "noise":
        run_noise(data_cfg, train_cfg, args.variants, list(LEVELS), seeds, device, args.out, progress=args.progress,
                  workers=workers, quick=args.quick)
    else:
        run(data_cfg, train_cfg, args.variants, seeds, device, args.out, progress=args.progress, workers=workers,
            quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
