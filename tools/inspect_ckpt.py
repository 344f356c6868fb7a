"""Inspect a moetrain checkpoint, or diff two, without a process group or a GPU.

    python tools/inspect_ckpt.py outputs/run/checkpoints/step_0000300
    python tools/inspect_ckpt.py outputs/run --json
    python tools/inspect_ckpt.py --diff outputs/run/checkpoints/step_0000100 outputs/run

CKPT_DIR is a committed step_N directory, a checkpoints directory or a run.dir (the
latest step). The report gives the step, the training tokens seen, the layout and world
size that saved it, every saved key with its shape, dtype and size, the totals, and the
manifest status: every file checked against MANIFEST.json (sizes and CRC32s; --quick:
sizes only) and against the byte ranges of the DCP metadata.

--diff A B lists the keys only in one checkpoint, the shape / dtype changes and, for the
tensors in both, the max absolute difference (tensors are read a group at a time, at
most --budget-mb MiB per checkpoint); non-tensor entries are compared by their bytes.

Exit status: 0 fine, 2 a missing, uncommitted or corrupt checkpoint (the message names
the path), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

try:
    import moetrain  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from moetrain.checkpoint.load import CONFIG_FILE, CheckpointNotFoundError, resolve_checkpoint
from moetrain.checkpoint.manager import (
    MARKER,
    CheckpointManager,
    check_checkpoint,
)

__all__ = ["diff", "inspect", "main"]

_LAYOUT_KEYS = ("dp", "ep", "tp", "pp", "dp_mode", "expert_tp")


class InspectError(Exception):
    """A checkpoint that cannot be inspected (missing, uncommitted, corrupt): exit 2."""


def _resolve(path: str | Path) -> Path:
    try:
        return resolve_checkpoint(path)
    except CheckpointNotFoundError as e:
        raise InspectError(str(e)) from None


def _metadata(ckpt: Path):
    try:
        return dcp.FileSystemReader(str(ckpt)).read_metadata()
    except Exception as e:  # noqa: BLE001 - reported as corruption, naming the file
        raise InspectError(f"checkpoint {ckpt} is corrupt: {ckpt / '.metadata'} is unreadable "
                           f"({type(e).__name__}: {e})") from None


def _bytes_ranges(meta) -> dict[str, list[tuple[str, int, int]]]:
    """Non-tensor key -> [(relative_path, offset, length)] from the DCP storage index."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    for idx, info in (meta.storage_data or {}).items():
        rel, off, n = (getattr(info, a, None) for a in ("relative_path", "offset", "length"))
        if isinstance(rel, str) and isinstance(off, int) and isinstance(n, int):
            out.setdefault(idx.fqn, []).append((rel, off, n))
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _keys(meta) -> dict[str, dict[str, Any]]:
    """Every saved key: kind, shape, dtype, bytes (tensors: numel * element size)."""
    ranges = _bytes_ranges(meta)
    keys: dict[str, dict[str, Any]] = {}
    for k, v in sorted(meta.state_dict_metadata.items()):
        if isinstance(v, TensorStorageMetadata):
            dtype = v.properties.dtype
            numel = 1
            for d in v.size:
                numel *= d
            keys[k] = {"kind": "tensor", "shape": list(v.size), "dtype": _dtype_name(dtype),
                       "numel": numel,
                       "bytes": numel * torch.empty((), dtype=dtype).element_size()}
        elif isinstance(v, BytesStorageMetadata):
            keys[k] = {"kind": "bytes", "shape": None, "dtype": None, "numel": None,
                       "bytes": sum(n for _, _, n in ranges.get(k, []))}
        else:
            keys[k] = {"kind": type(v).__name__, "shape": None, "dtype": None, "numel": None,
                       "bytes": 0}
    return keys


def _load_values(ckpt: Path, wanted: dict[str, Any]) -> dict[str, Any]:
    """Load ``wanted`` (flat FQN -> placeholder) from ``ckpt`` in this process."""
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.filterwarnings("ignore", category=UserWarning)
        dcp.load(wanted, checkpoint_id=str(ckpt), no_dist=True)
    return wanted


def _progress(ckpt: Path, keys: dict[str, dict]) -> dict[str, int | None]:
    want = {k: 0 for k in ("progress.step", "progress.tokens") if k in keys}
    if not want:
        return {"step": None, "tokens": None}
    try:
        got = _load_values(ckpt, {"progress": {k.split(".", 1)[1]: 0 for k in want}})
    except Exception as e:  # noqa: BLE001 - a damaged shard: say so, naming the checkpoint
        raise InspectError(f"checkpoint {ckpt} is corrupt: its progress entry could not be "
                           f"read ({type(e).__name__}: {e})") from None
    return {"step": got["progress"].get("step"), "tokens": got["progress"].get("tokens")}


