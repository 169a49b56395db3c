"""Input checks shared by the public entry points (SPEC §5).

Each check raises ``TypeError`` (not a tensor, wrong dtype kind) or ``ValueError`` (shape,
range) naming the function, the argument, what it got and what was expected, before any
computation. Value checks (label range, negative weights) read the data and therefore sync
with the GPU; under ``torch.compile`` they are skipped so that tracing sees no data-dependent
branch (the shape checks still run).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

SIMILARITIES = ("cosine", "dot")
POOLINGS = ("max", "logsumexp", "mean")
POSITIVES = ("all", "nearest")
REDUCTIONS = ("mean", "sum", "none")


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def choice(fn: str, name: str, value: object, options: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{fn}: {name} must be a str, one of {tuple(options)}; got {type(value).__name__}")
    if value not in options:
        raise ValueError(f"{fn}: {name} must be one of {tuple(options)}; got {value!r}")
    return value


def positive_int(fn: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int; got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{fn}: {name} must be >= 1; got {value}")
    return value


def positive_float(fn: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a float; got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{fn}: {name} must be a finite number > 0; got {value}")
    return float(value)


def finite_float(fn: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a float; got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be finite; got {value}")
    return float(value)


def tensor(fn: str, name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor; got {type(value).__name__}")
    return value


def floating(fn: str, name: str, value: object, dims: Sequence[int], form: str) -> Tensor:
    t = tensor(fn, name, value)
    if not t.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor {form}; got dtype {t.dtype}")
    if t.dim() not in dims:
        raise ValueError(f"{fn}: {name} must have shape {form}; got shape {tuple(t.shape)}")
    return t


def features(fn: str, x: object, name: str = "features") -> Tensor:
    x = floating(fn, name, x, (2, 4), "(B, C, H, W) or (N, C)")
    if x.shape[1] == 0:
        raise ValueError(f"{fn}: {name} must have at least one channel; got shape {tuple(x.shape)}")
    return x


def prototypes(fn: str, w: object, channels: int, allow_flat: bool = False) -> Tensor:
    form = "(K, M, C) or (P, C)" if allow_flat else "(K, M, C)"
    w = floating(fn, "prototypes", w, (2, 3) if allow_flat else (3,), form)
    if w.numel() == 0:
        raise ValueError(f"{fn}: prototypes must not be empty; got shape {tuple(w.shape)}")
    if w.shape[-1] != channels:
        raise ValueError(
            f"{fn}: prototypes have C={w.shape[-1]} channels but the features have C={channels}; "
            f"got prototypes of shape {tuple(w.shape)}"
        )
    return w


def same_device(fn: str, **tensors: Optional[Tensor]) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        found = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"{fn}: all tensors must be on one device; got {found}")


def labels(
    fn: str,
    name: str,
    y: object,
    x: Tensor,
    num_classes: int,
    ignore_index: int,
    *,
    any_resolution: bool = True,
) -> Tensor:
    """A label map for features ``x``: ``(B, H', W')`` for 4-D ``x`` (``(H, W)`` itself when
    ``any_resolution`` is False), ``(N,)`` for 2-D ``x``; values in ``[0, K)`` or ``ignore_index``."""
    y = tensor(fn, name, y)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{fn}: {name} must be an integer tensor (int64 class indices); got dtype {y.dtype}")
    if x.dim() == 4:
        ok = y.dim() == 3 and y.shape[0] == x.shape[0] and (any_resolution or y.shape[1:] == x.shape[2:])
        form = f"(B, H', W') with B={x.shape[0]}" if any_resolution else f"(B, H, W) = {(x.shape[0], *x.shape[2:])}"
    else:
        ok = y.dim() == 1 and y.shape[0] == x.shape[0]
        form = f"(N,) with N={x.shape[0]}"
    if not ok:
        raise ValueError(f"{fn}: {name} must have shape {form} to match features {tuple(x.shape)}; got {tuple(y.shape)}")
    if not _compiling() and y.numel() > 0:
        bad = ((y < 0) | (y >= num_classes)) & (y != ignore_index)
        if bool(bad.any()):
            found = torch.unique(y[bad])[:5].tolist()
            raise ValueError(
                f"{fn}: {name} values must be in [0, {num_classes}) or ignore_index={ignore_index}; "
                f"found {found}"
            )
    return y


def weight(fn: str, w: object, target: Tensor) -> Optional[Tensor]:
    if w is None:
        return None
    w = tensor(fn, "weight", w)
    if not w.is_floating_point():
        raise TypeError(f"{fn}: weight must be a floating-point tensor shaped like target; got dtype {w.dtype}")
    if w.shape != target.shape:
        raise ValueError(
            f"{fn}: weight must have the target's shape {tuple(target.shape)}; got {tuple(w.shape)}"
        )
    if not _compiling() and w.numel() > 0 and bool((w < 0).any()):
        raise ValueError(f"{fn}: weight must be >= 0 everywhere; found minimum {w.min().item():g}")
    return w


def ignore_index(fn: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: ignore_index must be an int; got {type(value).__name__}")
    return value
