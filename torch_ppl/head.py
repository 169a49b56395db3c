"""``MultiPrototypeClassifier``: the segmentation head whose weights are class prototypes."""
from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _backend, _checks
from . import functional as PF
from .functional import _quiet_when_tracing


class MultiPrototypeClassifier(nn.Module):
    """A drop-in replacement for the 1x1 (or kxk) conv classifier of a segmentation model,
    with ``M`` prototypes per class.

    ``logits[n, k] = scale * pool_m s[n, k, m] (+ bias[k])``, ``s`` the cosine (default) or
    dot-product similarity of pixel ``n`` to prototype ``(k, m)``. With ``num_prototypes=1``,
    ``similarity="dot"``, ``scale=1`` and ``bias=True`` it computes exactly ``nn.Conv2d(C, K, 1)``;
    :meth:`from_conv` loads such a conv.

    Args:
        in_channels: ``C``.
        num_classes: ``K``.
        num_prototypes: ``M`` prototypes per class.
        similarity: ``"cosine"`` or ``"dot"``.
        pooling: ``"max"`` (gradient to the winning prototype only), ``"logsumexp"`` or ``"mean"``.
        scale: the logit scale, a finite number ``> 0`` (an inverse temperature; for
            ``"dot"`` 1.0 is the natural choice). A learnable scale is checked here, not while
            it trains.
        learnable_scale: make ``scale`` a parameter.
        bias: add a learnable per-class bias.
        kernel_size: odd ``k``; ``k > 1`` compares each pixel's ``k x k`` neighbourhood
            (``C*k*k`` values, zero-padded as ``Conv2d(padding=k//2)``) with the prototypes, like
            the 3x3 head of segmentation_models_pytorch's Unet. Prototypes are then
            ``(K, M, C*k*k)``; :meth:`embed` gives the matching features for the loss.
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.

    Shapes:
        ``x``: ``(B, C, H, W)`` -> ``(B, K, H, W)``; ``(N, C)`` -> ``(N, K)`` (``kernel_size=1``).
        Logits are float32 (float64 for float64 input), also under autocast.

    Attributes:
        prototypes: ``nn.Parameter`` of shape ``(K, M, C*k*k)``.
        bias: ``nn.Parameter`` ``(K,)`` or ``None``.
        scale: 0-d parameter (``learnable_scale``) or buffer.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_prototypes: int = 1,
        *,
        similarity: str = "cosine",
        pooling: str = "max",
        scale: float = 10.0,
        learnable_scale: bool = False,
        bias: bool = False,
        kernel_size: int = 1,
        backend: str = "auto",
    ) -> None:
        """Check the options and create ``prototypes`` (and ``bias``), initialised by
        :meth:`reset_parameters`. The arguments are described on the class.

        Raises:
            TypeError: an argument of the wrong kind (e.g. ``num_classes=2.0``).
            ValueError: a value out of range (e.g. ``scale <= 0``, an even ``kernel_size``).
        """
        super().__init__()
        fn = type(self).__name__
        self.in_channels = _checks.positive_int(fn, "in_channels", in_channels)
        self.num_classes = _checks.positive_int(fn, "num_classes", num_classes)
        self.num_prototypes = _checks.positive_int(fn, "num_prototypes", num_prototypes)
        self.similarity = _checks.choice(fn, "similarity", similarity, _checks.SIMILARITIES)
        self.pooling = _checks.choice(fn, "pooling", pooling, _checks.POOLINGS)
        self.kernel_size = _checks.positive_int(fn, "kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"{fn}: kernel_size must be odd (padding kernel_size // 2 keeps H, W); got {kernel_size}")
        self.backend = _backend.check_backend(backend)
        init_scale = _checks.positive_float(fn, "scale", scale)
        dim = in_channels * kernel_size * kernel_size
        self.prototypes = nn.Parameter(torch.empty(num_classes, num_prototypes, dim))
        self.bias = nn.Parameter(torch.empty(num_classes)) if bias else None
        if learnable_scale:
            self.scale = nn.Parameter(torch.tensor(init_scale))
        else:
            self.register_buffer("scale", torch.tensor(init_scale))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Dot similarity: the Conv2d default (uniform in ``±1/sqrt(C k k)``), so a converted
        model starts where the conv would. Cosine: unit-norm Gaussian prototypes (random
        directions; their norm does not matter). Bias: the Conv2d default."""
        fan_in = self.prototypes.shape[-1]
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            if self.similarity == "dot":
                self.prototypes.uniform_(-bound, bound)
            else:
                self.prototypes.normal_()
                self.prototypes.copy_(F.normalize(self.prototypes, dim=-1))
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    @property
    def feature_dim(self) -> int:
        """Channels of the prototype space, ``C * k * k``."""
        return self.prototypes.shape[-1]

    @_quiet_when_tracing
    def embed(self, x: Tensor) -> Tensor:
        """The features the prototypes are compared with: ``x`` itself for ``kernel_size=1``,
        else the zero-padded ``k x k`` neighbourhoods ``(B, C*k*k, H, W)``, in ``Conv2d``'s
        weight order (channel-major)."""
        if self.kernel_size == 1:
            return x
        fn = type(self).__name__
        x = _checks.floating(fn, "x", x, (4,), f"(B, C, H, W) for kernel_size={self.kernel_size}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{fn}: x must have C={self.in_channels} channels; got shape {tuple(x.shape)}")
        b, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, padding=self.kernel_size // 2)
        return cols.view(b, self.feature_dim, h, w)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``scale * pool_m s[n, k, m] (+ bias[k])``.

        Args:
            x: features ``(B, C, H, W)`` (any strides, channels_last included) or ``(N, C)``
                (``kernel_size=1`` only).

        Returns:
            ``(B, K, H, W)`` or ``(N, K)`` logits, float32 (float64 for float64 input), also
            under autocast; at ``x``'s resolution (the head never upsamples).

        Raises:
            TypeError: ``x`` is not a floating-point tensor.
            ValueError: ``x`` has the wrong shape or a channel count other than ``in_channels``.
        """
        return PF.prototype_logits(
            self.embed(x), self.prototypes, similarity=self.similarity, pooling=self.pooling,
            scale=self.scale, bias=self.bias, backend=self.backend,
        )

    @classmethod
    def from_conv(cls, conv: Union[nn.Conv2d, nn.Linear], num_prototypes: int = 1, **kwargs) -> "MultiPrototypeClassifier":
        """Build a head that computes exactly what ``conv`` computes, and copy its weights.

        ``conv`` is the classifier being replaced: an ``nn.Conv2d`` (stride 1, dilation 1,
        groups 1, zero padding ``k // 2``, odd square kernel) or an ``nn.Linear``. Defaults to
        ``similarity="dot"``, ``scale=1.0``, ``bias=conv.bias is not None``; every keyword of
        the constructor can be overridden. With ``num_prototypes=M > 1`` each class's conv
        weight is copied into all its ``M`` prototypes (``"max"`` and ``"mean"`` pooling then
        still reproduce the conv).

        Example::

            model.classifier = MultiPrototypeClassifier.from_conv(model.classifier)
        """
        fn = f"{cls.__name__}.from_conv"
        if isinstance(conv, nn.Linear):
            out_ch, in_ch, k = conv.out_features, conv.in_features, 1
            weight = conv.weight
        elif isinstance(conv, nn.Conv2d):
            kh, kw = conv.kernel_size
            if (kh != kw or kh % 2 == 0 or conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1
                    or conv.padding_mode != "zeros" or conv.padding not in ((kh // 2, kw // 2), "same")):
                raise ValueError(
                    f"{fn}: conv must be a stride-1, dilation-1, groups-1 Conv2d with an odd square kernel and "
                    f"zero padding kernel_size // 2; got {conv}"
                )
            out_ch, in_ch, k = conv.out_channels, conv.in_channels, kh
            weight = conv.weight
        else:
            raise TypeError(f"{fn}: conv must be an nn.Conv2d or nn.Linear; got {type(conv).__name__}")
        kwargs.setdefault("similarity", "dot")
        kwargs.setdefault("scale", 1.0)
        kwargs.setdefault("bias", conv.bias is not None)
        head = cls(in_ch, out_ch, num_prototypes, kernel_size=k, **kwargs)
        head = head.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            head.prototypes.copy_(weight.detach().reshape(out_ch, 1, -1).expand_as(head.prototypes))
            if head.bias is not None:
                if conv.bias is not None:
                    head.bias.copy_(conv.bias.detach())
                else:
                    head.bias.zero_()
        return head

    def extra_repr(self) -> str:
        parts = [f"{self.in_channels}", f"num_classes={self.num_classes}", f"num_prototypes={self.num_prototypes}",
                 f"similarity={self.similarity!r}", f"pooling={self.pooling!r}"]
        learnable = isinstance(self.scale, nn.Parameter)
        parts.append(f"scale={float(self.scale.detach().cpu()):g}" + (" (learnable)" if learnable else ""))
        parts.append(f"bias={self.bias is not None}")
        if self.kernel_size != 1:
            parts.append(f"kernel_size={self.kernel_size}")
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)
