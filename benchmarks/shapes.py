"""The problem sizes: the headline shapes (docs/benchmarks.md), sweeps over N (pixels) and P (prototypes),
the M = 1 dot-product variants that outside fused cross-entropy kernels can run, voc with eight
attention heads, and tiny shapes for the CPU smoke test.

Every shape carries fp32 prototypes and bf16 features, except the fp32 variant of the heads set.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import torch


@dataclasses.dataclass(frozen=True)
class Shape:
    """One problem size. ``group`` says which set it belongs to (plots group by it)."""

    name: str
    group: str  # "headline", "sweep-N", "sweep-P", "m1-dot", "heads", "smoke"
    B: int
    H: int
    W: int
    C: int
    K: int
    M: int
    heads: int = 1
    similarity: str = "cosine"
    temperature: float = 0.1
    feature_dtype: torch.dtype = torch.bfloat16
    prototype_dtype: torch.dtype = torch.float32

    @property
    def N(self) -> int:
        return self.B * self.H * self.W

    @property
    def P(self) -> int:
        return self.K * self.M

    def dims(self) -> Dict[str, object]:
        return dict(B=self.B, H=self.H, W=self.W, N=self.N, C=self.C, K=self.K, M=self.M, P=self.P,
                    heads=self.heads, similarity=self.similarity, temperature=self.temperature)

    def dtype_str(self) -> str:
        return f"x={_short(self.feature_dtype)},W={_short(self.prototype_dtype)}"


def _short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}[dtype]


# name, B, H, W, C, K, M
_HEADLINE: Tuple[Tuple[str, int, int, int, int, int, int], ...] = (
    ("voc", 16, 129, 129, 256, 21, 10),
    ("cityscapes", 8, 201, 201, 256, 19, 10),
    ("ade", 16, 128, 128, 512, 150, 10),
    ("voc-fullres", 16, 513, 513, 256, 21, 10),
)


def headline() -> List[Shape]:
    return [Shape(n, "headline", b, h, w, c, k, m) for n, b, h, w, c, k, m in _HEADLINE]


def sweep_n() -> List[Shape]:
    """voc's C, K, M with N = 8 * S * S pixels, S from 64 to 512 (33k to 2.1M pixels)."""
    return [Shape(f"N-8x{s}x{s}", "sweep-N", 8, s, s, 256, 21, 10) for s in (64, 128, 256, 384, 512)]


def sweep_p() -> List[Shape]:
    """voc's N and C with K = 21 classes and M from 1 to 40 prototypes each (P = 21 to 840)."""
    return [Shape(f"P-21x{m}", "sweep-P", 16, 129, 129, 256, 21, m) for m in (1, 2, 5, 10, 20, 40)]


def m1_dot() -> List[Shape]:
    """The headline sizes with one dot-product prototype per class and temperature 1: then the
    contrastive loss is exactly ``F.cross_entropy(x @ W.T, y)``, which Liger-Kernel's and
    Cut-Cross-Entropy's fused linear cross-entropy compute too."""
    return [Shape(f"{n}-m1dot", "m1-dot", b, h, w, c, k, 1, similarity="dot", temperature=1.0)
            for n, b, h, w, c, k, _ in _HEADLINE]


def heads() -> List[Shape]:
    """voc with eight heads of 32 channels (as the docs' examples configure the attention), in
    bf16 and in fp32 features: where the attention's fast and projected forms compete."""
    return [Shape(f"voc-h8{suffix}", "heads", 16, 129, 129, 256, 21, 10, heads=8, feature_dtype=dtype)
            for suffix, dtype in (("", torch.bfloat16), ("-fp32", torch.float32))]


def smoke() -> List[Shape]:
    """Tiny sizes for the CPU smoke test (odd H, W so that nothing divides evenly)."""
    return [
        Shape("smoke", "smoke", 2, 5, 7, 16, 3, 2),
        # Liger's kernel runs one interpreted program per row on the CPU: keep N small.
        Shape("smoke-m1dot", "smoke", 1, 3, 5, 16, 3, 1, similarity="dot", temperature=1.0),
        # two heads of 8 channels: the attention's two forms
        Shape("smoke-h2", "smoke", 1, 3, 5, 16, 3, 2, heads=2),
    ]


SETS = {
    "headline": headline,
    "sweep-N": sweep_n,
    "sweep-P": sweep_p,
    "m1-dot": m1_dot,
    "heads": heads,
    "smoke": smoke,
}
DEFAULT_SETS = ("headline", "m1-dot", "sweep-N", "sweep-P")


def get(sets) -> List[Shape]:
    """The shapes of the named sets, in order, without duplicates."""
    out: List[Shape] = []
    for s in sets:
        if s not in SETS:
            raise ValueError(f"unknown shape set {s!r}; choose from {tuple(SETS)}")
        out += [shape for shape in SETS[s]() if shape not in out]
    return out
