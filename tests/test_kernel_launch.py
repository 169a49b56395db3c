"""Where the kernels launch. Triton launches on the *current* CUDA device and its current
stream, whatever device the tensors are on; every op makes its tensors' device current first
(``torch_ppl.kernels._common.launch_device``), so that a model on ``cuda:1`` runs on ``cuda:1``.

Without a GPU the device switch itself cannot run: these tests check that every launch of
every op, forward and backward, happens inside it, and what it switches to.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

import torch_ppl.functional as PF  # noqa: E402
from torch_ppl.kernels import _common, attention, contrastive, head_push, similarity  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

pytestmark = pytest.mark.skipif(not _common.interpreting(), reason="counts the interpreter's launches")


@pytest.fixture
def launches(monkeypatch):
    """Records, for every kernel launch, the devices made current around it (innermost last)."""
    current, seen = [], []

    @contextlib.contextmanager
    def recording(x):
        current.append(x.device)
        try:
            yield
        finally:
            current.pop()

    for module in (similarity, contrastive, attention, head_push):
        monkeypatch.setattr(module, "launch_device", recording)
    run = interpreter.InterpretedFunction.run

    def counted(self, *args, **kwargs):
        seen.append((self.__name__, list(current)))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", counted)
    return seen


def _every_op_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    protos = torch.randn(3, 2, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 3, 3))
    loss = PF.prototype_logits(x, protos, backend="triton").square().mean()
    loss = loss + PF.contrastive_loss(x, target, protos, backend="triton")
    logits, push = PF.prototype_logits_and_contrastive(x, protos, target, backend="triton")
    loss = loss + logits.square().mean() + push
    weights = [torch.randn(8, 8, requires_grad=True) for _ in range(4)]
    out = PF.prototype_attention(x, protos, *weights, backend="triton")
    (loss + out.square().mean()).backward()


def test_every_launch_runs_on_its_tensors_device(launches):
    _every_op_forward_and_backward()
    kernels = {name for name, _ in launches}
    # each op's forward and backward kernels: 3 head, 3 push, 3 one-pass, 3 attention (the
    # one-pass op shares the head's forward kernel; the head's max pooling takes the sliced dx)
    assert kernels == {
        "_logits_fwd_kernel", "_logits_bwd_dx_kernel", "_logits_bwd_dx_slice_kernel", "_logits_bwd_dw_kernel",
        "_logits_push_bwd_dw_kernel",
        "_contrastive_fwd_kernel", "_contrastive_bwd_dx_kernel", "_contrastive_bwd_dw_kernel",
        "_attention_fwd_kernel", "_attention_bwd_dx_kernel", "_attention_bwd_dproto_kernel",
    }
    outside = [name for name, devices in launches if not devices]
    assert not outside, f"launched without their tensors' device made current: {sorted(set(outside))}"
    assert all(devices == [torch.device("cpu")] for _, devices in launches)


def test_launch_device_makes_a_cuda_tensors_device_current():
    """Built, not entered: entering needs a GPU. A CPU tensor switches nothing."""
    guard = _common.launch_device(SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_common.launch_device(torch.zeros(1)), contextlib.nullcontext)
