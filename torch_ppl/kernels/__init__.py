"""Fused Triton kernels, one file per op, each next to its autograd wrapper.

* :mod:`.similarity`: the head's logits (``torch_ppl::prototype_logits_fwd`` / ``_bwd``).
* :mod:`.contrastive`: the push (``torch_ppl::contrastive_loss_fwd`` / ``_bwd``).
* :mod:`.attention`: the pull (``torch_ppl::prototype_attention_fwd`` / ``_bwd``).
* :mod:`.head_push`: the head's logits and the push in one pass
  (``torch_ppl::prototype_logits_contrastive_fwd`` / ``_bwd``), on the head's kernels with the
  push folded in.
* :mod:`.projected`: the attention's projected form (PyTorch's GEMMs and fused attention),
  which :mod:`.attention` runs instead of its kernels with many heads on a GPU.
* :mod:`._common`: the conventions the three share (layouts, flags, numerics, GPU tiling).
* :mod:`._autotune`: opt-in autotuning of every launch's tiles (``torch_ppl.set_autotune``).

Each op module exposes a function with the same signature as its counterpart in
:mod:`torch_ppl.reference`; :mod:`torch_ppl._backend` dispatches to it. Importing any of them
imports Triton, so nothing imports them eagerly.
"""
