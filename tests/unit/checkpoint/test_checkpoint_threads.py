"""A checkpoint save or load leaves no thread behind.

DCP's collectives copy pickled plans and metadata on gloo's worker threads. A large copy
opens an OpenMP parallel region there, and libgomp keeps a thread team for that worker
thread for as long as it lives. Once OpenMP threads outnumber the CPUs, libgomp stops
spinning between parallel regions, which slows every later training step (about 40% with
2 threads on 2 cores). The manager runs DCP on a group it destroys afterwards, so the
process has the same threads after a save or load as before it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    from moetrain.checkpoint import CheckpointManager
    from moetrain.checkpoint.state import ObjectState
    from moetrain.config import CheckpointConfig

    def threads():
        names = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    names[tid] = f.read().strip()
            except OSError:
                pass
        return names

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    torch.ones(1 << 20).add_(1)  # the main thread's OpenMP team exists from here on
    # Many small tensors: DCP's plan and metadata then pickle to far more than 32 KB.
    tensors = {f"t{i}": torch.full((4,), float(i)) for i in range(300)}
    state = {"s": ObjectState(lambda: dict(tensors), lambda sd: tensors.update(sd))}
    out = {}
    for async_save in (False, True):
        mgr = CheckpointManager(CheckpointConfig(dir=f"{sys.argv[1]}/{async_save}", keep=0,
                                                 async_save=async_save))
        before = threads()
        mgr.save(1, state)
        if async_save:  # what the trainer does after each step: poll() commits the
            import time  # finished write and frees its group, without the next save
            deadline = time.monotonic() + 60
            while mgr.poll() is None:
                assert time.monotonic() < deadline, "the async write never finished"
                time.sleep(0.01)
            assert mgr.latest() is not None and mgr._pending is None
        saved = threads()  # before close(): committed and freed by then
        mgr.close()
        mgr.load(mgr.latest(), state)
        loaded = threads()
        out[str(async_save)] = {"before": before, "saved": saved, "loaded": loaded}
    print("RESULT " + json.dumps(out))
    dist.destroy_process_group()
""")


def test_save_and_load_leave_no_threads_behind(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], env=env, check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(s for s in proc.stdout.splitlines() if s.startswith("RESULT "))
    for mode, snap in json.loads(line[len("RESULT "):]).items():
        before = snap["before"]
        for phase in ("saved", "loaded"):
            new = {t: n for t, n in snap[phase].items() if t not in before}
            assert not new, (f"async_save={mode}: threads left after the {phase[:-1]}: "
                             f"{sorted(new.values())}")
