"""Semi-supervised PPL in a PyTorch Lightning ``LightningModule``.

The model is a backbone and :class:`torch_ppl.PPLHead`. A training batch holds labelled
images with their labels and unlabelled images in a weak and a strong view; the step is
UniMatch's: the weak view proposes pseudo-labels and a confidence (no gradient), the strong
view is trained on them where the confidence passes a threshold::

    out_l = self(x_l, y_l)
    out_u = self(x_strong, pseudo, weight=(conf >= threshold).float())
    loss = out_l.loss + lambda_u * out_u.loss

Both losses are computed inside the head's forward, so the same module trains unchanged under
``Trainer(strategy="ddp")`` or ``strategy="fsdp"``. The data are random tensors and the
backbone two convs; ``python examples/lightning_semi.py`` trains a few steps on the CPU.
"""
from __future__ import annotations

import argparse
from typing import Optional, Union

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from torch_ppl import PPLHead, PPLHeadOutput


class RandomSemiSupervised(Dataset):
    """``(x_l (3, S, S), y_l (S, S) int64, x_weak (3, S, S), x_strong (3, S, S))`` items: a
    labelled image and an unlabelled one in two views (the strong one: noise and a gain)."""

    def __init__(self, length: int = 16, size: int = 16, classes: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x_l = torch.randn(length, 3, size, size, generator=g)
        self.y_l = torch.randint(0, classes, (length, size, size), generator=g)
        self.x_u = torch.randn(length, 3, size, size, generator=g)
        gain = 1.0 + 0.3 * torch.randn(length, 3, 1, 1, generator=g)
        self.x_strong = self.x_u * gain + 0.2 * torch.randn(self.x_u.shape, generator=g)

    def __len__(self) -> int:
        return len(self.x_l)

    def __getitem__(self, i: int):
        return self.x_l[i], self.y_l[i], self.x_u[i], self.x_strong[i]


class PPLSegmenter(L.LightningModule):
    """A backbone and a :class:`PPLHead`; ``self(images)`` gives ``(B, K, H/2, W/2)`` logits,
    ``self(images, target, weight)`` a :class:`~torch_ppl.PPLHeadOutput` with the loss."""

    def __init__(self, classes: int = 4, channels: int = 16, num_prototypes: int = 4, lambda_u: float = 1.0,
                 threshold: float = 0.95, lr: float = 0.01):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)
        )
        self.head = PPLHead(channels, classes, num_prototypes, num_heads=2)

    def forward(self, images: Tensor, target: Optional[Tensor] = None,
                weight: Optional[Tensor] = None) -> Union[Tensor, PPLHeadOutput]:
        return self.head(self.backbone(images), target, weight)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x_l, y_l, x_weak, x_strong = batch
        with torch.no_grad():  # the weak view only proposes targets
            probs = F.interpolate(self(x_weak), size=x_weak.shape[-2:], mode="bilinear", align_corners=False)
            conf, pseudo = probs.softmax(dim=1).max(dim=1)  # (B, H, W) at the image resolution
        mask = (conf >= self.hparams.threshold).float()
        out_l = self(x_l, y_l)
        out_u = self(x_strong, pseudo, weight=mask)
        loss = out_l.loss + self.hparams.lambda_u * out_u.loss
        self.log_dict({"loss/labelled": out_l.loss, "loss/unlabelled": out_u.loss, "confident": mask.mean()},
                      prog_bar=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class LossHistory(L.Callback):
    """Keeps the loss of every training step."""

    def __init__(self) -> None:
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def main(steps: int = 4, threshold: float = 0.95, seed: int = 0) -> list:
    L.seed_everything(seed, verbose=False)
    model = PPLSegmenter(threshold=threshold)
    history = LossHistory()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[history])
    trainer.fit(model, DataLoader(RandomSemiSupervised(seed=seed), batch_size=4, shuffle=True))
    for step, loss in enumerate(history.losses):
        print(f"step {step}: loss {loss:.4f}")
    return history.losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=0.95)
    args = parser.parse_args()
    main(steps=args.steps, threshold=args.threshold)
