"""Hugging Face checkpoints: import dense Llama/Qwen2/Mistral, export trained MoE models.

Import (:func:`load_hf_dense`) reads a Hugging Face directory (``config.json`` and
safetensors, one file or shards with ``model.safetensors.index.json``) into a dense
:class:`ModelConfig` and a state dict in moetrain's names. The upcycler starts from it.

Export (:func:`export_hf`) writes a committed moetrain checkpoint of any layout as a
Hugging Face directory whose logits equal moetrain's eval-mode logits (float32):

- ``mixtral`` (MixtralForCausalLM): softmax top-k, weights renormalised, every layer MoE.
- ``qwen2_moe`` (Qwen2MoeForCausalLM): softmax top-k, renormalised or not
  (``norm_topk_prob``), dense layers anywhere (``mlp_only_layers``), q/k/v biases.
- ``glm4_moe`` (Glm4MoeForCausalLM): sigmoid top-k with expert bias
  (``e_score_correction_bias``), groups, route_scale, shared experts, first dense layers,
  q/k/v biases: DeepSeek-V3's routing.
- ``ernie4_5_moe`` (Ernie4_5_MoeForCausalLM): softmax top-k renormalised, expert bias,
  shared experts, dense layers by start and interval.
- ``llama`` / ``qwen2``: dense models (``qwen2`` when ``model.qkv_bias``).
- ``jamba`` (JambaForCausalLM): Mamba, attention or both (``model.mixer``; the layer
  patterns as ``attn_layer_period/offset`` and ``expert_layer_period/offset``), Mamba
  with Jamba's inner dt/B/C norms (``model.mamba_inner_norms=true``), attention without
  positions (``model.position_encoding=none``), softmax top-k not renormalised. The only
  target for Mamba layers and for attention without RoPE; every other target refuses them.

Mixtral-style routers without a scaling factor get ``route_scale`` folded into each routed
expert's down projection; every target gets the router temperature folded into the gate
(``W / T``). ``deepseek_v3`` is not a target: DeepseekV3ForCausalLM's multi-head latent
attention normalises the compressed keys/values (``kv_a_layernorm``) and shares one RoPE
key head, so it cannot hold moetrain's attention; ``glm4_moe`` routes exactly like
DeepSeek-V3. Qwen2-MoE cannot hold shared experts: its ``shared_expert_gate`` is
sigmoid(w . x) without a bias, never exactly 1 for every token.

Experts are written one tensor per expert (``experts.{e}.w1.weight`` / ``gate_proj``),
the layout of the published checkpoints: transformers 4.x reads it natively, 5.x converts
it on load (tested with 5.24).

Legend: D model dim, F expert hidden, E experts, H heads, Hd head dim.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from moetrain.config.recipes import recipe_values
from moetrain.config.schema import (
    Config,
    GateActivation,
    GroupScore,
    Mixer,
    ModelConfig,
    PositionEncoding,
    RouterType,
    ScoreFunc,
)

__all__ = ["HFConversionError", "Target", "choose_target", "eval_routing", "export_hf",
           "export_model", "hf_dense_config", "load_hf_dense", "read_safetensors"]

log = logging.getLogger(__name__)


class HFConversionError(ValueError):
    """A Hugging Face directory cannot be imported, or a checkpoint cannot be exported
    exactly. The message names the file or field and what to do."""


# ============================================================================ safetensors
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise HFConversionError(f"{path} is missing: a Hugging Face model directory holds "
                                f"config.json and *.safetensors (save_pretrained writes them)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HFConversionError(f"{path} is not valid JSON ({e})") from e


def _safetensors_files(path: Path) -> list[Path]:
    """The weight files of a Hugging Face directory: the index's shards, or every file."""
    index = path / INDEX_FILE
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFConversionError(f"{index} has no weight_map: the index is damaged")
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise HFConversionError(f"{f.name} is listed in {index} but missing from "
                                        f"{path}: copy every shard")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in path.glob("*.bin"))
        extra = (f" (found {bins[0]}: re-save with save_pretrained(..., "
                 f"safe_serialization=True))" if bins else "")
        raise HFConversionError(f"{path} holds no *.safetensors weights{extra}")
    return files


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory (sharded or not), as stored (dtype kept)."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(Path(path)):
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():  # noqa: SIM118 - safe_open is not iterable
                    out[k] = st.get_tensor(k)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise HFConversionError(f"{f}: not a readable safetensors file ({e}); the "
                                    f"download or copy is incomplete or corrupt") from e
    return out


@dataclass
class _Item:
    """One tensor to write: its shape and dtype for shard planning, made on demand."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _shards(items: list[_Item], max_bytes: int) -> list[list[_Item]]:
    shards: list[list[_Item]] = [[]]
    size = 0
    for it in items:
        if shards[-1] and size + it.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += it.nbytes
    return shards


def _write_safetensors(items: list[_Item], out: Path, max_shard_bytes: int,
                       progress: bool) -> None:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus the index.

    Tensors are made one shard at a time, so peak memory is the model plus one shard."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    shards = _shards(items, max_shard_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    bar = tqdm(total=sum(it.nbytes for it in items), unit="B", unit_scale=True,
               desc="export", disable=not progress)
    for i, shard in enumerate(shards):
        name = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for it in shard:
            t = it.make().contiguous()
            if tuple(t.shape) != it.shape:  # a mapping bug, never user input
                raise AssertionError(f"{it.name}: made {tuple(t.shape)}, planned {it.shape}")
            tensors[it.name] = t.to(it.dtype)
            weight_map[it.name] = name
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        bar.update(sum(it.nbytes for it in shard))
        del tensors
    bar.close()
    if n > 1:
        index = {"metadata": {"total_size": sum(it.nbytes for it in items)},
                 "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


# ============================================================================ import
_DENSE_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "mistral": "MistralForCausalLM"}
_IGNORED_KEYS = ("rotary_emb.inv_freq",)  # derived buffers some old checkpoints store


def _rope_theta(hf: dict, source: Path) -> float:
    """RoPE theta from ``rope_parameters`` (transformers 5) or ``rope_theta`` (4.x); any
    scaled RoPE (linear, dynamic, yarn, llama3, ...) is refused: moetrain's is plain."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    for field_name, p in (("rope_parameters", params), ("rope_scaling", scaling)):
        if p:
            kind = p.get("rope_type", p.get("type", "default"))
            if kind not in (None, "default"):
                raise HFConversionError(
                    f"{source}: {field_name}.rope_type={kind!r} is not supported: moetrain's "
                    f"RoPE is unscaled (rope_type 'default')")
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise HFConversionError(f"{source}: partial_rotary_factor={factor} is not supported: "
                                f"moetrain rotates the whole head dimension")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _sliding_window(hf: dict, model_type: str) -> int | None:
    """The attention window of any layer, or None when every layer attends fully."""
    window = hf.get("sliding_window")
    if not window:
        return None
    if model_type == "qwen2":
        sliding = hf.get("use_sliding_window", False) or "sliding_attention" in (
            hf.get("layer_types") or [])
        return int(window) if sliding else None
    return int(window)


