"""Command line: ``python -m benchmarks {gpu,run,plot,compile,compile-docs} ...`` from the
repository root.

``python -m benchmarks gpu`` measures everything on a CUDA GPU: every op, provider and pass at
the headline shapes, the loss and head at the M=1 dot-product shapes (where Liger and CCE
compete), then the N and P sweeps (fwd+bwd, without torch.compile), then the attention with
eight heads in each of its two forms (fused kernels; PyTorch's GEMMs and fused attention),
then the fused kernels with autotuning on (``tuned``) at the headline shapes.
Results are appended to
``benchmarks/results/<device>.jsonl`` (+ ``.csv``) and plotted into
``benchmarks/results/<device>/``. It stops cleanly after ``--time-budget`` seconds (default
480); rerun the same command until it prints ``complete``: it skips what is already measured.

``python -m benchmarks compile`` needs no GPU: it compiles every kernel for sm_90 or sm_80
through the real launchers and tabulates what the compiler made (registers, spills, tensor
cores, loads, atomics); ``compile-docs`` regenerates docs/kernels.md from it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, NamedTuple, Optional

import torch

if sys.argv[1:2] in (["compile"], ["compile-docs"]):
    # `compile` compiles for a real GPU: kernels must be decorated for the compiler, not the
    # interpreter.
    os.environ.pop("TRITON_INTERPRET", None)
elif not torch.cuda.is_available():
    # Without a GPU, Triton kernels (ours and Liger's) can only run on the CPU interpreter, and
    # the switch must be set before any kernel is decorated, i.e. before they are imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import compile as compile_gate  # noqa: E402
from . import plots, providers, roofline, runner, shapes  # noqa: E402


def _add_grid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ops", nargs="+", default=list(roofline.OPS), choices=roofline.OPS)
    p.add_argument("--providers", nargs="+", default=list(providers.PROVIDERS), choices=providers.PROVIDERS)
    p.add_argument("--passes", nargs="+", default=list(roofline.PASSES), choices=roofline.PASSES)
    p.add_argument("--shapes", nargs="+", default=list(shapes.DEFAULT_SETS), choices=list(shapes.SETS),
                   help="shape sets (default: %(default)s)")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="stop cleanly after S seconds; rerun the same command to resume")
    p.add_argument("--no-resume", action="store_true", help="re-measure cells already in the output file")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default: inductor)")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up (default: 25)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench measuring time (default: 100)")
    p.add_argument("--peak-bandwidth", type=float, default=None, metavar="BYTES_PER_S",
                   help="override the device table (with --peak-flops)")
    p.add_argument("--peak-flops", type=float, default=None, metavar="FLOP_PER_S",
                   help="dense bf16 tensor FLOP/s, overrides the device table (with --peak-bandwidth)")


def _run(args, out: Path, plan=None) -> int:
    """Measure ``plan`` (a list of :class:`Step`; default: the command line's grid) into
    ``out``, all within one time budget, then rewrite the CSV. Each step's ops and providers
    are limited to those on the command line."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = RESULTS.resolve()
    if device.type != "cuda" and results in (out.resolve(), *out.resolve().parents):
        print(f"refusing to write CPU timings under {RESULTS}: they are not results; pass --out elsewhere",
              file=sys.stderr)
        return 2
    print(f"device: {runner.device_name(device)}; writing {out}")
    plan = plan or [Step(args.shapes, args.passes)]
    start, written, complete = time.monotonic(), 0, True
    for step in plan:
        budget = None if args.time_budget is None else args.time_budget - (time.monotonic() - start)
        ops = [o for o in args.ops if step.ops is None or o in step.ops]
        providers_ = [p for p in args.providers if step.providers is None or p in step.providers]
        done = runner.run(
            shapes.get(step.sets), ops, providers_, step.passes, device=device, out=out,
            resume=not args.no_resume, time_budget_s=budget, compile_backend=args.compile_backend,
            warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, peak_bandwidth=args.peak_bandwidth,
            peak_flops=args.peak_flops,
        )
        written += len(done["rows"])
        if not done["complete"]:
            complete = False
            break
    rows = runner.read_rows(out)
    runner.write_csv(rows, out.with_suffix(".csv"))
    print(f"{written} rows written this run, {len(rows)} in {out} (+ .csv); "
          + ("complete" if complete else "NOT complete: rerun the same command to resume"))
    return 0


class Step(NamedTuple):
    """Part of a plan: shape sets and passes, and the ops and providers (``None``: all)."""

    sets: List[str]
    passes: List[str]
    ops: Optional[List[str]] = None
    providers: Optional[List[str]] = None


# What `gpu` measures, in this order, when --shapes and --passes are not given:
# 1. every op, provider and pass at the headline shapes (they matter most);
# 2. at the M = 1 dot-product shapes the ops that M and the similarity change: the loss (where
#    Liger and CCE compete) and the head (the 1x1-conv replacement);
# 3. the sweeps over N and P, forward+backward only and without torch.compile, whose fresh
#    compile for every shape and op would cost more device time than all the measuring;
# 4. the attention with eight heads, in bf16 and fp32 features, in each of its two forms;
# 5. the fused kernels with autotuning on at the headline shapes, forward+backward (each
#    kernel's tiles timed against their neighbours at its first call, seconds per kernel).
_UNTUNED = [p for p in providers.PROVIDERS if p != "tuned"]
GPU_PLAN = [
    Step(["headline"], list(roofline.PASSES), providers=_UNTUNED),
    Step(["m1-dot"], list(roofline.PASSES), ops=["contrastive_loss", "prototype_logits"], providers=_UNTUNED),
    Step(["sweep-N", "sweep-P"], ["fwdbwd"], providers=[p for p in _UNTUNED if p != "compile"]),
    Step(["heads"], list(roofline.PASSES), ops=["prototype_attention"], providers=_UNTUNED),
    Step(["headline"], ["fwdbwd"], providers=["tuned"]),
]


RESULTS = runner.RESULTS_DIR


def _report(results: Path, out_dir=None, passes=roofline.PASSES) -> None:
    """Rewrite ``results``' CSV and draw its plots (default: into a folder named after it)."""
    rows = runner.read_rows(results)
    runner.write_csv(rows, results.with_suffix(".csv"))
    print(results.with_suffix(".csv"))
    for pass_ in passes:
        for path in plots.plot(rows, out_dir or results.with_suffix(""), pass_):
            print(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    gpu = sub.add_parser("gpu", help="the full suite on this GPU into benchmarks/results/<device>, then plots")
    _add_grid_args(gpu)
    gpu.set_defaults(time_budget=480.0, shapes=None, passes=None)

    run = sub.add_parser("run", help="measure a chosen grid into --out (JSON lines + CSV)")
    _add_grid_args(run)
    run.add_argument("--out", type=Path, required=True, help="JSON-lines file to append to")

    plot = sub.add_parser("plot", help="the CSV and PNG plots of a results file")
    plot.add_argument("results", type=Path, help="a .jsonl results file")
    plot.add_argument("--out-dir", type=Path, default=None,
                      help="where the PNGs go; default: next to the file, in a folder named after it")
    plot.add_argument("--pass", dest="passes", nargs="+", default=list(roofline.PASSES), choices=roofline.PASSES)

    comp = sub.add_parser("compile", help="compile every kernel for a GPU target without a GPU; "
                          "write PTX, cubin and a table of registers, spills, tensor cores, loads, atomics")
    compile_gate.add_arguments(comp)
    docs = sub.add_parser("compile-docs", help="regenerate docs/kernels.md: the compile tables at voc and ade, "
                          "bf16, NCHW and NHWC, for sm_90")
    docs.add_argument("--path", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "kernels.md")

    args = parser.parse_args(argv)
    if args.command == "compile":
        return compile_gate.run(args)
    if args.command == "compile-docs":
        return compile_gate.write_docs(args.path)
    if args.command == "plot":
        _report(args.results, args.out_dir, args.passes)
        return 0
    if args.command == "gpu":
        if not torch.cuda.is_available():
            print("`gpu` needs a CUDA device; on the CPU use `run --shapes smoke --out /tmp/x.jsonl`",
                  file=sys.stderr)
            return 2
        out = RESULTS / f"{runner.device_slug(runner.device_name(torch.device('cuda')))}.jsonl"
        plan = None
        if args.shapes is None and args.passes is None:
            plan = GPU_PLAN
        else:
            args.shapes = args.shapes or list(shapes.DEFAULT_SETS)
            args.passes = args.passes or list(roofline.PASSES)
        code = _run(args, out, plan)
        if code == 0:
            _report(out)
        return code
    return _run(args, args.out)


if __name__ == "__main__":
    sys.exit(main())
