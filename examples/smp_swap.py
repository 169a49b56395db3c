"""Swap the classifier of a segmentation_models_pytorch model for PPL.

smp's models end in ``model.segmentation_head``, an ``nn.Sequential`` of
``(Conv2d, upsampling, activation)``; ``model.segmentation_head[0]`` is the classifier conv:
1x1 for DeepLabV3+ (followed by a 4x bilinear upsampling), 3x3 for Unet. The swap replaces
that conv with :class:`PPLHead` below (the pull, then the multi-prototype head) and adds the
push to the loss. In your training script it is these lines::

    head = model.segmentation_head[0] = PPLHead(model.segmentation_head[0], num_prototypes=4)
    crit = PushPullLoss(ignore_index=255)
    ...
    logits = model(images)                                   # unchanged
    loss = crit(logits, head.pop_features(), labels, head.prototypes)

``python examples/smp_swap.py`` builds ``smp.DeepLabV3Plus`` and ``smp.Unet`` (random weights,
``encoder_weights=None``) when segmentation_models_pytorch imports, and otherwise two tiny
stand-ins with the same attribute structure (``encoder``, ``decoder``, ``segmentation_head``
with the conv at index 0). CI runs the stand-ins only: smp's own models are untested here,
because smp needs torchvision, which does not import beside this machine's torch build.
"""
from __future__ import annotations

import argparse
from typing import Optional

import torch
from torch import Tensor, nn

from torch_ppl import MultiPrototypeClassifier, PPLAttention, PushPullLoss
from torch_ppl import functional as PF


class PPLHead(nn.Module):
    """Drop-in for an smp classifier conv: ``x -> pull(embed(x), W) -> logits``.

    A ``k x k`` conv (smp's Unet uses 3x3) becomes a ``kernel_size=k`` head, whose prototypes
    live in the space of ``k x k`` neighbourhoods (``C*k*k`` channels); the pull and the
    contrastive loss then work on those neighbourhood features, ``head.embed(x)``.

    In training mode the features the logits were computed from are kept for the loss;
    :meth:`pop_features` hands them over (and drops the reference). In eval mode nothing is kept.
    """

    def __init__(self, conv: nn.Conv2d, num_prototypes: int = 4, num_heads: int = 1, **head_kwargs) -> None:
        super().__init__()
        self.classifier = MultiPrototypeClassifier(
            conv.in_channels, conv.out_channels, num_prototypes, kernel_size=conv.kernel_size[0], **head_kwargs
        ).to(conv.weight.device)
        self.pull = PPLAttention(self.classifier.feature_dim, num_heads).to(conv.weight.device)
        self._features: Optional[Tensor] = None

    @property
    def prototypes(self) -> nn.Parameter:
        return self.classifier.prototypes

    def forward(self, x: Tensor) -> Tensor:
        c = self.classifier
        f = self.pull(c.embed(x), c.prototypes)
        self._features = f if self.training else None
        # f is already in the prototype space (c.embed applied), so it is scored directly.
        return PF.prototype_logits(f, c.prototypes, similarity=c.similarity, pooling=c.pooling,
                                   scale=c.scale, bias=c.bias, backend=c.backend)

    def pop_features(self) -> Tensor:
        if self._features is None:
            raise RuntimeError("PPLHead.pop_features: no features kept; call the model in train mode first")
        f, self._features = self._features, None
        return f


def swap_classifier(model: nn.Module, num_prototypes: int = 4, num_heads: int = 1) -> PPLHead:
    """Replace ``model.segmentation_head[0]`` (the classifier conv) by a :class:`PPLHead`."""
    head = model.segmentation_head[0] = PPLHead(model.segmentation_head[0], num_prototypes, num_heads)
    return head


def train_step(model: nn.Module, head: PPLHead, crit: PushPullLoss, optimizer: torch.optim.Optimizer,
               images: Tensor, labels: Tensor) -> float:
    """One supervised step: the model's own forward, then CE + contrastive on the kept features."""
    model.train()
    logits = model(images)
    loss = crit(logits, head.pop_features(), labels, head.prototypes)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


# ----------------------------------------------------------------------------- stand-ins
class _StandInEncoder(nn.Module):
    """Returns a list of feature maps, like smp encoders (the input first, deepest last)."""

    def __init__(self, channels=(3, 8, 16)):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU())
            for cin, cout in zip(channels[:-1], channels[1:])
        )

    def forward(self, x):
        feats = [x]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return feats


class _StandInDecoder(nn.Module):
    """Called as ``decoder(*features)`` (smp < 0.5) and returns one map at ``1/scale``."""

    def __init__(self, out_channels: int, scale: int):
        super().__init__()
        self.proj = nn.Conv2d(16, out_channels, 1)
        self.scale = scale

    def forward(self, *features):
        x = self.proj(features[-1])
        return nn.functional.interpolate(x, scale_factor=4 // self.scale, mode="bilinear", align_corners=False)


class StandInSegmentationModel(nn.Module):
    """smp's ``SegmentationModel`` structure: ``encoder``, ``decoder``, and
    ``segmentation_head = Sequential(Conv2d(k, padding=k//2), upsampling, activation)``.

    ``kind="deeplabv3plus"``: decoder output at 1/4, 1x1 classifier, 4x bilinear upsampling.
    ``kind="unet"``: decoder output at full resolution, 3x3 classifier, no upsampling.
    """

    def __init__(self, kind: str = "deeplabv3plus", classes: int = 3):
        super().__init__()
        deeplab = kind == "deeplabv3plus"
        decoder_channels = 12 if deeplab else 6
        self.encoder = _StandInEncoder()
        self.decoder = _StandInDecoder(decoder_channels, scale=4 if deeplab else 1)
        k = 1 if deeplab else 3
        self.segmentation_head = nn.Sequential(
            nn.Conv2d(decoder_channels, classes, kernel_size=k, padding=k // 2),
            nn.UpsamplingBilinear2d(scale_factor=4) if deeplab else nn.Identity(),
            nn.Identity(),
        )

    def forward(self, x):
        return self.segmentation_head(self.decoder(*self.encoder(x)))


def build_models(classes: int):
    """Real smp models when the package imports, else the stand-ins."""
    try:
        import segmentation_models_pytorch as smp
    except Exception:  # ImportError, or torchvision failing to import beside this torch
        return {kind: StandInSegmentationModel(kind, classes) for kind in ("deeplabv3plus", "unet")}, "stand-in"
    return {  # untested here: smp does not import on this project's CI machine
        "deeplabv3plus": smp.DeepLabV3Plus("resnet18", encoder_weights=None, classes=classes),
        "unet": smp.Unet("resnet18", encoder_weights=None, classes=classes),
    }, "smp"


def main(steps: int = 3, classes: int = 3, size: int = 32, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    models, source = build_models(classes)
    losses = {}
    for kind, model in models.items():
        head = swap_classifier(model, num_prototypes=4)
        crit = PushPullLoss(ignore_index=255)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        images = torch.randn(2, 3, size, size)
        labels = torch.randint(0, classes, (2, size, size))
        labels[:, : size // 4] = 255
        losses[kind] = [train_step(model, head, crit, optimizer, images, labels) for _ in range(steps)]
        model.eval()
        with torch.no_grad():
            logits = model(images)
        print(f"{source} {kind}: classifier {type(model.segmentation_head[0]).__name__}, "
              f"logits {tuple(logits.shape)}, losses " + " ".join(f"{v:.4f}" for v in losses[kind]))
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    main(steps=args.steps)
