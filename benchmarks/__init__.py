"""The torch_ppl benchmark suite; run it as ``python -m benchmarks --help``.

Modules: :mod:`.shapes` (problem sizes), :mod:`.providers` (the implementations compared),
:mod:`.timing` (CUDA-event timing and peak memory), :mod:`.roofline` (bytes/FLOPs models
and device peaks), :mod:`.runner` (the grid and the result schema), :mod:`.plots`.
See ``docs/benchmarks.md``.
"""