def hf_dense_config(hf: dict, source: str | Path = "config.json") -> ModelConfig:
    """A dense moetrain ModelConfig equal to a Llama/Qwen2/Mistral ``config.json``."""
    source = Path(source)
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type not in _DENSE_ARCHS:
        raise HFConversionError(
            f"{source}: model_type={model_type!r} (architectures={archs}) is not supported: "
            f"import reads dense {', '.join(sorted(_DENSE_ARCHS))} models")
    if archs and archs[0] != _DENSE_ARCHS[model_type]:
        raise HFConversionError(
            f"{source}: architectures={archs} is not a causal LM: expected "
            f"{_DENSE_ARCHS[model_type]} (a language-model head on the decoder)")
    if hf.get("quantization_config"):
        raise HFConversionError(f"{source}: quantization_config is set: import reads "
                                f"unquantized float weights")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise HFConversionError(f"{source}: hidden_act={act!r} is not supported: moetrain's "
                                f"MLP is SwiGLU (silu)")
    for flag, what in (("attention_bias", "biases on q/k/v/o"), ("mlp_bias", "MLP biases")):
        if hf.get(flag):
            raise HFConversionError(
                f"{source}: {flag}=true is not supported: moetrain has no {what} (only "
                f"Qwen2-style q/k/v biases, model.qkv_bias)")
    dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) * n_heads != dim:
        raise HFConversionError(
            f"{source}: head_dim={head_dim} is not hidden_size / num_attention_heads = "
            f"{dim}/{n_heads}: moetrain's head dim is model.dim / model.n_heads")
    n_layers = int(hf["num_hidden_layers"])
    max_seq_len = int(hf.get("max_position_embeddings", 2048))
    window = _sliding_window(hf, model_type)
    if window is not None and window < max_seq_len:
        # Full causal attention equals the window's for sequences up to the window.
        log.warning("%s: sliding_window=%d < max_position_embeddings=%d: model.max_seq_len "
                    "is set to %d so that moetrain's full attention gives the same results",
                    source, window, max_seq_len, window)
        max_seq_len = window
    kv = hf.get("num_key_value_heads")
    return ModelConfig(
        name=str(hf.get("_name_or_path") or model_type).rstrip("/").split("/")[-1] or model_type,
        dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=None if kv is None or int(kv) == n_heads else int(kv),
        vocab_size=int(hf["vocab_size"]), ffn_hidden=int(hf["intermediate_size"]),
        max_seq_len=max_seq_len, rope_theta=_rope_theta(hf, source),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        init_std=float(hf.get("initializer_range", 0.02)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",  # Qwen2's q/k/v projections always carry biases
        # A dense model: every layer dense; the MoE fields are placeholders for the upcycler.
        num_experts=1, top_k=1, expert_hidden=int(hf["intermediate_size"]),
        first_dense_layers=n_layers,
    )


def _dense_names(m: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """moetrain key -> (Hugging Face key, shape) for a dense Llama-family model."""
    D, V, F = m.dim, m.vocab_size, m.ffn_hidden
    hd = D // m.n_heads
    q, kv = m.n_heads * hd, (m.n_kv_heads or m.n_heads) * hd
    names = {"tok_embeddings.weight": ("model.embed_tokens.weight", (V, D)),
             "norm.weight": ("model.norm.weight", (D,)),
             "output.weight": ("lm_head.weight", (V, D))}
    for i in range(m.n_layers):
        a, h = f"layers.{i}.", f"model.layers.{i}."
        names.update({
            a + "attention_norm.weight": (h + "input_layernorm.weight", (D,)),
            a + "ffn_norm.weight": (h + "post_attention_layernorm.weight", (D,)),
            a + "attention.wq.weight": (h + "self_attn.q_proj.weight", (q, D)),
            a + "attention.wk.weight": (h + "self_attn.k_proj.weight", (kv, D)),
            a + "attention.wv.weight": (h + "self_attn.v_proj.weight", (kv, D)),
            a + "attention.wo.weight": (h + "self_attn.o_proj.weight", (D, q)),
            a + "feed_forward.w1.weight": (h + "mlp.gate_proj.weight", (F, D)),
            a + "feed_forward.w3.weight": (h + "mlp.up_proj.weight", (F, D)),
            a + "feed_forward.w2.weight": (h + "mlp.down_proj.weight", (D, F)),
        })
        if m.qkv_bias:
            names.update({
                a + "attention.wq.bias": (h + "self_attn.q_proj.bias", (q,)),
                a + "attention.wk.bias": (h + "self_attn.k_proj.bias", (kv,)),
                a + "attention.wv.bias": (h + "self_attn.v_proj.bias", (kv,)),
            })
    return names


def load_hf_dense(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A Hugging Face Llama, Qwen2 or Mistral directory -> (dense ModelConfig, state dict).

    The state dict has moetrain's keys for ``Transformer(model_cfg, _, vocab)`` (with
    ``output.weight`` the same tensor as ``tok_embeddings.weight`` when the embeddings are
    tied) and the stored dtype; ``load_state_dict`` casts. ``model_cfg`` has every layer
    dense (``first_dense_layers = n_layers``); its MoE fields are placeholders. With a
    sliding window shorter than ``max_position_embeddings`` (Mistral), ``max_seq_len`` is
    the window, where full attention gives the same results. Raises
    :class:`HFConversionError` naming the file, field or tensor that does not fit.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise HFConversionError(f"{path} is not a directory: pass a Hugging Face model "
                                f"directory (config.json + *.safetensors)")
    model_cfg = hf_dense_config(_read_json(path / "config.json"), path / "config.json")
    tensors = read_safetensors(path)
    for k in [k for k in tensors if k.endswith(_IGNORED_KEYS)]:
        del tensors[k]
    names = _dense_names(model_cfg)
    out: dict[str, torch.Tensor] = {}
    for ours, (theirs, shape) in names.items():
        if ours == "output.weight" and model_cfg.tie_embeddings:
            continue
        if theirs not in tensors:
            raise HFConversionError(f"{path}: tensor {theirs!r} is missing from the "
                                    f"safetensors files (config.json needs it)")
        t = tensors.pop(theirs)
        if tuple(t.shape) != shape:
            raise HFConversionError(
                f"{path}: tensor {theirs!r} has shape {tuple(t.shape)} but config.json "
                f"implies {shape}: config.json and the weights disagree")
        out[ours] = t
    if model_cfg.tie_embeddings:
        head = tensors.pop("lm_head.weight", None)
        if head is not None and not torch.equal(head, out["tok_embeddings.weight"]):
            raise HFConversionError(f"{path}: tie_word_embeddings=true but lm_head.weight "
                                    f"differs from model.embed_tokens.weight")
        out["output.weight"] = out["tok_embeddings.weight"]
    if tensors:
        extra = sorted(tensors)
        raise HFConversionError(
            f"{path}: {len(extra)} tensors have no place in a dense "
            f"{_DENSE_ARCHS[_read_json(path / 'config.json')['model_type']]}, e.g. "
            f"{extra[0]!r}: it is another architecture or a modified model")
    return model_cfg, out


# ============================================================================ export
class Target(str, Enum):
    auto = "auto"
    mixtral = "mixtral"
    qwen2_moe = "qwen2_moe"
    glm4_moe = "glm4_moe"
    ernie4_5_moe = "ernie4_5_moe"
    llama = "llama"
    qwen2 = "qwen2"
    jamba = "jamba"  # Mamba / hybrid models (model.mixer), no RoPE
    deepseek_v3 = "deepseek_v3"  # refused with the reason (multi-head latent attention)


@dataclass(frozen=True)
class EvalRouting:
    """What a router computes in eval mode, the behaviour an export reproduces.

    Weights: ``score`` of (logits / temperature) at the ``top_k`` picks, chosen on score +
    expert bias (when ``uses_bias``) within the best ``topk_groups`` of ``n_groups``,
    renormalised over the picks when ``renorm``, times ``scale``."""

    score: ScoreFunc
    top_k: int
    renorm: bool
    scale: float
    temperature: float
    uses_bias: bool
    n_groups: int = 1
    topk_groups: int = 1
    group_top: int = 2  # how many of a group's best scores make the group's score


def _router_routing(router: torch.nn.Module) -> EvalRouting:
    """A router module's eval-mode routing, from its live attributes: a schedule may have
    moved ``top_k``, ``temperature`` or the score activation away from the config."""
    r, k = router.cfg, int(router.top_k)
    name = RouterType(r.name).value
    act = GateActivation(getattr(router, "score_activation", GateActivation.none))
    if act != GateActivation.none:
        raise HFConversionError(
            f"schedule.activation={act.value}: the router scores softmax({act.value}(logits) "
            f"/ tau) (the activation dense-to-sparse gate); no Hugging Face router applies "
            f"an activation to its logits")
    temperature = float(router.temperature)
    if name in ("topk", "deepseek_v3", "selective_sinkhorn", "switch", "compete"):
        # Selective Sinkhorn routes by optimal transport only on some training steps, and
        # CompeteSMoE's experts compete only on training steps: both route by top-k here.
        per = (2 if GroupScore(r.group_score) == GroupScore.top2_sum
               else max(1, k // r.topk_groups))
        return EvalRouting(
            score=ScoreFunc(router.score_func), top_k=k, renorm=bool(router.renormalize) and k > 1,
            scale=float(router.route_scale), temperature=temperature, uses_bias=True,
            n_groups=r.n_groups, topk_groups=r.topk_groups,
            group_top=min(per, router.num_experts // r.n_groups))
    if name == "noisy_topk":  # eval: the clean logits, a softmax over the k kept
        return EvalRouting(ScoreFunc.softmax, k, renorm=True, scale=1.0,
                           temperature=temperature, uses_bias=False)
    if name == "sinkhorn":  # eval: top-k of the gate activation, not renormalised
        return EvalRouting(ScoreFunc.sigmoid if k == 1 else ScoreFunc.softmax, k, renorm=False,
                           scale=1.0, temperature=temperature, uses_bias=False)
    if name == "dts" and getattr(router, "phase", "hard") != "diversify":
        # EvoMoE's gate in eval: top-k of the plain logits, p renormalised; with Gumbel
        # gates the weights are softmax(logits / tau) (the order, so the picks, is the same).
        tau = temperature if getattr(router, "gumbel_gates", False) else 1.0
        return EvalRouting(ScoreFunc.softmax, k, renorm=bool(router.renormalize) and k > 1,
                           scale=1.0, temperature=tau, uses_bias=False)
    why = {
        "expert_choice": "each expert picks its tokens from the whole batch, so a token's "
                         "experts depend on the other tokens",
        "threshold": "the number of experts varies per token (cumulative probability "
                     "threshold)",
        "dts": "schedule=evomoe is in its diversify phase at this step (every token to "
               "expert 0); export a checkpoint from after schedule.diversify_steps",
        "recurrent": "its logits come from a GRU state carried from each MoE layer to the "
                     "next (RMoE), which no Hugging Face MoE class computes",
    }.get(name, "it is not a fixed top-k router")
    raise HFConversionError(
        f"moe.router.name={name} cannot be exported: {why}; no Hugging Face MoE "
        f"architecture routes that way. Exportable routers: topk, switch, deepseek_v3, "
        f"noisy_topk, sinkhorn, selective_sinkhorn, compete, dts (after its diversify phase)")


def eval_routing(model: torch.nn.Module) -> EvalRouting | None:
    """The eval-mode routing shared by every MoE layer of ``model`` (None without MoE
    layers); an error names routers no target has."""
    found = {_router_routing(layer.router) for layer in model.moe_layers()}
    if len(found) > 1:
        raise HFConversionError(f"the MoE layers route differently ({sorted(map(str, found))}): "
                                f"a Hugging Face config holds one router setting")
    return found.pop() if found else None


def _moe_pattern(m: ModelConfig) -> list[bool]:
    return [m.is_moe_layer(i) for i in range(m.n_layers)]


def _check(cfg: Config, routing: EvalRouting | None, bias_used: bool,
           target: Target) -> str | None:
    """Why ``target`` cannot hold this model exactly (naming the field), or None."""
    m = cfg.model
    pattern = _moe_pattern(m)
    moe = any(pattern)
    if target == Target.deepseek_v3:
        return ("DeepseekV3ForCausalLM uses multi-head latent attention (an RMSNorm on the "
                "compressed keys/values, one shared RoPE key head), which cannot hold "
                "moetrain's attention; glm4_moe routes exactly like DeepSeek-V3 (sigmoid, "
                "group-limited, e_score_correction_bias, routed_scaling_factor, "
                "first_k_dense_replace) with standard attention")
    if m.expert_sizes is not None:
        return (f"model.expert_sizes={list(m.expert_sizes)}: HMoE's experts have different "
                f"hidden sizes, and every Hugging Face MoE target has one "
                f"moe_intermediate_size; train with model.expert_sizes=null to export")
    if target == Target.jamba:
        return _check_jamba(cfg, routing, bias_used)
    if any(not m.uses_attention(i) for i in range(m.n_layers)):
        return (f"model.mixer={Mixer(m.mixer).value}: {target.value} has attention in every "
                f"layer and no Mamba mixer; export as jamba")
    if PositionEncoding(m.position_encoding) == PositionEncoding.none:
        return (f"model.position_encoding=none: {target.value} applies RoPE in every "
                f"attention layer; export as jamba (attention without positions)")
    if target in (Target.llama, Target.qwen2):
        if moe:
            return f"{target.value} is dense but the model has MoE layers"
        if target == Target.llama and m.qkv_bias:
            return "model.qkv_bias=true: Llama has no q/k/v-only biases (use qwen2)"
        if target == Target.qwen2 and not m.qkv_bias:
            return "model.qkv_bias=false: Qwen2 always has q/k/v biases (use llama)"
        return None
    if moe and m.null_experts:
        return (f"model.zero_experts={m.zero_experts}, model.copy_experts={m.copy_experts}, "
                f"model.constant_experts={m.constant_experts}: MoE++'s zero-computation "
                f"experts, which no Hugging Face MoE class has")
    chain = cfg.moe.chain_iterations
    residual = cfg.moe.chain_residual or ("inner" if chain > 1 else "outer")
    if moe and (chain > 1 or residual != "outer"):
        return (f"moe.chain_iterations={chain} (moe.chain_residual={residual}): a "
                f"Chain-of-Experts layer routes and runs its experts {chain} times in "
                f"sequence, which no Hugging Face MoE class computes")
    if not moe:
        return (f"the model has no MoE layers (model.first_dense_layers="
                f"{m.first_dense_layers} = model.n_layers): export it as llama or qwen2")
    assert routing is not None
    fd, every, n = m.first_dense_layers, m.moe_every, m.n_layers
    layers = {  # the MoE layers each target can have, and why
        Target.mixtral: ([True] * n, "every Mixtral layer is MoE"),
        Target.glm4_moe: ([i >= fd for i in range(n)],
                          "Glm4Moe's MoE layers are all those from first_k_dense_replace on"),
        Target.ernie4_5_moe: ([i >= fd and (i + 1) % every == 0 for i in range(n)],
                              ("Ernie 4.5's MoE layers are i >= moe_layer_start_index with "
                               "(i + 1) % moe_layer_interval == 0")),
    }.get(target)
    if layers is not None and pattern != layers[0]:
        return f"model.first_dense_layers={fd}, model.moe_every={every}: {layers[1]}"
    if m.n_shared_experts and target in (Target.mixtral, Target.qwen2_moe):
        what = ("Mixtral has none" if target == Target.mixtral else
                "Qwen2-MoE scales them by sigmoid(shared_expert_gate . x), which has no bias "
                "and cannot be exactly 1 for every token")
        return f"model.n_shared_experts={m.n_shared_experts}: shared experts; {what}"
    if m.qkv_bias and target in (Target.mixtral, Target.ernie4_5_moe):
        return f"model.qkv_bias=true: {target.value} has no q/k/v-only biases"
    softmax_only = target in (Target.mixtral, Target.qwen2_moe, Target.ernie4_5_moe)
    if routing.score == ScoreFunc.sigmoid and softmax_only:
        return f"moe.router.score_func=sigmoid: {target.value} routes with a softmax"
    if routing.score == ScoreFunc.softmax and target == Target.glm4_moe:
        return "moe.router.score_func=softmax: Glm4Moe routes with a sigmoid"
    if not routing.renorm and target in (Target.mixtral, Target.ernie4_5_moe):
        return (f"the top-k weights are not renormalised (moe.router.renormalize="
                f"{cfg.moe.router.renormalize}, top_k={routing.top_k}, moe.router.name="
                f"{RouterType(cfg.moe.router.name).value}) but {target.value} always "
                f"renormalises them")
    if routing.n_groups > 1:
        if target != Target.glm4_moe:
            return (f"moe.router.n_groups={routing.n_groups}: {target.value} has no "
                    f"group-limited routing")
        if routing.group_top != 2:
            score = GroupScore(cfg.moe.router.group_score).value
            return (f"moe.router.group_score={score} sums a group's best "
                    f"{routing.group_top} scores; Glm4Moe sums its best 2 (top2_sum)")
    if bias_used and target in (Target.mixtral, Target.qwen2_moe):
        return (f"the router expert_bias is nonzero (aux-loss-free balancing, "
                f"moe.router.bias_update_rate={cfg.moe.router.bias_update_rate}): "
                f"{target.value} has no selection bias")
    return None


# jamba last: the only target for Mamba layers or attention without RoPE, which every
# other target refuses; an attention model with RoPE never fits it.
_PREFERENCE = (Target.mixtral, Target.qwen2_moe, Target.glm4_moe, Target.ernie4_5_moe,
               Target.llama, Target.qwen2, Target.jamba)


def choose_target(model: torch.nn.Module, cfg: Config, target: Target | str = "auto") -> Target:
    """``target`` if it holds ``model`` (built from ``cfg``) exactly, else an error naming
    the field; ``auto`` picks the first of mixtral, qwen2_moe, glm4_moe, ernie4_5_moe,
    llama, qwen2, jamba that does."""
    target = Target(target)
    routing = eval_routing(model)
    bias_used = routing is not None and routing.uses_bias and any(
        bool(layer.router.expert_bias.abs().max() > 0) for layer in model.moe_layers())
    if target != Target.auto:
        why = _check(cfg, routing, bias_used, target)
        if why is None:
            return target
        fits = [t.value for t in _PREFERENCE if _check(cfg, routing, bias_used, t) is None]
        hint = (f"use --target {' or '.join(fits)}" if fits else
                "no Hugging Face target holds this model exactly")
        raise HFConversionError(f"cannot export to {target.value}: {why}; {hint}")
    for t in _PREFERENCE:
        if _check(cfg, routing, bias_used, t) is None:
            return t
    moe = routing is not None
    reasons = "; ".join(f"{t.value}: {_check(cfg, routing, bias_used, t)}" for t in _PREFERENCE
                        if t == Target.jamba or moe == (t not in (Target.llama, Target.qwen2)))
    raise HFConversionError(f"no Hugging Face target holds this model exactly ({reasons})")


# ---------------------------------------------------------------------------- configs
def _hf_config(cfg: Config, vocab: int, target: Target, dtype: torch.dtype,
               routing: EvalRouting | None) -> dict:
    if target == Target.jamba:
        return _jamba_config(cfg, vocab, dtype, routing)
    m = cfg.model
    arch = {Target.mixtral: ("MixtralForCausalLM", "mixtral"),
            Target.qwen2_moe: ("Qwen2MoeForCausalLM", "qwen2_moe"),
            Target.glm4_moe: ("Glm4MoeForCausalLM", "glm4_moe"),
            Target.ernie4_5_moe: ("Ernie4_5_MoeForCausalLM", "ernie4_5_moe"),
            Target.llama: ("LlamaForCausalLM", "llama"),
            Target.qwen2: ("Qwen2ForCausalLM", "qwen2")}[target]
    rope = {"rope_type": "default", "rope_theta": m.rope_theta}
    dtype_name = str(dtype).removeprefix("torch.")
    hf: dict = {
        "architectures": [arch[0]], "model_type": arch[1],
        "vocab_size": vocab, "hidden_size": m.dim, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads or m.n_heads,
        "head_dim": m.dim // m.n_heads, "hidden_act": "silu",
        "intermediate_size": m.ffn_hidden, "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta, "rope_parameters": rope,
        "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std,
        "attention_dropout": 0.0, "use_cache": True, "torch_dtype": dtype_name,
        "dtype": dtype_name,
        # No class default (Mixtral's bos 1, eos 2): the exported tokenizer's ids, if any,
        # replace these (_copy_tokenizer).
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }
    dense = [i for i, moe in enumerate(_moe_pattern(m)) if not moe]
    if routing is not None:
        hf["num_experts_per_tok"] = routing.top_k
        # the coefficient trained with: the config's, or the router's recipe when null
        hf["router_aux_loss_coef"] = recipe_values(cfg.moe)["aux_loss_coef"]
        hf["output_router_logits"] = False
    if target == Target.llama:
        hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif target == Target.qwen2:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.n_layers)
    elif target == Target.mixtral:
        # Mixtral's experts take intermediate_size; it has no dense layers.
        hf.update(num_local_experts=m.num_experts, intermediate_size=m.expert_hidden,
                  sliding_window=None, router_jitter_noise=0.0)
    elif target == Target.qwen2_moe:
        hf.update(num_experts=m.num_experts, moe_intermediate_size=m.expert_hidden,
                  shared_expert_intermediate_size=0, decoder_sparse_step=1,
                  mlp_only_layers=dense, norm_topk_prob=routing.renorm, qkv_bias=m.qkv_bias,
                  use_sliding_window=False, sliding_window=None, max_window_layers=m.n_layers)
    elif target == Target.glm4_moe:
        rope["partial_rotary_factor"] = 1.0
        hf.update(n_routed_experts=m.num_experts, moe_intermediate_size=m.expert_hidden,
                  n_shared_experts=m.n_shared_experts, first_k_dense_replace=m.first_dense_layers,
                  n_group=routing.n_groups, topk_group=routing.topk_groups,
                  routed_scaling_factor=routing.scale, norm_topk_prob=routing.renorm,
                  attention_bias=m.qkv_bias, use_qk_norm=False, partial_rotary_factor=1.0,
                  num_nextn_predict_layers=0)
    elif target == Target.ernie4_5_moe:
        hf.update(moe_num_experts=m.num_experts, moe_k=routing.top_k,
                  moe_intermediate_size=m.expert_hidden,
                  moe_num_shared_experts=m.n_shared_experts,
                  moe_layer_start_index=m.first_dense_layers,
                  moe_layer_end_index=m.n_layers - 1, moe_layer_interval=m.moe_every,
                  moe_norm_min=1e-20, use_bias=False)  # moetrain clamps the sum at 1e-20
    return hf


# ---------------------------------------------------------------------------- tensors
def _interleave_rope_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a q/k projection from rotate-half pairs (i, i + Hd/2) to interleaved pairs
    (2i, 2i + 1) (GLM/Ernie RoPE): row 2i <- i, row 2i + 1 <- i + Hd/2, in every head."""
    half = head_dim // 2
    perm = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()
    return w.view(-1, head_dim, *w.shape[1:])[:, perm].reshape(w.shape)


def _export_items(model: torch.nn.Module, cfg: Config, target: Target,
                  routing: EvalRouting | None, dtype: torch.dtype) -> list[_Item]:
    if target == Target.jamba:
        return _jamba_items(model, cfg, routing, dtype)
    m = cfg.model
    sd = model.state_dict()
    hd = m.dim // m.n_heads
    items: list[_Item] = []

    def add(name: str, make: Callable[[], torch.Tensor], shape: tuple[int, ...]) -> None:
        items.append(_Item(name, tuple(shape), dtype, make))

    def copy(name: str, key: str, fn: Callable[[torch.Tensor], torch.Tensor] | None = None):
        t = sd[key]
        add(name, (lambda: fn(t)) if fn else (lambda: t), tuple(t.shape))

    rope_rows = ((lambda w: _interleave_rope_rows(w, hd)) if target == Target.ernie4_5_moe
                 else None)
    copy("model.embed_tokens.weight", "tok_embeddings.weight")
    for i in range(m.n_layers):
        a, h = f"layers.{i}.", f"model.layers.{i}."
        copy(h + "input_layernorm.weight", a + "attention_norm.weight")
        copy(h + "post_attention_layernorm.weight", a + "ffn_norm.weight")
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj")):
            copy(h + f"self_attn.{theirs}.weight", a + f"attention.{ours}.weight", rope_rows)
        copy(h + "self_attn.v_proj.weight", a + "attention.wv.weight")
        copy(h + "self_attn.o_proj.weight", a + "attention.wo.weight")
        if m.qkv_bias:
            for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj")):
                copy(h + f"self_attn.{theirs}.bias", a + f"attention.{ours}.bias")
        if not m.is_moe_layer(i):
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                copy(h + f"mlp.{theirs}.weight", a + f"feed_forward.{ours}.weight")
            continue
        items.extend(_moe_items(sd, a + "moe.", h, m, target, routing, dtype))
    copy("model.norm.weight", "norm.weight")
    if not m.tie_embeddings:
        copy("lm_head.weight", "output.weight")
    return items


def _moe_items(sd: dict[str, torch.Tensor], a: str, h: str, m: ModelConfig, target: Target,
               routing: EvalRouting, dtype: torch.dtype) -> Iterator[_Item]:
    """One MoE layer's tensors: gate (temperature folded in), experts, bias, shared."""
    E, D, F = m.num_experts, m.dim, m.expert_hidden
    gate_w = sd[a + "router.gate.weight"]
    temperature = routing.temperature
    # Targets without a scaling factor get route_scale in each expert's down projection.
    scale = 1.0 if target == Target.glm4_moe else routing.scale
    w1, w3, w2 = sd[a + "experts.w1_EFD"], sd[a + "experts.w3_EFD"], sd[a + "experts.w2_EDF"]
    block = {Target.mixtral: "block_sparse_moe", Target.jamba: "feed_forward"}.get(target, "mlp")
    gate = "router" if target == Target.jamba else "gate"
    yield _Item(f"{h}{block}.{gate}.weight", (E, D), torch.float32,
                lambda: gate_w.float() / temperature if temperature != 1.0 else gate_w.float())
    names = (("w1", "w3", "w2") if target == Target.mixtral
             else ("gate_proj", "up_proj", "down_proj"))
    for e in range(E):
        p = f"{h}{block}.experts.{e}."
        yield _Item(p + f"{names[0]}.weight", (F, D), dtype, lambda e=e: w1[e].clone())
        yield _Item(p + f"{names[1]}.weight", (F, D), dtype, lambda e=e: w3[e].clone())
        yield _Item(p + f"{names[2]}.weight", (D, F), dtype,
                    lambda e=e: w2[e] * scale if scale != 1.0 else w2[e].clone())
    bias = sd[a + "router.expert_bias"]
    if target == Target.glm4_moe:
        yield _Item(f"{h}mlp.gate.e_score_correction_bias", (E,), torch.float32,
                    lambda: bias.float() if routing.uses_bias else torch.zeros(E))
    elif target == Target.ernie4_5_moe:
        yield _Item(f"{h}mlp.moe_statics.e_score_correction_bias", (1, E), torch.float32,
                    lambda: (bias.float() if routing.uses_bias else torch.zeros(E)).view(1, E))
    if target == Target.qwen2_moe:  # shared_expert_intermediate_size = 0: zero output
        for name, shape in (("gate_proj", (0, D)), ("up_proj", (0, D)), ("down_proj", (D, 0))):
            yield _Item(f"{h}mlp.shared_expert.{name}.weight", shape, dtype,
                        lambda shape=shape: torch.zeros(shape))
        yield _Item(f"{h}mlp.shared_expert_gate.weight", (1, D), dtype, lambda: torch.zeros(1, D))
    elif target in (Target.glm4_moe, Target.ernie4_5_moe) and (
            m.n_shared_experts or target == Target.glm4_moe):
        S = m.n_shared_experts * F
        for ours, name, shape in (("w1", "gate_proj", (S, D)), ("w3", "up_proj", (S, D)),
                                  ("w2", "down_proj", (D, S))):
            key = f"{a}shared_experts.{ours}.weight"
            t = sd.get(key)
            yield _Item(f"{h}mlp.shared_experts.{name}.weight", shape, dtype,
                        (lambda t=t: t) if t is not None else (lambda shape=shape:
                                                                torch.zeros(shape)))


# ---------------------------------------------------------------------------- jamba
def _period(pattern: list[bool]) -> tuple[int, int] | None:
    """The smallest (period, offset), offset < period, with ``pattern[i] == (i % period ==
    offset)`` for every layer (Jamba's layer rule), or None. No True at all: (n + 1, n)."""
    n = len(pattern)
    for period in range(1, n + 2):
        for offset in range(period):
            if all(pattern[i] == (i % period == offset) for i in range(n)):
                return period, offset
    return None


def _check_jamba(cfg: Config, routing: EvalRouting | None, bias_used: bool) -> str | None:
    """Why JambaForCausalLM cannot hold this model exactly (naming the field), or None.

    A Jamba layer: x + mixer(input_layernorm(x)), then + feed_forward(pre_ff_layernorm(.));
    the mixer is attention without positions where ``i % attn_layer_period ==
    attn_layer_offset``, else a Mamba mixer with RMSNorms on dt, B and C; the FFN is an
    MoE (softmax top-k, weights not renormalised, no bias) where ``i % expert_layer_period
    == expert_layer_offset``, else a SwiGLU MLP of the same intermediate_size."""
    m = cfg.model
    attn = [m.uses_attention(i) for i in range(m.n_layers)]
    if any(attn) and PositionEncoding(m.position_encoding) == PositionEncoding.rope:
        return ("model.position_encoding=rope: Jamba's attention applies no positional "
                "encoding (train with model.position_encoding=none)")
    if any(attn) and m.qkv_bias:
        return "model.qkv_bias=true: Jamba's attention has no q/k/v biases"
    if not all(attn) and not m.mamba_inner_norms:
        return ("model.mamba_inner_norms=false: Jamba's Mamba mixer always applies RMSNorms "
                "to dt, B and C (train with model.mamba_inner_norms=true)")
    pattern = _moe_pattern(m)
    if not any(pattern):
        return None
    chain = cfg.moe.chain_iterations
    residual = cfg.moe.chain_residual or ("inner" if chain > 1 else "outer")
    if chain > 1 or residual != "outer":
        return (f"moe.chain_iterations={chain} (moe.chain_residual={residual}): Jamba runs "
                f"its experts once per layer")
    if _period(pattern) is None:
        return (f"model.first_dense_layers={m.first_dense_layers}, model.moe_every="
                f"{m.moe_every}: Jamba's MoE layers are those with i % expert_layer_period "
                f"== expert_layer_offset (offset < period), none before the first")
    if m.num_experts < 2:
        return ("model.num_experts=1: Jamba builds a dense MLP wherever a layer has one "
                "expert (no router)")
    if not all(pattern) and m.ffn_hidden != m.expert_hidden:
        return (f"model.ffn_hidden={m.ffn_hidden} != model.expert_hidden={m.expert_hidden}: "
                f"Jamba's dense MLPs and experts share one intermediate_size")
    if m.expert_sizes is not None:
        return "model.expert_sizes is set: Jamba's experts all have one intermediate_size"
    if m.n_shared_experts:
        return f"model.n_shared_experts={m.n_shared_experts}: Jamba has no shared experts"
    if m.null_experts:
        return (f"model.zero_experts={m.zero_experts}, copy_experts={m.copy_experts}, "
                f"constant_experts={m.constant_experts}: Jamba has no zero-computation "
                f"experts")
    assert routing is not None
    if routing.score != ScoreFunc.softmax:
        return f"moe.router.score_func={routing.score.value}: Jamba routes with a softmax"
    if routing.renorm:
        return (f"the top-k weights are renormalised (moe.router.renormalize="
                f"{cfg.moe.router.renormalize}, top_k={routing.top_k}, moe.router.name="
                f"{RouterType(cfg.moe.router.name).value}) but Jamba weights each expert by "
                f"its softmax probability alone (train with moe.router.renormalize=false)")
    if routing.n_groups > 1:
        return f"moe.router.n_groups={routing.n_groups}: Jamba has no group-limited routing"
    if bias_used:
        return (f"the router expert_bias is nonzero (moe.router.bias_update_rate="
                f"{cfg.moe.router.bias_update_rate}): Jamba has no selection bias")
    return None


def _jamba_config(cfg: Config, vocab: int, dtype: torch.dtype,
                  routing: EvalRouting | None) -> dict:
    m = cfg.model
    pattern = _moe_pattern(m)
    moe = any(pattern)
    attn_period, attn_offset = _period([m.uses_attention(i) for i in range(m.n_layers)])
    expert_period, expert_offset = _period(pattern) if moe else (1, 0)
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["JambaForCausalLM"], "model_type": "jamba",
        "vocab_size": vocab, "hidden_size": m.dim, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads or m.n_heads,
        "hidden_act": "silu", "max_position_embeddings": m.max_seq_len,
        # one intermediate_size for experts and dense MLPs (_check_jamba: equal if both)
        "intermediate_size": m.expert_hidden if moe else m.ffn_hidden,
        "rms_norm_eps": m.norm_eps, "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std, "attention_dropout": 0.0,
        # transformers' Jamba cache sizes its masks from an attention layer (5.25 raises
        # without one): a Mamba-only model runs without the cache.
        "use_cache": any(m.uses_attention(i) for i in range(m.n_layers)),
        "torch_dtype": dtype_name, "dtype": dtype_name,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        "attn_layer_period": attn_period, "attn_layer_offset": attn_offset,
        # num_experts = 1 makes every layer a dense MLP (a model without MoE layers)
        "num_experts": m.num_experts if moe else 1,
        "num_experts_per_tok": routing.top_k if moe else 1,
        "expert_layer_period": expert_period, "expert_layer_offset": expert_offset,
        "router_aux_loss_coef": recipe_values(cfg.moe)["aux_loss_coef"] if moe else 0.0,
        "output_router_logits": False,
        "mamba_d_state": m.mamba_d_state, "mamba_d_conv": m.mamba_d_conv,
        "mamba_expand": m.mamba_expand,
        "mamba_dt_rank": m.mamba_dt_rank or math.ceil(m.dim / 16),
        "mamba_conv_bias": True, "mamba_proj_bias": False,  # build_mamba's
    }


def _jamba_items(model: torch.nn.Module, cfg: Config, routing: EvalRouting | None,
                 dtype: torch.dtype) -> list[_Item]:
    """Jamba's names: ``self_attn.{q,k,v,o}_proj`` or ``mamba.*`` (the mixer's names are
    transformers' JambaMambaMixer's, so they copy as they are), ``input_layernorm``,
    ``pre_ff_layernorm``, ``feed_forward`` (router and per-expert projections, or a dense
    MLP), ``model.final_layernorm``."""
    m = cfg.model
    sd = model.state_dict()
    items: list[_Item] = []

    def copy(name: str, key: str) -> None:
        t = sd[key]
        items.append(_Item(name, tuple(t.shape), dtype, lambda: t))

    copy("model.embed_tokens.weight", "tok_embeddings.weight")
    for i in range(m.n_layers):
        a, h = f"layers.{i}.", f"model.layers.{i}."
        copy(h + "input_layernorm.weight", a + "attention_norm.weight")
        copy(h + "pre_ff_layernorm.weight", a + "ffn_norm.weight")
        if m.uses_attention(i):
            for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"),
                                 ("wo", "o_proj")):
                copy(h + f"self_attn.{theirs}.weight", a + f"attention.{ours}.weight")
        else:
            for key in [k for k in sd if k.startswith(a + "mamba.")]:
                copy(h + key[len(a):], key)
        if m.is_moe_layer(i):
            items.extend(_moe_items(sd, a + "moe.", h, m, Target.jamba, routing, dtype))
        else:
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                copy(h + f"feed_forward.{theirs}.weight", a + f"feed_forward.{ours}.weight")
    copy("model.final_layernorm.weight", "norm.weight")
    if not m.tie_embeddings:
        copy("lm_head.weight", "output.weight")
    return items


# ---------------------------------------------------------------------------- entry
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9),
                       ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def export_hf(ckpt_dir: str | Path, out_dir: str | Path, target: Target | str = "auto", *,
              dtype: torch.dtype = torch.float32, max_shard_size: int | str = "5GB",
              config: Config | None = None, overwrite: bool = False,
              progress: bool = True) -> Target:
    """Write moetrain checkpoint ``ckpt_dir`` (any layout) as a Hugging Face directory.

    ``ckpt_dir``: a committed ``step_N`` directory, a checkpoints directory or a run.dir
    (latest step). ``out_dir`` gets ``config.json`` and safetensors (sharded at
    ``max_shard_size`` with ``model.safetensors.index.json``);
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` then gives moetrain's eval-mode
    logits. ``target``: see the module docstring; ``auto`` picks the first that holds the
    model exactly. ``config`` overrides the checkpoint's ``config.yaml``. Returns the target.
    """
    from moetrain.checkpoint.load import load, resolve_checkpoint

    _check_out_dir(Path(out_dir).expanduser(), overwrite, source=Path(ckpt_dir).expanduser())
    log.info("loading %s into one process (DCP reshards any layout)", ckpt_dir)
    model, cfg = load(ckpt_dir, "cpu", config=config)
    return export_model(model, cfg, out_dir, target, dtype=dtype, max_shard_size=max_shard_size,
                        overwrite=overwrite, progress=progress,
                        tokenizer_dir=resolve_checkpoint(ckpt_dir))


# The model's tokenizer as a checkpoint carries it (a Hugging Face tokenizer; written by
# the trainer, moetrain/data/hf_tokenizer.py), copied into the export as it is.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def _special_id(tokenizer_dir: Path, name: str) -> int | None:
    """The id of the tokenizer's ``name`` token (``eos_token``, ``bos_token``), from
    tokenizer_config.json and tokenizer.json; None if it names none."""
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        return None
    config = _read_json(tokenizer_dir / "tokenizer_config.json")
    token = config.get(name)
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str):
        return None
    tok = _read_json(tokenizer_dir / "tokenizer.json")
    for added in tok.get("added_tokens", []):
        if added.get("content") == token:
            return int(added["id"])
    vocab = tok.get("model", {}).get("vocab")
    return int(vocab[token]) if isinstance(vocab, dict) and token in vocab else None


def _copy_tokenizer(tokenizer_dir: Path | None, out: Path, hf: dict) -> bool:
    """Copy the checkpoint's tokenizer into ``out`` and put its BOS/EOS ids into the
    model config ``hf``; False when the checkpoint carries none."""
    if tokenizer_dir is None or not (tokenizer_dir / "tokenizer.json").is_file():
        return False
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out / name)
    hf["bos_token_id"] = _special_id(tokenizer_dir, "bos_token")
    hf["eos_token_id"] = _special_id(tokenizer_dir, "eos_token")
    return True


