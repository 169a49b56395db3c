"""FSDP2 support: a DTensor reaching a torch_ppl op is explained, not left to fail inside torch.

FSDP2 (``torch.distributed.fsdp.fully_shard``) stores each parameter as a sharded ``DTensor``
and gathers the full tensor only while the module it wrapped runs its own ``forward`` (and
again in backward). A parameter read anywhere else is the sharded ``DTensor``: mixed with the
plain tensors of an op, torch fails deep inside with "got mixed torch.Tensor and DTensor". The
usual case is the prototypes, read by the pull and by the loss outside the head's forward.
"""
from __future__ import annotations

import sys
from typing import Optional

from torch import Tensor

FIX = (
    "FSDP2's fully_shard gathers a module's parameters only while that module's own forward runs, "
    "and by default frees them again when it returns. Keep the prototypes and every op that reads them "
    "inside one sharded module: use torch_ppl.PPLHead (pull, classifier and, when given the target, the "
    "loss, all in its forward), or call fully_shard on a module that contains the head and all its "
    "readers, not on the head alone. To compute the loss after that module's forward, pass "
    "reshard_after_forward=False to its fully_shard, or call module.unshard() before the loss."
)


def _dtensor_class():
    # No import: torch.distributed.tensor costs about half a second, and while it has not been
    # imported no DTensor can exist.
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else getattr(module, "DTensor", None)


def reject_dtensors(fn: str, **tensors: Optional[Tensor]) -> None:
    """Raise ``TypeError`` naming the first argument that is a ``DTensor``, and the fix.

    Args:
        fn: the public function's name, for the message.
        tensors: the op's tensor arguments by name (``None`` and non-tensors are skipped).
    """
    dtensor = _dtensor_class()
    if dtensor is None:
        return
    for name, t in tensors.items():
        if isinstance(t, dtensor):
            local = tuple(t.to_local().shape)
            raise TypeError(
                f"{fn}: {name} is a DTensor (global shape {tuple(t.shape)}, local shape {local}, placements "
                f"{tuple(t.placements)}), a parameter sharded by FSDP2 read outside the forward of the module "
                f"fully_shard wrapped; torch_ppl ops need the full tensor. {FIX}"
            )
