"""Conventions shared by the three kernel files (``similarity``, ``contrastive``, ``attention``).

* **Layout.** Every pixel tensor reaches a kernel as a ``(B, L, C)`` view with three strides
  (:func:`as_blc`): the channel-last view of NCHW features has a pixel stride of 1, a
  channels_last tensor a channel stride of 1. Triton specialises an integer argument equal to 1
  into a constant, so the compiler sees which axis is contiguous and lays threads along it.
  Never address pixels as ``l // W``: that hides the contiguity.
* **Optional inputs** are passed as ``None`` with a ``HAS_*`` constexpr flag, never as a dummy
  pointer. Gradients that are not needed are not computed: ``NEED_DX``-style constexpr flags,
  ``need_dx``-style Python arguments.
* **Ops** are ``torch.library.custom_op`` named ``torch_ppl::<op>_fwd`` / ``torch_ppl::<op>_bwd``
  with ``register_fake`` and ``register_autograd`` on the forward, so ``torch.compile`` traces
  them as single nodes. Each runs its body inside :func:`launch_device`: Triton launches on
  the current CUDA device, not the tensors' own.
* **Numerics.** fp32 accumulation; 16-bit GEMM operands stay 16-bit (tensor cores). The CPU
  interpreter cannot multiply 16-bit operands (it treats bfloat16 as raw bits), so under it
  :func:`dot_operand` rounds to the operand dtype and multiplies in fp32 (``UPCAST_DOT``),
  which is what the tensor cores compute up to summation order.
* **Tiling** depends on the GPU (:func:`on_gpu`, :func:`num_sms`). :func:`compile_for` lets the
  launchers tile for a named GPU while handed CPU tensors, so that ``python -m benchmarks
  compile`` compiles every kernel exactly as a CUDA user's call would, with no GPU present.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _backend
from ..reference import EPS

__all__ = [
    "EPS", "EPS_C", "SUPPORTED_DTYPES", "check_dtypes", "interpreting", "as_blc", "new_rows", "on_gpu",
    "launch_device", "num_sms", "pixel_splits", "capability", "has_wgmma", "has_tcgen05", "warpgroup_mma", "large_shared", "upcast_dot", "dot_operand", "next_pow2", "compile_for", "CompileTarget", "compile_target",
    "opaque_stride", "per_iteration", "fp32_precision", "TRITON_VERSION", "FP_CONTRACTION",
]

# (major, minor) of the installed Triton: some tiles compile without spilling with one release
# and not with another
TRITON_VERSION = tuple(int(v) for v in triton.__version__.split(".")[:2])

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Every launch asks for fused multiply-adds (a * b + c in one rounding) by name. Triton 3.9 warns
# on the first kernel it compiles without that option stated (its default turns them off in
# 3.10, which would change the kernels' code and slow them), and the compiled code that CI reads
# (docs/kernels.md) is compiled with them. TRITON_FORCE_DISABLE_FP_FUSION=1 still turns them off.
FP_CONTRACTION = {"enable_fp_fusion": True}

# Module globals read inside ``@triton.jit`` code must be ``tl.constexpr``: a plain float global
# passes the interpreter and fails the real compiler.
EPS_C = tl.constexpr(EPS)


def check_dtypes(op: str, **tensors: Optional[Tensor]) -> None:
    """``TypeError`` naming the first tensor whose dtype the kernels do not take (float64 mostly),
    raised before anything launches."""
    for name, t in tensors.items():
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{op} (triton): {name} has dtype {t.dtype}; the Triton kernels take float32, "
                f"bfloat16 or float16. Use backend='reference' for {t.dtype}."
            )


interpreting = _backend.interpret_mode  # one definition, shared with the backend choice


# ----------------------------------------------------------------------------- layouts
def as_blc(x: Tensor) -> Tensor:
    """``(..., C)`` rows as ``(B, L, C)``: ``(C,)`` is ``(1, 1, C)``, ``(N, C)`` is ``(1, N, C)``,
    ``(B, H, W, C)`` flattens its pixel axes. A view whenever the strides allow it, which both
    the channel-last view of a contiguous NCHW tensor and a channels_last tensor do (a crop
    copies)."""
    if x.dim() == 1:
        return x.reshape(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x.flatten(1, -2)


def needs_wide_offsets(*tensors: Tensor) -> bool:
    """Whether an element of one image of a ``(B, L, C)`` tensor lies 2**31 or more elements
    past the image's first: 32-bit offsets within an image would overflow, so the kernels take
    64-bit ones (``WIDE``). 64-bit offsets that stay the same from one pixel tile to the next
    take two registers per element, which the compiler keeps for the whole loop."""
    return any((t.shape[1] - 1) * abs(t.stride(1)) + (t.shape[2] - 1) * abs(t.stride(2)) >= 2 ** 31
               for t in tensors)


def launch_device(x: Tensor) -> contextlib.AbstractContextManager:
    """The CUDA device of ``x`` made current for the launches inside (nothing for a CPU tensor).
    Triton launches on the current device and its current stream, so without this a model on
    ``cuda:1`` while ``cuda:0`` is current would have its kernels refused (Triton cannot reach
    the pointers) or run on the wrong GPU. Every custom op runs its body inside it."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def new_rows(like: Tensor, channels: int, dtype: torch.dtype) -> Tensor:
    """A new ``(..., channels)`` tensor laid out like ``like``: for 4-D rows whose channel axis
    is not the fastest (the channel-last view of NCHW) it has the strides of a contiguous
    ``(B, channels, H, W)`` tensor, so that moving the channel axis back costs nothing. Not a
    view: an op's output that is a view of a buffer made inside the op could not be edited in
    place by the caller (autograd forbids it for outputs of custom functions)."""
    if like.dim() == 4 and like.stride(-1) != 1:
        b, h, w, _ = like.shape
        return like.new_empty_strided((b, h, w, channels), (channels * h * w, w, 1, h * w), dtype=dtype)
    return like.new_empty((*like.shape[:-1], channels), dtype=dtype)


