"""The training loop: supervised, or FixMatch/UniMatch-style pseudo-labelling.

One step of a semi-supervised variant::

    labelled:    loss_l = crit(model(x_l), y_l)
    unlabelled:  probs = model(x_u) under no_grad            (weak view: the scene as it is)
                 conf, pseudo = probs.max(1)
                 x_s, pseudo, conf = strong(x_u, pseudo, conf) (CutMix + intensity jitter, noise, blur)
                 loss_u = crit(model(x_s), pseudo, weight=(conf >= 0.95).float())
    loss = loss_l + lambda_u * loss_u

``crit`` divides by the number of pixels, not by the number of confident ones (UniMatch's
normalisation), which is what ``PushPullLoss`` does: every variant trains with it, the 1x1-conv
baselines with its CE term alone (``contrast_weight=0``). The unlabelled split's true labels are read only to
count how many confident pseudo-labels are wrong (the noise rate); no gradient sees them.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from torch_ppl import PushPullLoss

from .data import IGNORE_INDEX, NUM_CLASSES, DigitScenes, Split
from .model import SegNet, Variant


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500
    # Small batches: on a 2-core CPU the number of updates is what limits learning. With 2 + 2
    # scenes per step the supervised variant learned far more per second than with 8 + 8
    # (measured on the supervised variant only; see docs/demo.md).
    batch_labelled: int = 2
    batch_unlabelled: int = 2
    lr: float = 3e-3
    weight_decay: float = 1e-4
    threshold: float = 0.95       # pseudo-label confidence threshold
    # Threshold for pixels pseudo-labelled as a digit (``None``: ``threshold``); background keeps
    # ``threshold``. A class-aware threshold in the spirit of FlexMatch, fixed, not adaptive.
    threshold_digits: Optional[float] = None
    lambda_u: float = 1.0         # weight of the unlabelled loss
    eval_every: int = 50          # steps between two points of the curves
    curve_test_scenes: int = 64   # the curves use the first test scenes; the final mIoU uses all
    channels: int = 32
    num_prototypes: int = 4       # M, for the prototype-head variants
    samples: int = 4              # test scenes whose predictions are kept for the figure


@dataclass
class RunResult:
    """One variant trained with one seed. ``test_miou`` and ``per_class_iou`` are on the whole
    test split at the end; ``noise_rate``, ``noise_rate_fg``, ``coverage``, ``digit_claims`` and
    ``noise_rate_claims`` count every pseudo-label made during the run (see :class:`NoiseMeter`);
    ``history`` holds the curves."""
    variant: str
    seed: int
    test_miou: float
    per_class_iou: List[float]
    noise_rate: Optional[float]
    noise_rate_fg: Optional[float]
    coverage: Optional[float]
    digit_claims: Optional[float]
    noise_rate_claims: Optional[float]
    wall_s: float
    history: List[Dict[str, float]] = field(default_factory=list)
    samples: Optional[Tensor] = field(default=None, repr=False)  # (S, H, W) predicted classes

    def to_json(self) -> dict:
        """Every field but ``samples`` (plain Python values)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "samples"}


class Criterion:
    """The loss of a variant: ``PushPullLoss``, with ``contrast_weight=0`` (its CE term alone:
    cross-entropy after a bilinear resize, UniMatch-normalised) when the variant has no push,
    as for the 1x1-conv baselines."""

    def __init__(self, variant: Variant) -> None:
        self.variant = variant
        self.push_pull = PushPullLoss(contrast_weight=1.0 if variant.push else 0.0, ignore_index=IGNORE_INDEX)

    def __call__(self, model: SegNet, logits: Tensor, features: Tensor, target: Tensor,
                 weight: Optional[Tensor] = None) -> Tensor:
        if self.variant.push:
            return self.push_pull(logits, features, target, model.prototypes, weight)
        return self.push_pull(logits, None, target, None, weight)


def _uniform(g: torch.Generator, shape, low: float, high: float) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=g)


