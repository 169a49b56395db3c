"""The label-noise experiment (``python -m torch_ppl.demo noise``): does pull resist wrong labels?

Fully supervised training on a larger labelled set of digit scenes whose *training* labels are
corrupted in a controlled way; the test labels stay clean. Two kinds of noise:

* **class flips** (``flip``): each digit instance's label is replaced, with probability ``p``,
  by a uniformly drawn *other* digit (its whole mask changes class): the way pseudo-labels go
  wrong, a confident but wrong class for a whole object;
* **boundary noise** (``boundary``): each instance's mask is grown or shrunk (a fair coin per
  instance) by ``r`` pixels (a square ``(2r+1)``-pixel neighbourhood); grown pixels are taken
  from the background only, so two digits never swap pixels.

The noise is drawn per seed from its own generator (``noise_generator``), with the same
random numbers at every level: the instances flipped at ``p = 0.25`` are among those flipped at
``p = 0.5``, and every variant trained with a seed sees exactly the same corrupted labels, so
per-seed differences between variants are paired on the noise too.

Variants (:data:`NOISE_VARIANTS`): the 1x1-conv baseline ``conv`` and the four prototype-head
variants of the semi-supervised demo, all trained on the labelled split alone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import DataConfig, DigitScenes, Split
from .model import VARIANTS, Variant
from .train import TrainConfig, evaluate, setup_run

# 256 labelled training scenes, no unlabelled split, 256 clean test scenes.
NOISE_DATA = DataConfig(num_train=256, labelled_fraction=1.0, num_test=256)

NOISE_VARIANTS: Dict[str, Variant] = {
    "conv": replace(VARIANTS["supervised"], name="conv", description="1x1 conv + CE"),
    **{name: replace(VARIANTS[name], semi_supervised=False,
                     description=VARIANTS[name].description.replace(" (control: no push, no pull)", " (control)"))
       for name in ("prototypes", "push", "pull", "ppl")},
}


@dataclass(frozen=True)
class NoiseLevel:
    name: str
    flip: float = 0.0    # probability that an instance's class is replaced by another digit
    boundary: int = 0    # pixels by which each instance's mask is grown or shrunk (0: none)


LEVELS: Dict[str, NoiseLevel] = {lv.name: lv for lv in (
    NoiseLevel("clean"),
    NoiseLevel("flip 0.25", flip=0.25),
    NoiseLevel("boundary 1", boundary=1),
)}


@dataclass
class CorruptedLabels:
    """``labels`` ``(S, H, W)`` the corrupted training labels; ``flipped`` per scene, per
    instance (in the order of ``Split.placements``) whether its class was replaced; ``grown``
    +1 / -1 / 0 per instance (mask grown, shrunk, untouched)."""
    labels: Tensor
    flipped: List[List[bool]]
    grown: List[List[int]]

    @property
    def flip_rate(self) -> Optional[float]:
        flags = [f for scene in self.flipped for f in scene]
        return sum(flags) / len(flags) if flags else None


def noise_generator(seed: int) -> torch.Generator:
    """The label noise of a seed: its own stream, apart from the training's (batches, init)."""
    return torch.Generator().manual_seed(10_007 + seed)


def corrupt(split: Split, level: NoiseLevel, seed: int) -> CorruptedLabels:
    """The training labels of ``split`` corrupted at ``level`` with the noise of ``seed``.

    Per instance, three random numbers are drawn whatever the level (so the levels share them):
    ``u`` (flipped when ``u < level.flip``), the replacement digit (uniform over the nine other
    digits) and the coin that grows or shrinks its mask."""
    g = noise_generator(seed)
    labels = split.labels.clone()
    flipped: List[List[bool]] = []
    grown: List[List[int]] = []
    r = level.boundary
    for s, scene in enumerate(split.placements):
        n = len(scene)
        u = torch.rand(n, generator=g)
        offset = torch.randint(1, 10, (n,), generator=g)
        coin = torch.rand(n, generator=g) < 0.5
        flipped.append([bool(u[i] < level.flip) for i in range(n)])
        grown.append([(1 if coin[i] else -1) if r > 0 else 0 for i in range(n)])
        clean = split.labels[s]
        for i, p in enumerate(scene):
            mask = torch.zeros_like(clean, dtype=torch.bool)
            box = (slice(p.top, p.top + p.side), slice(p.left, p.left + p.side))
            mask[box] = clean[box] == p.digit + 1
            cls = (p.digit + int(offset[i])) % 10 + 1 if flipped[s][i] else p.digit + 1
            if r > 0:
                m = mask[None, None].float()
                if grown[s][i] > 0:
                    grow = F.max_pool2d(m, 2 * r + 1, 1, r)[0, 0] > 0
                    labels[s][grow & ~mask & (clean == 0)] = cls
                else:
                    keep = -F.max_pool2d(-m, 2 * r + 1, 1, r)[0, 0] > 0
                    labels[s][mask & ~keep] = 0
                    mask = mask & keep
            labels[s][mask] = cls
    return CorruptedLabels(labels, flipped, grown)


