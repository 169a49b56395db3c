"""``PPLAttention``: every pixel feature attends to all prototypes and adds what it reads."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import _backend, _checks
from . import functional as PF


class PPLAttention(nn.Module):
    """Feature-to-prototype attention, the *pull* of PPL.

    For head ``i`` (``h`` heads of ``d`` channels)::

        a[n, i, p] = softmax_p(<q_proj(x)[n, i], k_proj(W)[p, i]> / sqrt(d))   # all P prototypes
        x_out[n]   = x[n] + gamma * out_proj(concat_i sum_p a[n, i, p] v_proj(W)[p, i])

    No labels are needed: the same computation runs in training and inference. Passing
    ``exclude=labels`` hides each pixel's own (pseudo-)class prototypes from it, so it attends
    to its negatives only (the other reading of the paper).

    Args:
        channels: ``C`` of the features and of the prototypes.
        num_heads: ``h``.
        head_dim: ``d``; default ``channels // num_heads``.
        bias: biases in the four projections.
        layer_scale: ``None`` (``gamma = 1``), or the initial value of a learnable ``(C,)``
            ``gamma`` (e.g. ``1e-4`` to start close to the identity).
        detach_prototypes: stop gradients from this module into the prototypes.
        ignore_index: the label in ``exclude`` that excludes nothing.
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.

    Shapes:
        ``x``: ``(B, C, H, W)`` or ``(N, C)``; ``prototypes``: ``(K, M, C)`` or ``(P, C)``;
        ``exclude``: ``(B, H', W')`` or ``(N,)``. The output has ``x``'s shape, dtype and
        memory format.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        head_dim: Optional[int] = None,
        *,
        bias: bool = True,
        layer_scale: Optional[float] = None,
        detach_prototypes: bool = False,
        ignore_index: int = 255,
        backend: str = "auto",
    ) -> None:
        """Check the options and create the four projections ``q_proj``, ``k_proj``,
        ``v_proj`` (``C -> h*d``) and ``out_proj`` (``h*d -> C``), ``nn.Linear`` with their
        default initialisation, and ``gamma`` when ``layer_scale`` is given. The arguments
        are described on the class.

        Raises:
            TypeError: an argument of the wrong kind (e.g. ``head_dim=1.5``).
            ValueError: a value out of range (e.g. ``channels`` not divisible by
                ``num_heads`` when ``head_dim`` is not given).
        """
        super().__init__()
        fn = type(self).__name__
        self.channels = _checks.positive_int(fn, "channels", channels)
        self.num_heads = _checks.positive_int(fn, "num_heads", num_heads)
        if head_dim is None:
            if channels % num_heads:
                raise ValueError(f"{fn}: channels={channels} must be divisible by num_heads={num_heads} "
                                 f"when head_dim is not given")
            head_dim = channels // num_heads
        self.head_dim = _checks.positive_int(fn, "head_dim", head_dim)
        self.detach_prototypes = bool(detach_prototypes)
        self.ignore_index = _checks.ignore_index(fn, ignore_index)
        self.backend = _backend.check_backend(backend)
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(channels, inner, bias=bias)
        self.k_proj = nn.Linear(channels, inner, bias=bias)
        self.v_proj = nn.Linear(channels, inner, bias=bias)
        self.out_proj = nn.Linear(inner, channels, bias=bias)
        if layer_scale is None:
            self.gamma = None
        else:
            init = _checks.finite_float(fn, "layer_scale", layer_scale)
            self.gamma = nn.Parameter(torch.full((channels,), init))

    def forward(self, x: Tensor, prototypes: Tensor, exclude: Optional[Tensor] = None) -> Tensor:
        """Pull every pixel feature towards what it reads from the prototypes.

        Args:
            x: features ``(B, C, H, W)`` (any strides) or ``(N, C)``.
            prototypes: the head's ``prototypes``, ``(K, M, C)``, or ``(P, C)``.
            exclude: optional label map ``(B, H', W')`` (``(N,)`` for 2-D ``x``), resized to
                ``x``'s resolution with ``mode="nearest"``: each pixel then does not attend to
                its own class's prototypes; ``ignore_index`` pixels attend to all. Needs
                ``(K, M, C)`` prototypes.

        Returns:
            ``x + gamma * out_proj(attention)``, with ``x``'s shape, dtype and memory format.

        Raises:
            TypeError: an argument of the wrong kind.
            ValueError: shapes that do not fit (e.g. prototypes with another ``C``), or
                ``exclude`` values outside ``[0, K)`` and not ``ignore_index``.
        """
        if self.detach_prototypes and isinstance(prototypes, Tensor):
            prototypes = prototypes.detach()
        return PF.prototype_attention(
            x, prototypes,
            self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.out_proj.weight,
            self.q_proj.bias, self.k_proj.bias, self.v_proj.bias, self.out_proj.bias,
            num_heads=self.num_heads, gamma=self.gamma, exclude=exclude,
            ignore_index=self.ignore_index, backend=self.backend,
        )

    def extra_repr(self) -> str:
        parts = [f"{self.channels}", f"num_heads={self.num_heads}", f"head_dim={self.head_dim}",
                 f"bias={self.q_proj.bias is not None}"]
        if self.gamma is not None:
            parts.append("layer_scale=True")
        if self.detach_prototypes:
            parts.append("detach_prototypes=True")
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)
