"""The problems (inputs of each op at a shape) and the providers that compute them.

Providers, all run in the same process on the same inputs:

* ``triton``: torch_ppl's fused kernels, ``backend="triton"``.
* ``tuned``: the same with autotuning on (``torch_ppl.set_autotune``): each kernel's tiles
  timed against their neighbours at the first call (the runner's warm-up), the fastest kept.
* ``reference``: torch_ppl's pure-PyTorch reference in eager mode, ``backend="reference"``.
* ``compile``: the same reference under ``torch.compile`` (a fresh compile per shape).
* ``sdpa``: the attention as a user would write it with PyTorch's fused attention:
  ``q_proj`` on every pixel, ``k_proj``/``v_proj`` on the prototypes expanded over the batch,
  ``F.scaled_dot_product_attention``, ``out_proj``; in the features' dtype (bf16).
* ``fast-form``, ``projected-form``: the attention on ``backend="triton"`` with its form forced
  (``TORCH_PPL_ATTENTION_FORM``), at shapes with more than one head, where ``triton`` picks
  one of the two by a model: the fused kernels, or PyTorch's GEMMs and fused attention.
* ``liger``: Liger-Kernel's fused linear cross-entropy, for the contrastive loss in the
  ``M = 1``, dot-product, temperature-1 case (where it is exactly ``CE(x W^T, y)``).
* ``cce``: Cut-Cross-Entropy's ``linear_cross_entropy`` for the same case.

Where a provider computes an op at a shape at all is :func:`applies`; where it applies but
cannot run here, :func:`unavailable` says why and the runner records that reason instead of
a time.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import math
import os
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import torch_ppl
from torch_ppl import _backend
from torch_ppl import functional as PF

from .shapes import Shape

PROVIDERS = ("triton", "reference", "compile", "sdpa", "fast-form", "projected-form", "liger", "cce", "tuned")
_FORMS = {"fast-form": "fast", "projected-form": "projected"}
IGNORE_INDEX = 255
IGNORE_FRAC = 0.2  # fraction of ignored pixels in the targets, as in the tests
SCALE = 10.0  # head logit scale (the default of MultiPrototypeClassifier)


@dataclasses.dataclass
class Problem:
    """Inputs of one op at one shape. ``leaves`` are the tensors whose ``.grad`` the backward
    fills (the timing loop resets them)."""

    shape: Shape
    x: Tensor  # (B, C, H, W) features, requires grad
    prototypes: Tensor  # (K, M, C), requires grad
    target: Tensor  # (B, H, W) int64 with IGNORE_FRAC ignored
    attn: Dict[str, Tensor]  # q/k/v/out weights and biases of PPLAttention, require grad

    @property
    def leaves(self):
        return [self.x, self.prototypes, *self.attn.values()]


def make_problem(shape: Shape, device: torch.device, seed: int = 0, with_attention: bool = True) -> Problem:
    """Random inputs of ``shape`` made directly on ``device`` (at ``voc-fullres`` the features
    alone are 2 GB: drawing them on the host would take longer than timing them)."""
    g = torch.Generator(device=device).manual_seed(seed)
    s = shape

    def randn(*size, dtype=torch.float32, scale=1.0):
        t = torch.randn(*size, generator=g, device=device, dtype=torch.float32)
        return (t * scale).to(dtype).requires_grad_()

    x = randn(s.B, s.C, s.H, s.W, dtype=s.feature_dtype)
    prototypes = randn(s.K, s.M, s.C, dtype=s.prototype_dtype, scale=1 / math.sqrt(s.C))
    target = torch.randint(0, s.K, (s.B, s.H, s.W), generator=g, device=device)
    drop = torch.rand(target.shape, generator=g, device=device) < IGNORE_FRAC
    target = target.masked_fill(drop, IGNORE_INDEX)
    attn: Dict[str, Tensor] = {}
    if with_attention:
        bound = 1 / math.sqrt(s.C)  # about nn.Linear's scale; h * d = C
        for name in ("q", "k", "v", "out"):
            attn[f"{name}_weight"] = randn(s.C, s.C, scale=bound)
            attn[f"{name}_bias"] = randn(s.C, scale=bound)
    return Problem(shape, x, prototypes, target, attn)


# ----------------------------------------------------------------------------- the ops
def prototype_logits(p: Problem, backend: str) -> Tensor:
    return PF.prototype_logits(p.x, p.prototypes, similarity=p.shape.similarity, pooling="max",
                               scale=SCALE, backend=backend)


def contrastive_loss(p: Problem, backend: str) -> Tensor:
    return PF.contrastive_loss(p.x, p.target, p.prototypes, temperature=p.shape.temperature,
                               similarity=p.shape.similarity, ignore_index=IGNORE_INDEX, backend=backend)


def prototype_logits_and_contrastive(p: Problem, backend: str):
    """The head's logits and the contrastive loss of the same features in one op: a
    ``(logits, loss)`` pair, each backpropagated with a gradient of ones."""
    return PF.prototype_logits_and_contrastive(
        p.x, p.prototypes, p.target, similarity=p.shape.similarity, pooling="max", scale=SCALE,
        temperature=p.shape.temperature, ignore_index=IGNORE_INDEX, backend=backend)


def _attend(p: Problem, x: Tensor, backend: str) -> Tensor:
    a = p.attn
    return PF.prototype_attention(
        x, p.prototypes, a["q_weight"], a["k_weight"], a["v_weight"], a["out_weight"],
        a["q_bias"], a["k_bias"], a["v_bias"], a["out_bias"], num_heads=p.shape.heads, backend=backend)


def prototype_attention(p: Problem, backend: str) -> Tensor:
    return _attend(p, p.x, backend)


def ppl_step(p: Problem, backend: str) -> Tensor:
    """The whole PPL head + loss: pull (attention), head logits on the pulled features, then
    CE + contrastive loss (labels at the features' resolution)."""
    feats = _attend(p, p.x, backend)
    logits = PF.prototype_logits(feats, p.prototypes, similarity=p.shape.similarity, pooling="max",
                                 scale=SCALE, backend=backend)
    return PF.push_pull_loss(logits, feats, p.target, p.prototypes, temperature=p.shape.temperature,
                             similarity=p.shape.similarity, ignore_index=IGNORE_INDEX, backend=backend)


OPS: Dict[str, Callable[[Problem, str], Tensor]] = {
    "prototype_logits": prototype_logits,
    "contrastive_loss": contrastive_loss,
    "prototype_attention": prototype_attention,
    "ppl_step": ppl_step,
    "prototype_logits_and_contrastive": prototype_logits_and_contrastive,
}
# The torch_ppl ops each benchmark op dispatches through (for the Triton availability check).
_KERNEL_OPS = {
    "prototype_logits": ("prototype_logits",),
    "contrastive_loss": ("contrastive_loss",),
    "prototype_attention": ("prototype_attention",),
    "ppl_step": ("prototype_attention", "prototype_logits", "contrastive_loss"),
    "prototype_logits_and_contrastive": ("prototype_logits_and_contrastive",),
}


# ----------------------------------------------------------------------------- outside tools
def sdpa_attention(p: Problem) -> Tensor:
    """PPLAttention written with ``F.scaled_dot_product_attention`` in the features' dtype."""
    s, a, dt = p.shape, p.attn, p.x.dtype
    h, d = s.heads, s.C // s.heads
    rows = p.x.movedim(1, -1).reshape(s.B, s.H * s.W, s.C)
    q = F.linear(rows, a["q_weight"].to(dt), a["q_bias"].to(dt)).unflatten(-1, (h, d)).transpose(1, 2)
    w = p.prototypes.reshape(s.P, s.C).to(dt)
    k = F.linear(w, a["k_weight"].to(dt), a["k_bias"].to(dt)).unflatten(-1, (h, d)).transpose(0, 1)
    v = F.linear(w, a["v_weight"].to(dt), a["v_bias"].to(dt)).unflatten(-1, (h, d)).transpose(0, 1)
    k, v = k.expand(s.B, h, s.P, d), v.expand(s.B, h, s.P, d)  # the prototypes, per image
    o = F.scaled_dot_product_attention(q, k, v)  # (B, h, HW, d); scale 1/sqrt(d)
    out = F.linear(o.transpose(1, 2).reshape(s.B, s.H * s.W, h * d), a["out_weight"].to(dt), a["out_bias"].to(dt))
    return (rows + out).reshape(s.B, s.H, s.W, s.C).movedim(-1, 1)


def attention_in_form(form: str, p: Problem) -> Tensor:
    """The attention on ``backend="triton"`` in ``form`` (``"fast"`` or ``"projected"``),
    whatever the model would pick; the form is chosen in the forward."""
    from torch_ppl.kernels import projected

    saved = os.environ.get(projected.FORM_ENV_VAR)
    os.environ[projected.FORM_ENV_VAR] = form
    try:
        return prototype_attention(p, "triton")
    finally:
        if saved is None:
            del os.environ[projected.FORM_ENV_VAR]
        else:
            os.environ[projected.FORM_ENV_VAR] = saved


@contextlib.contextmanager
def autotuning(on: bool):
    """Autotuning on inside (for the ``tuned`` provider: the runner measures it, forward and
    backward, inside this block), as it was before outside."""
    previous = torch_ppl.set_autotune(on) if on else None
    try:
        yield
    finally:
        if on:
            torch_ppl.set_autotune(previous)


def _ce_rows(p: Problem):
    """``(N, C)`` features, ``(K, C)`` weight in the features' dtype and ``(N,)`` targets: what a
    fused linear cross-entropy takes. The copy to channel-last rows is part of the timed work."""
    s = p.shape
    rows = p.x.movedim(1, -1).reshape(s.N, s.C)
    return rows, p.prototypes.reshape(s.K, s.C).to(p.x.dtype), p.target.reshape(s.N)


def liger_ce(p: Problem) -> Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    rows, weight, target = _ce_rows(p)
    return liger_fused_linear_cross_entropy(rows, weight, target, ignore_index=IGNORE_INDEX, reduction="mean")


def cce_ce(p: Problem) -> Tensor:
    from cut_cross_entropy import linear_cross_entropy

    rows, weight, target = _ce_rows(p)
    # Library defaults otherwise (impl="cce", filter_eps="high": it skips gradient entries
    # below a threshold, so its gradient is not exact).
    return linear_cross_entropy(rows, weight, target, ignore_index=IGNORE_INDEX, reduction="mean")


# ----------------------------------------------------------------------------- availability
@functools.lru_cache(maxsize=None)
def _has(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def applies(provider: str, op: str, shape: Shape) -> bool:
    """Whether ``provider`` computes ``op`` at ``shape`` at all (no row is written where it
    does not: SDPA is only an attention, the forced forms only a multi-head attention, Liger and
    CCE only the ``M = 1`` dot-product loss)."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")
    if provider == "sdpa":
        return op == "prototype_attention"
    if provider in _FORMS:
        return op == "prototype_attention" and shape.heads > 1
    if provider in ("liger", "cce"):
        # CE(x W^T, y) is the contrastive loss only with one dot-product prototype per class
        # and temperature 1.
        return (op == "contrastive_loss" and shape.M == 1 and shape.similarity == "dot"
                and shape.temperature == 1.0)
    return True


def unavailable(provider: str, op: str, shape: Shape, device: torch.device) -> Optional[str]:
    """Why ``provider`` cannot run ``op`` at ``shape`` here (a missing kernel or package, the
    wrong device), or ``None`` if it can. Only asked where :func:`applies` holds."""
    if provider in ("reference", "compile", "sdpa"):
        return None
    if provider in ("triton", "tuned") or provider in _FORMS:
        try:
            for kernel_op in _KERNEL_OPS[op]:
                resolved = _backend.resolve("triton", torch.empty(0, device=device), op=kernel_op)
                _backend.implementation(kernel_op, resolved)
        except (NotImplementedError, RuntimeError, ValueError, ImportError) as err:
            return str(err)
        return None
    module = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}[provider]
    package = {"liger": "liger-kernel", "cce": "cut-cross-entropy"}[provider]
    if not _has(module):
        return f"{package} is not installed (pip install {package})"
    if device.type != "cuda":
        if provider == "cce":
            return "cut-cross-entropy's kernels need a CUDA device (they fail under TRITON_INTERPRET=1)"
        if not _backend.interpret_mode():
            return "liger-kernel needs a CUDA device (or TRITON_INTERPRET=1)"
    return None


def build(provider: str, op: str, problem: Problem, compile_backend: str = "inductor") -> Callable[[], Tensor]:
    """A zero-argument callable computing ``op`` on ``problem`` with ``provider`` (which
    :func:`applies` and :func:`unavailable` have cleared)."""
    if provider in ("triton", "reference"):
        return functools.partial(OPS[op], problem, provider)
    if provider == "tuned":  # the runner turns autotuning on around it (autotuning)
        return functools.partial(OPS[op], problem, "triton")
    if provider == "compile":
        compiled = torch.compile(OPS[op], backend=compile_backend, dynamic=False)
        return functools.partial(compiled, problem, "reference")
    if provider == "sdpa":
        return functools.partial(sdpa_attention, problem)
    if provider in _FORMS:
        return functools.partial(attention_in_form, _FORMS[provider], problem)
    if provider == "liger":
        return functools.partial(liger_ce, problem)
    if provider == "cce":
        return functools.partial(cce_ce, problem)
    raise ValueError(f"unknown provider {provider!r}")
