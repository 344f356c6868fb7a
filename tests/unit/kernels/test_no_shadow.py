"""The checkout's ``kernels/`` folder never shadows the PyPI package ``kernels``.

transformers imports Hugging Face's ``kernels`` package when ``transformers.activations``
loads. Python run from the checkout's root (``python -c``, ``python -m pytest``, a user
script there) has that root first on ``sys.path``; a regular package ``kernels/`` there
would win the search and break every transformers import with
``cannot import name ... from 'kernels'``. The folder therefore has no ``__init__.py`` and
is imported as ``moetrain.kernels`` only.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import in_ci, needs

ROOT = Path(__file__).resolve().parents[3]


def _run_in_root(code: str) -> subprocess.CompletedProcess:
    # ``python -c`` puts the working directory first on sys.path, as a user's script would.
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)


def test_kernels_folder_is_not_a_regular_package():
    assert (ROOT / "kernels" / "backend.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the checkout's folder shadow the PyPI package 'kernels' "
        "(which transformers imports) whenever Python runs from the repository root")


def test_moetrain_kernels_imports_from_the_checkout_root():
    r = _run_in_root(
        "import sys, os; assert sys.path[0] in ('', os.getcwd()), sys.path[:2]\n"
        "import moetrain.kernels.backend as b, moetrain.kernels.reference as ref\n"
        "from moetrain.kernels.backend import use_triton\n"
        "import torch\n"
        "assert use_triton('torch', torch.device('cpu')) is False\n"
        "print(b.__file__)\n")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve() == ROOT / "kernels" / "backend.py"


@needs("transformers")
def test_transformers_hub_kernels_imports_from_the_checkout_root():
    """The import that failed with the checkout's ``kernels/__init__.py`` in the way."""
    r = _run_in_root(
        "import importlib.metadata, importlib.util, os\n"
        "import transformers.activations, transformers.integrations.hub_kernels\n"
        "import moetrain.kernels.backend\n"
        "try:\n"
        "    importlib.metadata.version('kernels')\n"
        "except importlib.metadata.PackageNotFoundError:\n"
        "    pass  # Hugging Face's package is not installed: nothing to shadow\n"
        "else:\n"
        "    import kernels\n"
        "    here = os.path.realpath(os.path.join(os.getcwd(), 'kernels'))\n"
        "    assert not os.path.realpath(kernels.__file__).startswith(here), kernels.__file__\n"
        "print('ok')\n")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok")


def test_ci_mode_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert in_ci()
    monkeypatch.setenv("CI", "")
    assert not in_ci()
