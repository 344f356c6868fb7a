"""The two hand-offs of moetrain/train/preemption.py that SLURM launches rely on, without a
cluster (in a fresh interpreter: the test changes its signal handlers):

- a stop signal that lands before the trainer's handler is in place (a worker still
  starting when SLURM's warning comes) is kept and honoured after the first step;
- after the stop, the signal goes on to the handler the launcher had installed (the Hydra
  submitit launcher requeues a job on SIGUSR2), and further stop signals are ignored, so
  the repeated SIGTERM of launch/slurm.sbatch cannot kill a process that is exiting.
"""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import os, signal
import torch
from moetrain.train import preemption as p

# 1. Early: catch_early records SIGUSR1; the trainer's StopSignal adopts it.
p.catch_early()
os.kill(os.getpid(), signal.SIGUSR1)
stop = p.StopSignal(torch.device("cpu")).install()
assert stop.received == signal.SIGUSR1, stop.received
assert stop.requested()
stop.uninstall()
p.pass_on()  # no launcher handler: nothing to call; stop signals are ignored from now on
assert all(signal.getsignal(s) == signal.SIG_IGN for s in p.SIGNALS)

# 2. A launcher's handler: kept by catch_early, displaced by the trainer's, passed on after.
calls = []
for s in p.SIGNALS:
    signal.signal(s, signal.SIG_DFL)
signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
p.catch_early()
assert signal.getsignal(signal.SIGUSR2) is not p._record_early
stop = p.StopSignal(torch.device("cpu")).install()
os.kill(os.getpid(), signal.SIGUSR2)
assert stop.received == signal.SIGUSR2 and calls == []
assert stop.requested()
stop.uninstall()
assert calls == []
p.pass_on()
assert calls == [signal.SIGUSR2], calls
p.pass_on()  # once
assert calls == [signal.SIGUSR2], calls

# 3. A run that ends without a stop leaves the handlers as they were.
signal.signal(signal.SIGTERM, signal.SIG_DFL)
stop = p.StopSignal(torch.device("cpu")).install()
assert not stop.requested()
stop.uninstall()
p.pass_on()
assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
print("ok")
"""


def test_early_signal_and_pass_on():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
