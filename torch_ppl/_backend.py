"""Backend choice, in one place.

``"reference"`` is :mod:`torch_ppl.reference`; ``"triton"`` is the fused kernels in
:mod:`torch_ppl.kernels`; ``"auto"`` picks Triton for CUDA tensors when Triton imports and the
reference otherwise. The environment variable ``TORCH_PPL_BACKEND`` overrides ``"auto"``.
With ``TRITON_INTERPRET=1`` the Triton path also accepts CPU tensors (this is how CI tests
the kernels without a GPU).

While torch is exporting or tracing a graph for deployment (``torch.export``, both ONNX
exporters, ``torch.jit.trace``/``script``), every backend resolves to the reference: the
exported graph then holds plain ATen ops that any runtime executes, never a ``torch_ppl::``
custom op (see :func:`exporting`).
"""
from __future__ import annotations

import itertools
import os
import warnings
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from . import reference

BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "TORCH_PPL_BACKEND"

# The widest features each op's kernels take. They keep a pixel tile's whole channel axis on
# chip; up to these widths their tiles fit an H100's and an A100's shared memory (CI compiles
# them there). The attention also holds float32 prototype-side tiles as wide as the features.
# Wider features run on the reference ("auto") or are refused ("triton") before any launch,
# where a GPU would otherwise fail the launch for want of shared memory.
MAX_TRITON_CHANNELS = {
    "prototype_logits": 1024,
    "contrastive_loss": 1024,
    "prototype_logits_and_contrastive": 1024,
    "prototype_attention": 512,
}
# GPUs whose blocks may use less than LARGE_SHARED (163 KB, an A100's; an H100's is 227 KB):
# 99 KB on sm_86, sm_89 and sm_120 (RTX 30, 40 and 50 series, A10, A40, L4, L40S, RTX 6000).
# There the attention's tiles fit up to 256 channels (CI compiles every op for sm_86 with a
# 99 KB limit), and the others' as wide as elsewhere.
LARGE_SHARED = 163 * 1024
MAX_TRITON_CHANNELS_SMALL_SHARED = dict(MAX_TRITON_CHANNELS, prototype_attention=256)
# The oldest GPUs the kernels are compiled for: sm_80. Older ones (V100, T4) run the reference.
MIN_CAPABILITY = (8, 0)
# Shared memory one block may use, by compute capability, where torch does not report it
_SHARED_BY_ARCH = {(8, 0): 163 * 1024, (8, 7): 163 * 1024, (9, 0): 227 * 1024, (10, 0): 227 * 1024,
                   (10, 3): 227 * 1024}

# The oldest Triton the kernels compile with: CI compiles every kernel with it for sm_90 and
# sm_80 (as it does with the newest). Triton 3.2, which torch 2.6 brings, aborts inside its own
# compiler on one of them: with it, "auto" runs the reference and "triton" is refused.
MIN_TRITON = (3, 3)

_TRITON_PROBLEM: Optional[str] = None  # found out on first use, then a constant of the process
_TRITON_CHECKED = False


def _version_tuple(version: str) -> Tuple[int, ...]:
    """``"3.4.0+git1234"`` -> ``(3, 4, 0)``: the leading numeric fields."""
    fields = []
    for field in version.split("+")[0].split("."):
        digits = "".join(itertools.takewhile(str.isdigit, field))
        if not digits:
            break
        fields.append(int(digits))
    return tuple(fields)


def triton_problem() -> Optional[str]:
    """Why the fused kernels cannot run here (Triton missing, broken, or older than
    :data:`MIN_TRITON`), or ``None`` when they can. The first call that finds Triton too old
    warns once."""
    # Module globals rather than functools.lru_cache: torch.compile traces through lru_cache
    # and warns about it on every model that uses torch_ppl.
    global _TRITON_PROBLEM, _TRITON_CHECKED
    if not _TRITON_CHECKED:
        _TRITON_CHECKED = True
        try:
            import triton
        except Exception:  # ImportError, or a broken install raising on import
            _TRITON_PROBLEM = ("needs the triton package, which does not import here: pip install "
                               "\"torch_ppl[triton]\" (CUDA builds of torch bring their own)")
        else:
            version = getattr(triton, "__version__", "0")
            if _version_tuple(version) < MIN_TRITON:
                oldest = ".".join(map(str, MIN_TRITON))
                _TRITON_PROBLEM = (f"needs triton >= {oldest} (the oldest the kernels compile with); "
                                   f"triton {version} is installed: pip install \"triton>={oldest}\" or a newer torch")
                warnings.warn(f"torch_ppl: the fused kernels are off, so backend='auto' runs the reference: "
                              f"torch_ppl {_TRITON_PROBLEM}", RuntimeWarning, stacklevel=2)
    return _TRITON_PROBLEM


