"""The README's usage example must run as written."""
import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_one_module_head_example_runs_and_trains_every_parameter():
    example = _python_blocks()[0]
    assert "PPLHead" in example
    scope: dict = {}
    exec(compile(example, str(README), "exec"), scope)
    out, head, logits = scope["out"], scope["head"], scope["logits"]
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert logits.shape == out.logits.shape == (2, 21, 33, 33) and logits.dtype == torch.float32
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert head.prototypes.grad.abs().sum() > 0


def test_three_parts_example_runs_and_trains_every_parameter():
    example = _python_blocks()[1]
    scope: dict = {}
    exec(compile(example, str(README), "exec"), scope)
    loss, head, pull, logits = scope["loss"], scope["head"], scope["pull"], scope["logits"]
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert logits.shape == (2, 21, 33, 33) and logits.dtype == torch.float32
    for module in (head, pull):
        for name, p in module.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert head.prototypes.grad.abs().sum() > 0