# ----------------------------------------------------------------------------- the GPU
class CompileTarget(NamedTuple):
    """A GPU the launchers tile for without one being present."""

    arch: int  # compute capability as an int: 80 (A100), 86 (A6000, RTX 3090), 90 (H100)
    num_sms: int
    shared: Optional[int] = None  # bytes one block may use; None: that of the arch's data-centre GPU


_SMS: Dict[int, int] = {}


@contextlib.contextmanager
def compile_for(target: CompileTarget) -> Iterator[CompileTarget]:
    """Within this block the launchers choose tiles and grids for ``target`` whatever the
    device of their tensors, and accept CPU tensors for ``backend="triton"``. It does not stop
    launches: the caller pairs it with a Triton driver that compiles for ``target`` and
    launches nothing (``benchmarks/compile.py``)."""
    previous, _backend.COMPILE_TARGET = _backend.COMPILE_TARGET, target
    try:
        yield target
    finally:
        _backend.COMPILE_TARGET = previous


def compile_target() -> Optional[CompileTarget]:
    return _backend.COMPILE_TARGET


def on_gpu(device: torch.device) -> bool:
    """Whether launches for ``device`` are tiled for a GPU (a CUDA device, or the target of
    :func:`compile_for`) rather than for the CPU interpreter."""
    return device.type == "cuda" or compile_target() is not None


def capability(device: torch.device) -> Optional[Tuple[int, int]]:
    """Compute capability of the GPU the launchers tile for (a CUDA ``device`` or the target of
    :func:`compile_for`); ``None`` on the interpreter."""
    if not on_gpu(device):
        return None
    return _backend.gpu_properties(device)[0]


def has_wgmma(device: torch.device) -> bool:
    """Whether ``device`` (or the target of :func:`compile_for`) is a Hopper GPU, whose
    warpgroup MMA keeps its accumulators in a layout of its own: some tiles are sized for it."""
    return capability(device) == (9, 0)


def has_tcgen05(device: torch.device) -> bool:
    """Whether ``device`` (or the target of :func:`compile_for`) is a data-centre Blackwell GPU
    (sm_100: B200, GB200), whose ``tcgen05`` MMA keeps its accumulators in tensor memory rather
    than registers: some tiles that spill in registers elsewhere fit there. The RTX 50 series
    (sm_120) has no ``tcgen05``."""
    cap = capability(device)
    return cap is not None and cap[0] == 10


def warpgroup_mma(device: torch.device) -> bool:
    """Whether ``device``'s 16-bit 2-D GEMMs of 64 rows or more lower to the warpgroup-wide
    tensor-core instructions that some tiles are sized for: wgmma (sm_90), or tcgen05 (sm_100)
    from Triton 3.8 on (earlier releases spilled those tiles there)."""
    return has_wgmma(device) or (has_tcgen05(device) and TRITON_VERSION >= (3, 8))