def triton_available() -> bool:
    """Whether the fused kernels can run here: Triton imports and is at least :data:`MIN_TRITON`."""
    return triton_problem() is None


def gpu_properties(device: torch.device) -> Tuple[Tuple[int, int], int]:
    """``(capability, shared)`` of a CUDA ``device``: its compute capability and the shared
    memory one block may use (the opt-in maximum, in bytes); those of the GPU compiled for
    inside :func:`torch_ppl.kernels._common.compile_for`."""
    if COMPILE_TARGET is not None:
        capability = divmod(COMPILE_TARGET.arch, 10)
        return capability, COMPILE_TARGET.shared or _SHARED_BY_ARCH.get(capability, 99 * 1024)
    props = torch.cuda.get_device_properties(device)  # torch.compile folds it into a constant
    capability = (props.major, props.minor)
    shared = getattr(props, "shared_memory_per_block_optin", 0) or _SHARED_BY_ARCH.get(capability, 99 * 1024)
    return capability, shared


def max_triton_channels(name: str, shared: int) -> int:
    """The widest features op (or kernel) ``name`` takes on a GPU whose blocks may use
    ``shared`` bytes of shared memory."""
    table = MAX_TRITON_CHANNELS if shared >= LARGE_SHARED else MAX_TRITON_CHANNELS_SMALL_SHARED
    return table[name]


def _gpu_problem(tensors, channels: Optional[int], name: str) -> Optional[str]:
    """Why the kernels cannot take these tensors on their GPU (too old a GPU, features too wide
    for its shared memory), or ``None``. CPU tensors on the interpreter are held to the widths
    of the GPUs with the most shared memory."""
    device = next((t.device for t in tensors if t is not None and t.device.type == "cuda"), None)
    if COMPILE_TARGET is None and device is None:
        capability, shared = None, LARGE_SHARED
    else:
        capability, shared = gpu_properties(device)
    if capability is not None and capability < MIN_CAPABILITY:
        return (f"needs a GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (the "
                f"kernels are built for sm_80 and later); this one is {capability[0]}.{capability[1]}")
    widest = None if channels is None else max_triton_channels(name, shared)
    if widest is not None and channels > widest:
        where = "" if shared >= LARGE_SHARED else f" on a GPU whose blocks may use {shared // 1024} KB of shared memory"
        return (f"takes features of at most {widest} channels{where} (the kernels hold a pixel's channels "
                f"on chip); got {channels}")
    return None


def interpret_mode() -> bool:
    """Whether Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


AUTOTUNE_ENV = "TORCH_PPL_AUTOTUNE"
_AUTOTUNE = os.environ.get(AUTOTUNE_ENV, "0").strip().lower() in ("1", "true", "on", "yes")


def set_autotune(enabled: bool) -> bool:
    """Turn autotuning of the fused kernels' tiles on or off for the whole process; returns
    the previous setting.

    Off by default (``TORCH_PPL_AUTOTUNE=1`` in the environment at import turns it on): every
    kernel then runs the tiles chosen by rules from its compiled code. On, the first call of a
    kernel for a given problem on a CUDA GPU times those tiles against their neighbours (each
    block size, the warps and the pipeline stages one step down and up), which takes seconds
    (each candidate compiles), and keeps the fastest whose results agree with the rules' tiles;
    ``TORCH_PPL_AUTOTUNE_CACHE=<file.json>`` keeps the choices across processes. Never with
    ``torch.use_deterministic_algorithms(True)`` (the tiles set the order of the sums), nor
    while a CUDA graph is captured (a choice already made applies).
    """
    global _AUTOTUNE
    if not isinstance(enabled, bool):
        raise TypeError(f"set_autotune: enabled must be a bool; got {type(enabled).__name__}")
    previous, _AUTOTUNE = _AUTOTUNE, enabled
    return previous


def autotune_enabled() -> bool:
    """Whether the fused kernels' tiles are autotuned (see :func:`set_autotune`)."""
    return _AUTOTUNE


