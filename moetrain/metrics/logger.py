"""``<run.dir>/metrics.jsonl`` and TensorBoard scalars/images, written by rank 0.

metrics.jsonl is the machine-readable twin of the TensorBoard scalars: one JSON object per
logged optimizer step (``step`` plus the flat metric names the trainer passes, e.g. ``loss``,
``aux_loss``, ``lr``, ``grad_norm``, ``tokens``, ``tokens_per_s``) and one per validation
(``step``, ``val_loss``, ``val_ppl``). Every line is flushed, so a crash loses nothing that was
logged. Per-expert loads stay out of the jsonl (``E * L`` numbers per step would dwarf the rest):
they go to TensorBoard as a heatmap image plus per-layer max/min scalars; a one-number summary
(:func:`moetrain.metrics.heatmap.load_imbalance`) can be passed to ``log_step`` instead.
Non-finite values are written as ``NaN``/``Infinity`` (Python's json reads them back).

The first line is the run's resolved training recipe, ``{"recipe": {...}}``
(:func:`moetrain.config.recipes.recipe_record`: router, balance loss and coefficients,
z-loss, the router's own settings); it has no ``step``. :func:`read_metrics` skips it and
:func:`read_recipe` returns it. A resumed run rewrites it in place, so it stays first.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moetrain.config import LoggingConfig
from moetrain.metrics.heatmap import as_float64, load_heatmap_CHW

__all__ = ["MetricsLogger", "read_metrics", "read_recipe", "tensorboard_tag"]

_MOE_PREFIXES = ("aux", "z_loss", "moe_", "router", "expert", "drop", "load", "capacity")
_PERF_KEYS = ("tokens", "mfu", "step_time", "flops")


def tensorboard_tag(key: str) -> str:
    """Group a flat metric name into a TensorBoard section: ``train/``, ``moe/`` or ``perf/``.

    A key that already contains ``/`` is used as the tag unchanged.
    """
    if "/" in key:
        return key
    if key.startswith(_MOE_PREFIXES):
        return f"moe/{key}"
    if key.startswith(_PERF_KEYS) or key.endswith("_per_s"):
        return f"perf/{key}"
    return f"train/{key}"


def _scalar(v: Any) -> float | int | bool | None:
    if isinstance(v, torch.Tensor):
        v = v.detach().item()
    elif isinstance(v, np.generic):
        v = v.item()
    if v is None or isinstance(v, (bool, int, float)):
        return v
    raise TypeError(f"metric value {v!r} of type {type(v).__name__} is not a scalar")


def _records(path: str | Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _is_recipe(record: Mapping[str, Any]) -> bool:
    return "recipe" in record and "step" not in record


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Parse a metrics.jsonl: its step, validation and event rows. Blank and undecodable
    lines (a torn last line) and the recipe line are skipped (:func:`read_recipe`)."""
    return [r for r in _records(path) if not _is_recipe(r)]


def read_recipe(path: str | Path) -> dict[str, Any] | None:
    """The training recipe a metrics.jsonl starts with; None for files written before
    the recipe line existed."""
    return next((r["recipe"] for r in _records(path) if _is_recipe(r)), None)


