"""Fused Triton kernels, one file per op, each next to its autograd wrapper.

Each module exposes a function with the same signature as its counterpart in
:mod:`torch_ppl.reference`; :mod:`torch_ppl._backend` dispatches to it. Importing a module
here imports Triton, so nothing imports them eagerly.
"""