def _check_out_dir(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse an output that would clobber data: a non-empty directory without
    ``overwrite``, and, always, the checkpoint being exported or a directory holding it
    (``--overwrite`` deletes the old output)."""
    o = out.resolve()
    if source is not None:
        src = source.resolve()
        if o == src or o in src.parents or src in o.parents:
            raise HFConversionError(
                f"--out={str(out)!r} overlaps the checkpoint {str(source)!r} being exported "
                f"(writing there would delete or mix with it): pick a directory outside it")
    if not o.name or o == Path(o.anchor):
        raise HFConversionError(f"--out={str(out)!r} is not a usable directory name")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise HFConversionError(f"output directory {out} exists and is not empty: pick "
                                f"another --out or pass --overwrite")


def export_model(model: torch.nn.Module, cfg: Config, out_dir: str | Path,
                 target: Target | str = "auto", *, dtype: torch.dtype = torch.float32,
                 max_shard_size: int | str = "5GB", overwrite: bool = False,
                 progress: bool = True, tokenizer_dir: Path | None = None) -> Target:
    """Write a whole single-process ``Transformer`` built from ``cfg`` as a Hugging Face
    directory (what :func:`export_hf` does after loading the checkpoint).

    ``tokenizer_dir``: a directory holding the model's tokenizer as Hugging Face files (a
    checkpoint carries it): copied into the export, its BOS/EOS ids into config.json, so
    that ``AutoTokenizer.from_pretrained(out_dir)`` works too.

    Capacity-limited dispatch (``moe.dispatch=capacity``) exports as dropless, as every
    target is: the logits match wherever moetrain drops no token.
    """
    out = Path(out_dir).expanduser()
    _check_out_dir(out, overwrite)
    chosen = choose_target(model, cfg, target)
    routing = eval_routing(model)
    if routing is not None and any(layer.dispatcher.capacity_factor is not None
                                   for layer in model.moe_layers()):
        log.warning("moe.dispatch=capacity: %s is dropless; its logits equal moetrain's "
                    "wherever moetrain drops no token", chosen.value)
    hf = _hf_config(cfg, model.vocab_size, chosen, dtype, routing)
    items = _export_items(model, cfg, chosen, routing, dtype)
    # Written under a fresh temporary name, then swapped in: an interrupted export leaves
    # the old output (if any) intact, and no other directory is ever deleted.
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-export-", dir=out.resolve().parent))
    try:
        if not _copy_tokenizer(tokenizer_dir, tmp, hf) and tokenizer_dir is not None:
            log.warning("no tokenizer in %s (the run had none, it could not be saved, or "
                        "the checkpoint predates saved tokenizers): the export has none",
                        tokenizer_dir)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        _write_safetensors(items, tmp, _parse_size(max_shard_size), progress)
        old = None
        if out.exists():  # overwrite: checked above; moved aside until the swap is done
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    log.info("exported to %s as %s", out, hf["architectures"][0])
    return chosen
