"""The demo (``python -m torch_ppl.demo``): its data, its metrics, and a tiny run of every variant."""
import dataclasses
import json
import math

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from torch_ppl.demo import __main__ as cli  # noqa: E402
from torch_ppl.demo.data import IGNORE_INDEX, NUM_CLASSES, DataConfig, load_scans, make_scenes  # noqa: E402
from torch_ppl.demo.model import VARIANTS  # noqa: E402
from torch_ppl.demo.noise import (  # noqa: E402
    LEVELS, NOISE_DATA, NOISE_VARIANTS, NoiseLevel, corrupt, train_noise_run,
)
from torch_ppl.demo.stats import interval, paired, t975  # noqa: E402
from torch_ppl.demo.train import (  # noqa: E402
    Criterion, NoiseMeter, TrainConfig, confident_mask, iou_from_confusion, confusion, mean_iou, strong_view,
    train_variant,
)

TINY_DATA = DataConfig(num_train=64, num_test=16)
TINY_TRAIN = TrainConfig(steps=3, eval_every=2, curve_test_scenes=8, samples=2)


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(TINY_DATA)


# --- data -------------------------------------------------------------------------------------

def test_labels_are_the_digit_pixels(scenes):
    _, targets = load_scans()
    thr = TINY_DATA.ink_threshold
    for split in (scenes.labelled, scenes.unlabelled, scenes.test):
        assert split.labels.dtype == torch.int64 and split.labels.min() >= 0 and split.labels.max() < NUM_CLASSES
        # a pixel is a digit exactly where the (noise-free) upscaled ink passes the threshold ...
        assert torch.equal(split.labels > 0, split.clean[:, 0] > thr)
        for s, scene in enumerate(split.placements):
            assert TINY_DATA.max_digits >= len(scene) >= 1
            inside = torch.zeros(split.labels.shape[1:], dtype=torch.bool)
            for p in scene:
                assert p.digit == targets[p.scan]
                assert TINY_DATA.digit_min <= p.side <= TINY_DATA.digit_max
                box = (slice(p.top, p.top + p.side), slice(p.left, p.left + p.side))
                assert not inside[box].any(), "digits overlap"
                inside[box] = True
                # ... and carries the class of the digit drawn there (0 = background, d + 1 = digit d)
                labels = split.labels[s][box]
                assert set(labels.unique().tolist()) <= {0, p.digit + 1}
                assert (labels == p.digit + 1).any()
            assert (split.labels[s][~inside] == 0).all() and (split.clean[s, 0][~inside] == 0).all()
        # the noisy image is the clean one plus noise of about noise_std
        assert abs(float((split.images - split.clean).std()) - TINY_DATA.noise_std) < 0.01


def test_splits_are_disjoint_and_sized(scenes):
    lab, unlab, test = scenes.labelled.scans, scenes.unlabelled.scans, scenes.test.scans
    assert lab and unlab and test
    assert not (lab & unlab) and not (lab & test) and not (unlab & test)
    assert len(scenes.labelled) == round(TINY_DATA.num_train * TINY_DATA.labelled_fraction)
    assert len(scenes.labelled) + len(scenes.unlabelled) == TINY_DATA.num_train
    assert len(scenes.test) == TINY_DATA.num_test


