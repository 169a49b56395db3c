"""Input checks shared by the public entry points.

Each check raises ``TypeError`` (not a tensor, wrong dtype kind) or ``ValueError`` (shape,
range) naming the function, the argument, what it got and what was expected, before any
computation.

*Value checks* (labels in range, weights finite and ``>= 0``) read the data. They are one
custom op, ``torch_ppl::check_values``, so that eager and ``torch.compile`` behave alike:

* on CPU tensors the op reads the data (no device to wait for) and raises ``ValueError``
  naming the argument and the offending values; compiled code calls the op like eager
  code does, so the same ``ValueError`` comes out (not a crash inside a generated kernel);
* on other devices (CUDA) it queues ``torch._assert_async``: no host sync, and a bad value
  stops the program at the next synchronisation with a device-side assert, before a kernel
  can read out of bounds;
* :func:`set_value_checks` (or ``TORCH_PPL_VALUE_CHECKS=0`` in the environment at import)
  turns them off; shape and type checks always run.

Under ``torch.compile`` the op returns a zero that is added to the checked tensor, so the
compiled graph cannot drop the check or move the computation before it. The reasons are in
``docs/decisions.md``.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _backend

SIMILARITIES = ("cosine", "dot")
POOLINGS = ("max", "logsumexp", "mean")
POSITIVES = ("all", "nearest")
REDUCTIONS = ("mean", "sum", "none")


VALUE_CHECKS_ENV = "TORCH_PPL_VALUE_CHECKS"
_VALUE_CHECKS = os.environ.get(VALUE_CHECKS_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def set_value_checks(enabled: bool) -> bool:
    """Turn the value checks (labels in range, weights finite and ``>= 0``) on or off for the
    whole process; returns the previous setting.

    They are on by default; ``TORCH_PPL_VALUE_CHECKS=0`` in the environment at import turns
    them off. Off, a label out of range is not detected by torch_ppl (``F.cross_entropy``
    and the kernels then fail or read out of bounds). Shape, dtype and option checks always
    run. Compiled functions read the setting when they are traced: recompile (or call
    ``torch.compiler.reset()``) after changing it.
    """
    global _VALUE_CHECKS
    if not isinstance(enabled, bool):
        raise TypeError(f"set_value_checks: enabled must be a bool; got {type(enabled).__name__}")
    previous, _VALUE_CHECKS = _VALUE_CHECKS, enabled
    return previous


def value_checks_enabled() -> bool:
    """Whether the value checks run (see :func:`set_value_checks`)."""
    return _VALUE_CHECKS


def _compiling() -> bool:
    return torch.compiler.is_compiling()


_exporting = _backend.exporting  # one definition: export and tracing also pick the reference


# kinds of value check; the op takes the kind as an int so that one schema serves all
_LABELS, _WEIGHT = 0, 1


def _value_problem(t: Tensor, kind: int, num_classes: int, ignore: int) -> Tensor:
    """A bool tensor marking the bad entries of ``t``."""
    if kind == _LABELS:
        return ((t < 0) | (t >= num_classes)) & (t != ignore)
    return ~torch.isfinite(t) | (t < 0)


def _value_message(t: Tensor, bad: Tensor, kind: int, where: str, num_classes: int, ignore: int) -> str:
    if kind == _LABELS:
        found = torch.unique(t[bad])[:5].tolist()
        return f"{where} values must be in [0, {num_classes}) or ignore_index={ignore}; found {found}"
    values = t[bad]
    nonfinite = values[~torch.isfinite(values)]
    found = f"{nonfinite[0].item():g}" if nonfinite.numel() else f"minimum {values.min().item():g}"
    return f"{where} must be finite and >= 0 everywhere; found {found}"


def _check_values_impl(t: Tensor, kind: int, num_classes: int, ignore: int, where: str) -> None:
    if t.numel() == 0 or t.device.type == "meta":
        return
    bad = _value_problem(t, kind, num_classes, ignore)
    if t.device.type == "cpu":
        if bool(bad.any()):
            raise ValueError(_value_message(t, bad, kind, where, num_classes, ignore))
    else:
        # No host sync: the assert runs on the device, in stream order, before the kernels
        # that follow read the data.
        torch._assert_async(~bad.any(), f"torch_ppl: {where}: bad values (see the torch_ppl value checks)")


@torch.library.custom_op("torch_ppl::check_values", mutates_args=())
def _check_values_op(t: Tensor, kind: int, num_classes: int, ignore: int, where: str) -> Tensor:
    _check_values_impl(t, kind, num_classes, ignore, where)
    return t.new_zeros(())


@_check_values_op.register_fake
def _(t: Tensor, kind: int, num_classes: int, ignore: int, where: str) -> Tensor:
    return t.new_zeros(())


def check_values(t: Tensor, kind: int, where: str, num_classes: int = 0, ignore: int = 0) -> Tensor:
    """Run a value check on ``t`` and return ``t`` (compiled: ``t`` plus the op's zero)."""
    if not _VALUE_CHECKS or _exporting():
        return t
    if not _compiling():
        _check_values_impl(t, kind, num_classes, ignore, where)
        return t
    token = torch.ops.torch_ppl.check_values(t.detach(), kind, num_classes, ignore, where)
    return t + token


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


def non_negative_float(fn: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a float; got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{fn}: {name} must be a finite number >= 0; got {value}")
    return float(value)


def same_batch(fn: str, **tensors: Optional[Tensor]) -> None:
    """The first dimension (``B``, or ``N`` for 2-D forms) of every given tensor must agree.
    The message names the argument(s) that differ from the others, or all of them when no
    size has a majority."""
    sizes = {name: t.shape[0] for name, t in tensors.items() if isinstance(t, Tensor) and t.dim() > 0}
    values = list(sizes.values())
    # Compared with ==, not hashed: under torch.export the sizes may be symbolic.
    if all(v == values[0] for v in values):
        return
    sizes = {name: int(v) for name, v in sizes.items()}
    counts = {size: list(sizes.values()).count(size) for size in set(sizes.values())}
    majority = [size for size, n in counts.items() if 2 * n > len(sizes)]

    def names(items):
        items = list(items)
        return " and ".join(items) if len(items) <= 2 else ", ".join(items[:-1]) + " and " + items[-1]

    if majority:
        odd = {name: size for name, size in sizes.items() if size != majority[0]}
        agree = [name for name, size in sizes.items() if size == majority[0]]
        found = "; ".join(f"{name} has {size}" for name, size in odd.items())
        raise ValueError(f"{fn}: {names(odd)} must have the batch size (first dimension) of "
                         f"{names(agree)}, {majority[0]}; {found}")
    found = ", ".join(f"{name} {size}" for name, size in sizes.items())
    raise ValueError(f"{fn}: {names(sizes)} must have the same batch size (first dimension); got {found}")


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
    if y.dim() == 3 and 0 in y.shape[1:]:
        raise ValueError(f"{fn}: {name} must have H' >= 1 and W' >= 1 (it is resized to the features); "
                         f"got shape {tuple(y.shape)}")
    return check_values(y, _LABELS, f"{fn}: {name}", num_classes, ignore_index)


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
    return check_values(w, _WEIGHT, f"{fn}: weight")


def ignore_index(fn: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: ignore_index must be an int; got {type(value).__name__}")
    return value
