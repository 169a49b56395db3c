"""A small conv segmentation net and the heads the variants compare.

The backbone is a two-level encoder-decoder (a tiny U-Net): ``(B, 1, H, W)`` images to
``(B, C, H/2, W/2)`` features. The head never upsamples (the usual convention); the loss
bilinearly resizes the logits to the labels, and :meth:`SegNet.predict` does the same.

Variants (see ``VARIANTS``):

* ``supervised``, ``pseudo_label``: ``nn.Conv2d(C, K, 1)`` classifier, plain cross-entropy.
* ``prototypes``: ``MultiPrototypeClassifier`` and cross-entropy only: the control that tells
  the head's own effect from push's and pull's.
* ``push``: ``MultiPrototypeClassifier`` (``M`` prototypes per class) + ``PushPullLoss``
  (cross-entropy + multi-prototype contrastive term).
* ``pull``: ``MultiPrototypeClassifier`` + ``PPLAttention`` before it, cross-entropy only.
* ``ppl``: both.
* ``ppl_exclude``: both, the attention hiding each pixel's own (pseudo-)class in training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_ppl import MultiPrototypeClassifier, PPLAttention


@dataclass(frozen=True)
class Variant:
    name: str
    semi_supervised: bool   # trains on pseudo-labels of the unlabelled split
    prototype_head: bool    # MultiPrototypeClassifier instead of a 1x1 conv
    push: bool              # contrastive term of PushPullLoss
    pull: bool              # PPLAttention before the head
    exclude: bool = False   # attention to negatives only (training)
    description: str = ""


VARIANTS = {
    v.name: v for v in (
        Variant("supervised", False, False, False, False,
                description="1x1 conv + CE, labelled split only"),
        Variant("pseudo_label", True, False, False, False,
                description="1x1 conv + CE, FixMatch-style pseudo-labels"),
        Variant("prototypes", True, True, False, False,
                description="multi-prototype head + CE (control: no push, no pull)"),
        Variant("push", True, True, True, False,
                description="multi-prototype head + CE + contrastive"),
        Variant("pull", True, True, False, True,
                description="multi-prototype head + PPLAttention + CE"),
        Variant("ppl", True, True, True, True,
                description="head + PPLAttention + CE + contrastive"),
        Variant("ppl_exclude", True, True, True, True, exclude=True,
                description="as ppl, attention to negatives only in training"),
    )
}


def _block(c_in: int, c_out: int, stride: int = 1, dilation: int = 1, kernel: int = 3) -> nn.Sequential:
    # GroupNorm, not BatchNorm: the pseudo-labels come from the same model in no_grad mode, and
    # GroupNorm behaves the same in train() and eval(), so there is no statistics mismatch.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
        nn.GroupNorm(8, c_out),
        nn.ReLU(inplace=True),
    )


class Backbone(nn.Module):
    """``(B, 1, H, W)`` -> ``(B, channels, H/2, W/2)``."""

    def __init__(self, channels: int = 32, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(_block(1, width), _block(width, 2 * width, stride=2))           # H/2
        self.down = nn.Sequential(_block(2 * width, 3 * width, stride=2),
                                  _block(3 * width, 3 * width, dilation=2))                     # H/4
        # 1x1 then 3x3: the fuse runs at H/2 on 5 * width channels, the costliest place for a 3x3.
        self.fuse = nn.Sequential(_block(5 * width, channels, kernel=1), _block(channels, channels))  # H/2

    def forward(self, x: Tensor) -> Tensor:
        skip = self.stem(x)
        deep = self.down(skip)
        deep = F.interpolate(deep, size=skip.shape[2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([skip, deep], dim=1))


class SegNet(nn.Module):
    """Backbone, optional ``PPLAttention``, then a 1x1 conv or a ``MultiPrototypeClassifier``.

    ``forward(x, exclude=None)`` returns ``(logits, features)`` at the features' resolution,
    ``features`` being what the head saw (after the attention) so the contrastive term compares
    the head's own inputs with its prototypes.
    """

    def __init__(self, variant: Variant, num_classes: int, channels: int = 32, num_prototypes: int = 4) -> None:
        super().__init__()
        self.variant = variant
        self.backbone = Backbone(channels)
        self.attention: Optional[PPLAttention] = PPLAttention(channels) if variant.pull else None
        if variant.prototype_head:
            self.head: nn.Module = MultiPrototypeClassifier(channels, num_classes, num_prototypes)
        else:
            self.head = nn.Conv2d(channels, num_classes, 1)

    @property
    def prototypes(self) -> Optional[Tensor]:
        return self.head.prototypes if isinstance(self.head, MultiPrototypeClassifier) else None

    def forward(self, x: Tensor, exclude: Optional[Tensor] = None):
        features = self.backbone(x)
        if self.attention is not None:
            features = self.attention(features, self.head.prototypes,
                                      exclude=exclude if self.variant.exclude else None)
        return self.head(features), features

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Class probabilities ``(B, K, H, W)`` at the image's resolution (no labels used)."""
        logits, _ = self(x)
        logits = F.interpolate(logits.float(), size=x.shape[2:], mode="bilinear", align_corners=False)
        return logits.softmax(dim=1)
