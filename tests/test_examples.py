"""The scripts in examples/ run, and do what their docstrings say.

``smp_swap.py`` builds real segmentation_models_pytorch models when smp imports, and stand-ins
with smp's attribute structure (``encoder``, ``decoder(*features)``, ``segmentation_head[0]``
the classifier conv) otherwise. The tests take whichever it builds; on the CI machine that is
the stand-ins: smp needs torchvision, whose PyPI wheels link against the CUDA build of torch
and do not import beside the CPU-only torch CI installs.
"""
from __future__ import annotations

import importlib.util
import pathlib
import runpy
import sys

import pytest
import torch

import torch_ppl
from torch_ppl import PPLHead, PushPullLoss

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_script(name, args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / f"{name}.py"), *args])
    runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    return capsys.readouterr().out


# ----------------------------------------------------------------------------- smp_swap.py
def test_smp_swap_script_runs(monkeypatch, capsys):
    out = _run_script("smp_swap", ["--steps", "2"], monkeypatch, capsys)
    for kind in ("deeplabv3plus", "unet"):
        line = next(ln for ln in out.splitlines() if f" {kind}:" in ln)
        assert "classifier PPLHead" in line and "logits (2, 3, 32, 32)" in line, line
        assert "state_dict round trip 0.0e+00" in line, line


def _swapped(ex, kind, seed=0):
    torch.manual_seed(seed)
    models, source = ex.build_models(classes=3)
    return models[kind], source


@pytest.mark.parametrize("kind, kernel", [("deeplabv3plus", 1), ("unet", 3)])
def test_smp_swap_replaces_the_conv_trains_saves_compiles_and_exports(kind, kernel):
    ex = _load("smp_swap")
    model, source = _swapped(ex, kind)
    conv = model.segmentation_head[0]
    assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (kernel, kernel)

    head = ex.swap_classifier(model, num_prototypes=2)
    assert isinstance(head, PPLHead) and model.segmentation_head[0] is head
    assert head.classifier.kernel_size == kernel
    assert head.prototypes.shape == (3, 2, conv.in_channels * kernel * kernel)
    assert head.pull.channels == conv.in_channels * kernel * kernel

    size = 64 if source == "smp" else 16  # smp's encoders downsample 32x
    images, labels = torch.randn(2, 3, size, size), torch.randint(0, 3, (2, size, size))
    labels[0, :4] = 255
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: keep the gradients to inspect
    losses = [ex.train_step(model, head, optimizer, images, labels) for _ in range(2)]
    assert all(v > 0 and v == v for v in losses)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.startswith("segmentation_head"):
            assert p.grad.abs().sum() > 0, f"{name}: all-zero gradient"

    # compiled (aot_eager: the trace, without inductor's C++ build) equals eager
    model.zero_grad(set_to_none=True)
    compiled = ex.compiled_train_step(model, head, images, labels, backend="aot_eager")
    model.train()
    torch.testing.assert_close(compiled, head.loss(model(images), labels).item(), rtol=1e-4, atol=1e-5)

    fresh, _ = _swapped(ex, kind, seed=1)
    ex.swap_classifier(fresh, num_prototypes=2)
    assert ex.state_dict_round_trip(model, fresh, images) == 0.0
    assert ex.export(model, images) < 1e-4

    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (2, 3, size, size) and logits.dtype == torch.float32
    with pytest.raises(RuntimeError, match="no features kept"):
        head.loss(logits, labels)  # eval keeps nothing


# ----------------------------------------------------------------------------- unimatch_loop.py
def test_unimatch_script_runs(monkeypatch, capsys):
    out = _run_script("unimatch_loop", ["--steps", "2", "--threshold", "0.3"], monkeypatch, capsys)
    lines = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert len(lines) == 2
    for ln in lines:
        loss = float(ln.split("loss ")[1].split(",")[0])
        assert loss > 0 and loss == loss  # finite and not NaN


def _unimatch_loss(ex, **kwargs):
    torch.manual_seed(0)
    model = ex.SegNet(classes=4, channels=8, num_prototypes=2)
    g = torch.Generator().manual_seed(3)
    x_l, x_u = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    y_l = torch.randint(0, 4, (2, 8, 8), generator=g)
    loss, confident = ex.semi_supervised_loss(model, x_l, y_l, x_u, g, **kwargs)
    return model, loss, confident


def test_unimatch_confidence_mask_and_lambda():
    ex = _load("unimatch_loop")
    _, supervised, _ = _unimatch_loss(ex, lambda_u=0.0)
    _, nothing_confident, frac_none = _unimatch_loss(ex, threshold=1.01)
    model, everything, frac_all = _unimatch_loss(ex, threshold=0.0)
    assert frac_none == 0.0 and frac_all == 1.0
    # A mask of zeros removes the unlabelled term exactly (mean over valid pixels of 0 * loss).
    torch.testing.assert_close(nothing_confident, supervised, rtol=0, atol=0)
    assert everything > supervised
    everything.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# ----------------------------------------------------------------------------- lightning_semi.py