# Set by torch_ppl.kernels._common.compile_for: the launchers tile for a named GPU and CPU
# tensors are accepted for backend="triton", because a stand-in Triton driver compiles each
# kernel for that GPU and launches nothing (python -m benchmarks compile).
COMPILE_TARGET = None


def exporting() -> bool:
    """Whether torch is capturing a graph to run elsewhere: ``torch.export`` (and the ONNX
    exporter built on it, ``dynamo=True``), ``torch.jit.trace`` (and the legacy ONNX exporter,
    which traces) or ``torch.jit.script``. ``torch.compile`` is not exporting: it keeps the
    fused ops."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.7
    return bool(is_exporting is not None and is_exporting())


def check_backend(backend: object, name: str = "backend") -> str:
    if not isinstance(backend, str):
        raise TypeError(f"{name} must be a str, one of {BACKENDS}; got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"{name} must be one of {BACKENDS}; got {backend!r}")
    return backend


def resolve(backend: str, *tensors: Optional[Tensor], op: str = "", channels: Optional[int] = None,
            kernel: Optional[str] = None) -> str:
    """Turn ``"auto"`` into a concrete backend and check that the choice can run.

    While :func:`exporting`, every backend (``"triton"`` included) resolves to
    ``"reference"``.

    Raises:
        ValueError: unknown backend, or ``"triton"`` for tensors it cannot run on: not on CUDA,
            on a GPU older than :data:`MIN_CAPABILITY`, or features of more ``channels`` than
            :func:`max_triton_channels` allows the op whose kernels run (``kernel``, else
            ``op``, the name errors start with) on that GPU.
        RuntimeError: ``"triton"`` asked for but Triton does not import or is older than
            :data:`MIN_TRITON`.
    """
    check_backend(backend)
    if exporting():
        # The fused ops compute what the reference computes; an exported graph must run on
        # runtimes that know only ATen/ONNX ops, so it records the reference's ops instead.
        return "reference"
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"environment variable {ENV_VAR} must be one of {BACKENDS}; got {env!r}")
            backend = env
        else:
            on_cuda = all(t.is_cuda for t in tensors if t is not None)
            if on_cuda and triton_available() and _gpu_problem(tensors, channels, kernel or op) is None:
                return "triton"
            return "reference"
    if backend == "triton":
        where = f"{op}: " if op else ""
        problem = triton_problem()
        if problem is not None:
            raise RuntimeError(f"{where}backend='triton' {problem}; or use backend='reference'")
        devices = {t.device.type for t in tensors if t is not None}
        if devices - {"cuda"} and not interpret_mode() and COMPILE_TARGET is None:
            raise ValueError(
                f"{where}backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels "
                f"on the CPU interpreter); got tensors on {sorted(devices)}. Use backend='reference' on CPU."
            )
        problem = _gpu_problem(tensors, channels, kernel or op)
        if problem is not None:
            raise ValueError(f"{where}backend='triton' {problem}. Use backend='reference', or 'auto', which "
                             f"picks it here.")
    return backend


def implementation(op: str, backend: str) -> Callable:
    """The function computing ``op`` (``prototype_logits``, ``contrastive_loss``,
    ``prototype_logits_and_contrastive`` or ``prototype_attention``) for a resolved backend;
    both have the same signature."""
    if backend == "reference":
        return getattr(reference, op)
    # Plain import statements, not importlib or sys.modules: torch.compile traces an import
    # statement, while the other two made fullgraph=True fail on the functional API.
    if op == "prototype_logits":
        from .kernels import similarity as module
    elif op == "contrastive_loss":
        from .kernels import contrastive as module
    elif op == "prototype_attention":
        from .kernels import attention as module
    elif op == "prototype_logits_and_contrastive":
        from .kernels import head_push as module
    else:
        raise ValueError(f"unknown op {op!r}")
    return getattr(module, op)
