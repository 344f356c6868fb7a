"""Upcycle a dense model into an MoE: a committed moetrain checkpoint at step 0.

    python tools/upcycle.py --dense runs/dense/checkpoints/step_0002000 --out runs/moe_init \\
        --experts 8 --top-k 2 --drop-ratio 0.5 model=small
    moetrain-train model=small model.num_experts=8 model.expert_hidden=... \\
        checkpoint.resume=runs/moe_init            # the command this tool prints

``--dense``: a dense moetrain checkpoint (step_N, or a directory of them) or a Hugging Face
Llama/Qwen2/Mistral directory (config.json + *.safetensors). Positional arguments are
Hydra overrides of the target config, composed as ``moetrain-train`` composes them. The
target takes model.expert_hidden and model.ffn_hidden (and, when the dense config is known:
a checkpoint's config.yaml or the HF config.json, every architecture field) from the dense
model; overrides win, and a mismatch is an error naming the field. Every check (paths,
markers, truncated files, architecture, shapes) runs before any weight is converted.
The method and its choices: moetrain/checkpoint/upcycle.py and docs/upcycling.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from enum import Enum
from pathlib import Path

try:
    import moetrain  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from moetrain.checkpoint.manager import _committed_in
from moetrain.checkpoint.upcycle import (
    DenseSource,
    UpcycleError,
    build_upcycled,
    exactness_issue,
    inspect_dense,
    load_into,
)
from moetrain.config import CheckpointConfig, Config, ConfigError, compose_config, validate

log = logging.getLogger("moetrain.upcycle")

# Fields copied from a known dense config into the target (user overrides come after).
_ARCH = ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "rope_theta", "norm_eps",
         "tie_embeddings", "qkv_bias")


def _value(v: object) -> str:
    if isinstance(v, Enum):
        return str(v.value)
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def dense_overrides(src: DenseSource) -> list[str]:
    """Target model fields the dense model fixes: the FFN size (every expert copies it),
    the vocabulary and, when the dense config is known, the architecture."""
    out = [f"model.expert_hidden={src.ffn_hidden}", f"model.ffn_hidden={src.ffn_hidden}",
           f"model.vocab_size={src.vocab_size}"]
    if src.config is not None:
        out += [f"model.{name}={_value(getattr(src.config, name))}" for name in _ARCH
                if hasattr(src.config, name)]
    return out


def _json(v: object) -> object:
    return v.value if isinstance(v, Enum) else v


@contextlib.contextmanager
def _one_process_group() -> Iterator[None]:
    """CheckpointManager needs a process group: a 1-process gloo one unless one exists."""
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("tools/upcycle.py runs in one process")
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def write_checkpoint(cfg: Config, src: DenseSource, out: Path, vocab: int,
                     progress: bool = True) -> Path:
    """Upcycle ``src`` into ``cfg``'s model and save it through CheckpointManager (atomic,
    committed) as step 0 of ``out``: the model, a fresh AdamW state (zero moments, step 0)
    or the reused dense one (``init.reuse_optimizer``), progress 0, and the config.yaml."""
    from moetrain.checkpoint import CheckpointManager, ModelOptimizerState, step_dir_name
    from moetrain.checkpoint.load import CONFIG_FILE, config_to_yaml
    from moetrain.models import Transformer
    from moetrain.train.optim import build_optimizer
    from moetrain.train.trainer import Progress

    state = build_upcycled(cfg.init, cfg.model, cfg.moe, vocab, progress=progress,
                           field_name="--dense", source=src)
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model, cfg.moe, vocab)
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    with _one_process_group():
        load_into(model, optimizer, state)
        files = {CONFIG_FILE: config_to_yaml(cfg)}
        mgr = CheckpointManager(CheckpointConfig(dir=str(out), keep=0, resume="none"),
                                files=files)
        mgr.save(0, {"model_optim": ModelOptimizerState(model, optimizer),
                     "progress": Progress()}, blocking=True)
        mgr.close()
    return out / step_dir_name(0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the target, e.g. model=small")
    ap.add_argument("--dense", required=True, help="dense moetrain checkpoint or HF directory")
    ap.add_argument("--out", required=True, help="checkpoint directory to write (step_0000000)")
    ap.add_argument("--experts", type=int, help="model.num_experts")
    ap.add_argument("--top-k", type=int, help="model.top_k")
    ap.add_argument("--drop-ratio", type=float, help="init.drop_ratio (Drop-Upcycling r)")
    ap.add_argument("--drop-mode", choices=("per_expert", "per_matrix"), help="init.drop_mode")
    ap.add_argument("--seed", type=int, help="init.seed (router init and dropped channels)")
    ap.add_argument("--reuse-optimizer", action="store_true",
                    help="carry the dense checkpoint's AdamW state over (init.reuse_optimizer)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    out = Path(args.out).expanduser()
    try:
        existing = _committed_in(out)  # the cheap checks first: nothing loaded yet
        if existing:
            raise UpcycleError(f"--out={str(out)!r} already holds checkpoints "
                               f"({existing[-1].name}): pick a new directory or delete them")
        src = inspect_dense(args.dense, "--dense")
        flags = {"model.num_experts": args.experts, "model.top_k": args.top_k,
                 "init.drop_ratio": args.drop_ratio, "init.drop_mode": args.drop_mode,
                 "init.seed": args.seed}
        model_args = dense_overrides(src) + list(args.overrides) + [
            f"{k}={v}" for k, v in flags.items() if v is not None]
        if args.reuse_optimizer:
            model_args.append("init.reuse_optimizer=true")
        # The layout is the training run's business (DCP reshards the step-0 checkpoint):
        # this one-process conversion validates everything else.
        cfg = compose_config([a for a in model_args if not a.startswith("parallel.")]
                             + [f"init.from_dense={src.path}"])
        validate(cfg, 1)
        vocab = cfg.model.vocab_size or src.vocab_size
        issue = exactness_issue(cfg.model, cfg.moe)
        if issue:
            log.warning("%s, so the upcycled MoE will not reproduce the dense model exactly "
                        "(docs/upcycling.md)", issue)
        path = write_checkpoint(cfg, src, out, vocab, progress=not args.no_progress)
    except ConfigError as e:  # UpcycleError included: nothing was written
        print(f"upcycle: {e}", file=sys.stderr)
        return 2
    train_args = [a for a in model_args if not a.startswith("init.")]
    (out / "upcycle.json").write_text(json.dumps({
        "dense": str(src.path), "kind": src.kind, "checkpoint": str(path),
        "init": {k: _json(getattr(cfg.init, k)) for k in
                 ("drop_ratio", "drop_mode", "seed", "router_std", "router_init",
                  "reuse_optimizer")},
        "train_overrides": train_args}, indent=2, default=str) + "\n")
    print(f"upcycled {src.path} ({src.kind}) -> {path}\n"
          f"train it with (its checkpoints go beside step 0, so a restart resumes the "
          f"latest):\n  moetrain-train {' '.join(train_args)} checkpoint.dir={out} "
          f"checkpoint.resume=auto")
    return 0


if __name__ == "__main__":
    sys.exit(main())
