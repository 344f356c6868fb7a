"""moetrain: distributed training for sparse Mixture-of-Experts language models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``moetrain.load`` imports torch and the model lazily: ``import moetrain`` stays light.
    if name == "load":
        from moetrain.checkpoint.load import load

        return load
    raise AttributeError(f"module 'moetrain' has no attribute {name!r}")
