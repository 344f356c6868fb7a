"""moetrain: distributed training for sparse Mixture-of-Experts language models."""

__version__ = "0.1.0"
