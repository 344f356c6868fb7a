"""A bad layout under torchrun fails on every rank before any process group exists, with
a message naming the fields and the fix, and never hangs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moetrain.testing import find_free_port
from tests.conftest import TINY

CASES = [
    (["parallel.ep=2", "model.num_experts=3"],
     ["model.num_experts=3", "parallel.ep=2", "use parallel.ep in [1]"]),
    (["parallel.ep=4"], ["parallel.ep=4 must divide", "parallel.dp*parallel.tp=2*1=2"]),
    (["parallel.dp=4"], ["parallel.pp*parallel.dp*parallel.tp", "world size is 2"]),
    (["train.global_batch_size=6"], ["train.global_batch_size=6", "micro_batch_size"]),
]


@pytest.mark.parametrize("override,words", CASES)
def test_bad_layout_message_names_fields_and_fix(override, words):
    """Each message, from the validation every rank runs before any process group."""
    from moetrain.config import ConfigError, validate
    from tests.conftest import compose

    with pytest.raises(ConfigError) as e:
        validate(compose(TINY + override), 2)
    for w in words:
        assert w in str(e.value), str(e.value)


@pytest.mark.parametrize("override,words", [CASES[0], CASES[2]])
def test_torchrun_bad_layout_fails_fast(tmp_path, override, words):
    """The same under torchrun (two of the cases: a launch costs seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={find_free_port()}", "-m", "moetrain.train",
           *TINY, f"run.dir={tmp_path}", *override]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    for w in words:
        assert w in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr.split("moetrain: invalid config")[0][-500:]
