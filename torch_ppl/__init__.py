"""torch_ppl: Push-and-Pull Learning for semantic segmentation in PyTorch.

The public API:

* :class:`MultiPrototypeClassifier`: the head, ``(B, C, H, W) -> (B, K, H, W)`` logits from
  ``K x M`` prototypes (a drop-in for the 1x1 conv classifier).
* :class:`PPLAttention`: the pull, feature-to-prototype attention ``x -> x + attend(x, W)``.
* :class:`PushPullLoss`: the push, cross-entropy plus a multi-prototype contrastive loss.
* :class:`PPLHead`: the three in one module, a drop-in for a model's final classifier:
  ``head(x) -> logits``, ``head(x, target) -> (logits, features, loss)``.
* :mod:`torch_ppl.functional`: the same as functions, each with ``backend=``.
* :func:`set_value_checks`: turn the checks that read the data (label range, weights) off.
* :func:`set_autotune`: time the fused kernels' tiles on the GPU at hand and keep the fastest.
"""
from . import functional
from ._backend import autotune_enabled, set_autotune
from ._checks import set_value_checks, value_checks_enabled
from ._version import __version__
from .attention import PPLAttention
from .functional import LossTerms
from .head import MultiPrototypeClassifier
from .loss import PushPullLoss
from .ppl_head import PPLHead, PPLHeadOutput

__all__ = [
    "MultiPrototypeClassifier",
    "PPLAttention",
    "PushPullLoss",
    "PPLHead",
    "PPLHeadOutput",
    "LossTerms",
    "functional",
    "set_value_checks",
    "value_checks_enabled",
    "set_autotune",
    "autotune_enabled",
    "__version__",
]
