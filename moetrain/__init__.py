"""moetrain: distributed training for sparse Mixture-of-Experts language models."""

import importlib.machinery as _machinery
import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path

__version__ = "0.1.0"


def _find_kernels() -> None:
    """Make ``moetrain.kernels`` importable: the top-level ``kernels/`` folder.

    The folder has no ``__init__.py``, so that run from the checkout (its root on
    ``sys.path``) it never shadows the PyPI package ``kernels``, which transformers imports.
    A built wheel copies it to ``moetrain/kernels/``, where the normal search finds it. An
    editable install maps it to the checkout's folder, but setuptools' editable finder
    resolves no mapped package without ``__init__.py``; give it that folder here.
    """
    name = __name__ + ".kernels"
    if name in _sys.modules or _machinery.PathFinder.find_spec(name, __path__) is not None:
        return
    folder = _Path(__file__).resolve().parent.parent / "kernels"
    if not (folder / "backend.py").is_file():
        return  # neither installed nor a checkout: the import fails as it would anyway
    spec = _machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    _sys.modules[name] = _util.module_from_spec(spec)


_find_kernels()


def __getattr__(name: str):
    # ``moetrain.load`` imports torch and the model lazily: ``import moetrain`` stays light.
    if name == "load":
        from moetrain.checkpoint.load import load

        return load
    if name == "load_tokenizer":
        return _load_tokenizer
    raise AttributeError(f"module 'moetrain' has no attribute {name!r}")


def _load_tokenizer(path):
    """The tokenizer the model of checkpoint ``path`` was trained with (``moetrain.load``'s
    companion): a committed ``step_N`` directory, a checkpoints directory or a run.dir. Every
    checkpoint carries it as Hugging Face files; the result encodes and decodes as the
    data did (``encode``, ``decode``, ``eos_id``, ``bos_id``)."""
    from moetrain.checkpoint.load import resolve_checkpoint
    from moetrain.data.tokenizer import HFTokenizer

    ckpt = resolve_checkpoint(path)
    if not (ckpt / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{ckpt} carries no tokenizer (tokenizer.json): the run had none (Megatron data "
            f"without data.tokenizer), its tokenizer could not be saved (the run's log says "
            f"why), or the checkpoint predates saved tokenizers; load the data directory's "
            f"tokenizer instead (moetrain.data.load_tokenizer(read_meta(DIR), DIR))")
    return HFTokenizer(ckpt)
