"""Compile every kernel for a real GPU target without a GPU, and read what the compiler made.

``python -m benchmarks compile`` runs a forward and a backward of each op through its real
launchers (the functional API with ``backend="triton"``: the launchers' tile and grid choice for
that GPU, Triton's argument specialisation, the strides of the real layouts) on CPU tensors of a
benchmark shape. A stand-in Triton driver reports the target GPU, so each launch compiles the
kernel for it, with the ``ptxas`` that Triton ships, and launches nothing (Triton's
``warmup`` path). Each launched kernel's PTX and cubin are written to ``--out`` and read back:

* from ``cuobjdump -res-usage`` (shipped with Triton): registers, stack (local memory per
  thread: non-zero means spills) and static shared memory;
* from the SASS (``cuobjdump -sass``): spill stores and loads (``STL``/``LDL``), Hopper
  ``HGMMA`` (wgmma) and ``HMMA`` (mma.sync) tensor-core instructions, global-load widths
  (``LDG``), atomics (``ATOMG``/``RED``) and the fences around them (``MEMBAR``);
* from the Triton metadata: warps, stages and the dynamic shared memory the launch asks for.

Nothing here needs CUDA, a driver or a GPU; it needs Triton's NVIDIA backend (any Linux wheel).
The command exits with 1 if any kernel fails to compile, asks a block for more shared memory
than the GPU has, or compiles to a ``trap`` (which Triton emits, without an error, for a kernel
it cannot lower).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

# compute capability and SMs: H100 SXM, A100 SXM, RTX A6000 (sm_86 stands for the GPUs whose blocks
# may use 99 KB of shared memory: sm_86, sm_89 and sm_120, the RTX 30/40/50 series, A10, L4, L40S),
# B200 (sm_100) and RTX 5090 (sm_120, 170 SMs)
TARGETS = {"sm_90": (90, 132), "sm_80": (80, 108), "sm_86": (86, 84), "sm_100": (100, 148), "sm_120": (120, 170)}
# Shared memory one block may use (opt-in maximum): 227 KB on sm_90 and sm_100, 163 KB on sm_80,
# 99 KB on sm_86 and sm_120. Triton only finds out at load time, which a compile without a GPU
# never reaches, so the gate checks it.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 86: 99 * 1024, 100: 227 * 1024, 120: 99 * 1024}
# Shared memory of one SM (a block also reserves 1 KB of it) and the per-SM limits that decide
# how many blocks run side by side (CUDA occupancy rules for sm_80, sm_86, sm_90, sm_100, sm_120).
SHARED_PER_SM = {90: 228 * 1024, 80: 164 * 1024, 86: 100 * 1024, 100: 228 * 1024, 120: 100 * 1024}
REGS_PER_SM = 65536
WARPS_PER_SM = {90: 64, 80: 64, 86: 48, 100: 64, 120: 48}
BLOCKS_PER_SM = {90: 32, 80: 32, 86: 16, 100: 32, 120: 24}
DTYPES = ("bf16", "fp16", "fp32")
LAYOUTS = ("nchw", "nhwc")
OPS = ("prototype_logits", "contrastive_loss", "prototype_attention", "prototype_logits_and_contrastive")
# The head's other kernels and branches: the benchmarks' head is max pooling with a fixed scale;
# logsumexp pooling takes the joint dW kernel and recomputes the similarities in dx, mean
# pooling takes other branches, and a learnable scale adds its gradient to dx.
HEAD_VARIANTS = {
    "prototype_logits-lse-scale": dict(pooling="logsumexp", learnable_scale=True),
    "prototype_logits-mean-scale": dict(pooling="mean", learnable_scale=True),
}
# The attention's branches the benchmarks' plain pull never takes: a pixel's own class hidden
# (exclude=, as PPLHead passes its labels) and a layer scale gamma, whose gradient the kernels
# form alongside the others.
ATTENTION_VARIANTS = {"prototype_attention-exclude-scale": dict(exclude=True, layer_scale=0.1)}
# The head + push in one op with the branches that hold the most per pixel: logsumexp pooling
# (the pooled values, the recomputed similarities' softmax), the nearest positive and a
# learnable scale (its gradient summed in dx). Not compiled by default: it still spills in some
# configurations (docs/kernel-fused.md); CI compiles it where it must not.
ONE_PASS_VARIANTS = {
    "prototype_logits_and_contrastive-lse-nearest-scale": dict(pooling="logsumexp", positives="nearest",
                                                               learnable_scale=True),
}
VARIANTS = {**HEAD_VARIANTS, **ATTENTION_VARIANTS, **ONE_PASS_VARIANTS}
# What the command compiles without --ops
DEFAULT_OPS = OPS + tuple(HEAD_VARIANTS) + tuple(ATTENTION_VARIANTS)

# One line on the role of each kernel, for the table (docs/kernels.md).
ROLES = {
    "_logits_fwd_kernel": "head forward: similarity GEMM, pooled per class, logits (+ max winner)",
    "_logits_bwd_dx_kernel": "head backward (logsumexp pooling), head + push backward: dx (and dscale partials) "
                             "from the recomputed similarities",
    "_logits_bwd_dx_slice_kernel": "head backward (max, mean pooling): dx by channel slices, dscale partials, "
                                   "no similarity",
    "_logits_bwd_dw_kernel": "head backward (max, mean pooling): prototype gradient per class tile and channel slice",
    "_logits_push_bwd_dw_kernel": "head + push backward, and the head's alone for logsumexp pooling: prototype "
                                  "gradient from one recomputed similarity tile",
    "_contrastive_fwd_kernel": "push forward: similarity GEMM, online logsumexp, per-pixel loss",
    "_contrastive_bwd_dx_kernel": "push backward: dx, all channels on chip, written once in the features' dtype",
    "_contrastive_bwd_dw_kernel": "push backward: prototype gradient, one prototype tile per program, flushed once",
    "_attention_fwd_kernel": "pull forward: scores, online softmax, read-out and residual",
    "_attention_bwd_dx_kernel": "pull backward: dx, softmax deltas, dgamma/dbias partials",
    "_attention_bwd_dproto_kernel": "pull backward: gradients of the prototype-side K~, c, V~",
}


@dataclasses.dataclass
class Launch:
    op: str
    kernel: str
    grid: Tuple[int, ...]
    compiled: object = None
    error: Optional[str] = None
    meta: Dict[str, object] = dataclasses.field(default_factory=dict)  # the launch's constexprs


# ----------------------------------------------------------------------------- the driver
def _stand_in_driver(arch: int):
    """A Triton driver that reports ``arch`` as the current GPU and has no device behind it:
    Triton specialises and compiles for that target; ``warmup`` launches skip the launch."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class StandInDriver(DriverBase):
        def __init__(self) -> None:
            self.target = GPUTarget("cuda", arch, 32)

        @classmethod
        def is_active(cls) -> bool:
            return False

        def map_python_to_cpp_type(self, ty: str) -> str:
            raise NotImplementedError("the stand-in driver builds no launcher")

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError("the stand-in driver runs nothing")

        def get_current_device(self) -> int:
            return 0

        def set_current_device(self, device: int) -> None:
            pass

        def get_current_stream(self, device: Optional[int] = None) -> int:
            return 0

    return StandInDriver()


