"""Semi-supervised segmentation demo on scikit-learn's handwritten digits (work in progress:
data, model and training loop exist; the CLI, reporting, tests and docs are not written yet)."""