@dataclass
class NoiseRunResult:
    """One variant trained with one seed at one noise level.

    * ``test_miou``, ``per_class_iou``: on the clean test split at the end of training;
    * ``flip_rate``: the share of training instances whose class was replaced;
      ``corrupted_pixels``: the share of training pixels whose label differs from the truth;
    * ``memorised``: of those corrupted pixels, the share the trained model predicts with the
      corrupted label (``None`` at the clean level); ``corrected``: the share it predicts with
      the true label;
    * ``train_clean_acc``: its accuracy on the training pixels whose label was left alone.
    """
    variant: str
    level: str
    seed: int
    test_miou: float
    per_class_iou: List[float]
    flip_rate: Optional[float]
    corrupted_pixels: float
    memorised: Optional[float]
    corrected: Optional[float]
    train_clean_acc: float
    final_loss: float
    wall_s: float

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _ratio(a: int, b: int) -> Optional[float]:
    return a / b if b else None


def train_noise_run(name: str, level_name: str, seed: int, scenes: DigitScenes, cfg: TrainConfig,
                    device: torch.device = torch.device("cpu"),
                    on_step: Callable[[], None] = lambda: None) -> NoiseRunResult:
    """Train variant ``name`` on ``scenes.labelled`` with its labels corrupted at ``level_name``
    (noise of ``seed``), ``cfg.batch_labelled`` scenes per step, no augmentation; evaluate on
    the clean test split and measure what the model learned of the corrupted pixels."""
    start = time.perf_counter()
    variant, level = NOISE_VARIANTS[name], LEVELS[level_name]
    train = scenes.labelled
    noisy = corrupt(train, level, seed)
    model, criterion, opt, sched, g = setup_run(variant, cfg, seed, device)
    model.train()
    loss = torch.zeros(())
    for _ in range(cfg.steps):
        idx = torch.randint(len(train), (cfg.batch_labelled,), generator=g)
        x, y = train.images[idx].to(device), noisy.labels[idx].to(device)
        logits, feats = model(x, exclude=y)
        loss = criterion(model, logits, feats, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        on_step()
    miou, per_class, _ = evaluate(model, scenes.test, device)
    _, _, pred = evaluate(model, Split(train.images, train.labels, train.clean, train.placements), device)
    corrupted = noisy.labels != train.labels
    n_bad = int(corrupted.sum())
    return NoiseRunResult(
        variant=name, level=level_name, seed=seed, test_miou=miou, per_class_iou=per_class,
        flip_rate=noisy.flip_rate, corrupted_pixels=n_bad / corrupted.numel(),
        memorised=_ratio(int((corrupted & (pred == noisy.labels)).sum()), n_bad),
        corrected=_ratio(int((corrupted & (pred == train.labels)).sum()), n_bad),
        train_clean_acc=float((pred == train.labels)[~corrupted].double().mean()),
        final_loss=float(loss.detach()), wall_s=time.perf_counter() - start)


def per_seed(runs: List[NoiseRunResult], variant: str, level: str, key: str = "test_miou") -> Dict[int, float]:
    return {r.seed: getattr(r, key) for r in runs if r.variant == variant and r.level == level
            and getattr(r, key) is not None}


def drops(runs: List[NoiseRunResult], variant: str, level: str) -> Dict[int, float]:
    """Per seed, clean test mIoU minus noisy test mIoU (positive: what the noise cost)."""
    clean, noisy = per_seed(runs, variant, "clean"), per_seed(runs, variant, level)
    return {s: clean[s] - noisy[s] for s in sorted(set(clean) & set(noisy))}


__all__ = ["NOISE_DATA", "NOISE_VARIANTS", "LEVELS", "NoiseLevel", "CorruptedLabels", "corrupt",
           "noise_generator", "NoiseRunResult", "train_noise_run", "per_seed", "drops"]