def _layout(ckpt: Path) -> dict[str, Any]:
    cfg = ckpt / CONFIG_FILE
    if not cfg.is_file():
        return {}
    try:
        from omegaconf import OmegaConf

        par = OmegaConf.to_container(OmegaConf.load(cfg)).get("parallel") or {}
    except Exception:  # noqa: BLE001 - the layout is informational
        return {}
    return {k: par[k] for k in _LAYOUT_KEYS if k in par}


def inspect(path: str | Path, *, full: bool = True) -> dict[str, Any]:
    """The report of checkpoint ``path`` (see the module docstring) as a dict."""
    ckpt = _resolve(path)
    has_manifest, problems = check_checkpoint(ckpt, full=full)
    try:
        marker = json.loads((ckpt / MARKER).read_text() or "{}")
    except (OSError, ValueError):
        marker = {}
        problems.append(f"{ckpt / MARKER} is unreadable")
    status = "corrupt" if problems else ("ok" if has_manifest else "no manifest")
    meta = None if any(".metadata" in q for q in problems) else _metadata(ckpt)
    keys = _keys(meta) if meta is not None else {}
    progress = {"step": None, "tokens": None}
    if meta is not None:
        try:
            progress = _progress(ckpt, keys)
        except InspectError as e:
            problems.append(str(e))
            status = "corrupt"
    tensors = [v for v in keys.values() if v["kind"] == "tensor"]
    return {
        "path": str(ckpt),
        "step": CheckpointManager.step_of(ckpt),
        "progress": progress,
        "world_size": marker.get("world_size"),
        "saved_utc": marker.get("time_utc"),
        "commit_seq": marker.get("seq"),  # recency within its directory (resume=auto)
        "layout": _layout(ckpt),
        "keys": keys,
        "totals": {"keys": len(keys), "tensors": len(tensors),
                   "numel": sum(v["numel"] for v in tensors),
                   "tensor_bytes": sum(v["bytes"] for v in tensors),
                   "bytes": sum(v["bytes"] for v in keys.values()),
                   "files_bytes": sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())},
        "manifest": {"status": status, "check": "size+crc32" if full else "size",
                     "problems": problems},
    }


def _read_raw(ckpt: Path, ranges: list[tuple[str, int, int]]) -> bytes:
    out = b""
    for rel, off, n in ranges:
        with open(ckpt / rel, "rb") as f:
            f.seek(off)
            out += f.read(n)
    return out


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    if a.is_complex():
        return float((a - b).abs().max())
    return float((a.double() - b.double()).abs().max())


