"""Scenes of real handwritten digits for semi-supervised segmentation.

The digits are scikit-learn's bundled ``load_digits`` (1797 real 8x8 scans, shipped inside the
package: nothing is downloaded). A scene is a ``size x size`` canvas holding 2-4 digits, each
upscaled to a random side of ``digit_min``-``digit_max`` pixels and placed without overlap. Its
label map has 11 classes: 0 = background, ``d + 1`` = digit ``d``; a pixel belongs to a digit
when the upscaled digit's ink there is above ``ink_threshold`` (before the image noise is added).

The 1797 digit scans are first split into three disjoint pools (test, labelled, unlabelled), so
a test scene never shows a scan seen in training, and the labelled scenes draw only on the
labelled pool. The unlabelled split keeps its true labels in ``hidden_labels``: the training
loop never reads them, they are only used to measure how wrong its pseudo-labels are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

NUM_CLASSES = 11
CLASS_NAMES = ("bg",) + tuple(str(d) for d in range(10))
IGNORE_INDEX = 255


@dataclass(frozen=True)
class DataConfig:
    size: int = 48              # canvas side, pixels
    digit_min: int = 14         # side of an upscaled digit, pixels
    digit_max: int = 22
    min_digits: int = 2
    max_digits: int = 4
    ink_threshold: float = 0.3  # upscaled ink (0..1) above which a pixel is labelled as the digit
    noise_std: float = 0.08     # Gaussian image noise
    num_train: int = 1024       # labelled + unlabelled scenes
    labelled_fraction: float = 1 / 16
    num_test: int = 256
    test_pool_fraction: float = 0.25  # share of the 1797 scans reserved for test scenes
    seed: int = 0


@dataclass
class Placement:
    """One digit in a scene: which scan, its class, where (top-left) and how large."""
    scan: int
    digit: int
    top: int
    left: int
    side: int


@dataclass
class Split:
    """``images`` ``(S, 1, H, W)`` float32 in about [0, 1]; ``labels`` ``(S, H, W)`` int64;
    ``clean`` the images before noise; ``placements`` per scene; ``scans`` the scan indices used."""
    images: Tensor
    labels: Tensor
    clean: Tensor
    placements: List[List[Placement]] = field(repr=False)

    @property
    def scans(self) -> set:
        return {p.scan for scene in self.placements for p in scene}

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class DigitScenes:
    labelled: Split
    unlabelled: Split   # its ``labels`` are the hidden truth: the training loop must not train on them
    test: Split
    config: DataConfig


def load_scans() -> Tuple[np.ndarray, np.ndarray]:
    """The 1797 scikit-learn digits as ``(1797, 8, 8)`` float32 in [0, 1] and their targets."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def _upscale(scan: np.ndarray, side: int) -> np.ndarray:
    t = torch.from_numpy(scan)[None, None]
    return F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).numpy()


def _make_split(num: int, pool: np.ndarray, scans: np.ndarray, targets: np.ndarray, cfg: DataConfig,
                rng: np.random.Generator) -> Split:
    size = cfg.size
    images = np.zeros((num, 1, size, size), np.float32)
    clean = np.zeros((num, 1, size, size), np.float32)
    labels = np.zeros((num, size, size), np.int64)
    placements: List[List[Placement]] = []
    for s in range(num):
        occupied = np.zeros((size, size), bool)
        scene: List[Placement] = []
        for _ in range(int(rng.integers(cfg.min_digits, cfg.max_digits + 1))):
            scan = int(rng.choice(pool))
            side = int(rng.integers(cfg.digit_min, cfg.digit_max + 1))
            for _attempt in range(50):  # rejection sampling for a free box; give the digit up if none
                top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
                if not occupied[top:top + side, left:left + side].any():
                    break
            else:
                continue
            occupied[top:top + side, left:left + side] = True
            ink = _upscale(scans[scan], side)
            clean[s, 0, top:top + side, left:left + side] = ink
            box = labels[s, top:top + side, left:left + side]
            box[ink > cfg.ink_threshold] = targets[scan] + 1
            scene.append(Placement(scan, int(targets[scan]), top, left, side))
        placements.append(scene)
    images[:] = clean + rng.normal(0.0, cfg.noise_std, clean.shape).astype(np.float32)
    return Split(torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(clean), placements)


def make_scenes(cfg: DataConfig = DataConfig()) -> DigitScenes:
    """Build the three splits, deterministically from ``cfg.seed``."""
    scans, targets = load_scans()
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(scans))
    n_test = int(round(cfg.test_pool_fraction * len(scans)))
    n_lab = max(int(round(cfg.labelled_fraction * (len(scans) - n_test))), NUM_CLASSES)
    test_pool, lab_pool, unlab_pool = order[:n_test], order[n_test:n_test + n_lab], order[n_test + n_lab:]
    num_lab = max(int(round(cfg.labelled_fraction * cfg.num_train)), 1)
    return DigitScenes(
        labelled=_make_split(num_lab, lab_pool, scans, targets, cfg, rng),
        unlabelled=_make_split(cfg.num_train - num_lab, unlab_pool, scans, targets, cfg, rng),
        test=_make_split(cfg.num_test, test_pool, scans, targets, cfg, rng),
        config=cfg,
    )