def strong_view(x: Tensor, pseudo: Tensor, conf: Tensor, g: torch.Generator):
    """UniMatch-style strong view of a weak batch: CutMix with a shuffled copy of the batch
    (the pseudo-labels and confidences mixed the same way), then per-image intensity jitter,
    Gaussian noise and a 3x3 blur. Random numbers come from ``g`` on the CPU, so a seed gives
    the same views on any device."""
    b, _, h, w = x.shape
    dev = x.device
    partner = torch.roll(torch.arange(b), 1).to(dev)
    box = torch.zeros(b, h, w, dtype=torch.bool)
    use = torch.rand(b, generator=g) < 0.5
    sides = (_uniform(g, (b, 2), 0.3, 0.7) * torch.tensor([h, w])).long()
    corners = (torch.rand(b, 2, generator=g) * (torch.tensor([h, w]) - sides + 1)).long()
    for i in range(b):
        if use[i]:
            (top, left), (sh, sw) = corners[i].tolist(), sides[i].tolist()
            box[i, top:top + sh, left:left + sw] = True
    box = box.to(dev)
    x = torch.where(box[:, None], x[partner], x)
    pseudo = torch.where(box, pseudo[partner], pseudo)
    conf = torch.where(box, conf[partner], conf)

    contrast = _uniform(g, (b, 1, 1, 1), 0.6, 1.4).to(dev)
    shift = _uniform(g, (b, 1, 1, 1), -0.2, 0.2).to(dev)
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + shift
    x = x + _uniform(g, (b, 1, 1, 1), 0.0, 0.15).to(dev) * torch.randn(x.shape, generator=g).to(dev)
    blur = (torch.rand(b, generator=g) < 0.5).to(dev)
    x = torch.where(blur[:, None, None, None], F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), x)
    return x, pseudo, conf


def confident_mask(conf: Tensor, pseudo: Tensor, cfg: TrainConfig) -> Tensor:
    """Pixels whose pseudo-label is used: confidence at least ``cfg.threshold`` for background,
    ``cfg.threshold_digits`` (when set) for a digit."""
    if cfg.threshold_digits is None:
        return conf >= cfg.threshold
    thr = torch.where(pseudo == 0, torch.full_like(conf, cfg.threshold), torch.full_like(conf, cfg.threshold_digits))
    return conf >= thr


