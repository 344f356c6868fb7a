"""MOETRAIN_FAULTS parsing and matching (the fault-tolerance tests rely on it)."""

from __future__ import annotations

import os
import signal

import pytest

from moetrain import faults


def test_parse_and_match():
    got = faults.parse("mid_step:step=7:rank=1:attempt=0; step_end:step=10:world=1:"
                       "action=hold:seconds=2.5")
    assert got == [faults.Fault("mid_step", step=7, rank=1, attempt=0),
                   faults.Fault("step_end", action="hold", step=10, world=1, seconds=2.5)]
    kill = got[0]
    assert kill.matches("mid_step", step=7, rank=1, world=2, attempt=0)
    assert not kill.matches("mid_step", step=7, rank=1, world=2, attempt=1)  # restarted
    assert not kill.matches("mid_step", step=7, rank=0, world=2, attempt=0)
    assert not kill.matches("sync_save", step=7, rank=1, world=2, attempt=0)
    assert got[1].matches("step_end", step=10, rank=5, world=1, attempt=3)  # unset: any
    assert faults.parse("") == [] and faults.parse(" ; ") == []


@pytest.mark.parametrize("spec,match", [
    ("mid_stp:step=1", "unknown point 'mid_stp'"),
    ("mid_step:step", "bad field 'step'"),
    ("mid_step:when=3", "bad field 'when=3'"),
    ("mid_step:step=x", "step='x' .* is not a number"),
    ("mid_step:action=explode", "unknown action 'explode'"),
])
def test_bad_specs_name_the_part(spec, match):
    with pytest.raises(ValueError, match=match):
        faults.parse(spec)


def test_hit_fires_only_the_matching_fault(monkeypatch):
    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    monkeypatch.setenv(faults.ENV, "step_end:step=3:action=sigterm;mid_step:step=3")
    faults.hit("step_end", 2)
    assert sent == []
    faults.hit("step_end", 3)
    assert sent == [(os.getpid(), signal.SIGTERM)]
    faults.hit("mid_step", 3)
    assert sent[-1] == (os.getpid(), signal.SIGKILL)
    monkeypatch.setenv(faults.ENV, "step_end:action=hold:seconds=30")
    faults.hit("step_end", 1, stopped=lambda: True)  # returns at once when stopped
    monkeypatch.delenv(faults.ENV)
    faults.hit("mid_step", 3)
    assert len(sent) == 2
