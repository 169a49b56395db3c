"""Shared test utilities: devices, random inputs, and the Cut-Cross-Entropy style comparison."""
from __future__ import annotations

import importlib.util
from typing import Optional, Sequence

import pytest
import torch
from torch import Tensor

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HAS_TRITON = importlib.util.find_spec("triton") is not None
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

LOW_PRECISION = (torch.bfloat16, torch.float16)
# Absolute slack added to the reference's own error in `assert_no_worse`; low-precision inputs
# carry rounding the fused kernels may place differently (e.g. casting normalised rows).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-10}


def random_labels(shape: Sequence[int], num_classes: int, *, ignore_frac: float = 0.2,
                  ignore_index: int = 255, generator: Optional[torch.Generator] = None,
                  device=DEVICE) -> Tensor:
    """int64 labels in ``[0, K)`` with about ``ignore_frac`` of them set to ``ignore_index``."""
    y = torch.randint(0, num_classes, tuple(shape), generator=generator)
    drop = torch.rand(tuple(shape), generator=generator) < ignore_frac
    return y.masked_fill(drop, ignore_index).to(device)


def assert_no_worse(fused: Tensor, same_dtype: Tensor, ground_truth: Tensor, tol: float, what: str = "") -> None:
    """``|fused - gt| <= |same_dtype - gt| + tol`` elementwise (Cut Cross-Entropy's test).

    ``ground_truth`` is the reference in float32 (or float64) on the same inputs upcast;
    ``same_dtype`` is the reference fed the low-precision inputs. A fused kernel may be as
    inexact as plain PyTorch in that dtype, plus ``tol``, but no worse.
    """
    gt = ground_truth.double()
    err_fused = (fused.double() - gt).abs()
    err_ref = (same_dtype.double() - gt).abs()
    bound = err_ref + tol * (1.0 + gt.abs())
    bad = ~(err_fused <= bound)
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements worse than the reference + tol={tol}; "
            f"first at {idx}: fused={fused[tuple(idx)].item():.6g} ref={same_dtype[tuple(idx)].item():.6g} "
            f"gt={gt[tuple(idx)].item():.6g}; max fused err {err_fused.max().item():.3g}, "
            f"max ref err {err_ref.max().item():.3g}"
        )