def _forget_compiled(fn) -> None:
    """Empty a ``JITFunction``'s per-device kernel cache (``device_caches`` from Triton 3.3 on,
    ``cache`` and the argument binder before)."""
    if hasattr(fn, "device_caches"):
        fn.device_caches.clear()
    else:
        fn.cache.clear()
        fn.binder = None


def record_launches(arch: int, num_sms: int):
    """Context manager: inside it the torch_ppl launchers tile for ``arch`` and every
    ``kernel[grid](...)`` compiles for it and is recorded instead of launched. Yields the list
    of :class:`Launch`."""
    import contextlib

    import triton.language as tl
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from torch_ppl.kernels import _common

    @contextlib.contextmanager
    def _ctx():
        launches: List[Launch] = []
        original = JITFunction.run
        touched = set()

        def run(self, *args, grid, warmup, **kwargs):
            if self not in touched:
                # Triton keys its per-kernel binder and kernel cache by device index (0 here,
                # whatever the target): start from empty ones so that nothing compiled for
                # another target is reused, and empty them again on the way out.
                _forget_compiled(self)
                touched.add(self)
            name = self.fn.__name__
            launch = Launch(op="", kernel=name, grid=tuple(grid) if not callable(grid) else ("?",),
                            meta={k: str(v) if isinstance(v, tl.dtype) else v for k, v in kwargs.items()
                                  if isinstance(v, (bool, int, str, tl.dtype))})
            launches.append(launch)
            try:
                launch.compiled = original(self, *args, grid=grid, warmup=True, **kwargs)
            except Exception as err:  # a compile error: record it, go on with the rest
                launch.error = f"{type(err).__name__}: {err}"
            return launch.compiled

        # Triton 3.5 on keeps the active driver in ``_active`` (None until a real driver was
        # needed; reset_active would make one), earlier releases in ``active``
        slot = "_active" if hasattr(driver, "_active") else "active"
        previous = getattr(driver, slot)
        driver.set_active(_stand_in_driver(arch))
        JITFunction.run = run
        try:
            with _common.compile_for(_common.CompileTarget(arch, num_sms, SHARED_LIMIT[arch])):
                yield launches
        finally:
            JITFunction.run = original
            setattr(driver, slot, previous)
            for fn in touched:
                _forget_compiled(fn)

    return _ctx()


# ----------------------------------------------------------------------------- the ops
def _problem(shape, dtype: str, layout: str):
    import torch

    from . import providers

    shape = resolve_shape(shape, dtype)
    problem = providers.make_problem(shape, torch.device("cpu"))
    if layout == "nhwc":
        x = problem.x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        problem = dataclasses.replace(problem, x=x)
    return problem


def _scale(learnable: bool):
    """The head's scale as the benchmarks fix it, or as a learnable 0-d tensor (whose gradient
    the kernels form)."""
    import torch

    from . import providers

    return torch.tensor(providers.SCALE, requires_grad=True) if learnable else providers.SCALE


def _head_variant(pooling: str, learnable_scale: bool):
    def run(problem, backend: str):
        import torch_ppl.functional as PF

        return PF.prototype_logits(problem.x, problem.prototypes, similarity=problem.shape.similarity,
                                   pooling=pooling, scale=_scale(learnable_scale), backend=backend)
    return run


def _attention_variant(exclude: bool, layer_scale: float):
    def run(problem, backend: str):
        import torch

        import torch_ppl.functional as PF

        from . import providers

        a = problem.attn
        gamma = torch.full((problem.shape.C,), layer_scale, device=problem.x.device, requires_grad=True)
        return PF.prototype_attention(
            problem.x, problem.prototypes, a["q_weight"], a["k_weight"], a["v_weight"], a["out_weight"],
            a["q_bias"], a["k_bias"], a["v_bias"], a["out_bias"], num_heads=problem.shape.heads, gamma=gamma,
            exclude=problem.target if exclude else None, ignore_index=providers.IGNORE_INDEX, backend=backend)
    return run