def test_scenes_are_deterministic_in_the_seed(scenes):
    again = make_scenes(TINY_DATA)
    for a, b in ((scenes.labelled, again.labelled), (scenes.unlabelled, again.unlabelled), (scenes.test, again.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.placements == b.placements
    other = make_scenes(dataclasses.replace(TINY_DATA, seed=1))
    assert not torch.equal(scenes.test.labels, other.test.labels)


# --- metrics and pieces of the loop -----------------------------------------------------------

def test_confusion_iou_and_mean_iou():
    truth = torch.tensor([0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0])
    per_class = iou_from_confusion(confusion(pred, truth, num_classes=4))
    assert per_class[:3] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert math.isnan(per_class[3])  # absent from truth and prediction: left out of the mean
    assert mean_iou(per_class) == pytest.approx(1 / 3)


def test_noise_meter_counts_confident_wrong_pixels():
    meter = NoiseMeter()
    truth = torch.tensor([0, 0, 3, 3, 5, 5])
    pseudo = torch.tensor([0, 2, 3, 0, 5, 1])
    confident = torch.tensor([True, True, True, True, False, False])
    meter.update(pseudo, confident, truth)
    assert meter.read() == {"noise_rate": 2 / 4, "noise_rate_fg": 1 / 2, "coverage": 4 / 6,
                            "digit_claims": 2 / 6, "noise_rate_claims": 1 / 2}
    assert set(meter.read().values()) == {None}  # a new window: nothing counted yet
    meter.update(pseudo, torch.ones(6, dtype=torch.bool), truth)
    assert meter.total() == {"noise_rate": 5 / 10, "noise_rate_fg": 3 / 6, "coverage": 10 / 12,
                             "digit_claims": 6 / 12, "noise_rate_claims": 3 / 6}


def test_baseline_loss_is_the_library_ce_normalised_the_unimatch_way():
    """The 1x1-conv variants train with ``PushPullLoss``'s CE term: bilinear resize, then
    ``sum(w * ce) / #valid``; the variants differ in their head and terms, not in the reduction."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, NUM_CLASSES, 6, 6, generator=g)
    target = torch.randint(NUM_CLASSES, (2, 12, 12), generator=g)
    target[0, :3] = IGNORE_INDEX
    weight = (torch.rand(2, 12, 12, generator=g) > 0.5).float()
    crit = Criterion(VARIANTS["pseudo_label"])
    assert not VARIANTS["pseudo_label"].prototype_head
    ours = crit(None, logits, None, target, weight)
    up = torch.nn.functional.interpolate(logits, size=(12, 12), mode="bilinear", align_corners=False)
    ce = torch.nn.functional.cross_entropy(up, target, ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(ours, (ce * weight).sum() / (target != IGNORE_INDEX).sum())
    assert ours < crit(None, logits, None, target)  # the mask lowers the loss, it does not renormalise it


def test_digit_threshold_applies_to_digit_pseudo_labels_only():
    conf = torch.tensor([0.9, 0.9, 0.96, 0.6])
    pseudo = torch.tensor([0, 3, 0, 5])
    assert confident_mask(conf, pseudo, TINY_TRAIN).tolist() == [False, False, True, False]
    cfg = dataclasses.replace(TINY_TRAIN, threshold_digits=0.7)
    assert confident_mask(conf, pseudo, cfg).tolist() == [False, True, True, False]


def test_strong_view_mixes_pseudo_labels_with_their_confidence():
    g = torch.Generator().manual_seed(0)
    b = 8
    x = torch.rand(b, 1, 16, 16, generator=g)
    pseudo = torch.arange(b).view(b, 1, 1).expand(b, 16, 16).clone()
    conf = pseudo.float() / 10
    x_s, pseudo_s, conf_s = strong_view(x, pseudo, conf, g)
    assert x_s.shape == x.shape and torch.isfinite(x_s).all()
    torch.testing.assert_close(conf_s, pseudo_s.float() / 10)  # the same CutMix box for both
    assert (pseudo_s != pseudo).any()  # some CutMix happened with this seed


# --- the training loop and the CLI ------------------------------------------------------------

def _wrong_truth(scenes):
    """The same scenes, the unlabelled split's hidden labels replaced by other labels."""
    unlab = dataclasses.replace(scenes.unlabelled, labels=(scenes.unlabelled.labels + 1) % NUM_CLASSES)
    return dataclasses.replace(scenes, unlabelled=unlab)


@pytest.mark.parametrize("variant", ["supervised", "ppl"])
def test_hidden_truth_only_feeds_the_noise_rate(scenes, variant):
    """Training never reads the unlabelled split's labels: replacing them changes the noise rate
    and nothing else. (Threshold 0: every pseudo-label is confident, so the noise rate exists.)"""
    cfg = dataclasses.replace(TINY_TRAIN, threshold=0.0)
    a = train_variant(VARIANTS[variant], scenes, cfg, seed=0)
    b = train_variant(VARIANTS[variant], _wrong_truth(scenes), cfg, seed=0)
    assert a.test_miou == b.test_miou and torch.equal(a.samples, b.samples)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert a.coverage == b.coverage == 1.0
    # a pixel is right under at most one of the two truths, so the two noise rates add up to >= 1
    assert a.noise_rate != b.noise_rate and a.noise_rate + b.noise_rate >= 1.0 - 1e-12


def test_supervised_does_not_train_on_the_unlabelled_split(scenes):
    noise = dataclasses.replace(scenes.unlabelled, images=torch.rand_like(scenes.unlabelled.images))
    a = train_variant(VARIANTS["supervised"], scenes, TINY_TRAIN, seed=0)
    b = train_variant(VARIANTS["supervised"], dataclasses.replace(scenes, unlabelled=noise), TINY_TRAIN, seed=0)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history] and torch.equal(a.samples, b.samples)


def _in_unit(v):
    return v is None or 0.0 <= v <= 1.0


def test_cli_runs_every_variant_and_writes_results(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["--quick", "--steps", "2", "--seeds", "2", "--workers", "2", "--out", str(out),
                     "--no-progress"]) == 0
    doc = json.loads((out / "results.json").read_text())
    png = (out / "figure.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    assert set(doc) == {"config", "environment", "wall_s", "runs", "summary", "comparisons"}
    assert doc["config"]["variants"] == list(VARIANTS) and doc["config"]["seeds"] == [0, 1]
    assert doc["config"]["train"]["steps"] == 2 and doc["config"]["train"]["threshold"] == 0.95
    assert doc["wall_s"] > 0 and doc["environment"]["device"] == "cpu"
    assert sorted((r["variant"], r["seed"]) for r in doc["runs"]) == sorted((v, s) for v in VARIANTS for s in (0, 1))
    for r in doc["runs"]:
        assert 0.0 <= r["test_miou"] <= 1.0 and r["wall_s"] > 0
        assert len(r["per_class_iou"]) == NUM_CLASSES and all(_in_unit(v) for v in r["per_class_iou"])
        assert all(_in_unit(r[k]) for k in ("noise_rate", "noise_rate_fg", "noise_rate_claims", "digit_claims"))
        assert r["coverage"] is not None and 0.0 <= r["coverage"] <= 1.0
        assert [h["step"] for h in r["history"]] == [2]
        for h in r["history"]:
            assert 0.0 <= h["test_miou"] <= 1.0 and math.isfinite(h["loss"]) and _in_unit(h["noise_rate"])
    assert list(doc["summary"]) == list(VARIANTS)
    for name, s in doc["summary"].items():
        assert s["seeds"] == [0, 1]
        mine = [r["test_miou"] for r in doc["runs"] if r["variant"] == name]
        assert s["test_miou"]["mean"] == pytest.approx(sum(mine) / 2)
        assert s["test_miou"]["std"] == pytest.approx(abs(mine[0] - mine[1]) / math.sqrt(2))
        assert _in_unit(s["noise_rate"]["mean"])

    table = capsys.readouterr().out
    for name in VARIANTS:
        assert name in table
    assert "test mIoU" in table and "results.json" in table
    assert "This was --quick, a smoke test" in table and "docs/demo.md" in table  # points to the full run
    assert "noise % (digits):" in table  # the key under the table
    # every comparison also as a paired per-seed difference with its interval
    assert "paired per seed" in table and "pseudo_label - supervised" in table
    comp = {(c["a"], c["b"]): c for c in doc["comparisons"]}
    for (a, b), c in comp.items():
        ra = {r["seed"]: r["test_miou"] for r in doc["runs"] if r["variant"] == a}
        rb = {r["seed"]: r["test_miou"] for r in doc["runs"] if r["variant"] == b}
        assert c["diffs"] == pytest.approx([ra[s] - rb[s] for s in (0, 1)])
        assert c["low"] <= c["mean"] <= c["high"]
    assert ("pull", "prototypes") in comp and ("pseudo_label", "supervised") in comp


def test_worker_processes_train_the_same_runs_as_one_process(tmp_path):
    """--workers spreads whole runs over processes; each run seeds itself, so the results are
    those of the in-process loop (up to the float order of one thread instead of several)."""
    args = ["--quick", "--steps", "3", "--seeds", "2", "--variants", "pseudo_label,ppl", "--no-progress"]
    docs = []
    for workers in ("1", "2"):
        assert cli.main(args + ["--workers", workers, "--out", str(tmp_path / workers)]) == 0
        docs.append(json.loads((tmp_path / workers / "results.json").read_text()))
    one, many = docs
    assert [(r["variant"], r["seed"]) for r in one["runs"]] == [(r["variant"], r["seed"]) for r in many["runs"]]
    assert many["config"]["workers"] == 2
    for a, b in zip(one["runs"], many["runs"]):
        assert [h["loss"] for h in a["history"]] == pytest.approx([h["loss"] for h in b["history"]], rel=1e-4)
        assert a["coverage"] == pytest.approx(b["coverage"], abs=1e-3)
        assert a["test_miou"] == pytest.approx(b["test_miou"], abs=1e-3)


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        cli.parse_args(["--variants", "ppl,nope"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--seeds", "0"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--workers", "0"])
    with pytest.raises(SystemExit):
        cli.parse_args(["noise", "--variants", "pseudo_label"])  # no pseudo-labels in the noise experiment
    with pytest.raises(SystemExit):
        cli.parse_args(["--variants", "conv"])  # the noise experiment's baseline only
    args = cli.parse_args(["noise"])
    assert args.variants == list(NOISE_VARIANTS) and str(args.out) == "demo_out/noise"
    assert cli.parse_args([]).mode == "semi"
    assert cli.parse_args(["--variants", "ppl, supervised"]).variants == ["ppl", "supervised"]
    if not torch.cuda.is_available():
        assert cli.main(["--device", "cuda", "--no-progress"]) == 2


def test_cli_checks_the_demo_extra_before_any_work(tmp_path, capsys, monkeypatch):
    """A missing package of the demo extra stops the demo at once, naming the pip command,
    instead of failing at the figure after the training."""
    monkeypatch.setattr(cli, "missing_packages", lambda: ["matplotlib"])
    monkeypatch.setattr(cli, "run", lambda *a, **k: pytest.fail("the demo started without its packages"))
    assert cli.main(["--quick", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "missing: matplotlib" in err and 'pip install "torch_ppl[demo]"' in err
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    assert cli.missing_packages() == []  # here the extra is installed


def test_cli_help_is_plain_text_and_quick_says_it_is_a_smoke_test(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":mod:" not in text
    assert "smoke test" in text and 'pip install "torch_ppl[demo]"' in text


# --- the label-noise experiment ---------------------------------------------------------------

NOISE_TINY = dataclasses.replace(NOISE_DATA, num_train=48, num_test=16)
FLIP_HALF = NoiseLevel("flip 0.5", flip=0.5)


@pytest.fixture(scope="module")
def noise_scenes():
    return make_scenes(NOISE_TINY)


def test_noise_data_is_all_labelled_with_clean_test_labels(noise_scenes):
    assert len(noise_scenes.labelled) == NOISE_TINY.num_train and len(noise_scenes.unlabelled) == 0
    assert len(noise_scenes.test) == NOISE_TINY.num_test
    assert not (noise_scenes.labelled.scans & noise_scenes.test.scans)
    assert NOISE_DATA.num_train == 256 and NOISE_DATA.labelled_fraction == 1.0


def _instance_masks(split, s):
    for p in split.placements[s]:
        box = (slice(p.top, p.top + p.side), slice(p.left, p.left + p.side))
        mask = torch.zeros(split.labels.shape[1:], dtype=torch.bool)
        mask[box] = split.labels[s][box] == p.digit + 1
        yield p, mask


def test_class_flips_corrupt_the_expected_share_of_instances(noise_scenes):
    """Each instance is flipped with probability p: over many seeds the share is p; a flipped
    instance's whole mask takes one other digit's class, nothing else changes."""
    train = noise_scenes.labelled
    before = train.labels.clone()
    rates = []
    for seed in range(40):
        c = corrupt(train, LEVELS["flip 0.25"], seed)
        rates.append(c.flip_rate)
        for s in range(len(train)):
            for (p, mask), flipped in zip(_instance_masks(train, s), c.flipped[s]):
                new = c.labels[s][mask].unique().tolist()
                assert len(new) == 1 and 1 <= new[0] <= 10
                assert (new[0] != p.digit + 1) == flipped
        assert torch.equal(c.labels[train.labels == 0], train.labels[train.labels == 0])  # background untouched
    n = sum(len(scene) for scene in train.placements)
    # 40 seeds x n instances: the standard error of the share is sqrt(p (1 - p) / (40 n)) < 0.01
    assert abs(sum(rates) / len(rates) - 0.25) < 4 * math.sqrt(0.25 * 0.75 / (40 * n))
    assert torch.equal(train.labels, before), "corrupt() must not write into the split"
    # the levels share their random numbers: p = 0.25 flips a subset of what p = 0.5 flips,
    # and p = 0 leaves the labels as they are
    small, large = corrupt(train, LEVELS["flip 0.25"], 3), corrupt(train, FLIP_HALF, 3)
    assert all(not a or b for sa, sb in zip(small.flipped, large.flipped) for a, b in zip(sa, sb))
    assert torch.equal(corrupt(train, LEVELS["clean"], 3).labels, train.labels)
    assert not torch.equal(corrupt(train, FLIP_HALF, 4).labels, large.labels)  # each seed its own noise


def test_boundary_noise_grows_or_shrinks_each_mask_by_r(noise_scenes):
    train = noise_scenes.labelled
    c = corrupt(train, NoiseLevel("b2", boundary=2), seed=0)
    grew = shrank = 0
    for s in range(len(train)):
        near = torch.zeros(train.labels.shape[1:], dtype=torch.bool)  # within r of some instance
        for (p, mask), sign in zip(_instance_masks(train, s), c.grown[s]):
            m = mask[None, None].float()
            dil = torch.nn.functional.max_pool2d(m, 5, 1, 2)[0, 0] > 0
            ero = -torch.nn.functional.max_pool2d(-m, 5, 1, 2)[0, 0] > 0
            near |= dil
            if sign > 0:  # the whole mask kept, every background pixel within r taken by a digit
                grew += 1
                assert (c.labels[s][mask] == p.digit + 1).all()
                assert (c.labels[s][dil & (train.labels[s] == 0)] != 0).all()
            else:  # the eroded mask kept, the rest of the mask turned background
                shrank += 1
                assert (c.labels[s][ero & mask] == p.digit + 1).all()
                assert (c.labels[s][mask & ~ero] == 0).all()
        assert torch.equal(c.labels[s][~near], train.labels[s][~near])  # nothing changes farther away
    assert grew and shrank
    assert c.flip_rate == 0.0


def test_noise_run_reads_only_the_corrupted_training_labels(noise_scenes):
    """Training sees the corrupted labels (flip 0.25 trains differently from clean); the test
    split's labels are never corrupted, and memorisation is measured on the corrupted pixels."""
    cfg = dataclasses.replace(TINY_TRAIN, steps=3, batch_labelled=2)
    test_before = noise_scenes.test.labels.clone()
    clean = train_noise_run("ppl", "clean", 0, noise_scenes, cfg)
    noisy = train_noise_run("ppl", "flip 0.25", 0, noise_scenes, cfg)
    again = train_noise_run("ppl", "flip 0.25", 0, noise_scenes, cfg)
    assert torch.equal(noise_scenes.test.labels, test_before)
    assert clean.final_loss != noisy.final_loss and noisy.final_loss == again.final_loss
    assert clean.corrupted_pixels == 0.0 and clean.memorised is None and clean.flip_rate == 0.0
    assert noisy.corrupted_pixels > 0 and 0.0 <= noisy.memorised <= 1.0 and 0.0 <= noisy.corrected <= 1.0
    assert noisy.memorised + noisy.corrected <= 1.0 + 1e-12


def test_stats_paired_interval():
    assert t975(1) == pytest.approx(12.706) and t975(9) == pytest.approx(2.262) and t975(100) == pytest.approx(1.96)
    st = interval([1.0, 2.0, 3.0])
    assert st["mean"] == 2.0 and st["std"] == 1.0
    assert st["high"] - st["mean"] == pytest.approx(4.303 / math.sqrt(3))
    assert interval([0.5])["low"] is None
    pr = paired({0: 0.5, 1: 0.7, 2: 0.9}, {0: 0.4, 1: 0.6, 2: 0.7, 3: 0.1})
    assert pr["seeds"] == [0, 1, 2] and pr["diffs"] == pytest.approx([0.1, 0.1, 0.2])


def test_cli_noise_mode_runs_every_variant_and_level(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "NOISE_QUICK", cli.Preset(NOISE_TINY, cli.NOISE_QUICK.train, seeds=1))
    out = tmp_path / "noise"
    assert cli.main(["noise", "--quick", "--steps", "2", "--seeds", "2", "--workers", "1", "--out", str(out),
                     "--no-progress"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(doc) == {"config", "environment", "wall_s", "runs", "summary", "comparisons"}
    assert list(doc["config"]["levels"]) == list(LEVELS) and doc["config"]["variants"] == list(NOISE_VARIANTS)
    assert sorted((r["variant"], r["level"], r["seed"]) for r in doc["runs"]) == sorted(
        (v, lv, s) for v in NOISE_VARIANTS for lv in LEVELS for s in (0, 1))
    for r in doc["runs"]:
        assert 0.0 <= r["test_miou"] <= 1.0
        assert (r["memorised"] is None) == (r["level"] == "clean")
    # every variant trained with a seed saw the same noise
    for lv in LEVELS:
        for s in (0, 1):
            assert len({r["corrupted_pixels"] for r in doc["runs"] if r["level"] == lv and r["seed"] == s}) == 1
    primary = [c for c in doc["comparisons"] if c["kind"] == "primary drop difference"]
    assert {(c["a"], c["b"], c["level"]) for c in primary} == {("ppl", "prototypes", "flip 0.25"),
                                                               ("pull", "prototypes", "flip 0.25")}
    runs = {(r["variant"], r["level"], r["seed"]): r["test_miou"] for r in doc["runs"]}
    for c in primary:
        want = [(runs[(c["a"], "clean", s)] - runs[(c["a"], "flip 0.25", s)])
                - (runs[(c["b"], "clean", s)] - runs[(c["b"], "flip 0.25", s)]) for s in (0, 1)]
        assert c["diffs"] == pytest.approx(want)
    text = capsys.readouterr().out
    assert "* ppl - prototypes" in text and "memorised" in text and "noise --quick, a smoke test" in text