def diff(path_a: str | Path, path_b: str | Path, *,
         budget_bytes: int = 256 << 20) -> dict[str, Any]:
    """Compare two checkpoints key by key; tensors are loaded in groups of at most
    ``budget_bytes`` per checkpoint, so memory stays about twice that."""
    a, b = _resolve(path_a), _resolve(path_b)
    meta_a, meta_b = _metadata(a), _metadata(b)
    ka, kb = _keys(meta_a), _keys(meta_b)
    common = sorted(set(ka) & set(kb))
    changed = {k: {"a": {"shape": ka[k]["shape"], "dtype": ka[k]["dtype"], "kind": ka[k]["kind"]},
                   "b": {"shape": kb[k]["shape"], "dtype": kb[k]["dtype"], "kind": kb[k]["kind"]}}
               for k in common
               if (ka[k]["kind"], ka[k]["shape"], ka[k]["dtype"])
               != (kb[k]["kind"], kb[k]["shape"], kb[k]["dtype"])}
    same = [k for k in common if k not in changed]
    tensor_keys = [k for k in same if ka[k]["kind"] == "tensor"]
    max_diff: dict[str, float] = {}
    groups: list[list[str]] = []
    size = 0
    for k in tensor_keys:
        if not groups or (size + ka[k]["bytes"] > budget_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += ka[k]["bytes"]
    for group in groups:
        def placeholders(group: list[str] = group) -> dict[str, torch.Tensor]:
            md = meta_a.state_dict_metadata
            return {k: torch.empty(tuple(md[k].size), dtype=md[k].properties.dtype)
                    for k in group}
        try:
            ta = _load_values(a, placeholders())
        except Exception as e:  # noqa: BLE001
            raise InspectError(f"checkpoint {a} could not be read ({type(e).__name__}: {e})"
                               ) from None
        try:
            tb = _load_values(b, placeholders())
        except Exception as e:  # noqa: BLE001
            raise InspectError(f"checkpoint {b} could not be read ({type(e).__name__}: {e})"
                               ) from None
        for k in group:
            max_diff[k] = _max_abs_diff(ta[k], tb[k])
        del ta, tb
    ra, rb = _bytes_ranges(meta_a), _bytes_ranges(meta_b)
    bytes_equal = {k: _read_raw(a, ra.get(k, [])) == _read_raw(b, rb.get(k, []))
                   for k in same if ka[k]["kind"] == "bytes"}
    return {
        "a": str(a), "b": str(b),
        "step_a": CheckpointManager.step_of(a), "step_b": CheckpointManager.step_of(b),
        "only_in_a": sorted(set(ka) - set(kb)),
        "only_in_b": sorted(set(kb) - set(ka)),
        "changed": changed,
        "max_abs_diff": max_diff,
        "bytes_equal": bytes_equal,
        "summary": {"common": len(common), "tensors_compared": len(max_diff),
                    "tensors_differing": sum(1 for v in max_diff.values() if v != 0),
                    "max_abs_diff": max(max_diff.values(), default=0.0),
                    "bytes_entries_differing": sum(1 for v in bytes_equal.values() if not v)},
    }


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB" if n >= 1 << 20 else f"{n:,} B"


def _print_report(r: dict[str, Any]) -> None:
    prog = r["progress"]
    lay = ", ".join(f"{k}={v}" for k, v in r["layout"].items()) or "unknown (no config.yaml)"
    print(f"checkpoint   {r['path']}")
    print(f"step         {r['step']}" + (f" (progress.step={prog['step']})"
                                         if prog["step"] not in (None, r["step"]) else ""))
    print(f"tokens seen  {prog['tokens']:,}" if prog["tokens"] is not None
          else "tokens seen  unknown")
    print(f"saved        {r['saved_utc'] or '?'} by world size {r['world_size']}"
          + (f", commit #{r['commit_seq']} of its directory" if r.get("commit_seq") else ""))
    print(f"layout       {lay}")
    width = max((len(k) for k in r["keys"]), default=3)
    print()
    print(f"{'key':<{width}}  {'shape':<16} {'dtype':<9} {'size':>12}")
    for k, v in r["keys"].items():
        shape = "x".join(map(str, v["shape"])) if v["shape"] is not None else "-"
        shape = shape or "scalar"
        print(f"{k:<{width}}  {shape:<16} {v['dtype'] or v['kind']:<9} {_mib(v['bytes']):>12}")
    t = r["totals"]
    print()
    print(f"totals       {t['keys']} keys, {t['tensors']} tensors, {t['numel']:,} elements, "
          f"{_mib(t['tensor_bytes'])} of tensors; {_mib(t['files_bytes'])} on disk")
    m = r["manifest"]
    print(f"manifest     {m['status'].upper()} ({m['check']})")
    for q in m["problems"]:
        print(f"  - {q}")


def _print_diff(d: dict[str, Any]) -> None:
    print(f"A  {d['a']} (step {d['step_a']})")
    print(f"B  {d['b']} (step {d['step_b']})")
    for side in ("a", "b"):
        only = d[f"only_in_{side}"]
        print(f"only in {side.upper()}: {len(only)}")
        for k in only:
            print(f"  {k}")
    print(f"shape/dtype changes: {len(d['changed'])}")
    for k, v in d["changed"].items():
        print(f"  {k}: {v['a']['shape']} {v['a']['dtype']} -> {v['b']['shape']} {v['b']['dtype']}")
    width = max((len(k) for k in d["max_abs_diff"]), default=3)
    print("max |A - B| per tensor:")
    for k, v in d["max_abs_diff"].items():
        print(f"  {k:<{width}}  {v:.6g}")
    differing = [k for k, eq in d["bytes_equal"].items() if not eq]
    print(f"non-tensor entries differing: {len(differing)}")
    for k in differing:
        print(f"  {k}")
    s = d["summary"]
    print(f"summary: {s['common']} common keys, {s['tensors_differing']}/"
          f"{s['tensors_compared']} tensors differ, max |A - B| = {s['max_abs_diff']:.6g}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("ckpt", nargs="?", help="step_N dir, checkpoints dir or run.dir")
    p.add_argument("--diff", nargs=2, metavar=("A", "B"), help="compare two checkpoints")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--quick", action="store_true",
                   help="check file sizes only against the manifest (no CRC32)")
    p.add_argument("--budget-mb", type=int, default=256,
                   help="--diff: MiB of tensors loaded at a time per checkpoint")
    args = p.parse_args(argv)
    if (args.ckpt is None) == (args.diff is None):
        p.error("pass either CKPT_DIR or --diff A B")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.diff:
            out = diff(*args.diff, budget_bytes=max(1, args.budget_mb) << 20)
            print(json.dumps(out, indent=1)) if args.json else _print_diff(out)
            return 0
        out = inspect(args.ckpt, full=not args.quick)
        print(json.dumps(out, indent=1)) if args.json else _print_report(out)
        if out["manifest"]["status"] == "corrupt":
            print(f"error: checkpoint {out['path']} is corrupt (see the manifest problems)",
                  file=sys.stderr)
            return 2
        return 0
    except InspectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
