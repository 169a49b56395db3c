"""Run the grid (shape x op x provider x pass) and write one row per cell.

Rows are appended to a JSON-lines file as they are measured (a run cut short keeps what it
measured, and a rerun of the same command skips the cells already there), and the whole file
is then rewritten as CSV next to it. The schema is :data:`FIELDS`.
"""
from __future__ import annotations

import csv
import datetime
import gc
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from . import providers as P
from . import roofline, timing
from .shapes import Shape

FIELDS = (
    "op", "provider", "shape", "group", "dims", "dtype", "pass",
    "median_ms", "p20_ms", "p80_ms", "peak_mem_bytes",
    "bytes", "flops", "achieved_gbps", "achieved_tflops", "roofline_fraction", "bound",
    "fwd_max_abs_err",
    "device", "torch_version", "triton_version", "commit", "timestamp",
    "status", "reason", "tiles",
)
STATUSES = ("ok", "unavailable", "skipped", "error")
REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- environment
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def device_slug(name: str) -> str:
    """A file name for a device: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit() -> str:
    """HEAD of the repository the suite runs from, ``-dirty`` when tracked files differ."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "."], cwd=REPO).returncode != 0
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device) -> Dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # not installed, or broken
        triton_version = "none"
    return dict(device=device_name(device), torch_version=torch.__version__, triton_version=triton_version,
                commit=git_commit())


# ----------------------------------------------------------------------------- rows
def read_rows(path: Path) -> List[Dict]:
    """The rows of a JSON-lines file; a line cut off by a killed run is dropped (that cell is
    measured again on resume)."""
    if not Path(path).exists():
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def write_csv(rows: Sequence[Dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()})


def _key(row: Dict):
    return row["device"], row["op"], row["provider"], row["shape"], row["pass"]