def confusion(pred: Tensor, target: Tensor, num_classes: int = NUM_CLASSES) -> Tensor:
    """``(K, K)`` counts, rows the true class."""
    idx = target.reshape(-1) * num_classes + pred.reshape(-1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def iou_from_confusion(cm: Tensor) -> List[float]:
    """Per-class IoU ``tp / (tp + fp + fn)``; NaN for a class absent from both."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan"))).tolist()


def mean_iou(per_class: List[float]) -> float:
    vals = [v for v in per_class if not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else float("nan")


@torch.no_grad()
def evaluate(model: SegNet, split: Split, device: torch.device, batch: int = 64, limit: Optional[int] = None):
    """mIoU over the split's first ``limit`` scenes (all by default), per-class IoU, and the
    predicted classes."""
    model.eval()
    cm = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    preds = []
    stop = len(split) if limit is None else min(limit, len(split))
    for start in range(0, stop, batch):
        end = min(start + batch, stop)
        x = split.images[start:end].to(device)
        pred = model.predict(x).argmax(dim=1)
        cm += confusion(pred, split.labels[start:end].to(device))
        preds.append(pred.cpu())
    model.train()
    per_class = iou_from_confusion(cm)
    return mean_iou(per_class), per_class, torch.cat(preds)


class NoiseMeter:
    """Counts pseudo-labelled pixels, the confident ones and the confident ones that are wrong
    against the hidden truth.

    * ``noise_rate`` = wrong confident / confident: the share of the pseudo-labels the loss
      trains on that are wrong (``None`` while nothing is confident);
    * ``noise_rate_fg``: the same over the pixels whose true class is a digit (the background
      is most of a scene and easy, so it dilutes ``noise_rate``);
    * ``coverage`` = confident / all pixels;
    * ``digit_claims`` = confident pixels pseudo-labelled as a digit (not background) / all
      pixels: how much digit supervision the unlabelled loss gets, and ``noise_rate_claims`` the
      share of those claims that are wrong.

    :meth:`read` gives the rates since the previous ``read``; :meth:`total` those of the whole run.
    """

    KEYS = ("pixels", "confident", "wrong", "confident_fg", "wrong_fg", "claims", "wrong_claims")

    def __init__(self) -> None:
        self.window = dict.fromkeys(self.KEYS, 0)
        self.run = dict.fromkeys(self.KEYS, 0)

    def update(self, pseudo: Tensor, confident: Tensor, truth: Tensor) -> None:
        wrong = confident & (pseudo != truth)
        fg = truth != 0
        claims = confident & (pseudo != 0)
        counts = {"pixels": truth.numel(), "confident": int(confident.sum()), "wrong": int(wrong.sum()),
                  "confident_fg": int((confident & fg).sum()), "wrong_fg": int((wrong & fg).sum()),
                  "claims": int(claims.sum()), "wrong_claims": int((claims & wrong).sum())}
        for key, value in counts.items():
            self.window[key] += value
            self.run[key] += value

    @staticmethod
    def rates(c: Dict[str, int]) -> Dict[str, Optional[float]]:
        def ratio(a: int, b: int) -> Optional[float]:
            return a / b if b else None
        return {"noise_rate": ratio(c["wrong"], c["confident"]),
                "noise_rate_fg": ratio(c["wrong_fg"], c["confident_fg"]),
                "coverage": ratio(c["confident"], c["pixels"]),
                "digit_claims": ratio(c["claims"], c["pixels"]),
                "noise_rate_claims": ratio(c["wrong_claims"], c["claims"])}

    def read(self) -> Dict[str, Optional[float]]:
        out = self.rates(self.window)
        self.window = dict.fromkeys(self.KEYS, 0)
        return out

    def total(self) -> Dict[str, Optional[float]]:
        return self.rates(self.run)


def setup_run(variant: Variant, cfg: TrainConfig, seed: int, device: torch.device):
    """A fresh run of ``variant`` seeded with ``seed``: the model, its criterion, AdamW with a
    cosine decay to 0 over ``cfg.steps``, and the generator that draws the run's batches."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = SegNet(variant, NUM_CLASSES, cfg.channels, cfg.num_prototypes).to(device)
    criterion = Criterion(variant)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    return model, criterion, opt, sched, g


def train_variant(variant: Variant, scenes: DigitScenes, cfg: TrainConfig, seed: int,
                  device: torch.device = torch.device("cpu"), on_step: Callable[[], None] = lambda: None) -> RunResult:
    """Train one variant from scratch with one seed and return its test metrics and history.

    ``history`` has one entry per ``cfg.eval_every`` steps (and the last step): the mIoU on the
    first ``cfg.curve_test_scenes`` test scenes then, and the noise rate and coverage of the
    pseudo-labels made since the previous entry. The final ``test_miou`` is on the whole test
    split. The supervised variant trains on no pseudo-labels; it makes them all the same (with
    no gradient) so its noise rate says how noisy its pseudo-labels would have been.
    """
    start = time.perf_counter()
    model, criterion, opt, sched, g = setup_run(variant, cfg, seed, device)
    lab, unlab = scenes.labelled, scenes.unlabelled
    meter, history = NoiseMeter(), []
    model.train()
    for step in range(1, cfg.steps + 1):
        il = torch.randint(len(lab), (cfg.batch_labelled,), generator=g)
        x_l, y_l = lab.images[il].to(device), lab.labels[il].to(device)
        logits, feats = model(x_l, exclude=y_l)
        loss = criterion(model, logits, feats, y_l)

        iu = torch.randint(len(unlab), (cfg.batch_unlabelled,), generator=g)
        x_u = unlab.images[iu].to(device)
        with torch.no_grad():
            conf, pseudo = model.predict(x_u).max(dim=1)
        meter.update(pseudo, confident_mask(conf, pseudo, cfg), unlab.labels[iu].to(device))  # the only read of the truth
        if variant.semi_supervised:
            x_s, pseudo_s, conf_s = strong_view(x_u, pseudo, conf, g)
            confident = confident_mask(conf_s, pseudo_s, cfg)
            logits_s, feats_s = model(x_s, exclude=pseudo_s.masked_fill(~confident, IGNORE_INDEX))
            loss = loss + cfg.lambda_u * criterion(model, logits_s, feats_s, pseudo_s, confident.float())

        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        on_step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            miou, _, _ = evaluate(model, scenes.test, device, limit=cfg.curve_test_scenes)
            history.append({"step": step, "test_miou": miou, "loss": float(loss.detach()), **meter.read()})
    miou, per_class, preds = evaluate(model, scenes.test, device)
    return RunResult(variant.name, seed, miou, per_class, **meter.total(), wall_s=time.perf_counter() - start,
                     history=history, samples=preds[:cfg.samples])
