"""Deployment: torch.export, ONNX (both exporters, run in onnxruntime) and torch.jit.trace.

A model holding the three modules, and one holding a :class:`PPLHead` with a 3x3 head, are
exported on every backend and compared with eager on an input of another shape (dynamic
batch, height and width). While exporting or tracing, every backend runs the reference, so
the graphs hold ATen ops only and run anywhere.
"""
from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from torch import nn

from helpers import HAS_TRITON
from torch_ppl import MultiPrototypeClassifier, PPLAttention, PPLHead, _backend

C, K, M = 8, 3, 2
BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))]
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
requires_onnx = pytest.mark.skipif(not HAS_ONNX, reason="onnx, onnxscript and onnxruntime are not installed")


class ThreeModules(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backbone = nn.Conv2d(3, C, 3, padding=1)
        self.pull = PPLAttention(C, num_heads=2, backend=backend)
        self.head = MultiPrototypeClassifier(C, K, M, backend=backend)

    def forward(self, img):
        return self.head(self.pull(self.backbone(img), self.head.prototypes))


class WithPPLHead(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backbone = nn.Conv2d(3, C, 3, padding=1)
        self.head = PPLHead(C, K, M, num_heads=2, kernel_size=3, backend=backend)

    def forward(self, img):
        return self.head(self.backbone(img))


MODELS = {"three-modules": ThreeModules, "pplhead": WithPPLHead}


def _model(kind, backend):
    torch.manual_seed(0)
    return MODELS[kind](backend).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 8, 8, generator=g), torch.randn(3, 3, 6, 10, generator=g)


def _dynamic():
    return ({0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")},)


def test_exporting_is_seen_and_resolves_to_the_reference():
    seen = []

    def probe(x):
        seen.append((_backend.exporting(), _backend.resolve("auto", x), _backend.resolve("triton", x)))
        return x + 1

    class Probe(nn.Module):
        def forward(self, x):
            return probe(x)

    probe(torch.zeros(1))
    assert seen.pop() == (False, "reference", "triton") or not HAS_TRITON
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(probe, torch.zeros(1), check_trace=False)
    assert seen.pop() == (True, "reference", "reference")
    torch.export.export(Probe(), (torch.zeros(1),))
    assert seen.pop() == (True, "reference", "reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(MODELS))
def test_torch_export_dynamic_shapes_and_save_load(kind, backend, tmp_path):
    model = _model(kind, backend)
    x, other = _inputs()
    program = torch.export.export(model, (x,), dynamic_shapes=_dynamic())
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("torch_ppl" in op for op in ops), ops
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    with torch.no_grad():
        for inp in (x, other):
            torch.testing.assert_close(loaded(inp), model(inp), rtol=1e-5, atol=1e-5)


@requires_onnx
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(MODELS))
def test_onnx_export_runs_in_onnxruntime(kind, backend, dynamo, tmp_path):
    import onnxruntime

    model = _model(kind, backend)
    x, other = _inputs()
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter announces itself
        if dynamo:
            torch.onnx.export(model, (x,), path, dynamo=True, input_names=["images"], output_names=["logits"],
                              dynamic_shapes=_dynamic(), verbose=False)
        else:
            torch.onnx.export(model, (x,), path, dynamo=False, input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for inp in (x, other):
            (got,) = session.run(None, {"images": inp.numpy()})
            torch.testing.assert_close(torch.from_numpy(got), model(inp), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(MODELS))
def test_jit_trace_without_tracer_warnings(kind, backend):
    model = _model(kind, backend)
    x, other = _inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace announces its own deprecation
        traced = torch.jit.trace(model, (x,))
    tracer = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    assert not tracer, tracer
    with torch.no_grad():
        for inp in (x, other):
            torch.testing.assert_close(traced(inp), model(inp), rtol=1e-5, atol=1e-5)