def test_lightning_example_trains_a_few_steps_on_cpu(monkeypatch, capsys):
    pytest.importorskip("lightning")
    out = _run_script("lightning_semi", ["--steps", "3", "--threshold", "0.3"], monkeypatch, capsys)
    losses = [float(ln.split("loss ")[1]) for ln in out.splitlines() if ln.startswith("step ")]
    assert len(losses) == 3 and all(0 < v < float("inf") for v in losses), out


def test_lightning_step_uses_the_confidence_mask():
    pytest.importorskip("lightning")
    ex = _load("lightning_semi")
    batch = [t[:2] for t in ex.RandomSemiSupervised(length=2, size=8).__dict__.values()]
    losses = {}
    for threshold in (1.01, 0.0):  # nothing confident / everything confident
        torch.manual_seed(0)
        model = ex.PPLSegmenter(channels=8, num_prototypes=2, threshold=threshold)
        model.log_dict = lambda *args, **kwargs: None  # outside a Trainer
        losses[threshold] = model.training_step(batch, 0)
    torch.manual_seed(0)
    model = ex.PPLSegmenter(channels=8, num_prototypes=2)
    supervised = model(batch[0], batch[1]).loss
    torch.testing.assert_close(losses[1.01], supervised, rtol=0, atol=0)
    assert losses[0.0] > supervised


def test_examples_use_the_public_api_only():
    for path in EXAMPLES.glob("*.py"):
        text = path.read_text()
        assert "torch_ppl._" not in text and "torch_ppl.reference" not in text, path.name


# ----------------------------------------------------------------------------- docs
DOCS = EXAMPLES.parent / "docs"


def _python_blocks(page):
    import re

    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


@pytest.mark.parametrize("page", ["index.md", "usage.md"])
def test_doc_code_blocks_run(page):
    """Every python block of the page runs, in order, in one namespace; blocks that start with
    ``# fragment`` use names from the reader's own script and are only compiled."""
    scope: dict = {}
    blocks = _python_blocks(page)
    assert blocks, page
    autotune = torch_ppl.autotune_enabled()  # a page may turn it on; the other tests run on
    try:
        for i, block in enumerate(blocks):
            code = compile(block, f"{page}[block {i}]", "exec")
            if block.lstrip().startswith("# fragment"):
                continue
            torch.manual_seed(0)
            exec(code, scope)
    finally:
        torch_ppl.set_autotune(autotune)


def test_mmseg_page_marks_its_code_untested():
    blocks = _python_blocks("mmseg.md")
    assert blocks
    for block in blocks:
        compile(block, "mmseg.md", "exec")  # at least valid Python
        assert block.lstrip().startswith("# UNTESTED"), block[:80]


def test_mmseg_reduction_mapping():
    """docs/mmseg.md: avg_non_ignore=True is our "mean"; avg_non_ignore=False is our "sum" over
    target.numel(); loss_weight is ce_weight; seg_weight is weight= (no renormalisation).
    The right-hand sides are mmseg's formula: per-pixel CE, times weight, summed, divided by
    the number of non-ignored pixels (True) or of all pixels (False)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 6, generator=g)
    target = torch.randint(0, 4, (2, 6, 6), generator=g)
    target[0, :2] = 255
    seg_weight = torch.rand(2, 6, 6, generator=g)
    per_pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none") * seg_weight
    n_valid = (target != 255).sum()
    ce_only = dict(contrast_weight=0.0, ce_weight=0.4)  # loss_weight=0.4
    ours_mean = PushPullLoss(**ce_only)(logits, None, target, None, weight=seg_weight)
    ours_sum = PushPullLoss(reduction="sum", **ce_only)(logits, None, target, None, weight=seg_weight)
    torch.testing.assert_close(ours_mean, 0.4 * per_pixel.sum() / n_valid)             # avg_non_ignore=True
    torch.testing.assert_close(ours_sum / target.numel(), 0.4 * per_pixel.sum() / target.numel())  # False
    assert n_valid < target.numel()  # so the two rows really differ

    # the recipe's push term: ce_weight=0 and logits=None give the contrastive term alone
    from torch_ppl.functional import contrastive_loss

    feats, protos = torch.randn(2, 8, 3, 3, generator=g), torch.randn(4, 2, 8, generator=g)
    push = PushPullLoss(ce_weight=0.0)(None, feats, target, protos)
    torch.testing.assert_close(push, contrastive_loss(feats, target, protos))
