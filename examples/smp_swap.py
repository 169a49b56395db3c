"""Swap the classifier of a segmentation_models_pytorch model for PPL; train, save, compile, export.

smp's models end in ``model.segmentation_head``, an ``nn.Sequential`` of
``(Conv2d, upsampling, activation)``; ``model.segmentation_head[0]`` is the classifier conv:
1x1 for DeepLabV3+ (followed by a 4x bilinear upsampling), 3x3 for Unet. The swap replaces
that conv with :class:`torch_ppl.PPLHead` (the pull, the multi-prototype head and the push in
one module). smp's forward cannot pass labels to its head, so the loss comes from
``head.loss``, which uses the features the head kept in training mode. In your training
script it is these lines::

    conv = model.segmentation_head[0]
    head = model.segmentation_head[0] = PPLHead(conv.in_channels, conv.out_channels, num_prototypes=4,
                                                kernel_size=conv.kernel_size[0])
    ...
    logits = model(images)                                   # smp's forward, unchanged
    loss = head.loss(logits, labels)

(``PPLHead.from_conv(conv, ...)`` instead starts from a trained conv's weights.)

``python examples/smp_swap.py`` builds ``smp.DeepLabV3Plus`` and ``smp.Unet`` (resnet18,
``encoder_weights=None``) when segmentation_models_pytorch imports, and otherwise two tiny
stand-ins with the same attribute structure (``encoder``, ``decoder``, ``segmentation_head``
with the conv at index 0). Each is trained for a few steps, its ``state_dict`` is saved and
loaded into a fresh model, and it is exported with ``torch.export`` (``--compile`` also runs a
``torch.compile``d training step). The project's CI runs the stand-ins: smp needs
torchvision, and PyPI's torchvision wheels link against the CUDA build of torch, so they do
not import beside the CPU-only torch that CI installs.
"""
from __future__ import annotations

import argparse
import io

import torch
from torch import Tensor, nn

from torch_ppl import PPLHead


def swap_classifier(model: nn.Module, num_prototypes: int = 4, num_heads: int = 1) -> PPLHead:
    """Replace ``model.segmentation_head[0]`` (the classifier conv) by a :class:`PPLHead` of the
    same input channels, classes and kernel size (a ``k x k`` conv gives a head comparing
    ``k x k`` neighbourhoods, ``C*k*k`` values, in which the pull and the loss then work)."""
    conv = model.segmentation_head[0]
    head = PPLHead(conv.in_channels, conv.out_channels, num_prototypes, num_heads=num_heads,
                   kernel_size=conv.kernel_size[0]).to(conv.weight.device)
    model.segmentation_head[0] = head
    return head


def train_step(model: nn.Module, head: PPLHead, optimizer: torch.optim.Optimizer,
               images: Tensor, labels: Tensor) -> float:
    """One supervised step: the model's own forward, then CE + contrastive from the head."""
    model.train()
    logits = model(images)
    loss = head.loss(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def state_dict_round_trip(model: nn.Module, fresh: nn.Module, images: Tensor) -> float:
    """Save ``model``'s ``state_dict``, load it into ``fresh`` (same architecture, already
    swapped); the largest logit difference in eval mode (0 when the round trip is exact)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    model.eval(), fresh.eval()
    with torch.no_grad():
        return (model(images) - fresh(images)).abs().max().item()


def export(model: nn.Module, images: Tensor) -> float:
    """``torch.export`` the model in eval mode (dynamic batch); the largest difference of the
    exported program from eager."""
    model.eval()
    program = torch.export.export(model, (images,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    with torch.no_grad():
        return (program.module()(images) - model(images)).abs().max().item()


def compiled_train_step(model: nn.Module, head: PPLHead, images: Tensor, labels: Tensor,
                        backend: str = "inductor") -> float:
    """Forward and loss through ``torch.compile``, then backward; returns the loss."""
    model.train()
    step = torch.compile(lambda images, labels: head.loss(model(images), labels), backend=backend)
    loss = step(images, labels)
    loss.backward()
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


def build_models(classes: int, source: str = "auto"):
    """``{"deeplabv3plus": model, "unet": model}`` and where they came from: real smp models
    (``source="smp"``, or ``"auto"`` when the package imports), else the stand-ins."""
    if source in ("auto", "smp"):
        try:
            import segmentation_models_pytorch as smp
        except Exception:  # ImportError, or torchvision failing to import beside this torch
            if source == "smp":
                raise
        else:
            return {
                "deeplabv3plus": smp.DeepLabV3Plus("resnet18", encoder_weights=None, classes=classes),
                "unet": smp.Unet("resnet18", encoder_weights=None, classes=classes),
            }, "smp"
    return {kind: StandInSegmentationModel(kind, classes) for kind in ("deeplabv3plus", "unet")}, "stand-in"


def main(steps: int = 3, classes: int = 3, size: int = 32, seed: int = 0, compile: bool = False,
         source: str = "auto") -> dict:
    torch.manual_seed(seed)
    models, source = build_models(classes, source)
    fresh_models, _ = build_models(classes, source)
    losses = {}
    for kind, model in models.items():
        head = swap_classifier(model, num_prototypes=4)
        swap_classifier(fresh_models[kind], num_prototypes=4)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        images = torch.randn(2, 3, size, size)
        labels = torch.randint(0, classes, (2, size, size))
        labels[:, : size // 4] = 255
        losses[kind] = [train_step(model, head, optimizer, images, labels) for _ in range(steps)]
        if compile:
            compiled_train_step(model, head, images, labels)
        reloaded = state_dict_round_trip(model, fresh_models[kind], images)
        exported = export(model, images)
        with torch.no_grad():
            logits = model(images)
        print(f"{source} {kind}: classifier {type(model.segmentation_head[0]).__name__}, "
              f"logits {tuple(logits.shape)}, losses " + " ".join(f"{v:.4f}" for v in losses[kind])
              + f", state_dict round trip {reloaded:.1e}, torch.export {exported:.1e}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also run one torch.compile'd training step")
    parser.add_argument("--source", choices=("auto", "smp", "stand-in"), default="auto")
    args = parser.parse_args()
    main(steps=args.steps, compile=args.compile, source=args.source)
