"""Fused Triton kernels, one file per op, each next to its autograd wrapper.

Each module exposes a function with the same signature as its counterpart in
:mod:`torch_ppl.reference`; :mod:`torch_ppl._backend` dispatches to it. Importing a module
here imports Triton, so nothing imports them eagerly.
"""

from typing import Optional

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_dtypes(op: str, **tensors: Optional[Tensor]) -> None:
    """``TypeError`` naming the first tensor whose dtype the kernels do not take (float64 mostly),
    raised before anything launches."""
    for name, t in tensors.items():
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{op} (triton): {name} has dtype {t.dtype}; the Triton kernels take float32, "
                f"bfloat16 or float16. Use backend='reference' for {t.dtype}."
            )
