"""The workers of each torchrun launch agree on a fresh namespace of the agent's store,
whatever keys an earlier launch left there (its dead workers' addresses)."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch.distributed as dist

from moetrain.parallel.mesh import _FRESH, _fresh_namespace


def _agree(store, world, order):
    out, errors = {}, []

    def rank(r):
        try:
            out[r] = _fresh_namespace(store, r, world, timedelta(seconds=20))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in order]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    return out


def test_ranks_share_a_namespace_that_is_new_for_every_launch():
    store = dist.HashStore()
    # What a killed launch left behind: its epoch, acknowledgements and answers.
    for key, value in [("epoch", "dead"), ("ack/1", "dead:a"), ("go/1", "dead:a"),
                       ("ack/2", "dead:b"), ("go/2", "dead:b")]:
        store.set(f"{_FRESH}/{key}", value)
    store.set(f"{_FRESH}/dead/gloo/rank_1", "old address")
    seen = []
    for launch in range(2):
        ns = _agree(store, 3, order=(2, 1, 0) if launch == 0 else (0, 1, 2))
        for r in range(3):
            ns[r].set(f"rank{r}", str(launch))
        # every rank reads every other rank's key through its own namespace
        for r in range(3):
            assert [ns[r].get(f"rank{q}").decode() for q in range(3)] == [str(launch)] * 3
            assert not ns[r].check(["gloo/rank_1"])  # the dead launch's keys are not there
        epoch = store.get(f"{_FRESH}/epoch").decode()
        assert epoch != "dead" and epoch not in seen
        seen.append(epoch)


def test_a_missing_rank_times_out_with_a_clear_error():
    with pytest.raises(RuntimeError, match=r"rank 0: timed out after 1 s .*waiting for ranks \[1\]"):
        _fresh_namespace(dist.HashStore(), 0, 2, timedelta(seconds=1))
