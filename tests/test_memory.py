"""What the fused ops allocate: never a pixel-by-prototype tensor, forward or backward.

The Triton backend promises to hold no ``N x P`` (attention: ``N x h*P``) tensor: tiles of
pixels stream through, prototypes stay on chip, the backward recomputes from per-pixel
statistics. These tests record every allocation PyTorch makes during a forward and a backward
(the profiler's memory events, nested calls inside the ops' host code included) and check the
promise in two ways, each with the reference backend, which does materialise ``N x P``, as the
control that shows the measurement can see such a tensor:

* no single allocation reaches a quarter of an ``N x P`` float32 tensor, at a shape where every
  per-pixel tensor the op must hold (features, their gradient, logits) is half that;
* the bytes allocated in all have no ``N x P`` term: the extra bytes that four times the
  prototypes cost are the same at 64 pixels as at 256 (the reference's grow by at least one
  float32 ``N x ΔP`` tensor).

The kernels run through the interpreter here, with the same host code (buffers, partial sums,
casts) as on a GPU; only the tiles and grids differ, and the bounds are sized for the
interpreter's (two pixel splits; a GPU's deterministic partial sums scale with its SM count).
On a GPU the peak memory is measured by ``python -m benchmarks``, so these tests run where
the kernels run on the interpreter.
"""
from __future__ import annotations

from typing import Callable, List

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import torch_ppl as ppl
from torch_ppl import functional as F

from helpers import random_labels, requires_triton

pytestmark = [requires_triton, pytest.mark.skipif(
    torch.cuda.is_available(), reason="sized for the interpreter's tiles and grids; on a GPU python -m benchmarks "
                                      "measures the peak memory")]

B, C, K = 4, 16, 16
HEADS = 2
# prototypes per class: the attention's columns are per head, so half as many keep its
# pixel-by-prototype tensors as large as the others' (and its tests half as slow)
PER_CLASS = {"attention": 4}


def _allocations(step: Callable[[], None]) -> List[int]:
    """The size in bytes of every allocation PyTorch's CPU allocator makes during ``step``."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # each event's own allocations: its figure includes those of the calls nested in it (an
    # `aten::empty` in deterministic mode calls a fill, for one)
    own = (e.cpu_memory_usage - sum(c.cpu_memory_usage for c in e.cpu_children) for e in prof.events())
    return [b for b in own if b > 0]


def _inputs(side: int, m: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, side, side, generator=g).to(dtype)
    w = torch.randn(K, m, C, generator=g)
    y = random_labels((B, side, side), K, generator=g, device="cpu")
    return x, w, y


def _head(x, w, y, backend):
    logits = F.prototype_logits(x, w, pooling="logsumexp", backend=backend)
    logits.float().sum().backward()


def _push(x, w, y, backend):
    F.contrastive_loss(x, y, w, backend=backend).backward()


def _head_and_push(x, w, y, backend):
    logits, loss = F.prototype_logits_and_contrastive(x, w, y, backend=backend)
    (logits.float().sum() + loss).backward()


def _attention(x, w, y, backend):
    torch.manual_seed(0)
    pull = ppl.PPLAttention(C, num_heads=HEADS, layer_scale=0.5, backend=backend)
    pull(x, w, exclude=y).float().sum().backward()


OPS = {"head": _head, "push": _push, "head+push": _head_and_push, "attention": _attention}


def _step(op: str, side: int, m: int, backend: str, dtype: torch.dtype = torch.float32):
    x, w, y = _inputs(side, m, dtype)

    def step():
        OPS[op](x.clone().requires_grad_(), w.clone().requires_grad_(), y, backend)
    return step


def _pixel_by_prototype_bytes(op: str, pixels: int, prototypes: int) -> int:
    """The bytes of one float32 tensor with a row per pixel and a column per prototype (per
    head and prototype for the attention)."""
    return pixels * prototypes * (HEADS if op == "attention" else 1) * 4


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("op", list(OPS))
def test_no_allocation_near_pixels_by_prototypes(op, deterministic):
    # 256 pixels, P = 128 prototypes (attention: 2 heads x 64) against C = K = 16: the features,
    # their gradient and the logits (float32) are N x P / 8 each, the deterministic mode's two
    # partial sums of a prototype gradient on the interpreter (2 x P x C) less
    side, m = 8, PER_CLASS.get(op, 8)
    limit = _pixel_by_prototype_bytes(op, B * side * side, K * m) // 4
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        fused = max(_allocations(_step(op, side, m, "triton")))
        reference = max(_allocations(_step(op, side, m, "reference")))
    finally:
        torch.use_deterministic_algorithms(before)
    assert reference >= 4 * limit, f"the reference's largest allocation, {reference} B, should be N x P"
    assert fused < limit, (f"{op}: an allocation of {fused} B during forward + backward, at least a "
                           f"quarter of an N x P float32 tensor ({4 * limit} B)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", list(OPS))
def test_allocated_bytes_have_no_pixels_times_prototypes_term(op, dtype):
    sides = (4, 8)
    ms = (PER_CLASS.get(op, 8) // 4, PER_CLASS.get(op, 8))

    def extra_for_more_prototypes(backend: str, side: int) -> int:
        more, fewer = (sum(_allocations(_step(op, side, m, backend, dtype))) for m in reversed(ms))
        return more - fewer

    one_tensor = (_pixel_by_prototype_bytes(op, B * sides[1] ** 2, K * ms[1])
                  - _pixel_by_prototype_bytes(op, B * sides[1] ** 2, K * ms[0])
                  - _pixel_by_prototype_bytes(op, B * sides[0] ** 2, K * ms[1])
                  + _pixel_by_prototype_bytes(op, B * sides[0] ** 2, K * ms[0]))
    term = {backend: extra_for_more_prototypes(backend, sides[1]) - extra_for_more_prototypes(backend, sides[0])
            for backend in ("triton", "reference")}
    assert term["reference"] >= one_tensor, "the reference should allocate N x P tensors"
    assert abs(term["triton"]) < one_tensor // 8, (
        f"{op}: the bytes allocated during forward + backward have an N x P term: {term['triton']} B "
        f"from 64 to 256 pixels and {ms[0]} to {ms[1]} prototypes per class ({one_tensor} B for one "
        f"float32 N x P tensor)")