def _one_pass_variant(pooling: str, positives: str, learnable_scale: bool):
    def run(problem, backend: str):
        import torch_ppl.functional as PF

        from . import providers

        return PF.prototype_logits_and_contrastive(
            problem.x, problem.prototypes, problem.target, similarity=problem.shape.similarity, pooling=pooling,
            scale=_scale(learnable_scale), temperature=problem.shape.temperature, positives=positives,
            ignore_index=providers.IGNORE_INDEX, backend=backend)
    return run


def base_op(name: str) -> str:
    """The op a variant runs (``prototype_logits-lse-scale``: ``prototype_logits``)."""
    return name.split("-")[0] if name in VARIANTS else name


def _op(name: str):
    from . import providers

    if name in HEAD_VARIANTS:
        return _head_variant(**HEAD_VARIANTS[name])
    if name in ATTENTION_VARIANTS:
        return _attention_variant(**ATTENTION_VARIANTS[name])
    if name in ONE_PASS_VARIANTS:
        return _one_pass_variant(**ONE_PASS_VARIANTS[name])
    return providers.OPS[name]


def compile_ops(target: str, shape, dtype: str, layout: str, ops=OPS,
                deterministic: bool = False, tf32: bool = False) -> List[Launch]:
    """Forward and backward of each op at ``shape`` (a headline shape's name or a
    :class:`~benchmarks.shapes.Shape`) through the real launchers, compiled for ``target``; the
    launches in order, each with its compiled kernel or its error. ``ops`` may name
    :data:`VARIANTS` too. ``tf32``: with PyTorch's float32 matmuls allowed to use TF32, which
    the GEMMs of float32 features follow."""
    import torch

    arch, sms = TARGETS[target]
    problem = _problem(shape, dtype, layout)
    out: List[Launch] = []
    previous = torch.are_deterministic_algorithms_enabled()
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        for op in ops:
            with record_launches(arch, sms) as launches:
                try:
                    result = _op(op)(problem, "triton")
                    results = list(result) if isinstance(result, tuple) else [result]
                    torch.autograd.backward(results, [torch.ones_like(r) for r in results])
                except Exception as err:  # a launcher failing after a failed compile
                    if not any(l.error for l in launches):
                        launches.append(Launch(op, "(launcher)", (), error=f"{type(err).__name__}: {err}"))
            for launch in launches:
                launch.op = op
            out += launches
            for leaf in problem.leaves:
                leaf.grad = None
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    return out