class MetricsLogger:
    """Rank 0's writer for metrics.jsonl and TensorBoard; every method is a no-op elsewhere.

    Files open lazily on the first write, so a resumed run can call :meth:`truncate_after`
    first: it drops lines past the resumed step and makes TensorBoard purge events past it.
    """

    def __init__(self, run_dir: str | Path, cfg: LoggingConfig, enabled: bool) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.enabled = enabled
        self.path = self.run_dir / "metrics.jsonl"
        self.tb_dir = self.run_dir / "tensorboard"
        self._file: Any = None
        self._writer: Any = None
        self._purge_step: int | None = None
        self._recipe: dict[str, Any] | None = None

    def set_recipe(self, recipe: Mapping[str, Any]) -> None:
        """The training recipe to write as the first line, ``{"recipe": recipe}``, when
        the file is first written (a run that takes no step writes no file)."""
        self._recipe = dict(recipe)

    # ------------------------------------------------------------------ sinks
    def _jsonl(self):
        if self._file is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self._recipe is not None:
                self._put_recipe_first()
            self._file = open(self.path, "a")  # noqa: SIM115 - kept open across steps
        return self._file

    def _put_recipe_first(self) -> None:
        """Start the file with the recipe line; an earlier run's recipe line (a resume)
        is replaced, every other line kept in order (atomic rewrite)."""
        head = json.dumps({"recipe": self._recipe}) + "\n"
        lines: list[str] = []
        if self.path.exists():
            with open(self.path) as f:
                for line in f:
                    try:
                        if _is_recipe(json.loads(line)):
                            continue
                    except json.JSONDecodeError:
                        pass
                    lines.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(head)
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _tb(self):
        if not self.cfg.tensorboard:
            return None
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.tb_dir), purge_step=self._purge_step)
        return self._writer

    def _write_line(self, record: Mapping[str, Any]) -> None:
        f = self._jsonl()
        f.write(json.dumps(record) + "\n")
        f.flush()

    # ------------------------------------------------------------------ logging
    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One jsonl line ``{"step": step, **metrics}`` and one TensorBoard scalar per metric.

        Values may be python numbers, numpy scalars or 0-d tensors; None is kept in the jsonl
        (e.g. MFU on CPU) and skipped in TensorBoard.
        """
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": int(step)}
        record.update({k: _scalar(v) for k, v in metrics.items()})
        self._write_line(record)
        tb = self._tb()
        if tb is not None:
            for k, v in record.items():
                if k != "step" and v is not None:
                    tb.add_scalar(tensorboard_tag(k), float(v), step)

    def log_event(self, step: int, record: Mapping[str, Any]) -> None:
        """One jsonl line ``{"step": step, **record}`` for an event (e.g. an expert
        collapse); events carry an ``event`` key and no ``loss``."""
        if not self.enabled:
            return
        self._write_line({"step": int(step), **record})

    def log_val(self, step: int, val_loss: float) -> None:
        """``{"step", "val_loss", "val_ppl"}`` line plus ``val/loss`` and ``val/ppl`` scalars."""
        if not self.enabled:
            return
        loss = float(_scalar(val_loss))
        ppl = math.exp(loss) if loss < 700 else math.inf
        self._write_line({"step": int(step), "val_loss": loss, "val_ppl": ppl})
        tb = self._tb()
        if tb is not None:
            tb.add_scalar("val/loss", loss, step)
            tb.add_scalar("val/ppl", ppl, step)

    def log_expert_loads(self, step: int, load_LE: torch.Tensor) -> None:
        """Per-expert load fractions as TensorBoard scalars ``moe/load/layer{l}/expert{e}``
        (kept out of metrics.jsonl; see the module docstring)."""
        if not self.enabled:
            return
        tb = self._tb()
        if tb is None:
            return
        for layer, row in enumerate(load_LE.detach().float().cpu().tolist()):
            for expert, frac in enumerate(row):
                tb.add_scalar(f"moe/load/layer{layer}/expert{expert}", frac, step)

    def heatmap_due(self, step: int) -> bool:
        """True when ``logging.heatmap_every`` asks for a heatmap at ``step``."""
        every = self.cfg.heatmap_every
        return self.enabled and self.cfg.tensorboard and every > 0 and step % every == 0

    def log_heatmap(self, step: int, load_LE: torch.Tensor | np.ndarray) -> None:
        """Expert-load heatmap image (rows MoE layers, columns experts, values load fractions)
        plus per-layer ``moe/load_max/layer{l}`` and ``moe/load_min/layer{l}`` scalars, both
        relative to the balanced share (1.0 = even)."""
        if not self.enabled:
            return
        tb = self._tb()
        if tb is None:
            return
        load_LE = as_float64(load_LE)
        # Cells sized so the longer side is ~768 px (8 to 48 px a cell): legible in TensorBoard.
        cell = max(8, min(48, 768 // max(load_LE.shape)))
        tb.add_image("moe/expert_load", load_heatmap_CHW(load_LE, cell=cell), step,
                     dataformats="CHW")
        rel_LE = load_LE * load_LE.shape[1]
        for layer in range(rel_LE.shape[0]):
            tb.add_scalar(f"moe/load_max/layer{layer}", float(rel_LE[layer].max()), step)
            tb.add_scalar(f"moe/load_min/layer{layer}", float(rel_LE[layer].min()), step)

    # ------------------------------------------------------------------ resume / teardown
    def truncate_after(self, step: int) -> int:
        """Keep only metrics.jsonl lines with ``step <= step`` (atomic rewrite); returns how
        many lines were dropped. TensorBoard opened after this call purges events past
        ``step``, so a resumed run has no duplicate steps in either sink."""
        if not self.enabled:
            return 0
        self._purge_step = step + 1
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self.path.exists():
            return 0
        kept: list[str] = []
        dropped = 0
        with open(self.path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    dropped += 1  # torn line from a crash
                    continue
                if int(rec.get("step", -1)) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
                else:
                    dropped += 1
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return dropped

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