class _Writer:
    def __init__(self, path: Optional[Path], log=print):
        self.path, self.log = path, log
        self.rows: List[Dict] = []
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            # a killed run may have left half a line: end it, so that the next row stands alone
            if Path(path).exists() and Path(path).stat().st_size:
                with open(path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    cut = f.read(1) != b"\n"
                if cut:
                    with open(path, "a") as f:
                        f.write("\n")

    def add(self, row: Dict) -> None:
        assert set(row) == set(FIELDS), sorted(set(row) ^ set(FIELDS))
        self.rows.append(row)
        if row["status"] != "ok":
            self.log(f"{row['shape']:>16} {row['op']:>20} {row['provider']:>9} {row['pass']:>6}: "
                     f"{row['status']}: {row['reason']}")
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def _row(env, op: str, provider: str, shape: Shape, pass_: str, status: str, reason: str = "", **measured) -> Dict:
    bytes_, flops = roofline.work(op, shape, pass_)
    row = dict.fromkeys(FIELDS)
    row.update(env, op=op, provider=provider, shape=shape.name, group=shape.group, dims=shape.dims(),
               dtype=shape.dtype_str(), **{"pass": pass_}, bytes=bytes_, flops=flops, status=status,
               reason=reason, timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    row.update(measured)
    return row


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _free(device: torch.device) -> None:
    """Give freed GPU memory back between cells so that one cell's peak does not count the
    last one's leftovers (a no-op on the CPU, where a full ``gc.collect`` only costs time)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _describe(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    return text[0][:300] if text else type(err).__name__


# ----------------------------------------------------------------------------- the run
def run(
    shapes: Iterable[Shape],
    ops: Sequence[str] = roofline.OPS,
    providers: Sequence[str] = P.PROVIDERS,
    passes: Sequence[str] = roofline.PASSES,
    *,
    device: Optional[torch.device] = None,
    out: Optional[Path] = None,
    resume: bool = True,
    time_budget_s: Optional[float] = None,
    compile_backend: str = "inductor",
    warmup_ms: float = 25,
    rep_ms: float = 100,
    cpu_reps: int = 3,
    peak_bandwidth: Optional[float] = None,
    peak_flops: Optional[float] = None,
    log=print,
) -> Dict:
    """Measure every (shape, op, provider, pass) cell; returns ``{"rows": [...], "complete": bool}``
    (``complete`` is False when the time budget stopped the run before the end).

    A provider that cannot run a cell gets a row with ``status="unavailable"`` and the reason;
    one that runs out of memory gets ``"skipped"``; any other exception ``"error"``. Nothing
    stops the run but the time budget, checked before each (shape, op, provider).
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name, chosen, allowed in (("op", ops, roofline.OPS), ("provider", providers, P.PROVIDERS),
                                  ("pass", passes, roofline.PASSES)):
        bad = [c for c in chosen if c not in allowed]
        if bad:
            raise ValueError(f"unknown {name}(s) {bad}; choose from {allowed}")
    env = environment(device)
    peak = roofline.device_peak(env["device"], peak_bandwidth, peak_flops)
    done = {_key(r) for r in read_rows(out)} if (out is not None and resume) else set()
    writer = _Writer(out, log)
    start = time.monotonic()

    for shape in shapes:
        problem = None
        for op in ops:
            reference_out = None  # the reference's forward output, for each provider's error
            for provider in providers:
                if not P.applies(provider, op, shape):
                    continue
                todo = [p for p in passes if (env["device"], op, provider, shape.name, p) not in done]
                if not todo:
                    continue
                if time_budget_s is not None and time.monotonic() - start > time_budget_s:
                    log(f"time budget of {time_budget_s:.0f} s reached: rerun the same command to resume")
                    return dict(rows=writer.rows, complete=False)
                reason = P.unavailable(provider, op, shape, device)
                if reason is not None:
                    for p in todo:
                        writer.add(_row(env, op, provider, shape, p, "unavailable", reason))
                    continue
                if problem is None:
                    try:
                        problem = P.make_problem(shape, device)
                    except Exception as err:  # noqa: BLE001 - recorded, the run goes on
                        status = "skipped" if _is_oom(err) else "error"
                        for p in todo:
                            writer.add(_row(env, op, provider, shape, p, status,
                                            f"making the inputs failed: {_describe(err)}"))
                        _free(device)
                        continue
                if reference_out is None:
                    # The reference may not fit where a fused kernel does (it holds N x P): then
                    # the other providers still run, without an error figure.
                    try:
                        with torch.no_grad():
                            reference_out = P.OPS[op](problem, "reference").detach()
                    except Exception:  # noqa: BLE001
                        reference_out = False
                        _free(device)
                with P.autotuning(provider == "tuned"):
                    _measure_provider(writer, env, peak, problem,
                                      reference_out if reference_out is not False else None,
                                      op, provider, shape, todo, device, compile_backend=compile_backend,
                                      warmup_ms=warmup_ms, rep_ms=rep_ms, cpu_reps=cpu_reps, log=log)
                if provider == "compile":
                    torch._dynamo.reset()
                _free(device)
            reference_out = None
            _free(device)
        del problem
        _free(device)
    return dict(rows=writer.rows, complete=True)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 26) -> float:
    """``max |a - b|`` in fp32, a chunk at a time (the outputs can be GBs)."""
    a, b = a.reshape(-1), b.reshape(-1)
    if a.numel() == 0:
        return 0.0
    return max((a[i:i + chunk].float() - b[i:i + chunk].float()).abs().max().item()
               for i in range(0, a.numel(), chunk))


def _tuned_tiles() -> Optional[Dict[str, Dict[str, object]]]:
    """What each kernel of the ``tuned`` provider's last call ran: ``{site: launch arguments}``
    (empty where nothing was tuned, as on the CPU), and forgets it for the next cell."""
    try:
        from torch_ppl.kernels import _autotune
    except ImportError:  # no Triton
        return None
    tiles = dict(_autotune.LAST)
    _autotune.LAST.clear()
    return tiles


def _measure_provider(writer, env, peak, problem, reference_out, op, provider, shape, todo, device, *,
                      compile_backend, warmup_ms, rep_ms, cpu_reps, log) -> None:
    if provider == "tuned":
        _tuned_tiles()  # start from nothing
    try:
        fn = P.build(provider, op, problem, compile_backend)
        out = fn()  # first call: compiles, autotunes; also the accuracy check
        err = None if reference_out is None else max_abs_diff(out.detach(), reference_out)
        grad = timing.output_grad(out)
        tiles = None
        if provider == "tuned":
            if any(p != "fwd" for p in todo):
                # the backward's kernels are tuned at their first call: here, not in a timed run
                out.backward(grad)
                for t in problem.leaves:
                    t.grad = None
            tiles = _tuned_tiles()
        del out
    except NotImplementedError as exc:
        for p in todo:
            writer.add(_row(env, op, provider, shape, p, "unavailable", str(exc)))
        return
    except Exception as exc:  # noqa: BLE001
        status = "skipped" if _is_oom(exc) else "error"
        for p in todo:
            writer.add(_row(env, op, provider, shape, p, status, _describe(exc)))
        _free(device)
        return
    for p in todo:
        try:
            m = timing.measure(fn, p, grad, problem.leaves, device, warmup_ms=warmup_ms, rep_ms=rep_ms,
                               cpu_reps=cpu_reps)
        except Exception as exc:  # noqa: BLE001
            status = "skipped" if _is_oom(exc) else "error"
            writer.add(_row(env, op, provider, shape, p, status, _describe(exc)))
            for t in problem.leaves:
                t.grad = None
            _free(device)
            continue
        bytes_, flops = roofline.work(op, shape, p)
        row = _row(env, op, provider, shape, p, "ok", fwd_max_abs_err=err, tiles=tiles, **m,
                   **roofline.rates(bytes_, flops, m["median_ms"], peak))
        writer.add(row)
        log(f"{shape.name:>16} {op:>20} {provider:>9} {p:>6}: {m['median_ms']:9.3f} ms"
            + (f"  peak {m['peak_mem_bytes'] / 2**20:9.1f} MiB" if m["peak_mem_bytes"] is not None else ""))
