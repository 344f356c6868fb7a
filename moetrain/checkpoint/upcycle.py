"""Dense -> MoE: sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055) and
Drop-Upcycling (Nakamura et al. 2025, arXiv 2502.19261). User docs: docs/upcycling.md.

Legend: D model dim, F hidden size of the dense FFN (= model.expert_hidden), E experts.

Every routed expert of MoE layer i starts as a copy of layer i's dense SwiGLU FFN
(``w1_EFD[e] = w1``, ``w3_EFD[e] = w3``, ``w2_EDF[e] = w2``); attention, norms, embeddings,
the output and the layers that stay dense are copied. Choices (docs/upcycling.md):

- **Router**: fresh, zero-mean with std ``init.router_std``, from a generator seeded by
  (init.seed, layer): N(0, std^2), or with Drop-Upcycling (``init.router_init=auto`` and
  r > 0, or ``uniform``) U(-a, a) with a = std * sqrt(3), the released recipe's
  ``torch_rand_002``. ``expert_bias`` 0; a noisy router's noise projection 0 (as a fresh
  one). Sparse upcycling initialises it randomly with zero mean.
- **Exactness**: with identical experts the MoE output is ``sum_k w_k * FFN(x)``, which is
  ``FFN(x)`` when the combine weights sum to 1: renormalised top-k (softmax or sigmoid,
  k >= 2, route_scale 1), or noisy top-k. :func:`exactness_issue` names the configs where
  they do not (Switch, raw-probability routers, capacity drops); they train, not exactly.
- **Shared experts** (model.n_shared_experts = s > 0): the shared FFN (hidden s*F) holds s
  copies of the dense FFN with w2 scaled by 1/(2s), and each routed expert's w2 is scaled
  by 1/2, so shared + routed = FFN(x) exactly and every path gets gradients.
- **Drop-Upcycling** (``init.drop_ratio`` r > 0): in each routed expert, n = floor(r*F)
  intermediate channels (rows of w1 and w3, columns of w2) are re-drawn from N(mu, sigma),
  the mean and std of the weights they replace, per matrix. ``init.drop_mode``:
  ``per_expert`` (default) draws one channel set per expert for the three matrices (the
  paper's dropped neurons); ``per_matrix`` one per matrix (the released code). The released
  code also permutes the channels first; a permutation only relabels channels of a SwiGLU,
  and a uniformly drawn set has the same law, so the kept channels stay in place here
  (bit-identical to the dense weights). Draws come from a generator seeded by
  (init.seed, layer, expert): reproducible, and independent of the layout.
- **Optimizer** (``init.reuse_optimizer``): the dense checkpoint's AdamW moments follow the
  weights (copied per expert, zero at dropped channels); the router's are zero with step
  0 (a fresh Adam state); everything else is carried over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import struct
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from moetrain.checkpoint.manager import MARKER, _committed_in, is_committed
from moetrain.checkpoint.state import ModelOptimizerState
from moetrain.config.schema import (
    ConfigError,
    DispatchMode,
    DropMode,
    InitConfig,
    ModelConfig,
    MoEConfig,
    RouterInit,
    RouterType,
)
from moetrain.models import Transformer

__all__ = [
    "DenseSource", "UpcycleError", "UpcycledState", "build_upcycled", "drop_upcycle",
    "exactness_issue", "inspect_dense", "load_into", "num_dropped", "router_law",
    "upcycle_into", "upcycle_state_dict",
]

log = logging.getLogger(__name__)

HF_ARCHITECTURES = ("llama", "qwen2", "mistral")  # config.json model_type (hf.load_hf_dense)
_MODEL = "model_optim.model."  # ModelOptimizerState's entries as DCP flattens them
_OPTIM = "model_optim.optim.state."
_MOMENTS = ("exp_avg", "exp_avg_sq")
_CONFIG_FILE = "config.yaml"  # the run's config, written by the trainer into each checkpoint
_STEP_DIR = re.compile(r"^step_\d+$")
_DENSE_KEY = re.compile(r"^(tok_embeddings\.weight|output\.weight|norm\.weight|"
                        r"layers\.(\d+)\.(attention_norm\.weight|ffn_norm\.weight|attention\..+|"
                        r"feed_forward\.w[123]\.weight))$")
_EXPERT_KEY = re.compile(r"^layers\.(\d+)\.moe\.experts\.(w1_EFD|w3_EFD|w2_EDF)$")
_SHARED_KEY = re.compile(r"^layers\.(\d+)\.moe\.shared_experts\.(w[123])\.weight$")
# round 0's router, or a later Chain-of-Experts round's (moe.chain_routers.{t - 1})
_ROUTER_KEY = re.compile(r"^layers\.(\d+)\.moe\.(?:router|chain_routers\.(\d+))\.(.+)$")
_ROUTER_RNN_KEY = re.compile(r"^router_rnn\.(.+)$")  # RMoE's shared cell
_EXPERT_TO_DENSE = {"w1_EFD": "w1", "w3_EFD": "w3", "w2_EDF": "w2"}
# Architecture fields a dense config fixes (compared when the dense config is known).
_ARCH_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "rope_theta", "norm_eps",
                "tie_embeddings", "qkv_bias")


class UpcycleError(ConfigError):
    """The dense source or the target config cannot be upcycled; the message says why."""


# ----------------------------------------------------------------------------- the source
@dataclass
class DenseSource:
    """A checked dense model on disk: a moetrain checkpoint or a Hugging Face directory.

    ``shapes``: moetrain key -> shape of every dense tensor. ``config``: the dense model
    config when known (a checkpoint's config.yaml, or the HF config.json), else None.
    """

    path: Path
    kind: str  # "moetrain" | "hf"
    shapes: dict[str, tuple[int, ...]]
    config: ModelConfig | None
    has_optimizer: bool
    _hf_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def n_layers(self) -> int:
        return 1 + max((int(m.group(2)) for k in self.shapes
                        if (m := _DENSE_KEY.match(k)) and m.group(2) is not None), default=-1)

    @property
    def dim(self) -> int:
        return self.shapes["norm.weight"][0]

    @property
    def vocab_size(self) -> int:
        key = "tok_embeddings.weight" if "tok_embeddings.weight" in self.shapes else "output.weight"
        return self.shapes[key][0]

    @property
    def ffn_hidden(self) -> int:
        return self.shapes["layers.0.feed_forward.w1.weight"][0]

    def load(self, keys: Iterable[str], optimizer: bool = False
             ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """The dense tensors ``keys`` (and their AdamW state if ``optimizer``), whole."""
        keys = sorted(set(keys))
        if self.kind == "hf":
            return {k: self._hf_state[k] for k in keys}, {}
        meta = _read_metadata(self.path).state_dict_metadata
        want = {_MODEL + k: k for k in keys}
        if optimizer:
            for k in keys:
                for name in (*_MOMENTS, "step"):
                    if f"{_OPTIM}{k}.{name}" in meta:
                        want[f"{_OPTIM}{k}.{name}"] = (k, name)
        template = {full: torch.empty(meta[full].size, dtype=meta[full].properties.dtype)
                    for full in want}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(template, checkpoint_id=str(self.path), no_dist=True)
        weights: dict[str, torch.Tensor] = {}
        optim: dict[str, dict[str, torch.Tensor]] = {}
        for full, t in template.items():
            name = want[full]
            if isinstance(name, tuple):
                optim.setdefault(name[0], {})[name[1]] = t
            else:
                weights[name] = t
        return weights, optim


def _fail(field_name: str, value: object, why: str, fix: str) -> UpcycleError:
    return UpcycleError(f"{field_name}={str(value)!r} {why}: {fix}")


def _read_metadata(path: Path):
    try:
        return dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise UpcycleError(f"{path}: cannot read its DCP metadata (.metadata): the checkpoint "
                           f"is corrupt ({type(e).__name__}: {e}); point at another "
                           f"checkpoint") from e


def inspect_dense(path: str | Path, field_name: str = "init.from_dense") -> DenseSource:
    """Check a dense model on disk without reading its weights (HF: see below); raises
    :class:`UpcycleError` naming the problem: a missing path, an unfinished or corrupt
    checkpoint (no marker, unreadable metadata, missing or truncated files), an unknown
    architecture or a model that is not dense.

    ``path``: a committed ``step_N`` directory, a directory of them or a run.dir (the latest
    step), or a Hugging Face Llama/Qwen2/Mistral directory (config.json + *.safetensors).
    A Hugging Face model is loaded here (``moetrain.checkpoint.hf.load_hf_dense``) after
    its files are checked; a moetrain checkpoint is read later, by :meth:`DenseSource.load`.
    """
    p = Path(str(path)).expanduser()
    fix = ("point it at a committed dense moetrain checkpoint (a step_N directory with "
           f"{MARKER}, or a run/checkpoints directory holding one) or at a Hugging Face "
           f"{'/'.join(HF_ARCHITECTURES)} directory (config.json + *.safetensors)")
    if not str(path):
        raise _fail(field_name, path, "is empty", fix)
    if not p.exists():
        raise _fail(field_name, path, "does not exist", fix)
    if not p.is_dir():
        raise _fail(field_name, path, "is a file, not a directory", fix)
    if (p / "config.json").is_file():
        return _inspect_hf(p, field_name)
    if ".tmp-" in p.name:
        raise _fail(field_name, path, "is an unfinished save (temporary name)", fix)
    if _STEP_DIR.match(p.name) and not is_committed(p):
        raise _fail(field_name, path, f"has no {MARKER} marker (its save did not finish)", fix)
    if not is_committed(p):
        found = _committed_in(p) or _committed_in(p / "checkpoints")
        if not found:
            raise _fail(field_name, path, "holds no committed checkpoint and is not a Hugging "
                        "Face model directory", fix)
        p = found[-1]
    return _inspect_moetrain(p, field_name)


def _inspect_moetrain(p: Path, field_name: str) -> DenseSource:
    md = _read_metadata(p)
    sizes: dict[str, int] = {}
    for info in md.storage_data.values():  # every byte range the metadata points at
        end = info.offset + info.length
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), end)
    for rel, end in sorted(sizes.items()):
        f = p / rel
        if not f.is_file():
            raise _fail(field_name, p, f"is corrupt: its data file {rel} is missing",
                        "restore the file or use another checkpoint")
        if f.stat().st_size < end:
            raise _fail(field_name, p, f"is corrupt: {rel} is truncated ({f.stat().st_size} "
                        f"of {end} bytes)", "restore the file or use another checkpoint")
    meta = md.state_dict_metadata
    shapes = {k[len(_MODEL):]: tuple(v.size) for k, v in meta.items()
              if k.startswith(_MODEL) and hasattr(v, "size")}
    if not shapes:
        raise _fail(field_name, p, "holds no model weights (model_optim.model.*)",
                    "it is not a moetrain training checkpoint; point at one")
    _check_dense_keys(shapes, p, field_name)
    config = None
    if (p / _CONFIG_FILE).is_file():
        config = _read_model_config(p / _CONFIG_FILE, field_name)
    has_optim = any(k.startswith(_OPTIM) for k in meta)
    return DenseSource(p, "moetrain", shapes, config, has_optim)


def _check_dense_keys(shapes: dict[str, tuple[int, ...]], p: Path, field_name: str) -> None:
    moe = sorted(k for k in shapes if ".moe." in k)
    if moe:
        raise _fail(field_name, p, f"is already an MoE (it holds {moe[0]})",
                    "upcycle a dense model (model.first_dense_layers=model.n_layers)")
    unknown = sorted(k for k in shapes if not _DENSE_KEY.match(k))
    if unknown:
        raise _fail(field_name, p, f"has an unknown architecture (unexpected tensor "
                    f"{unknown[0]!r})", "upcycle a moetrain dense Transformer")
    n_layers = 1 + max(int(m.group(2)) for k in shapes
                       if (m := _DENSE_KEY.match(k)) and m.group(2) is not None)
    for i in range(n_layers):
        for w in ("w1", "w2", "w3"):
            if f"layers.{i}.feed_forward.{w}.weight" not in shapes:
                raise _fail(field_name, p, f"has an unknown architecture (layer {i} has no "
                            f"feed_forward.{w}.weight)", "upcycle a moetrain dense Transformer")
    hidden = {shapes[f"layers.{i}.feed_forward.w1.weight"][0] for i in range(n_layers)}
    if len(hidden) > 1 or "norm.weight" not in shapes:
        raise _fail(field_name, p, "has an unknown architecture (FFN sizes differ between "
                    "layers, or no final norm)", "upcycle a moetrain dense Transformer")


def _read_model_config(f: Path, field_name: str) -> ModelConfig:
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.load(f).model
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), node))
    except Exception as e:
        raise _fail(field_name, f.parent, f"has an unreadable {f.name} ({type(e).__name__}: "
                    f"{e})", "restore the file, or delete it to infer the dense model from "
                    "the weights' shapes") from e


def _inspect_hf(p: Path, field_name: str) -> DenseSource:
    fix = "point at a complete Hugging Face model directory"
    try:
        hf_cfg = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise _fail(field_name, p, f"has an unreadable config.json ({e})", fix) from e
    arch = str(hf_cfg.get("model_type", ""))
    if arch not in HF_ARCHITECTURES:
        raise _fail(field_name, p, f"is an unknown architecture (config.json model_type="
                    f"{arch!r})", f"upcycle one of {list(HF_ARCHITECTURES)}")
    files = sorted(p.glob("*.safetensors"))
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError) as e:
            raise _fail(field_name, p, f"has an unreadable {index.name} ({e})", fix) from e
        missing = sorted(n for n in names if not (p / n).is_file())
        if missing:
            raise _fail(field_name, p, f"is missing the weight file {missing[0]}", fix)
    if not files:
        raise _fail(field_name, p, "has no *.safetensors weights", fix)
    for f in files:
        _check_safetensors(f, field_name)
    try:
        from moetrain.checkpoint.hf import load_hf_dense
    except ImportError as e:
        raise UpcycleError(f"{field_name}={str(p)!r} is a Hugging Face directory but "
                           f"moetrain.checkpoint.hf is unavailable ({e})") from e
    try:
        config, state = load_hf_dense(p)
    except ValueError as e:  # hf.HFConversionError: names the file, field or tensor
        raise UpcycleError(f"{field_name}={str(p)!r} cannot be imported: {e}") from e
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    _check_dense_keys(shapes, p, field_name)
    return DenseSource(p, "hf", shapes, config, False, _hf_state=state)


def _check_safetensors(f: Path, field_name: str) -> None:
    """The header parses and the file holds every byte the header points at."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size:
                raise ValueError(f"header length {n} exceeds the file size")
            header = json.loads(fh.read(n))
        end = 8 + n + max((v["data_offsets"][1] for k, v in header.items()
                           if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise _fail(field_name, f.parent, f"has a corrupt {f.name} ({type(e).__name__}: {e})",
                    "re-save or re-download the model") from e
    if size < end:
        raise _fail(field_name, f.parent, f"has a truncated {f.name} ({size} of {end} bytes)",
                    "re-save or re-download the model")


# ----------------------------------------------------------------------------- checks
def _target_shapes(model_cfg: ModelConfig, moe_cfg: MoEConfig, vocab: int
                   ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of the target model's state dict (built on the meta device)."""
    with torch.device("meta"):
        model = Transformer(model_cfg, moe_cfg, vocab)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _dense_key(key: str) -> tuple[str | None, str]:
    """The dense key a target key is built from (None for the router) and its role."""
    if m := _EXPERT_KEY.match(key):
        return f"layers.{m.group(1)}.feed_forward.{_EXPERT_TO_DENSE[m.group(2)]}.weight", "expert"
    if m := _SHARED_KEY.match(key):
        return f"layers.{m.group(1)}.feed_forward.{m.group(2)}.weight", "shared"
    if _ROUTER_KEY.match(key) or _ROUTER_RNN_KEY.match(key):
        return None, "router"
    if ".moe." in key:
        raise UpcycleError(f"upcycling does not know how to initialise {key!r}")
    return key, "copy"


def refuse_ragged(model_cfg: ModelConfig, field_name: str = "init.from_dense") -> None:
    """HMoE's ragged experts have no upcycled meaning here: upcycling copies the dense MLP
    (hidden size model.expert_hidden) into every expert, and an expert of another size
    would have to cut or pad it, which no method we follow defines."""
    if model_cfg.expert_sizes is not None:
        raise UpcycleError(
            f"model.expert_sizes={list(model_cfg.expert_sizes)} with {field_name}: "
            f"upcycling copies the dense MLP into experts of its own hidden size "
            f"(model.expert_hidden); set model.expert_sizes=null to upcycle")


def check_compatible(src: DenseSource, model_cfg: ModelConfig, moe_cfg: MoEConfig, vocab: int,
                     field_name: str = "init.from_dense") -> None:
    """The target config can hold the dense model: errors name the model.* field and the
    value that matches the dense model."""
    where = f"the dense model ({field_name}={str(src.path)!r})"
    refuse_ragged(model_cfg, field_name)
    if not any(model_cfg.is_moe_layer(i) for i in range(model_cfg.n_layers)):
        raise UpcycleError(
            f"model.first_dense_layers={model_cfg.first_dense_layers} with model.n_layers="
            f"{model_cfg.n_layers} makes no MoE layer to upcycle: set "
            f"model.first_dense_layers below model.n_layers")
    checks = [("n_layers", model_cfg.n_layers, src.n_layers), ("dim", model_cfg.dim, src.dim),
              ("vocab_size", vocab, src.vocab_size)]
    if any(model_cfg.is_moe_layer(i) for i in range(model_cfg.n_layers)):
        checks.append(("expert_hidden", model_cfg.expert_hidden, src.ffn_hidden))
    if any(not model_cfg.is_moe_layer(i) for i in range(model_cfg.n_layers)):
        checks.append(("ffn_hidden", model_cfg.ffn_hidden, src.ffn_hidden))
    if src.config is not None:
        for name in _ARCH_FIELDS:
            if name == "n_kv_heads":
                ours, theirs = (model_cfg.n_kv_heads or model_cfg.n_heads,
                                src.config.n_kv_heads or src.config.n_heads)
            else:
                ours, theirs = getattr(model_cfg, name, None), getattr(src.config, name, None)
            checks.append((name, ours, theirs))
    for name, ours, theirs in checks:
        if ours != theirs:
            why = (" (every expert starts as a copy of the dense FFN)"
                   if name == "expert_hidden" else "")
            raise UpcycleError(f"model.{name}={ours} but {where} has {name}={theirs}{why}: "
                               f"set model.{name}={theirs}")
    for key, (shape, _) in _target_shapes(model_cfg, moe_cfg, vocab).items():
        dense, role = _dense_key(key)
        if dense is None:
            continue
        if dense not in src.shapes:
            raise UpcycleError(f"{where} has no {dense!r}, which {key!r} is built from: the "
                               f"target model config does not match it (model.qkv_bias, "
                               f"model.tie_embeddings?)")
        want = shape[1:] if role == "expert" else shape
        if role == "shared":
            n = model_cfg.n_shared_experts
            want = (shape[0] // n, shape[1]) if dense.endswith(("w1.weight", "w3.weight")) \
                else (shape[0], shape[1] // n)
        if tuple(src.shapes[dense]) != tuple(want):
            raise UpcycleError(
                f"{where}: {dense!r} has shape {tuple(src.shapes[dense])} but the target "
                f"config needs {tuple(want)} for {key!r}: check model.dim, model.n_heads, "
                f"model.n_kv_heads, model.expert_hidden")


def exactness_issue(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> str | None:
    """Why an upcycled MoE will not reproduce the dense model at step 0, or None.

    Identical experts give ``sum_k w_k * FFN(x)``: exact when the combine weights sum to 1
    for every token (renormalised top-k with k >= 2, noisy top-k) and no token is dropped.
    """
    r, k = moe_cfg.router, model_cfg.top_k
    kind = RouterType(r.name)
    chain = moe_cfg.chain_iterations
    residual = moe_cfg.chain_residual or ("inner" if chain > 1 else "outer")
    if chain > 1 or residual != "outer":
        return (f"moe.chain_iterations={chain} (moe.chain_residual={residual}): a chain of "
                f"experts is not the dense block (it applies the FFN {chain} times, or adds "
                f"the normalised input instead of the residual)")
    # recurrent (RMoE) and compete renormalise their top-k, and a competition step's
    # weights a_S / sum a_S sum to 1 too
    if kind not in (RouterType.topk, RouterType.deepseek_v3, RouterType.selective_sinkhorn,
                    RouterType.noisy_topk, RouterType.recurrent, RouterType.compete):
        return (f"moe.router.name={kind.value} combines with weights that need not sum to 1 "
                f"(raw probabilities, or tokens routed to a variable number of experts)")
    if kind != RouterType.noisy_topk:
        if k == 1:
            return "model.top_k=1: the single combine weight is the raw score, not 1"
        if not r.renormalize:
            return "moe.router.renormalize=false: the top-k weights do not sum to 1"
    if r.route_scale != 1.0:
        return f"moe.router.route_scale={r.route_scale}: the weights sum to route_scale, not 1"
    if DispatchMode(moe_cfg.dispatch) == DispatchMode.capacity:
        return "moe.dispatch=capacity: tokens over an expert's capacity are dropped"
    return None


# ----------------------------------------------------------------------------- the maths
def _seed(*parts: object) -> int:
    """A 63-bit generator seed from a tuple (stable across processes and Python runs)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def num_dropped(ratio: float, hidden: int) -> int:
    """floor(ratio * hidden), exact for the decimal the config wrote (0.29 * 100 = 29)."""
    return math.floor(Fraction(str(float(ratio))) * hidden)


def drop_upcycle(w1_FD: torch.Tensor, w3_FD: torch.Tensor, w2_DF: torch.Tensor, ratio: float,
                 mode: DropMode | str, generator: torch.Generator
                 ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                            tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One Drop-Upcycling expert (Nakamura et al. 2025): copies of the dense SwiGLU matrices
    with n = floor(ratio * F) intermediate channels (rows of w1/w3, columns of w2) re-drawn
    from N(mu, sigma), the mean and std (unbiased; 0 for a single value) of the replaced
    entries of that matrix. ``per_expert``: one sorted channel set for the three matrices;
    ``per_matrix``: one set each. Draw order: set(s), then w1, w3, w2 values.

    Returns the new (w1, w3, w2) and the channel index set of each (int64, sorted).
    """
    F_ = w1_FD.shape[0]
    n = num_dropped(ratio, F_)
    out = [w1_FD.clone(), w3_FD.clone(), w2_DF.clone()]
    if n == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return (out[0], out[1], out[2]), (empty, empty, empty)

    def draw_set() -> torch.Tensor:
        return torch.randperm(F_, generator=generator)[:n].sort().values

    per_expert = DropMode(mode) == DropMode.per_expert
    shared = draw_set() if per_expert else None
    sets = []
    for i, w in enumerate(out):
        idx = shared if per_expert else draw_set()
        sets.append(idx)
        view = w if i < 2 else w.transpose(0, 1)  # channels as rows: (F, D) for all three
        old = view[idx].float()
        mu = old.mean()
        sigma = old.std() if old.numel() > 1 else torch.zeros(())
        new = torch.empty(old.shape).normal_(float(mu), float(sigma), generator=generator)
        view[idx] = new.to(w.dtype)
    return (out[0], out[1], out[2]), (sets[0], sets[1], sets[2])


@dataclass
class UpcycledState:
    """Whole tensors of the upcycled model (``model``: key -> tensor) and, when the dense
    optimizer state is reused, AdamW state per parameter (``optim``: key -> {exp_avg,
    exp_avg_sq, step}); parameters missing from ``optim`` start from a fresh Adam state."""

    model: dict[str, torch.Tensor]
    optim: dict[str, dict[str, torch.Tensor]] | None = None


def _required_dense(keys: Iterable[str]) -> set[str]:
    return {d for k in keys if (d := _dense_key(k)[0]) is not None}


@torch.no_grad()
def upcycle_state_dict(dense: dict[str, torch.Tensor], model_cfg: ModelConfig, moe_cfg: MoEConfig,
                       init: InitConfig, vocab: int,
                       dense_optim: dict[str, dict[str, torch.Tensor]] | None = None,
                       keys: Iterable[str] | None = None, progress: bool = False
                       ) -> UpcycledState:
    """The MoE state dict of ``model_cfg`` from a dense state dict (moetrain key names).

    ``keys`` limits the output to those target keys (a pipeline stage's); ``dense_optim``
    (key -> AdamW state) is carried over as in the module docstring. Shapes are assumed
    checked (:func:`check_compatible`). Copied tensors share storage with ``dense``.
    """
    refuse_ragged(model_cfg)
    target = _target_shapes(model_cfg, moe_cfg, vocab)
    only = None if keys is None else set(keys)
    wanted = [k for k in target if only is None or k in only]
    E, s = model_cfg.num_experts, model_cfg.n_shared_experts
    routed_scale = 0.5 if s > 0 else 1.0
    out: dict[str, torch.Tensor] = {}
    optim: dict[str, dict[str, torch.Tensor]] | None = None if dense_optim is None else {}
    moe_layers = sorted({int(m.group(1)) for k in wanted if (m := _EXPERT_KEY.match(k))})

    def cast(t: torch.Tensor, key: str) -> torch.Tensor:
        return t.to(target[key][1])

    for key in wanted:  # everything but the routed experts
        dense_key, role = _dense_key(key)
        if role == "copy":
            out[key] = cast(dense[dense_key], key)
            if optim is not None and dense_key in dense_optim:
                optim[key] = dict(dense_optim[dense_key])
        elif role == "router":
            out[key] = _router_init(key, target[key], init, moe_cfg.router.rnn_hidden)
        elif role == "shared":
            w = cast(dense[dense_key], key)
            is_w2 = dense_key.endswith("w2.weight")
            out[key] = (torch.cat([w] * s, dim=1) / (2 * s) if is_w2
                        else torch.cat([w] * s, dim=0))
            if optim is not None and dense_key in dense_optim:
                st = dense_optim[dense_key]
                optim[key] = {n: (torch.cat([st[n]] * s, dim=1 if is_w2 else 0)
                                  if n in _MOMENTS else st[n]) for n in st}

    from tqdm import tqdm

    for i in tqdm(moe_layers, desc="upcycle", unit="layer", disable=not progress):
        ffn = {w: cast(dense[f"layers.{i}.feed_forward.{w}.weight"], f"layers.{i}.moe.experts."
                       f"{'w2_EDF' if w == 'w2' else w + '_EFD'}") for w in ("w1", "w2", "w3")}
        w2 = ffn["w2"] * routed_scale if routed_scale != 1.0 else ffn["w2"]
        experts, sets = [], []
        for e in range(E):
            g = torch.Generator().manual_seed(_seed("drop", init.seed, i, e))
            ws, idx = drop_upcycle(ffn["w1"], ffn["w3"], w2, init.drop_ratio, init.drop_mode, g)
            experts.append(ws)
            sets.append(idx)
        for j, name in enumerate(("w1_EFD", "w3_EFD", "w2_EDF")):
            key = f"layers.{i}.moe.experts.{name}"
            if key not in target or (only is not None and key not in only):
                continue
            out[key] = torch.stack([ws[j] for ws in experts])
            dense_key = f"layers.{i}.feed_forward.{_EXPERT_TO_DENSE[name]}.weight"
            if optim is not None and dense_key in dense_optim:
                st = dense_optim[dense_key]
                optim[key] = {"step": st["step"]} if "step" in st else {}
                for n in _MOMENTS:
                    if n in st:
                        m = torch.stack([st[n]] * E).clone()
                        for e, idx in enumerate(sets):  # new channels: no history
                            (m[e] if j < 2 else m[e].transpose(0, 1))[idx[j]] = 0
                        optim[key][n] = m
    return UpcycledState(model={k: out[k] for k in wanted}, optim=optim)


def router_law(init: InitConfig) -> RouterInit:
    """``init.router_init`` with ``auto`` resolved: uniform for Drop-Upcycling (its released
    conversions draw the router with ``torch_rand_002``), normal for plain upcycling."""
    law = RouterInit(init.router_init)
    if law == RouterInit.auto:
        return RouterInit.uniform if init.drop_ratio > 0 else RouterInit.normal
    return law


def _router_init(key: str, spec: tuple[tuple[int, ...], torch.dtype], init: InitConfig,
                 rnn_hidden: int = 1) -> torch.Tensor:
    """The gate, zero-mean with std ``router_std``, seeded by (seed, layer): N(0, std^2),
    or U(-a, a) with a = std * sqrt(3) (the variance of U(-a, a) is a^2 / 3).
    Drop-Upcycling's ``torch_rand_002`` is (u - mean(u)) * std * sqrt(12), u ~ U(0, 1): the
    same law, centred on the sample mean instead of 1/2. Every other router tensor is 0
    (expert_bias; a noisy router's noise projection, zero-initialised as a fresh one).

    New in a fresh MoE and drawn the same way: a later Chain-of-Experts round's gate
    (seeded by (seed, layer, round)) and RMoE's per-layer projection and head (seeded by
    (seed, layer, name)). RMoE's shared cell gets torch's GRUCell law, U(-1/sqrt(H),
    1/sqrt(H)), seeded by (seed, name), as a fresh model draws it."""
    shape, dtype = spec
    if m := _ROUTER_RNN_KEY.match(key):
        g = torch.Generator().manual_seed(_seed("router_rnn", init.seed, m.group(1)))
        bound = 1.0 / math.sqrt(rnn_hidden)  # H, for the (g H,) biases too
        return torch.empty(shape).uniform_(-bound, bound, generator=g).to(dtype)
    m = _ROUTER_KEY.match(key)
    layer, chain_round, name = int(m.group(1)), m.group(2), m.group(3)
    if name in ("gate.weight", "proj.weight", "head.weight"):
        parts = ("router", init.seed, layer)  # round 0's gate: as before chains existed
        if chain_round is not None:
            parts += ("round", int(chain_round) + 1)
        if name != "gate.weight":
            parts += (name,)
        g = torch.Generator().manual_seed(_seed(*parts))
        if router_law(init) == RouterInit.uniform:
            a = init.router_std * math.sqrt(3.0)
            return torch.empty(shape).uniform_(-a, a, generator=g).to(dtype)
        return torch.empty(shape).normal_(0.0, init.router_std, generator=g).to(dtype)
    return torch.zeros(shape, dtype=dtype)


# ----------------------------------------------------------------------------- from disk
def build_upcycled(init: InitConfig, model_cfg: ModelConfig, moe_cfg: MoEConfig, vocab: int,
                   keys: Iterable[str] | None = None, optimizer: bool | None = None,
                   progress: bool = False, field_name: str = "init.from_dense",
                   source: DenseSource | None = None) -> UpcycledState:
    """Check ``init.from_dense`` and the target config, then upcycle (``keys``: only those
    target keys). ``optimizer`` (default ``init.reuse_optimizer``) carries the dense AdamW
    state over; asking for it from a source without one is an error. All checks run
    before any weight is read or converted."""
    src = source if source is not None else inspect_dense(init.from_dense, field_name)
    reuse = init.reuse_optimizer if optimizer is None else optimizer
    if reuse and not src.has_optimizer:
        raise UpcycleError(
            f"init.reuse_optimizer=true but {field_name}={str(src.path)!r} holds no optimizer "
            f"state ({'a Hugging Face model never does' if src.kind == 'hf' else 'it was saved without one'}"
            f"): set init.reuse_optimizer=false")
    check_compatible(src, model_cfg, moe_cfg, vocab, field_name)
    only = None if keys is None else set(keys)
    wanted = [k for k in _target_shapes(model_cfg, moe_cfg, vocab) if only is None or k in only]
    dense, dense_optim = src.load(_required_dense(wanted), optimizer=reuse)
    return upcycle_state_dict(dense, model_cfg, moe_cfg, init, vocab,
                              dense_optim=dense_optim if reuse else None, keys=wanted,
                              progress=progress)


# ----------------------------------------------------------------------------- placing
def _fill(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of a whole tensor into ``dst`` (a DTensor shard or a tensor),
    the slice DCP would read for it."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if isinstance(dst, DTensor):
        shape, offset = compute_local_shape_and_global_offset(
            full.shape, dst.device_mesh, dst.placements)
        part = full[tuple(slice(o, o + n) for n, o in zip(shape, offset))]
        dst.to_local().copy_(part)
    else:
        dst.copy_(full)


@torch.no_grad()
def load_into(parts: nn.Module | Sequence[nn.Module],
              optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
              state: UpcycledState) -> None:
    """Load whole upcycled tensors into a placed model (any layout: each rank keeps its
    shards, as a DCP load would) and, with ``optimizers``, set their AdamW state: the
    reused state where ``state.optim`` has it, else a fresh one (zero moments, step 0)."""
    mos = ModelOptimizerState(parts, optimizers)
    sd = mos.state_dict()  # the DCP template: this rank's DTensor shards / tensors
    for key, dst in sd["model"].items():
        _fill(dst, state.model[key])
    if mos.optimizers:
        optim = state.optim or {}
        for key, dst in list(sd["optim"].items()):
            if not key.startswith("state."):
                continue  # param_groups: the target config's hyper-parameters
            fqn, name = key[len("state."):].rsplit(".", 1)
            saved = optim.get(fqn, {})
            if name == "step":
                step = float(saved["step"]) if "step" in saved else 0.0
                sd["optim"][key] = torch.tensor(step, dtype=dst.dtype, device=dst.device)
            elif name in saved:
                _fill(dst, saved[name])
            else:
                (dst.to_local() if hasattr(dst, "to_local") else dst).zero_()
    mos.load_state_dict(sd)


def upcycle_into(parts: nn.Module | Sequence[nn.Module],
                 optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
                 init: InitConfig, model_cfg: ModelConfig, moe_cfg: MoEConfig, vocab: int,
                 progress: bool = False, verbose: bool = True) -> None:
    """The trainer's ``init.from_dense`` hook: every rank builds the upcycled tensors of
    its own model parts from the same files and keeps its shards. ``optimizers`` (when
    ``init.reuse_optimizer``) receive the dense AdamW state."""
    src = inspect_dense(init.from_dense)
    issue = exactness_issue(model_cfg, moe_cfg)
    if issue and verbose:
        log.warning("init.from_dense: %s, so the upcycled MoE will not reproduce the dense "
                    "model exactly at step 0 (docs/upcycling.md)", issue)
    parts = list(parts) if isinstance(parts, (list, tuple)) else [parts]
    keys = set(ModelOptimizerState(parts, None).state_dict()["model"])  # this rank's FQNs
    state = build_upcycled(init, model_cfg, moe_cfg, vocab, keys=keys, progress=progress,
                           source=src)
    load_into(parts, optimizers, state)
    if verbose:
        log.info("init.from_dense: upcycled %s (%s) into %d experts per MoE layer "
                 "(drop_ratio=%s, drop_mode=%s, router %s, seed=%d%s)", src.path, src.kind,
                 model_cfg.num_experts, init.drop_ratio, DropMode(init.drop_mode).value,
                 router_law(init).value, init.seed, ", dense optimizer state reused" if state.optim else "")
