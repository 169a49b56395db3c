"""``PPLHead``: the pull, the multi-prototype classifier and the push, as one module."""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

from torch import Tensor, nn

from . import _backend
from . import functional as PF
from .attention import PPLAttention
from .head import MultiPrototypeClassifier
from .loss import PushPullLoss


class PPLHeadOutput(NamedTuple):
    """What ``PPLHead(x, target)`` returns.

    Attributes:
        logits: ``(B, K, H, W)`` (``(N, K)`` for 2-D ``x``) float32 logits.
        features: ``(B, C*k*k, H, W)`` (``(N, C)``), the features the prototypes scored (after
            the pull).
        loss: the :class:`PushPullLoss` of ``logits`` and ``features`` against the target: a
            float32 scalar, a per-pixel map for ``reduction="none"``, or
            :class:`~torch_ppl.functional.LossTerms` with ``return_terms=True``.
    """

    logits: Tensor
    features: Tensor
    loss: Union[Tensor, PF.LossTerms]


class PPLHead(nn.Module):
    """The whole of PPL in one module: a drop-in for a segmentation model's final classifier.

    ``x -> pull(embed(x), W) -> logits``, and with a target also the push: CE plus the
    multi-prototype contrastive loss, computed inside ``forward``. The prototypes ``W`` and
    every op that reads them live in this one module, so one ``fully_shard`` (FSDP2) of it
    gathers them for all their readers, and one DDP wrapper, optimizer and checkpoint cover
    everything.

    Submodules: ``classifier`` (:class:`MultiPrototypeClassifier`), ``pull``
    (:class:`PPLAttention` over the classifier's feature space, or ``None`` with
    ``pull=False``) and ``criterion`` (:class:`PushPullLoss`, no parameters).

    Args:
        in_channels: ``C`` of the decoder features.
        num_classes: ``K``.
        num_prototypes: ``M`` prototypes per class.
        num_heads: heads of the pull.
        head_dim: ``d`` of the pull; default ``C*k*k // num_heads``.
        pull: include the feature-to-prototype attention.
        layer_scale: the pull's ``gamma``: ``None`` (1) or the initial value of a learnable
            ``(C*k*k,)`` gain (``0.0`` makes the head start exactly as the classifier alone).
        detach_prototypes: no gradient from the pull into the prototypes.
        similarity: ``"cosine"`` or ``"dot"``, for the logits and (unless ``criterion`` is
            given) the contrastive term.
        pooling: ``"max"``, ``"logsumexp"`` or ``"mean"`` over a class's prototypes.
        scale: the logit scale.
        learnable_scale: make ``scale`` a parameter.
        bias: a learnable per-class bias.
        kernel_size: odd ``k``; ``k > 1`` compares ``k x k`` neighbourhoods (``C*k*k`` values),
            and the pull and the loss work in that space.
        criterion: the loss; default ``PushPullLoss(similarity=similarity, backend=backend)``.
        backend: ``"auto"``, ``"reference"`` or ``"triton"``, for the three parts.

    Call:
        ``head(x)`` -> logits ``(B, K, H, W)`` (or ``(N, K)`` for ``x`` of shape ``(N, C)``).
        ``head(x, target, weight=None)`` -> :class:`PPLHeadOutput` ``(logits, features, loss)``
        with ``target`` ``(B, H', W')`` int64 at any resolution (the loss resizes; see
        :class:`PushPullLoss`) and ``weight`` an optional per-pixel weight shaped like it.
        ``exclude=labels`` (keyword) is passed to the pull.

    Inside a model whose ``forward`` cannot pass a target (segmentation_models_pytorch's
    ``segmentation_head``), call the model as usual and then :meth:`loss`: in training mode
    ``head(x)`` keeps the features it scored for it.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_prototypes: int = 1,
        *,
        num_heads: int = 1,
        head_dim: Optional[int] = None,
        pull: bool = True,
        layer_scale: Optional[float] = None,
        detach_prototypes: bool = False,
        similarity: str = "cosine",
        pooling: str = "max",
        scale: float = 10.0,
        learnable_scale: bool = False,
        bias: bool = False,
        kernel_size: int = 1,
        criterion: Optional[PushPullLoss] = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        fn = type(self).__name__
        _backend.check_backend(backend)
        self.classifier = MultiPrototypeClassifier(
            in_channels, num_classes, num_prototypes, similarity=similarity, pooling=pooling, scale=scale,
            learnable_scale=learnable_scale, bias=bias, kernel_size=kernel_size, backend=backend,
        )
        if not isinstance(pull, bool):
            raise TypeError(f"{fn}: pull must be a bool; got {type(pull).__name__}")
        self.pull: Optional[PPLAttention] = None
        if pull:
            self.pull = PPLAttention(
                self.classifier.feature_dim, num_heads, head_dim, layer_scale=layer_scale,
                detach_prototypes=detach_prototypes, backend=backend,
            )
        if criterion is None:
            criterion = PushPullLoss(similarity=similarity, backend=backend)
        elif not isinstance(criterion, PushPullLoss):
            raise TypeError(f"{fn}: criterion must be a torch_ppl.PushPullLoss or None; got {type(criterion).__name__}")
        self.criterion = criterion
        self._features: Optional[Tensor] = None

    def __getstate__(self) -> dict:
        # Kept features are part of an autograd graph: copy.deepcopy (an EMA teacher) and
        # pickling would fail on them, and they belong to one step anyway.
        return {**self.__dict__, "_features": None}

    @property
    def prototypes(self) -> nn.Parameter:
        """The classifier's prototypes, ``(K, M, C*k*k)``."""
        return self.classifier.prototypes

    def forward(
        self,
        x: Tensor,
        target: Optional[Tensor] = None,
        weight: Optional[Tensor] = None,
        *,
        exclude: Optional[Tensor] = None,
        return_terms: bool = False,
    ) -> Union[Tensor, PPLHeadOutput]:
        """``x`` ``(B, C, H, W)`` or ``(N, C)`` -> logits ``(B, K, H, W)`` or ``(N, K)``; with
        ``target`` (``(B, H', W')`` or ``(N,)``) and optional ``weight`` shaped like it ->
        :class:`PPLHeadOutput`. ``exclude``: optional label map for the pull."""
        fn = type(self).__name__
        if target is None and (weight is not None or return_terms):
            raise ValueError(f"{fn}: weight= and return_terms= need a target; got target=None")
        c = self.classifier
        features = c.embed(x)
        if self.pull is not None:
            features = self.pull(features, c.prototypes, exclude)
        elif exclude is not None:
            raise ValueError(f"{fn}: exclude= is an argument of the pull, and this head has pull=False")
        # The features are already in the prototype space (embed applied): score them directly.
        if target is None:
            self._features = features if self.training else None
            return PF.prototype_logits(features, c.prototypes, similarity=c.similarity, pooling=c.pooling,
                                       scale=c.scale, bias=c.bias, backend=c.backend)
        self._features = None
        if self._fused_push(features, target):
            return self._forward_fused(features, target, weight, return_terms)
        logits = PF.prototype_logits(features, c.prototypes, similarity=c.similarity, pooling=c.pooling,
                                     scale=c.scale, bias=c.bias, backend=c.backend)
        loss = self.criterion(logits, features, target, c.prototypes, weight, return_terms=return_terms)
        return PPLHeadOutput(logits, features, loss)

    def _fused_push(self, features: Tensor, target: object) -> bool:
        """Whether ``forward`` computes the logits and the contrastive term in one op: the
        default kind of criterion (a plain :class:`PushPullLoss` with the classifier's
        similarity and its contrast term on) on the Triton backend. Anything else, including
        inputs the checks will reject, takes the two-op path."""
        c, crit = self.classifier, self.criterion
        if type(crit) is not PushPullLoss or crit.similarity != c.similarity or crit.contrast_weight == 0.0:
            return False
        if not isinstance(target, Tensor) or target.dim() != features.dim() - 1:
            return False
        if crit.reduction == "none" and features.dim() == 4 and features.shape[2:] != target.shape[1:]:
            return False  # the two-op path raises the error that explains it
        try:
            backends = {_backend.resolve(b, features, c.prototypes, target, op="prototype_logits_and_contrastive",
                                         channels=features.shape[1])
                        for b in (c.backend, crit.backend)}
        except (ValueError, RuntimeError):
            return False
        return backends == {"triton"}

    def _forward_fused(self, features: Tensor, target: Tensor, weight: Optional[Tensor],
                       return_terms: bool) -> PPLHeadOutput:
        """``forward`` with :func:`~torch_ppl.functional.prototype_logits_and_contrastive`: one
        read of the features and one similarity GEMM for the logits and the contrastive term;
        the CE term from the logits exactly as :func:`~torch_ppl.functional.push_pull_loss`
        computes it, and the total in its order."""
        c, crit = self.classifier, self.criterion
        logits, contrastive = PF.prototype_logits_and_contrastive(
            features, c.prototypes, target, weight, similarity=c.similarity, pooling=c.pooling, scale=c.scale,
            bias=c.bias, temperature=crit.temperature, positives=crit.positives, ignore_index=crit.ignore_index,
            reduction=crit.reduction, backend="triton")
        ce = PF.push_pull_loss(logits, None, target, None, weight, contrast_weight=0.0, ce_weight=crit.ce_weight,
                               ignore_index=crit.ignore_index, reduction=crit.reduction, backend=crit.backend,
                               return_terms=True).ce
        total = crit.ce_weight * ce + crit.contrast_weight * contrastive
        loss = PF.LossTerms(total, ce, contrastive) if return_terms else total
        return PPLHeadOutput(logits, features, loss)

    def loss(
        self, logits: Tensor, target: Tensor, weight: Optional[Tensor] = None, *, return_terms: bool = False
    ) -> Union[Tensor, PF.LossTerms]:
        """The push-pull loss of the last training-mode ``head(x)`` call, for models whose
        ``forward`` cannot pass a target to the head.

        Args:
            logits: ``(B, K, h, w)``, the model's output (possibly upsampled after the head,
                as smp does); bilinearly resized to ``target``.
            target: ``(B, H', W')`` int64 labels.
            weight: optional per-pixel weight shaped like ``target``.
            return_terms: return :class:`~torch_ppl.functional.LossTerms`.

        Returns:
            A float32 scalar (see :class:`PushPullLoss`). The kept features are released.

        Under FSDP2 this runs outside the head's forward, where the prototypes are sharded:
        prefer ``head(x, target)``, or see the distributed-training notes in the usage docs.
        """
        if self._features is None:
            raise RuntimeError(
                f"{type(self).__name__}.loss: no features kept; call the head (or the model holding it) "
                f"in training mode without a target first, or call head(x, target) to get the loss directly"
            )
        features, self._features = self._features, None
        return self.criterion(logits, features, target, self.prototypes, weight, return_terms=return_terms)

    @classmethod
    def from_conv(
        cls,
        conv: Union[nn.Conv2d, nn.Linear],
        num_prototypes: int = 1,
        *,
        num_heads: int = 1,
        head_dim: Optional[int] = None,
        pull: bool = True,
        layer_scale: Optional[float] = None,
        detach_prototypes: bool = False,
        criterion: Optional[PushPullLoss] = None,
        **classifier_kwargs,
    ) -> "PPLHead":
        """Replace a conv (or linear) classifier: the classifier is
        ``MultiPrototypeClassifier.from_conv(conv, num_prototypes, **classifier_kwargs)`` (the
        conv's weights, dot similarity and ``scale=1`` unless overridden), the pull is new.
        With ``pull=False`` or ``layer_scale=0.0`` the head starts out computing exactly what
        ``conv`` computes.

        Example::

            model.segmentation_head[0] = PPLHead.from_conv(model.segmentation_head[0], num_prototypes=4)
        """
        classifier = MultiPrototypeClassifier.from_conv(conv, num_prototypes, **classifier_kwargs)
        backend = classifier.backend
        head = cls(
            classifier.in_channels, classifier.num_classes, num_prototypes, num_heads=num_heads, head_dim=head_dim,
            pull=pull, layer_scale=layer_scale, detach_prototypes=detach_prototypes,
            similarity=classifier.similarity, pooling=classifier.pooling, kernel_size=classifier.kernel_size,
            criterion=criterion, backend=backend,
        )
        head.classifier = classifier
        weight = classifier.prototypes
        return head.to(device=weight.device, dtype=weight.dtype)
