"""Entry point: ``moetrain-train``, ``python -m moetrain.train``, ``torchrun -m moetrain.train``.

Hydra composes the config; it is converted once to typed dataclasses, validated against
the world size before any process group exists, then the Trainer runs.

A config or checkpoint error is reported once, by rank 0, as one line without a traceback,
and every rank exits with the same status (2: config, 3: checkpoint); see :func:`_fail`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from typing import NoReturn

import hydra
from omegaconf import DictConfig, OmegaConf

from moetrain.config import Config, ConfigError, register_configs, validate
from moetrain.config.schema import AUTO

log = logging.getLogger("moetrain")

register_configs()

EXIT_CONFIG, EXIT_CHECKPOINT = 2, 3
# After an error every rank meets (see _fail): how long rank 0 waits for the others to
# report it too, and how long another rank waits for rank 0's report before printing.
RANK0_WAIT_S, PEER_GRACE_S = 30.0, 20.0


def _world_size() -> int:
    import torch.distributed as dist

    if dist.is_initialized():  # e.g. a test harness created the group
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def run(cfg: Config) -> object:
    """Validate, initialise distributed, train. Returns the trainer's Summary."""
    from moetrain.parallel.mesh import destroy_distributed, init_distributed
    from moetrain.train.trainer import Trainer

    auto = cfg.train.micro_batch_size == AUTO
    layout = validate(cfg, _world_size())  # before any process group exists
    t = cfg.train
    if auto and _rank() == 0:
        share = t.global_batch_size // layout.dp
        log.info("train.micro_batch_size=auto -> %d (train.global_batch_size/dp = %d/%d = %d "
                 "sequences per rank: %d micro-batches per step; cap "
                 "train.max_micro_batch_size=%d)", t.micro_batch_size, t.global_batch_size,
                 layout.dp, share, share // t.micro_batch_size, t.max_micro_batch_size)
    # ZeRO-Offload keeps FSDP's gradient shards on the CPU: the gradient-norm reduction
    # then runs on CPU tensors, which need a gloo part of the group beside NCCL.
    from moetrain.config.schema import OptimOffload

    backend = None
    if cfg.optim.offload == OptimOffload.cpu:
        import torch

        backend = "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else None
    rank, _, device = init_distributed(backend)
    try:
        summary = Trainer(cfg, layout, device).fit()
        if rank == 0:
            print(summary.format(), flush=True)
        return summary
    finally:
        destroy_distributed()


def _write_error_file(message: str) -> None:
    """Hand ``message`` to torchrun's failure summary (its ``traceback :`` row, instead of
    ``<N/A>``) through the file torchrun names in TORCHELASTIC_ERROR_FILE, in the format of
    torch.distributed.elastic.multiprocessing.errors.ErrorHandler."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": message, "extraInfo": {
        "py_callstack": message, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:  # the summary then says <N/A>; the message was printed anyway
        pass


def _agent_store():
    """A client of torchrun's own key-value store (it serves the workers' rendezvous), or
    None outside torchrun: ranks can meet there before and after their process group."""
    import datetime

    from moetrain.parallel.mesh import agent_store

    try:
        return agent_store(datetime.timedelta(seconds=5))
    except (KeyError, ValueError, RuntimeError):
        return None


def _fail(kind: str, err: object, code: int) -> NoReturn:
    """Report an error that every rank meets alike (a config or checkpoint error), once.

    Rank 0 prints ``moetrain: <kind>: <err>`` and the first rank of each node writes it to
    torchrun's error file, so torchrun's failure summary names it. The ranks meet in
    torchrun's store: rank 0 exits ``code`` once every rank has reported the error (or
    after RANK0_WAIT_S), then torchrun stops the others, which exit ``code`` too. A rank
    exiting before rank 0 would get rank 0 stopped, perhaps before it printed. A rank that
    does not see rank 0 report within PEER_GRACE_S (an error of its own, or no torchrun)
    prints the message itself and exits."""
    rank, world = _rank(), _world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    message = f"moetrain: {kind}: {err}"
    if rank == 0:
        print(message, file=sys.stderr, flush=True)
    else:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(code))
    if local_rank == 0 or world == 1:
        _write_error_file(message)
    sys.stdout.flush()
    sys.stderr.flush()
    if world == 1:
        sys.exit(code)
    store = _agent_store()
    key = f"moetrain/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if rank == 0:
        try:
            if store is not None:
                store.set(f"{key}/rank0", "1")
                store.add(key, 1)
                deadline = time.monotonic() + RANK0_WAIT_S
                while store.add(key, 0) < world and time.monotonic() < deadline:
                    time.sleep(0.05)
        finally:  # whatever the store does, rank 0 exits with the error's status
            sys.exit(code)
    try:
        reported = False
        if store is not None:
            store.add(key, 1)
            deadline = time.monotonic() + PEER_GRACE_S
            while not (reported := store.check([f"{key}/rank0"])):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        else:
            time.sleep(PEER_GRACE_S)
    except RuntimeError:  # the store went with rank 0's torchrun, which reported the failure
        reported = True
    if reported:  # torchrun stops this rank once rank 0 has exited
        time.sleep(RANK0_WAIT_S + PEER_GRACE_S)
    else:
        print(f"moetrain (rank {rank}): {kind}: {err}", file=sys.stderr, flush=True)
        if local_rank != 0:
            _write_error_file(message)
    sys.exit(code)


_job_started = False  # set once Hydra has composed the config and calls the job


@hydra.main(config_path="pkg://moetrain.conf", config_name="train", version_base="1.3")
def _hydra_main(dcfg: DictConfig) -> None:
    global _job_started
    _job_started = True
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        # Each job of a sweep (-m) in its own run dir, <run.dir>/sweep/<job number>: else
        # they would share metrics.jsonl and checkpoints/ (and resume=auto each other's).
        dcfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        cfg: Config = OmegaConf.to_object(dcfg)
    except ConfigError as e:  # raised by a schema __post_init__
        _fail("invalid config", e, EXIT_CONFIG)
    from moetrain.checkpoint import CheckpointLoadError
    from moetrain.train.preemption import pass_on

    try:
        run(cfg)
    except ConfigError as e:
        _fail("invalid config", e, EXIT_CONFIG)
    except CheckpointLoadError as e:  # corrupt or unreadable checkpoint: named in the message
        _fail("checkpoint error", e, EXIT_CHECKPOINT)
    pass_on()  # a stop signal, once checkpointed, to the launcher's handler (e.g. submitit's)


def _composition_message(e: BaseException) -> str:
    """Hydra's own short text for an override it cannot apply (what it prints without
    HYDRA_FULL_ERROR), e.g. "Could not override 'trian.steps'. ... Key 'trian' not in
    'Config'"."""
    from omegaconf.errors import OmegaConfBaseException

    text = str(e)
    if isinstance(e.__cause__, OmegaConfBaseException):
        text += "\n" + str(e.__cause__)
    return text


def main() -> None:
    from moetrain.train.preemption import catch_early

    catch_early()  # a stop signal during start-up is honoured after the first step
    logging.basicConfig(
        level=os.environ.get("MOETRAIN_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Hydra prints a composition error (a misspelt key, a bad value type) itself on every
    # rank and exits 1. With HYDRA_FULL_ERROR it raises instead, and it is reported once
    # here like any config error. A user who set HYDRA_FULL_ERROR gets Hydra's behaviour.
    user_full_error = "HYDRA_FULL_ERROR" in os.environ
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except Exception as e:
        if _job_started or user_full_error:
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

            ErrorHandler().record_exception(e)  # torchrun's summary shows this traceback
            raise
        _fail("invalid config", _composition_message(e), EXIT_CONFIG)
    finally:
        if not user_full_error:
            os.environ.pop("HYDRA_FULL_ERROR", None)
