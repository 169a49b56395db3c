"""A UniMatch-style semi-supervised step with PPL.

Labelled images give CE + contrastive on their labels. Unlabelled images are seen twice: a
weak view, whose predictions (no gradient) give pseudo-labels and a confidence, and a strong
view, trained on those pseudo-labels where the confidence passes a threshold::

    loss = crit(p_l, f_l, y_l, W) + lambda_u * crit(p_u, f_u, pseudo, W, weight=(conf >= 0.95).float())

``weight`` is a per-pixel mask: with ``reduction="mean"`` the unlabelled term is
``sum(mask * loss) / #pixels`` (UniMatch's convention: low-confidence pixels lower the loss,
they do not renormalise it), and it applies to the CE and the contrastive term alike.

With :class:`torch_ppl.PPLHead` (pull, multi-prototype head and push in one module) the model
computes each term in its own forward when given a target, so the two lines to copy are::

    out_l = model(x_l, y_l)
    out_u = model(x_strong, pseudo, weight=(conf >= 0.95).float())
    loss = out_l.loss + lambda_u * out_u.loss

The model is a stand-in (a two-conv backbone and the head) and the "strong" augmentation is
noise plus a per-channel gain instead of UniMatch's colour jitter, blur and CutMix.
``python examples/unimatch_loop.py`` runs a few steps on random data.
"""
from __future__ import annotations

import argparse
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_ppl import PPLHead, PPLHeadOutput, PushPullLoss


class SegNet(nn.Module):
    """backbone -> PPLHead. ``model(images)`` gives ``(B, K, H/2, W/2)`` logits;
    ``model(images, target, weight)`` gives :class:`~torch_ppl.PPLHeadOutput`
    ``(logits, features, loss)`` with the loss against a target at image resolution."""

    def __init__(self, classes: int = 4, channels: int = 16, num_prototypes: int = 4,
                 criterion: Optional[PushPullLoss] = None):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)
        )
        self.head = PPLHead(channels, classes, num_prototypes, num_heads=2, criterion=criterion)

    def forward(self, images: Tensor, target: Optional[Tensor] = None,
                weight: Optional[Tensor] = None) -> Union[Tensor, PPLHeadOutput]:
        return self.head(self.backbone(images), target, weight)


def strong_view(images: Tensor, generator: torch.Generator) -> Tensor:
    """A stand-in for UniMatch's strong augmentation (photometric only, so labels stay aligned)."""
    gain = 1.0 + 0.3 * torch.randn(images.shape[0], images.shape[1], 1, 1, generator=generator)
    return images * gain + 0.2 * torch.randn(images.shape, generator=generator)


def semi_supervised_loss(model: SegNet, x_l: Tensor, y_l: Tensor, x_u: Tensor, generator: torch.Generator,
                         *, lambda_u: float = 1.0, threshold: float = 0.95):
    """Returns ``(loss, fraction of unlabelled pixels above the threshold)``."""
    with torch.no_grad():  # the weak view only proposes targets
        logits_w = model(x_u)
        probs = F.interpolate(logits_w, size=x_u.shape[-2:], mode="bilinear", align_corners=False).softmax(dim=1)
        conf, pseudo = probs.max(dim=1)  # (B, H, W) at the image resolution, like y_l

    out_l = model(x_l, y_l)
    out_u = model(strong_view(x_u, generator), pseudo, weight=(conf >= threshold).float())
    loss = out_l.loss + lambda_u * out_u.loss
    return loss, (conf >= threshold).float().mean().item()


def main(steps: int = 5, seed: int = 0, threshold: float = 0.95) -> list:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classes, size = 4, 16
    model = SegNet(classes, criterion=PushPullLoss(temperature=0.1, ignore_index=255))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for step in range(steps):
        x_l = torch.randn(2, 3, size, size, generator=g)
        y_l = torch.randint(0, classes, (2, size, size), generator=g)
        x_u = torch.randn(4, 3, size, size, generator=g)
        model.train()
        loss, confident = semi_supervised_loss(model, x_l, y_l, x_u, g, threshold=threshold)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append((loss.item(), confident))
        print(f"step {step}: loss {loss.item():.4f}, confident unlabelled pixels {confident:.1%}")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.95)
    args = parser.parse_args()
    main(steps=args.steps, threshold=args.threshold)
