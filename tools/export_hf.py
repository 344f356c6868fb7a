"""Export a moetrain checkpoint (any layout) as a Hugging Face model directory.

    python tools/export_hf.py outputs/run/checkpoints/step_0000300 --out hf/my-moe
    python tools/export_hf.py outputs/run --out hf/my-moe --target glm4_moe --dtype bfloat16

CKPT_DIR is a committed step_N directory, a checkpoints directory or a run.dir (the
latest step). The result loads with ``AutoModelForCausalLM.from_pretrained(HF_DIR)`` and
gives moetrain's eval-mode logits. Targets (``--target``, default auto):

  mixtral       softmax top-k, renormalised weights, every layer MoE
  qwen2_moe     softmax top-k with or without renormalisation, dense layers anywhere
  glm4_moe      sigmoid / DeepSeek-V3 routing: expert bias, groups, shared experts
  ernie4_5_moe  softmax top-k renormalised, with shared experts or an expert bias
  llama, qwen2  dense models
  jamba         Mamba or hybrid models (model.mixer), attention without RoPE, Jamba's
                inner norms, softmax top-k not renormalised (docs/mamba.md)

A model no target can hold exactly is refused with the field that prevents it. See
docs/hf.md for what maps to what.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    from moetrain.checkpoint import hf
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from moetrain.checkpoint import hf

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("ckpt", metavar="CKPT_DIR",
                   help="committed step_N directory, checkpoints directory or run.dir")
    p.add_argument("--out", required=True, metavar="HF_DIR", help="output directory")
    p.add_argument("--target", default="auto",
                   choices=[t.value for t in hf.Target],
                   help="Hugging Face architecture (default: the first that fits)")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES),
                   help="dtype of the written weights (router tensors stay float32)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors file, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--config", metavar="YAML",
                   help="the run's config, for checkpoints without config.yaml")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty HF_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from moetrain.checkpoint.load import CheckpointNotFoundError, config_from_file
    from moetrain.config import ConfigError

    try:
        config = config_from_file(args.config) if args.config else None
        target = hf.export_hf(args.ckpt, args.out, args.target,
                              dtype=getattr(torch, _DTYPES[args.dtype]),
                              max_shard_size=args.max_shard_size, config=config,
                              overwrite=args.overwrite, progress=not args.no_progress)
    except (hf.HFConversionError, ConfigError, CheckpointNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.ckpt} -> {args.out} ({target.value})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
