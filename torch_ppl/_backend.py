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


def interpret_mode() -> bool:
    """Whether Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
        ValueError: unknown backend, or ``"triton"`` for tensors it cannot run on (not on CUDA,
            or features of more ``channels`` than :data:`MAX_TRITON_CHANNELS` allows the op
            whose kernels run: ``kernel``, else ``op``, the name errors start with).
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
            fits = channels is None or channels <= MAX_TRITON_CHANNELS[kernel or op]
            return "triton" if on_cuda and fits and triton_available() else "reference"
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
        widest = None if channels is None else MAX_TRITON_CHANNELS[kernel or op]
        if widest is not None and channels > widest:
            raise ValueError(
                f"{where}backend='triton' takes features of at most {widest} channels (the "
                f"kernels hold a pixel's channels on chip); got {channels}. Use backend='reference' or "
                f"'auto', which picks it for features this wide."
            )
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
