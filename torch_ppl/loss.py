"""``PushPullLoss``: cross-entropy plus the multi-prototype contrastive loss (the push)."""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor, nn

from . import _backend, _checks
from . import functional as PF


class PushPullLoss(nn.Module):
    """``ce_weight * CE + contrast_weight * contrastive``, both reduced the UniMatch way.

    The prototypes are not owned by the loss: pass the head's ``prototypes`` parameter at each
    call, so one optimizer, one checkpoint and one DDP wrapper cover everything.

    Args:
        temperature: ``tau`` of the contrastive term, ``z = s / tau``; ``> 0``.
        contrast_weight: the weight of the contrastive term, finite and ``>= 0``.
        ce_weight: the weight of the cross-entropy term, finite and ``>= 0``.
        positives: ``"all"`` (logsumexp over the ``M`` prototypes of the label's class) or
            ``"nearest"`` (the closest one).
        similarity: ``"cosine"`` or ``"dot"`` (for the contrastive term).
        ignore_index: label of pixels left out of both terms.
        reduction: ``"mean"`` (``sum(w l) / max(#valid, 1)``), ``"sum"`` or ``"none"``.
            ``"none"`` returns one per-pixel map at the target's resolution: with both terms
            on, the features must then be at the target's resolution too (coarser features,
            as in the usage example, raise ``ValueError``; see :meth:`forward`).
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.

    Call:
        ``loss = crit(logits, features, target, prototypes, weight=None, return_terms=False)``
        with ``logits`` ``(B, K, h, w)`` (bilinearly resized to the target), ``features``
        ``(B, C, H, W)`` (the target is nearest-resized to them), ``target`` ``(B, H', W')``
        int64, ``prototypes`` ``(K, M, C)``, ``weight`` shaped like ``target``. 2-D forms
        ``(N, K)``, ``(N, C)``, ``(N,)`` work too. Returns a float32 scalar (per-pixel map for
        ``"none"``), or :class:`~torch_ppl.functional.LossTerms` with ``return_terms=True``.

    Semi-supervised use::

        loss = crit(p_l, f_l, y_l, W) + lambda_u * crit(p_u, f_u, pseudo, W, weight=(conf >= 0.95).float())
    """

    def __init__(
        self,
        *,
        temperature: float = 0.1,
        contrast_weight: float = 1.0,
        ce_weight: float = 1.0,
        positives: str = "all",
        similarity: str = "cosine",
        ignore_index: int = 255,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        """Check and store the options (described on the class); the loss has no parameters.

        Raises:
            TypeError: an option of the wrong kind (e.g. ``temperature=None``).
            ValueError: a value out of range (e.g. ``temperature <= 0``, a negative or
                non-finite ``ce_weight`` / ``contrast_weight``, an unknown ``reduction``).
        """
        super().__init__()
        fn = type(self).__name__
        self.temperature = _checks.positive_float(fn, "temperature", temperature)
        self.contrast_weight = _checks.non_negative_float(fn, "contrast_weight", contrast_weight)
        self.ce_weight = _checks.non_negative_float(fn, "ce_weight", ce_weight)
        self.positives = _checks.choice(fn, "positives", positives, _checks.POSITIVES)
        self.similarity = _checks.choice(fn, "similarity", similarity, _checks.SIMILARITIES)
        self.ignore_index = _checks.ignore_index(fn, ignore_index)
        self.reduction = _checks.choice(fn, "reduction", reduction, _checks.REDUCTIONS)
        self.backend = _backend.check_backend(backend)

    def forward(
        self,
        logits: Optional[Tensor],
        features: Optional[Tensor],
        target: Tensor,
        prototypes: Optional[Tensor],
        weight: Optional[Tensor] = None,
        *,
        return_terms: bool = False,
    ) -> Union[Tensor, PF.LossTerms]:
        """``ce_weight * CE + contrast_weight * contrastive`` for one batch.

        Args:
            logits: ``(B, K, h, w)`` or ``(N, K)``, bilinearly resized to the target's
                resolution; ``None`` when ``ce_weight == 0`` (when given, the CE term is
                computed even at weight 0, so that ``return_terms`` can report it).
            features: ``(B, C, H, W)`` or ``(N, C)``, the features the prototypes are compared
                with (the head's input, or :meth:`MultiPrototypeClassifier.embed` of it); the
                contrastive term is computed at their resolution, the target and weight
                nearest-resized to it. ``None`` when ``contrast_weight == 0``.
            target: ``(B, H', W')`` or ``(N,)`` integer labels in ``[0, K)`` or ``ignore_index``.
            prototypes: the head's ``prototypes`` ``(K, M, C)``; ``None`` with ``features``.
            weight: optional per-pixel weight shaped like ``target``, finite and ``>= 0`` (a
                pseudo-label confidence mask lowers the loss, it does not renormalise it).
            return_terms: also return the two reduced terms.

        Returns:
            A float32 scalar (``"mean"``, ``"sum"``), a per-pixel map shaped like ``target``
            with 0 at ignored pixels (``"none"``), or
            :class:`~torch_ppl.functional.LossTerms` ``(total, ce, contrastive)`` with
            ``return_terms=True``.

        Raises:
            TypeError: a tensor of the wrong kind (e.g. float labels).
            ValueError: shapes that disagree (the message names the argument), labels out
                of range, a negative or non-finite ``weight``, or ``reduction="none"`` with
                features coarser than the target while both terms are on. For the two
                per-pixel maps at their own resolutions, call
                :func:`~torch_ppl.functional.contrastive_loss` with ``reduction="none"`` and
                this loss with ``contrast_weight=0``.
        """
        return PF.push_pull_loss(
            logits, features, target, prototypes, weight,
            temperature=self.temperature, contrast_weight=self.contrast_weight, ce_weight=self.ce_weight,
            positives=self.positives, similarity=self.similarity, ignore_index=self.ignore_index,
            reduction=self.reduction, backend=self.backend, return_terms=return_terms,
        )

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature:g}, contrast_weight={self.contrast_weight:g}, "
                f"ce_weight={self.ce_weight:g}, positives={self.positives!r}, similarity={self.similarity!r}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")