# ----------------------------------------------------------------------------- reading the binary
def _tool(name: str) -> str:
    """A CUDA binary tool as Triton ships it (``triton/backends/nvidia/bin``)."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is neither in {path.parent} nor on PATH")
    return found


_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(cubin: Path) -> Dict[str, int]:
    text = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], check=True,
                          capture_output=True, text=True).stdout
    m = _RES.search(text)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line for {cubin}:\n{text}")
    regs, stack, shared, local = map(int, m.groups())
    return dict(regs=regs, stack=stack, static_shared=shared, local=local)


def sass_counts(cubin: Path) -> Dict[str, object]:
    """Instruction counts read off the SASS."""
    sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], check=True,
                          capture_output=True, text=True).stdout
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    count = collections.Counter(o.split(".")[0] for o in ops)
    loads = collections.Counter()
    for o in ops:
        if o.startswith("LDG"):
            parts = o.split(".")
            width = next((p for p in parts[1:] if p in ("64", "128", "U8", "S8", "U16", "S16")), "32")
            loads[{"U8": "8", "S8": "8", "U16": "16", "S16": "16"}.get(width, width)] += 1
    atomics = count["ATOMG"] + count["REDG"] + count["RED"] + count["ATOM"]
    # a fence that orders global memory (MEMBAR.*.GPU / .SYS); MEMBAR.*.CTA only orders shared
    # memory within the block, around the pipeline's barriers
    fences = sum(1 for o in ops if o.startswith("MEMBAR") and (".GPU" in o or ".SYS" in o))
    return dict(
        stl=count["STL"], ldl=count["LDL"], hgmma=count["HGMMA"], hmma=count["HMMA"],
        # Blackwell's tcgen05 MMA (UTCHMMA for 16-bit operands, UTCQMMA, UTCIMMA, ...)
        tcgen05=sum(n for op, n in count.items() if op.startswith("UTC") and op.endswith("MMA")),
        ldg=dict(sorted(loads.items(), key=lambda kv: int(kv[0]))), tma=count["UTMALDG"],
        atomics=atomics, fences=fences, instructions=len(ops),
    )


def ptx_counts(ptx: str) -> Dict[str, int]:
    return dict(
        wgmma=len(re.findall(r"^\s*wgmma\.mma_async", ptx, re.M)),
        mma_sync=len(re.findall(r"^\s*mma\.sync", ptx, re.M)),
        atom_relaxed=len(re.findall(r"^\s*(?:@%p\d+\s+)?(?:atom|red)\.global\S*\.relaxed", ptx, re.M)),
        atom_acq_rel=len(re.findall(r"^\s*(?:@%p\d+\s+)?(?:atom|red)\.global\S*\.acq_rel", ptx, re.M)),
        # none of the kernels asserts anything, so a trap is Triton's: see analyse
        traps=len(re.findall(r"^\s*(?:@!?%p\d+\s+)?trap;", ptx, re.M)),
    )


_MMA_LAYOUT = re.compile(r"^(#mma\d*) = #ttg\.nvidia_mma<\{(.*?)\}>", re.M)
# a dot of the TTGIR: its A operand's type (a register tensor or a shared-memory descriptor) and
# its result, an fp32 accumulator in an MMA layout
_MMA_DOT = re.compile(r"(?:tt\.dot|ttng\.warp_group_dot) [^\n]*? : (?:tensor|!ttg\.memdesc)<([\dx]+)x\w+[,>]"
                      r"[^\n]*-> tensor<([\dx]+)x\w+, (#mma\d*)>")


def mma_tiles(ttgir: str) -> List[Dict[str, object]]:
    """Each tensor-core GEMM of a kernel's TTGIR: its output tile, reduction depth and how many
    times its warps compute each output element. A layout assigns every warp a part of the
    tile; when the warps' parts together cover more than the tile (a 32 x 16 tile on 8 warps
    side by side, 8 columns each), warps compute the same elements: Triton puts all warps on
    one axis of a GEMM whose result feeds another, so the smaller GEMM of such a pair inherits
    a layout sized for the larger one."""
    layouts = dict(_MMA_LAYOUT.findall(ttgir))
    tiles = []
    for a_shape, out_shape, name in _MMA_DOT.findall(ttgir):
        fields = {key: re.search(pattern, layouts.get(name, "")) for key, pattern in (
            ("warps", r"warpsPerCTA = \[([\d, ]+)\]"), ("instr", r"instrShape = \[([\d, ]+)\]"),
            ("version", r"versionMajor = (\d)"))}
        if not all(fields.values()):  # a layout this reading does not know: not counted
            continue
        shape = [int(v) for v in out_shape.split("x")]
        warps, instr = ([int(v) for v in fields[key].group(1).split(", ")] for key in ("warps", "instr"))
        if int(fields["version"].group(1)) == 3:
            # wgmma: a warpgroup of 4 warps owns 64 rows; instrShape's N columns per warp column
            cover = [16 * warps[0], instr[1] * warps[1]]
        else:  # mma.sync: each warp owns an instrShape tile (the leading 1 of batched GEMMs)
            cover = [w * i for w, i in zip(warps, instr)]
        replicated = 1
        for size, covered in zip(shape, cover):
            replicated *= max(1, covered // size)
        tiles.append(dict(tile=shape, k=int(a_shape.split("x")[-1]), warps=warps, replicated=replicated))
    return tiles


def mma_replication(tiles: List[Dict[str, object]]) -> float:
    """The tensor-core work a kernel issues over the work its GEMMs need: each GEMM weighted by
    the multiply-adds of one execution of its tile. Exact where a kernel's GEMMs share one loop
    body (every kernel of 16-bit features); where one runs in an inner loop (the channel chunks
    of float32 features' TF32 GEMMs) it counts once, and the factor understates the repeats.
    1.0 when no warp repeats another's products."""
    need = sum(math.prod(t["tile"]) * t["k"] for t in tiles)
    issued = sum(math.prod(t["tile"]) * t["k"] * t["replicated"] for t in tiles)
    return issued / need if need else 1.0


def blocks_per_sm(regs: int, warps: int, shared: int, arch: int) -> int:
    """How many blocks of a kernel one SM holds at once: registers are allocated per warp in
    units of 256, and each block reserves 1 KB of shared memory besides its own."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = (REGS_PER_SM // regs_per_warp) // warps if regs else BLOCKS_PER_SM[arch]
    by_shared = SHARED_PER_SM[arch] // (shared + 1024)
    return max(0, min(by_regs, by_shared, WARPS_PER_SM[arch] // warps, BLOCKS_PER_SM[arch]))


def waves(programs: int, per_sm: int, num_sms: int) -> Tuple[float, float]:
    """``(waves, efficiency)`` of a grid of equal programs: ``programs / (per_sm · SMs)``, and
    the share of the SMs' time the programs fill when a last, partial wave runs alone."""
    slots = max(1, per_sm) * num_sms
    full = -(-programs // slots)
    return programs / slots, programs / (full * slots)


def analyse(launches: List[Launch], out_dir: Path, shape=None, arch: int = 90) -> List[Dict[str, object]]:
    """Write each kernel's PTX and cubin to ``out_dir`` and read them back into table rows;
    with ``shape``, add the per-kernel traffic model (:func:`benchmarks.roofline.kernel_work`),
    its ideal time stretched by the grid's wave efficiency."""
    num_sms = dict(TARGETS.values())[arch]
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    seen = collections.Counter()
    for launch in launches:
        row: Dict[str, object] = dict(op=launch.op, kernel=launch.kernel,
                                      grid="x".join(map(str, launch.grid)))
        if launch.error is not None:
            row["error"] = launch.error
            rows.append(row)
            continue
        k = launch.compiled
        # the constexprs it was specialised with: tiles, branches (HAS_*, NEED_*), precisions
        row["meta"] = {key: value for key, value in launch.meta.items()
                       if isinstance(value, (bool, int, float, str))}
        stem = f"{launch.op}.{launch.kernel}"
        seen[stem] += 1
        if seen[stem] > 1:
            stem += f".{seen[stem]}"
        ptx, cubin = out_dir / f"{stem}.ptx", out_dir / f"{stem}.cubin"
        ptx.write_text(k.asm["ptx"])
        cubin.write_bytes(k.asm["cubin"])
        md = k.metadata
        row.update(warps=md.num_warps, stages=md.num_stages, shared=md.shared)
        if md.shared > SHARED_LIMIT[arch]:
            row["error"] = (f"needs {md.shared} bytes of shared memory, more than the {SHARED_LIMIT[arch]} "
                            f"one block may use on sm_{arch}: it compiles but cannot launch")
        row.update(resource_usage(cubin))
        row["per_sm"] = blocks_per_sm(row["regs"], md.num_warps, md.shared + row["static_shared"], arch)
        programs = 1
        for g in launch.grid:
            programs *= int(g)
        row["waves"], row["wave_efficiency"] = waves(programs, row["per_sm"], num_sms)
        row.update(sass_counts(cubin))
        row.update(ptx_counts(k.asm["ptx"]))
        row["mma_tiles"] = mma_tiles(k.asm["ttgir"])
        row["mma_replication"] = mma_replication(row["mma_tiles"])
        if row["traps"]:
            # Triton 3.8 and 3.9 compile a kernel they cannot lower into a lone `trap` without an
            # error: on sm_100, two 64 x 256 fp32 tcgen05 accumulators and an operand, more
            # than the 512 columns of tensor memory an SM has. It would stop the program at
            # its first launch.
            row["error"] = (f"compiles to code that traps ({row['traps']} `trap` in its PTX, "
                            f"{row['instructions']} SASS instructions): it cannot run")
        row["files"] = [ptx.name, cubin.name]
        if shape is not None:
            from . import roofline

            row["model"] = roofline.kernel_work(launch.kernel, launch.grid, launch.meta, shape)
            row["model"]["wave_efficiency"] = row["wave_efficiency"]
            row["model"]["mma_replication"] = row["mma_replication"]
            row["ideal_us"] = roofline.ideal_seconds(row["model"], _h100()) * 1e6
        rows.append(row)
    return rows


def _h100():
    from . import roofline

    return dict(roofline.PEAKS)["H100"]


def resolve_shape(shape, dtype: str, channels: Optional[int] = None, classes: Optional[int] = None,
                  protos_per_class: Optional[int] = None, size: Optional[int] = None,
                  similarity: Optional[str] = None):
    """The :class:`~benchmarks.shapes.Shape` a name (or shape) and dtype stand for, with
    ``channels`` features, ``classes`` x ``protos_per_class`` prototypes, ``size`` x ``size``
    pixels per image and ``similarity`` where given (the shape's own otherwise)."""
    import torch

    from . import shapes

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    if isinstance(shape, str):
        shape = next(s for s in shapes.headline() if s.name == shape)
    for key, value, tag in (("C", channels, "C"), ("K", classes, "K"), ("M", protos_per_class, "M"),
                            ("H", size, "S")):
        if value is not None and value != getattr(shape, key):
            shape = dataclasses.replace(shape, name=f"{shape.name}-{tag}{value}", **{key: value})
            if key == "H":
                shape = dataclasses.replace(shape, W=value)
    if similarity is not None and similarity != shape.similarity:
        shape = dataclasses.replace(shape, name=f"{shape.name}-{similarity}", similarity=similarity)
    return dataclasses.replace(shape, feature_dtype=dt)


def predictions(rows: List[Dict[str, object]], shape) -> List[str]:
    """One line per op: the predicted share of the H100 roofline for forward + backward."""
    from . import roofline

    lines = []
    for op in dict.fromkeys(r["op"] for r in rows):
        works = [r["model"] for r in rows if r["op"] == op and "model" in r]
        if not works or op not in roofline.MODELLED_OPS:
            continue
        pred = roofline.predicted_fraction(op, shape, works, _h100())
        lines.append(f"- `{op}` forward + backward: the op's roofline {pred['t_min_us']:.0f} µs, its kernels at "
                     f"their own bounds {pred['t_kernels_us']:.0f} µs ({pred['t_kernels_l2_us']:.0f} µs if L2 served "
                     f"every re-read): **{100 * pred['fraction']:.0f} %** of the H100 roofline predicted "
                     f"({100 * pred['fraction_l2']:.0f} % at best)")
    return lines


# ----------------------------------------------------------------------------- the table
def _loads(ldg: Dict[str, int]) -> str:
    return " ".join(f"{w}b×{n}" for w, n in ldg.items()) or "-"


def _tensor_cores(row) -> str:
    parts = []
    if row["hgmma"]:
        parts.append(f"wgmma {row['hgmma']}")
    if row["hmma"]:
        parts.append(f"mma.sync {row['hmma']}")
    if row.get("tcgen05"):
        parts.append(f"tcgen05 {row['tcgen05']}")
    text = ", ".join(parts) or "-"
    repeated = dict.fromkeys(f"{'×'.join(map(str, t['tile']))} tile {t['replicated']}×"
                             for t in row.get("mma_tiles", ()) if t["replicated"] > 1)
    if repeated:
        tiles = ", ".join(repeated)
        text += f" (**repeated work**: {tiles}; {row['mma_replication']:.2f}× in all)"
    return text


def _atomics(row) -> str:
    if not row["atomics"]:
        return "-"
    sem = "relaxed" if row["atom_relaxed"] and not row["atom_acq_rel"] else ("acq_rel" if row["atom_acq_rel"] else "?")
    fenced = f"fenced, {row['fences']} MEMBAR.GPU" if row["fences"] else "unfenced"
    return f"{row['atomics']} {sem}, {fenced}"


def markdown(rows: List[Dict[str, object]], title: str) -> str:
    head = ("| op | kernel | grid | waves | warps | stages | regs | stack B | STL/LDL | shared B | tensor cores "
            "| global loads (bits×count) | atomics | model MB | L2 MB | model GFLOP | ideal µs |")
    lines = [f"**{title}**", "", head, "|" + " --- |" * 17]
    for r in rows:
        if "error" in r:
            msg = str(r["error"]).splitlines()[0][:120]
            lines.append(f"| {r['op']} | `{r['kernel']}` | {r['grid']} | **compile error**: {msg} |" + " |" * 13)
            continue
        lines.append(
            f"| {r['op']} | `{r['kernel']}` | {r['grid']} | {_waves(r)} | {r['warps']} | {r['stages']} | {r['regs']} "
            f"| {r['stack']} | {r['stl']}/{r['ldl']} | {r['shared']} | {_tensor_cores(r)} | {_loads(r['ldg'])} "
            f"| {_atomics(r)} | {_model(r)} |")
    return "\n".join(lines) + "\n"


def _waves(r) -> str:
    eff = f", {100 * r['wave_efficiency']:.0f} %" if r["wave_efficiency"] < 0.995 else ""
    return f"{r['waves']:.2f} ({r['per_sm']}/SM{eff})"


def _model(r) -> str:
    if "model" not in r:
        return "- | - | - | -"
    m = r["model"]
    gflop = sum(m["flops"].values()) / 1e9
    precisions = "+".join(sorted(m["flops"]))
    return f"{m['bytes'] / 1e6:.0f} | {m['l2_bytes'] / 1e6:.0f} | {gflop:.1f} ({precisions}) | {r['ideal_us']:.0f}"


def fitting_ops(ops, channels: int, shared: Optional[int] = None) -> Tuple[List[str], List[str]]:
    """``(fits, too_wide)``: the ops among ``ops`` whose kernels take ``channels``-wide features
    on a GPU whose blocks may use ``shared`` bytes of shared memory (default: an A100's or more;
    ``torch_ppl._backend.max_triton_channels``; a variant runs its op's kernels)."""
    from torch_ppl import _backend

    shared = _backend.LARGE_SHARED if shared is None else shared

    def widest(op: str) -> int:
        return _backend.max_triton_channels(base_op(op), shared)

    return [op for op in ops if channels <= widest(op)], [op for op in ops if channels > widest(op)]


def over_stack(rows: List[Dict[str, object]], max_stack: Optional[int]) -> List[Dict[str, object]]:
    """The compiled kernels that use more than ``max_stack`` bytes of stack per thread (spill);
    none when ``max_stack`` is ``None``."""
    if max_stack is None:
        return []
    return [r for r in rows if "error" not in r and r["stack"] > max_stack]


def run(args) -> int:
    import torch
    import triton

    out_dir: Path = args.out
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.monotonic()
    shape = resolve_shape(args.shape, args.dtype, args.channels, args.classes, args.protos_per_class, args.size,
                          args.similarity)
    ops, too_wide = fitting_ops(args.ops, shape.C, SHARED_LIMIT[TARGETS[args.target][0]])
    for op in too_wide:
        print(f"{op}: skipped, C = {shape.C} is wider than its kernels take (the reference runs it)")
    launches = compile_ops(args.target, shape, args.dtype, args.layout, ops, args.deterministic, args.tf32)
    rows = analyse(launches, out_dir, shape, TARGETS[args.target][0])
    title = (f"{shape.name}, {args.dtype} features ({args.layout.upper()}), {args.target}, "
             f"triton {triton.__version__}" + (", deterministic" if args.deterministic else "")
             + (", TF32 allowed" if args.tf32 else ""))
    table = markdown(rows, title) + "\n" + "\n".join(predictions(rows, shape)) + "\n"
    (out_dir / "table.md").write_text(table)
    meta = dict(target=args.target, shape=args.shape, channels=shape.C, classes=shape.K, protos_per_class=shape.M,
                height=shape.H, width=shape.W, similarity=shape.similarity, dtype=args.dtype, layout=args.layout,
                deterministic=args.deterministic, tf32=args.tf32, triton=triton.__version__, torch=torch.__version__)
    (out_dir / "table.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    print(table)
    errors = [r for r in rows if "error" in r]
    print(f"{len(rows) - len(errors)} kernels compiled, {len(errors)} failed, "
          f"in {time.monotonic() - start:.0f} s; files in {out_dir}")
    for r in errors:
        print(f"\n{r['op']} / {r['kernel']}:\n{r['error']}", file=sys.stderr)
    spilled = over_stack(rows, args.max_stack)
    for r in spilled:
        print(f"{r['op']} / {r['kernel']}: {r['stack']} bytes of stack per thread (spills), more than "
              f"--max-stack {args.max_stack}", file=sys.stderr)
    return 1 if errors or spilled else 0


DOC_INTRO = """\
# What the kernels compile to

**No kernel of this library has run on a GPU yet.** Every kernel is tested for correctness on
the CPU through Triton's interpreter, and compiled, as below, for real GPUs without one. Until a
GPU run is published in [benchmarks](benchmarks.md), these tables are the whole truth about the
GPU path: what the compiler makes of each kernel, not how fast it runs.

The tables are generated, not written: `python -m benchmarks compile-docs` rewrites this page.
It runs a forward and a backward of each op through its real launchers (the tile and grid choice
for the GPU, Triton's argument specialisation, the strides of the real layouts) on CPU tensors
of the shape, with a stand-in Triton driver that compiles for sm_90 (H100) with Triton's own
`ptxas` and launches nothing. One table per shape and feature layout; bf16 features, fp32
prototypes; the default, non-deterministic mode. To see one configuration, with the PTX and
cubin of every kernel:

```bash
python -m benchmarks compile --target sm_90 --shape ade --dtype bf16 --layout nhwc --out compile-out
```

CI runs that command for sm_90 and sm_80, NCHW and NHWC, and in deterministic mode, at the voc
shape, for sm_90 at ade, and at 720 and 1024 channels (`--channels`, wide features; ops whose
kernels do not take that width are skipped), with the newest Triton and with Triton 3.8.0, and
at fewer shapes with Triton 3.3.1, the oldest the kernels take, and at voc for sm_90 with each
release in between (3.4 to 3.7); with the newest Triton also for
fp16 and fp32 features, for sm_86 and sm_120 (99 KB of shared memory per block) and for sm_100
(B200), and for sm_90 at 60 classes of 5 prototypes (`--classes 60 --protos-per-class 5`) and
at ade's sizes on 129 x 129 pixels (`--size 129`: an NCHW channel stride without 16-element
alignment), and with dot-product similarity (`--similarity dot`) at voc with one prototype per
class and at ade. By default the command also compiles the head with logsumexp and mean pooling and a
learnable scale, and the attention with `exclude=` and a layer scale; CI also compiles the head
+ push in one op with logsumexp pooling, the nearest positive and a learnable scale
(`--ops prototype_logits_and_contrastive-lse-nearest-scale`; sm_90, bf16 at voc and ade, fp16
at voc, [its spills](kernel-fused.md#the-heaviest-branches)). It fails on any compile
error, launch that does not fit the GPU's shared memory or kernel compiled to a `trap` (Triton
3.8 and 3.9 emit one, without an error, for a kernel they cannot lower: on sm_100, tensor-memory
accumulators over an SM's 512 columns), and on any spill for bf16 features
on sm_90 (`--max-stack 0`; 8 bytes with Triton 3.8, whose head prototype gradient spills that
much at voc; no limit with Triton 3.3), for fp16 and fp32 features on sm_90 and at voc on
sm_100, and for fp32 features with TF32 allowed (`--tf32`) on sm_90 at voc and ade (with the
newest Triton and 3.8); fp32 with TF32 is also compiled for sm_80 and sm_86 (and with Triton
3.3 for sm_80), where every launch must fit.

## The kernels

| kernel | role |
| --- | --- |
{roles}

## Reading the columns

- **grid**: programs launched at that shape (an H100 has 132 SMs).
- **waves**: the grid over the blocks that all SMs hold at once, with how many blocks one SM
  holds (from the registers, warps and shared memory, by the CUDA occupancy rules) and, when
  the last wave is partial, the share of the SMs' time the grid fills. A grid of 2.02 waves
  runs three, the third with 1 % of the SMs busy: 67 %.
- **regs**, **stack B**: registers per thread and local memory per thread (`cuobjdump
  -res-usage`); a non-zero stack means registers spilled. **STL/LDL**: spill stores and loads
  in the SASS.
- **shared B**: the shared memory the launch asks for.
- **tensor cores**: Hopper `wgmma` (SASS `HGMMA`) and `mma.sync` (`HMMA`) instructions. On
  sm_90 a GEMM lowers to `wgmma` when its tile has 64 rows per warpgroup (16-bit or TF32
  operands), to `mma.sync` on smaller tiles; IEEE fp32 GEMMs run on the CUDA cores (`-`).
  Compiled for Blackwell (sm_100), `tcgen05` counts its MMAs (`UTC*MMA`). **Repeated work**
  names a GEMM tile whose warps compute the same products more than once, read off the
  layouts in the compiled TTGIR: when one GEMM's result feeds another (the similarities that
  make a gradient tile), Triton puts all warps of both on one axis, so the smaller tile of the
  pair can be narrower than its warps side by side (a 32 × 16 tile on 8 warps of 8 columns:
  four times over), and a tile of 16 rows on 8 warps takes them all on its columns. The factor
  after it is the tensor-core work issued over the work needed (each GEMM weighted by one pass
  over its tile: it understates the repeats of a GEMM that runs in an inner loop, as float32
  features' chunked TF32 GEMMs do), which the model's FLOP time includes.
- **global loads**: `LDG` instructions by width. 16-bit loads of the features mean one element
  per thread: coalesced along pixels for NCHW (the pixel stride is specialised to 1), but not
  vectorised, because the pixel count of these shapes is odd and the loads are masked.
- **atomics**: `ATOMG`/`REDG` instructions, their memory order in the PTX, and the
  `MEMBAR.*.GPU` fences around them. Relaxed atomics compile without fences.
- **model MB, L2 MB, model GFLOP, ideal µs**: a traffic and FLOP model of that launch with its
  actual grid and tiles (`benchmarks/roofline.py`, `kernel_work`). HBM (model MB): every
  N-sized tensor is charged each time a distinct program reads it (re-reads included), the
  small prototype-side tensors once. L2 MB: what the programs read from L2 in all, the HBM
  traffic plus each program's own pass over the prototype-side tensors (`Ŵ`, or the
  attention's float32 `K~` and `V~`): a kernel that tiles the pixels streams all prototypes
  through every program, so its L2 traffic grows as its pixel tile shrinks. GEMM FLOPs on the
  padded tiles, with the precision class they run in (`16-bit` operands; `tf32`, `tf32x3`;
  `ieee`: fp32 on the CUDA cores). The ideal time is the largest of bytes over the H100's
  3.35 TB/s, L2 bytes over 9 TB/s (NVIDIA publishes no L2 bandwidth; this is the high end of
  the public figures) and FLOPs over the peak of their precision (989 TFLOP/s bf16, half
  that for TF32, 67 TFLOP/s fp32; tensor-core FLOPs times the repeated-work factor), divided
  by the grid's wave share (its SMs sit idle in a
  partial last wave; exact for GEMM-bound kernels, pessimistic for memory-bound ones, where
  fewer SMs can still draw much of the bandwidth). `mma.sync` is charged like `wgmma`, which
  is optimistic.
- Below each table, the **predicted share of the H100 roofline** of each op (forward +
  backward): the op's own roofline time (its minimal bytes and FLOPs) over the sum of its
  kernels' ideal times, first with every re-read charged to HBM, then ("at best") with L2
  serving every re-read (the programs that re-read a tile run side by side in launch order,
  so the truth lies in between); the L2 traffic is charged in both. It says how much the tiling wastes (re-reads, recomputation,
  padding, slower GEMM precisions) if every kernel ran at its own bound. It is a model, not a
  measurement, and an upper bound on what a GPU run would show.

"""


def write_docs(path: Path, shapes=("voc", "ade"), layouts=LAYOUTS, target: str = "sm_90") -> int:
    """Regenerate ``docs/kernels.md``: the tables for ``shapes`` x ``layouts`` at bf16."""
    import tempfile

    import triton

    roles = "\n".join(f"| `{k}` | {v} |" for k, v in ROLES.items())
    parts = [DOC_INTRO.replace("{roles}", roles)]
    failed = 0
    for shape in shapes:
        parts.append(f"## {shape}\n")
        for layout in layouts:
            launches = compile_ops(target, shape, "bf16", layout)
            resolved = resolve_shape(shape, "bf16")
            with tempfile.TemporaryDirectory() as tmp:
                rows = analyse(launches, Path(tmp), resolved, TARGETS[target][0])
            failed += sum("error" in r for r in rows)
            title = f"{shape}, bf16 features ({layout.upper()}), {target}, triton {triton.__version__}"
            parts.append(markdown(rows, title) + "\n" + "\n".join(predictions(rows, resolved)) + "\n")
    parts.append("## Other feature dtypes\n\nThe same kernels with float16 and float32 features (voc, NCHW). "
                 "float16 runs the attention's products that have a float16 side (exact in TF32) as two TF32 "
                 "products against the float32 side's halves, the others in 3xTF32; float32 runs every GEMM in "
                 "exact fp32 on the CUDA cores (`-` under tensor cores), as PyTorch's float32 matmul does by "
                 "default, and in TF32 on the tensor cores where PyTorch's float32 matmuls may use it "
                 "(`torch.backends.cuda.matmul.allow_tf32`; `--tf32` here). Both use smaller tiles than bf16, "
                 "channel chunks and register budgets where that removed spills; the float32 tiles were chosen "
                 "for the CUDA cores.\n")
    for dtype, tf32 in (("fp16", False), ("fp32", False), ("fp32", True)):
        launches = compile_ops(target, "voc", dtype, "nchw", tf32=tf32)
        resolved = resolve_shape("voc", dtype)
        with tempfile.TemporaryDirectory() as tmp:
            rows = analyse(launches, Path(tmp), resolved, TARGETS[target][0])
        failed += sum("error" in r for r in rows)
        title = f"voc, {dtype} features (NCHW), {target}, triton {triton.__version__}" + (", TF32 allowed" if tf32 else "")
        parts.append(markdown(rows, title) + ("\n" + "\n".join(predictions(rows, resolved)) + "\n" if tf32 else ""))
    path.write_text("\n".join(parts))
    print(f"wrote {path}" + (f"; {failed} kernels failed to compile" if failed else ""))
    return 1 if failed else 0


def _positive(text: str) -> int:
    """``--channels`` and the like: a positive int, else argparse's usage error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="sm_90", choices=tuple(TARGETS), help="GPU to compile for (default: %(default)s)")
    p.add_argument("--shape", default="voc", choices=("voc", "cityscapes", "ade", "voc-fullres"),
                   help="benchmark shape (default: %(default)s)")
    p.add_argument("--channels", type=_positive, default=None, metavar="C",
                   help="feature channels instead of the shape's own (wide features: 720, 2048, ...)")
    p.add_argument("--classes", type=_positive, default=None, metavar="K",
                   help="classes instead of the shape's own")
    p.add_argument("--protos-per-class", type=_positive, default=None, metavar="M",
                   help="prototypes per class instead of the shape's own")
    p.add_argument("--size", type=_positive, default=None, metavar="S",
                   help="S x S feature pixels per image instead of the shape's own (odd S: NCHW channel "
                        "strides without 16-element alignment)")
    p.add_argument("--similarity", default=None, choices=("cosine", "dot"),
                   help="similarity of the head and the push instead of the shape's own (cosine)")
    p.add_argument("--dtype", default="bf16", choices=DTYPES, help="feature dtype (default: %(default)s)")
    p.add_argument("--layout", default="nchw", choices=LAYOUTS,
                   help="feature memory layout: nchw (contiguous) or nhwc (channels_last)")
    p.add_argument("--ops", nargs="+", default=list(DEFAULT_OPS), choices=OPS + tuple(VARIANTS),
                   help="ops to compile (default: all, and the head with logsumexp and mean pooling and a "
                        "learnable scale, and the attention with exclude= and a layer scale; the head + "
                        "push in one op with logsumexp pooling, the nearest positive and a learnable scale "
                        "only when named)")
    p.add_argument("--max-stack", type=int, default=None, metavar="BYTES",
                   help="also fail if a kernel uses more stack per thread than this (0: no spills)")
    p.add_argument("--deterministic", action="store_true",
                   help="compile the deterministic-mode kernels (torch.use_deterministic_algorithms)")
    p.add_argument("--tf32", action="store_true",
                   help="with torch.backends.cuda.matmul.allow_tf32 = True: the GEMMs of fp32 features run in TF32")
    p.add_argument("--out", type=Path, default=Path("compile-out"),
                   help="folder for the .ptx, .cubin, table.md and table.json (emptied first)")