def large_shared(device: torch.device) -> bool:
    """Whether blocks on ``device`` may use as much shared memory as an A100's (163 KB) or more.
    sm_86, sm_89 and sm_120 GPUs allow 99 KB; some tiles are smaller there."""
    if not on_gpu(device):
        return True
    return _backend.gpu_properties(device)[1] >= _backend.LARGE_SHARED


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``, looked up once per device."""
    if compile_target() is not None:
        return compile_target().num_sms
    if device.type != "cuda":
        return 2
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def pixel_splits(device: torch.device, units: int, pixel_tiles: int, min_waves: int = 2) -> int:
    """Pixel splits of a prototype-gradient grid: ``units`` programs (prototype tiles, channel
    slices) times ``splits``, each program summing every ``splits``-th pixel tile on chip.

    On a GPU the grid fills whole waves of one block per SM (these kernels hold more than 128
    registers per thread in 8 or 16 warps: an SM holds one; ``python -m benchmarks compile``
    shows it), at least ``min_waves`` of them where the pixel tiles allow: the smallest split
    whose last wave is at least 95 % full, or else the fullest. Its programs run equally long,
    so a grid of 2.02 waves runs three with the third almost empty. Two splits on the
    interpreter, so that tests combine partials."""
    if not on_gpu(device):
        return min(pixel_tiles, 2)
    slots = num_sms(device)
    most = max(1, min(pixel_tiles, -(-8 * slots // units)))
    least = min(most, -(-min_waves * slots // units))
    best, best_fill = least, 0.0
    for splits in range(least, most + 1):
        programs = units * splits
        fill = programs / (-(-programs // slots) * slots)
        if fill >= 0.95:
            return splits
        if fill > best_fill:
            best, best_fill = splits, fill
    return best


def fp32_precision() -> str:
    """``tl.dot`` precision of the GEMMs of float32 features: TF32 when PyTorch's float32
    matmuls may use it (``torch.backends.cuda.matmul.allow_tf32``, which
    ``torch.set_float32_matmul_precision("high")`` sets), as PyTorch's own matmuls and
    Inductor's Triton GEMMs then do; exact IEEE float32 otherwise (PyTorch's default). Read at
    each launch, forward and backward, as PyTorch's matmuls read it: the backward follows the
    setting in effect when it runs."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def upcast_dot() -> bool:
    """The ``UPCAST_DOT`` flag of every kernel with a 16-bit ``tl.dot``: on under the interpreter."""
    return interpreting() and compile_target() is None


@triton.jit
def dot_operand(t, DTYPE: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``t`` rounded to the GEMM operand dtype ``DTYPE``; back to fp32 under the interpreter
    (``UPCAST_DOT``), where the products of the rounded values are exact in fp32."""
    t = t.to(DTYPE)
    if UPCAST_DOT:
        t = t.to(tl.float32)
    return t


def opaque_stride(device: torch.device, stride: int, channels: int) -> bool:
    """The ``OPAQUE_*`` flag of a pixel-tile loop that reads ``channels``-wide rows with this
    channel stride: on for more than 256 channels when the stride is neither 1 nor a multiple
    of 16 (NCHW features of an odd ``H * W``) and fits 32 bits, on an NVIDIA GPU
    (:func:`per_iteration` is PTX).

    Such a stride gives the compiler no alignment to vectorise with, so each thread's element
    offsets ``chan * stride`` are all distinct; they do not change from one pixel tile to the
    next, and the compiler keeps them in registers for the whole loop, one per element (32 per
    tensor for a 16 x 512 tile on 256 threads). Beside a 32 x 512 or 64 x 512 fp32 accumulator
    that spilled: 128 to 256 bytes per thread on sm_90 at 512 channels and 129 x 129 features,
    where 128 x 128 (aligned) did not. Recomputed in each iteration (one integer multiply-add per
    element), nothing spills. An aligned stride keeps its known divisibility (vector loads).
    Narrower rows hold fewer offsets: at 96 channels recomputing them spilled 8 bytes per
    thread in the attention's prototype gradient where holding them spilled nothing."""
    return (on_gpu(device) and torch.version.hip is None and channels > 256 and stride != 1
            and stride % 16 != 0 and abs(stride) < 2 ** 31)


@triton.jit
def per_iteration(v, OPAQUE: tl.constexpr):
    """``v`` (an int32 scalar) made opaque to loop-invariant code motion when ``OPAQUE``: called
    inside a loop, whatever is computed from it is recomputed in each iteration rather than
    held in registers across the loop (see :func:`opaque_stride`). A ``mov`` with side effects,
    which the compiler may neither hoist nor fold."""
    if OPAQUE:
        v = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [v], dtype=tl.int32, is_pure=False, pack=1)
    return v


def next_pow2(n: int, minimum: int = 16) -> int:
    """``triton.next_power_of_2`` with a floor (``tl.dot`` needs every side >= 16)."""
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))
