"""Semi-supervised segmentation demo on scikit-learn's handwritten digits.

``python -m torch_ppl.demo [--quick]`` trains a small conv segmentation net with pseudo-labels
(FixMatch/UniMatch style) in seven variants, from a 1x1-conv baseline to full PPL, and measures
test mIoU and how noisy the confident pseudo-labels are against the hidden truth. Modules:

* :mod:`~torch_ppl.demo.data`: the digit scenes and their splits;
* :mod:`~torch_ppl.demo.model`: the network and the variants;
* :mod:`~torch_ppl.demo.train`: the training loop, metrics and the noise meter;
* :mod:`~torch_ppl.demo.report`: aggregates, ``results.json``, ``figure.png`` and the table.

Needs the ``demo`` extra (scikit-learn, matplotlib, tqdm). See ``docs/demo.md``.
"""
