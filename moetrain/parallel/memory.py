"""Per-rank memory of a training run, predicted from its config and parallel layout, and
the layouts of a world size that fit a GPU. ``tools/estimate_memory.py`` is the CLI.

Legend: T tokens of one micro-batch (micro_batch_size * seq_len), D model dim, F expert
hidden, Fd dense-MLP hidden, Fs shared-expert hidden, E experts, K top-k, R routed rows one
rank's experts receive, V vocabulary, H heads, t tp degree, c / r bytes per element of
matmul outputs / of the residual stream.

**Parameters** are exact: the model is built on the meta device and every parameter is
sharded as the real placement does it (``tensor.py``, ``expert.py``, ``fsdp.py``):
tensor-parallel dims over tp (vocab rows of the embedding and output; column-parallel
wq/wk/wv/w1/w3 on dim 0, row-parallel wo/w2 on dim 1; under ``parallel.expert_tp=etp`` the
experts' F dim), routed experts over ep on dim 0, then FSDP2 over dp (dense; experts too
when ep=1) or edp (experts, ep>1) on dim 0 of the local tensor; experts in their own edp
unit on dim 1 when their local experts do not split evenly over edp
(``fsdp.expert_fsdp_shard_dim``, the same function the placement calls); HMoE's ragged
experts (``model.expert_sizes``) are one stack per size class, each sharded the same way
(every rank holds n_c/ep experts of class c). FSDP2 splits
its dim like ``torch.chunk``: ceil(n/dp) rows per rank, the last ranks fewer, and pads
every shard to ceil(n/dp) rows in memory. Layers go to pipeline stages by the real split
(``pipeline.stage_split``); the embedding sits on stage 0, norm and output on the last.

**Training state**, per local parameter: fp32 master weight (4 B), fp32 gradient (4 B;
FSDP reduces in fp32), AdamW exp_avg and exp_avg_sq (8 B; with ``optim.offload=cpu`` on a
GPU they and a 4 B fp32 master copy are in CPU memory instead, ``MemoryEstimate.host``).
Under gradient accumulation with ``parallel.fsdp_grad_sync=last_microbatch`` (and under
pp > 1, whose schedule defers the reduce-scatter the same way) FSDP keeps every unit's
unsharded gradient in fp32 from the first micro-batch to the last, so the gradient term
is 4 B per parameter of the rank's FSDP units before sharding (the sharded gradient only
exists after the window); ``every_microbatch`` keeps the sharded fp32 gradient
(``fsdp.grad_sync_mode``). On top: FSDP's unsharded working set (the largest unit
all-gathered in the compute dtype, twice for prefetch, plus its unsharded gradient and
fp32 reduce-scatter input); without FSDP, bf16 autocast keeps a bf16 copy of each weight
for the backward, and replicated DP flattens all gradients.

**Activations** saved for the backward, per micro-batch and MoE layer (the tensors the
autograd graph holds, counted op by op on this model; the dense transformer terms are
Korthikanti et al., 2022, "Reducing Activation Recomputation in Large Transformer
Models", with flash attention, i.e. without their 5*a*s/h score terms):

    attention   norm in + normalised (2 r T/t D), the gathered q/k/v input (c T D, or
                3 c T D when autocast casts it once per projection), q, k, v (GQA
                heads repeated) and the output, which is wo's input (4 c T D / t)
    ffn norm    2 r T/t D, and the router's fp32 input (4 T/t D)
    router      fp32 logits and scores (~12 T E), top-k weights, ids and the dispatch
                permutation (40 T K)
    experts     input rows c R D, SwiGLU intermediates w1 out, silu, w3 out, product
                (4 c R F, F/t under etp; 3 c R F with the fused Triton SwiGLU)
    combine     expert output rows c R D (twice under EP: the regroup and the scatter)
                and the fp32 weighted rows 4 T K D (not with the fused Triton combine)
    shared/MLP  inputs plus 4 c T Fs / t (4 c T Fd / t for a dense layer)

with R = T K (T/t K when each tp rank routes its sequence shard) times the routing
imbalance (dropless) or the capacity factor (padded EP exchange); an adaptive capacity
(factor <= 0) takes its worst case, E x :func:`adaptive_capacity_bound`. The last stage adds the
final norm and the loss (fp32 log-softmax T V / t, plus the compute-dtype logits at the
peak). ``parallel.ac=full`` keeps only each block's input (r T/t D) and re-creates one
block at a time; ``selective`` (or ``moe.recompute_experts``) drops the 4 c R F expert
terms and re-creates one layer's; ``ac_attention`` drops the attention's projections and
core, keeping its input. The peak adds to the kept activations the larger of the logits
at the end of the forward and one recomputed region in the backward. A pipeline rank holds several micro-batches in flight: all of
them under GPipe, min(pp - rank, accumulation) under 1F1B.

**All-to-all buffers** (EP): one layer's send and receive rows, 2 r R D, transient.

On CPU in float32 the activation count equals the bytes of the tensors the autograd graph
saves (tests/unit/parallel/test_memory_estimate.py measures it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from moetrain.config.recipes import recipe_values
from moetrain.config.schema import (
    ActivationCheckpointing,
    Config,
    ConfigError,
    DataParallelMode,
    DispatchMode,
    ExpertBackend,
    ExpertTP,
    FSDPGradSync,
    KernelBackend,
    OptimOffload,
    RouterType,
)
from moetrain.config.validate import Layout, validate
from moetrain.models.moe.dispatcher import expert_capacity
from moetrain.parallel.fsdp import expert_fsdp_shard_dim, grad_sync_mode
from moetrain.parallel.mesh import ParallelDims

GiB = 1024**3

__all__ = [
    "GiB", "LayoutCost", "MemoryEstimate", "ParamInfo", "estimate", "local_param_counts",
    "model_params", "resolve_vocab_size", "suggest_layouts",
]


# ----------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParamInfo:
    """One parameter of the full model and how the layout shards it.

    layer: its layer index, -1 for the embedding, n_layers for the final norm / output.
    expert: a routed-expert weight (EP on dim 0, FSDP over edp when ep > 1, on dim 0 or 1
    by ``expert_fsdp_shard_dim``).
    tp_dims: the dim sharded over tp, per ``parallel.expert_tp`` mode (None = replicated).
    """

    name: str
    shape: tuple[int, ...]
    layer: int
    expert: bool
    tp_dim: dict[str, int | None]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


_COLWISE = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1",
            "feed_forward.w3")
_ROWWISE = ("attention.wo", "feed_forward.w2")
_EXPERT_F_DIM = {"w1_EFD": 1, "w3_EFD": 1, "w2_EDF": 2}


def _tp_dims(name: str, expert: bool) -> dict[str, int | None]:
    """The tensor-parallel dim of a parameter under each ``expert_tp`` mode (tensor.py)."""
    both = lambda d: {ExpertTP.ep.value: d, ExpertTP.etp.value: d}
    if name in ("tok_embeddings.weight", "output.weight"):
        return both(0)  # vocabulary-parallel
    if any(f".{m}.weight" in f".{name}" for m in _COLWISE):
        return both(0)
    if any(f".{m}.weight" in f".{name}" for m in _ROWWISE):
        return both(1)
    if expert:
        return {ExpertTP.ep.value: None, ExpertTP.etp.value: _EXPERT_F_DIM[name.split(".")[-1]]}
    if ".moe.shared_experts." in f".{name}":
        d = 1 if name.endswith("w2.weight") else 0
        return {ExpertTP.ep.value: None, ExpertTP.etp.value: d}
    return both(None)  # norms, router


def _unwrapped(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


_PARAMS_CACHE: dict[tuple[str, str, int], list[ParamInfo]] = {}


def model_params(cfg: Config, vocab_size: int) -> list[ParamInfo]:
    """Every parameter of ``Transformer(cfg.model, cfg.moe, vocab_size)`` (built on meta)."""
    key = (repr(cfg.model), repr(cfg.moe), vocab_size)
    if key not in _PARAMS_CACHE:
        _PARAMS_CACHE[key] = _model_params(cfg, vocab_size)
    return _PARAMS_CACHE[key]


def _model_params(cfg: Config, vocab_size: int) -> list[ParamInfo]:
    from moetrain.models import Transformer

    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.moe, vocab_size)
    L = cfg.model.n_layers
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        name = _unwrapped(name)
        parts = name.split(".")
        layer = int(parts[1]) if parts[0] == "layers" else (-1 if parts[0] == "tok_embeddings"
                                                            else L)
        expert = ".moe.experts." in f".{name}"
        out.append(ParamInfo(name, tuple(p.shape), layer, expert, _tp_dims(name, expert)))
    return out


def _chunk(n: int, parts: int, index: int) -> int:
    """Size of chunk ``index`` of ``torch.chunk`` of n rows into ``parts`` (FSDP2, DTensor)."""
    size = -(-n // parts)
    return max(0, min(size, n - index * size))


def _stage_layers(cfg: Config, vocab_size: int, layout: Layout) -> list[set[int]]:
    """Layer indices (with -1 = embedding and n_layers = head) held by each pp rank."""
    L = cfg.model.n_layers
    if layout.pp == 1:
        return [set(range(-1, L + 1))]
    from moetrain.parallel.pipeline import stage_ids_of, stage_split

    v = cfg.parallel.pp_virtual_stages
    n_stages = layout.pp * v
    starts = stage_split(cfg.model, vocab_size, cfg.train.seq_len, n_stages, cfg.parallel.pp_split,
                         cfg.moe)
    bounds = [*starts, L]
    out = []
    for r in range(layout.pp):
        held: set[int] = set()
        for s in stage_ids_of(r, layout.pp, v):
            held |= set(range(bounds[s], bounds[s + 1]))
            if s == 0:
                held.add(-1)
            if s == n_stages - 1:
                held.add(L)
        out.append(held)
    return out


def _fsdp(cfg: Config, layout: Layout) -> bool:
    return layout.dp > 1 and cfg.parallel.dp_mode == DataParallelMode.fsdp


def _local_shape(p: ParamInfo, cfg: Config, layout: Layout, c: dict[str, int]) -> list[int]:
    """The shape of ``p`` on the rank at mesh coordinates ``c``, before FSDP."""
    shape = list(p.shape)
    d = p.tp_dim[ExpertTP(cfg.parallel.expert_tp).value]
    if layout.tp > 1 and d is not None:
        shape[d] = _chunk(shape[d], layout.tp, c["tp"])
    if p.expert and layout.ep > 1 and ".classes." in f".{p.name}" and shape[0] % layout.ep:
        # an HMoE size class that does not divide over ep: every expert split along F
        f = _EXPERT_F_DIM[p.name.split(".")[-1]]
        shape[f] = _chunk(shape[f], layout.ep, c["ep"])
    elif p.expert and layout.ep > shape[0] > 0:  # sharded experts: 1/s of one expert's F
        s = layout.ep // shape[0]
        shape[0] = 1
        f = _EXPERT_F_DIM[p.name.split(".")[-1]]
        shape[f] = _chunk(shape[f], s, c["ep"] % s)
    elif p.expert and layout.ep > 1:
        shape[0] = _chunk(shape[0], layout.ep, c["ep"])
    return shape


def _fsdp_rows(p: ParamInfo, cfg: Config, layout: Layout,
               c: dict[str, int]) -> tuple[int, int, str]:
    """(FSDP degree, this rank's index, mesh axis) that shard ``p``'s local tensor (on the
    dim :func:`_fsdp_dim` gives).

    As parallelize() does: experts over edp when EP shards them or when tp ranks feed them
    different tokens (``expert_tp=ep``); modules replicated over tp although their ranks
    see different tokens (routers; shared experts under ``ep``) over dp x tp.
    """
    tp_routes_shard = layout.tp > 1 and ExpertTP(cfg.parallel.expert_tp) == ExpertTP.ep
    if p.expert and (layout.ep > 1 or tp_routes_shard):
        return layout.edp, c["edp"], "edp"
    name = f".{p.name}"
    if layout.tp > 1 and (".moe.router." in name or ".moe.chain_routers." in name
                          or (tp_routes_shard and ".moe.shared_experts." in name)):
        return layout.dp * layout.tp, c["dp_tp"], "dp_tp"
    return layout.dp, c["dp"], "dp"


def _fsdp_dim(p: ParamInfo, shape: list[int], n: int, axis: str) -> int:
    """The dim FSDP shards ``p`` (local ``shape``) on: experts in their own edp unit by the
    placement's own rule; everything else, experts inside a block's dp unit too, dim 0."""
    return expert_fsdp_shard_dim(shape, n) if p.expert and axis == "edp" else 0


def _rank_numel(params: list[ParamInfo], cfg: Config, layout: Layout, held: set[int],
                c: dict[str, int]) -> tuple[int, int]:
    """(unpadded, padded) local parameter count of the rank at coordinates ``c``."""
    fsdp = _fsdp(cfg, layout)
    unpadded = padded = 0
    for p in params:
        if p.layer not in held and not p.name.startswith("router_rnn."):  # on every stage
            continue
        if p.name == "output.weight" and cfg.model.tie_embeddings and -1 in held:
            continue  # one tensor with the embedding on this rank
        shape = _local_shape(p, cfg, layout, c)
        if fsdp:
            n, i, axis = _fsdp_rows(p, cfg, layout, c)
            d = _fsdp_dim(p, shape, n, axis)
            rest = math.prod(shape[:d] + shape[d + 1:])
            unpadded += _chunk(shape[d], n, i) * rest
            padded += -(-shape[d] // n) * rest
        else:
            unpadded += math.prod(shape)
            padded += math.prod(shape)
    return unpadded, padded


def local_param_counts(cfg: Config, layout: Layout, vocab_size: int) -> list[int]:
    """Parameters each global rank holds (unpadded FSDP shards: ``DTensor.to_local()``)."""
    params = model_params(cfg, vocab_size)
    dims = ParallelDims.from_layout(layout)
    stages = _stage_layers(cfg, vocab_size, layout)
    return [_rank_numel(params, cfg, layout, stages[dims.coords(r)["pp"]], dims.coords(r))[0]
            for r in range(layout.world_size)]


# ----------------------------------------------------------------------------- estimate
@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the most loaded rank (``rank``); ``parts`` itemises ``total``."""

    layout: Layout
    rank: int
    params: int  # local parameters of that rank (unpadded)
    parts: dict[str, int] = field(default_factory=dict)
    # That rank's CPU memory for optimizer state moved off the device (optim.offload=cpu).
    host: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def format(self) -> str:
        lines = [f"  {k:<24} {v / GiB:9.2f} GiB" for k, v in self.parts.items()]
        lines.append(f"  {'total':<24} {self.total / GiB:9.2f} GiB")
        lines += [f"  {k:<24} {v / GiB:9.2f} GiB (CPU memory)" for k, v in self.host.items()]
        return "\n".join(lines)


def resolve_vocab_size(cfg: Config) -> int:
    """``model.vocab_size``, else the data's tokenizer's (byte: 257; a prepared directory's
    or a mixture's meta; ``data.tokenizer`` for Megatron data), read without any shard."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    from moetrain.data import data_vocab_size

    try:
        vocab = data_vocab_size(cfg.data)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.vocab_size=None and the data's tokenizer cannot be read "
                          f"({e}): set model.vocab_size") from e
    if vocab is None:
        raise ConfigError(f"model.vocab_size=None and data.source={cfg.data.source!r} names "
                          f"no tokenizer (Megatron data without data.tokenizer): set "
                          f"model.vocab_size")
    return vocab


def _dtypes(cfg: Config, layout: Layout, device: str) -> tuple[int, int, int]:
    """(c, r, p): bytes of matmul outputs, of the residual stream, of FSDP's gathered params.

    As the trainer and parallelize() do: bf16 autocast for precision=bf16 (or auto on
    CUDA); FSDP then gathers bf16 parameters on CUDA, so the whole stream is bf16.
    """
    bf16 = cfg.train.uses_bf16(device)
    p = 2 if (bf16 and device == "cuda" and _fsdp(cfg, layout)) else 4
    return (2 if bf16 or p == 2 else 4), p, p


def _mean_hidden(m) -> float:
    """The F of an average routed row: model.expert_hidden, or with HMoE's ragged experts
    (model.expert_sizes) their mean, the cost of a row under uniform routing (a routing
    skewed to large experts costs more; ``imbalance`` scales the rows, not F)."""
    return m.expert_hidden if m.expert_sizes is None else sum(m.expert_sizes) / len(m.expert_sizes)


def adaptive_capacity_bound(tokens: float, top_k: int, num_experts: int, moe) -> float:
    """The largest C an adaptive capacity (``moe.capacity_factor`` <= 0) can reach when a
    dispatcher routes ``tokens`` tokens: a token's K experts are distinct, so one expert
    gets at most one row per token and every rank's load is at most T (reached when all
    tokens pick one expert). A factor -c caps it at the rule's capacity for factor c.
    Every rank's experts then hold E x C rows, padding included."""
    if moe.capacity_factor == 0:
        return tokens
    rule = recipe_values(moe)["capacity_rule"]
    return min(tokens, expert_capacity(tokens, top_k, num_experts, -moe.capacity_factor, rule))


def _layer_acts(cfg: Config, layout: Layout, i: int, T: int, device: str,
                imbalance: float, competes: bool = False) -> tuple[dict[str, float], float]:
    """Bytes one micro-batch leaves saved in layer ``i``, by region (see module doc), and
    the routed rows this rank's experts receive (0 for a dense layer). ``competes``: the
    layer runs a CompeteSMoE competition step (every expert on every token)."""
    m, moe, par = cfg.model, cfg.moe, cfg.parallel
    t = layout.tp
    c, r, _ = _dtypes(cfg, layout, device)
    casts = c != r  # autocast casts an fp32 input once per consuming matmul
    D, Ts = m.dim, T / t
    etp = t > 1 and ExpertTP(par.expert_tp) == ExpertTP.etp
    out = {}
    out["attn_norm"] = 2 * r * Ts * D + 4 * Ts
    if m.uses_attention(i):
        # q, k, v and the output, which is also wo's input; the log-sum-exp per head
        out["attn"] = ((3 * c if casts else r) * T * D + 4 * c * T * D / t
                       + 4 * T * m.n_heads / t)
    else:
        # a Mamba mixer: the sequential scan keeps about (2N + 12) I fp32 values per token
        # (measured from its saved tensors); the chunked one about 13 I N at chunk 8
        I, N = m.mamba_expand * D, m.mamba_d_state
        per_token = 13 * I * N if m.mamba_scan == "chunked" else I * (2 * N + 12)
        out["attn"] = 4 * T * per_token
    out["ffn_norm"] = 2 * r * Ts * D + 4 * Ts
    if not m.is_moe_layer(i):
        out["mlp"] = (2 * c if casts else r) * T * D + 4 * c * T * m.ffn_hidden / t
        return out, 0.0
    E, K, F = m.num_experts, m.top_k, _mean_hidden(m)
    C = moe.chain_iterations  # a chain of experts keeps every round's activations
    tokens = T if etp else Ts  # tokens this rank routes
    rows = tokens * K
    if DispatchMode(moe.dispatch) == DispatchMode.capacity and moe.capacity_factor <= 0:
        rows = E * adaptive_capacity_bound(tokens, K, E, moe)
    elif DispatchMode(moe.dispatch) == DispatchMode.capacity:
        rows *= moe.capacity_factor if layout.ep > 1 else min(1.0, moe.capacity_factor)
    else:
        rows *= imbalance
    if competes:  # CompeteSMoE's competition step: every expert on every token
        rows = tokens * E
    rows *= C
    # fp32 input; fp32 logits, scores and loss terms; top-k weights, ids, dispatch indices
    out["router"] = C * (4 * tokens * D + tokens * (12 * E + 40 * K))
    if RouterType(moe.router.name) == RouterType.recurrent:  # input, gate values, state
        out["router"] += 4 * tokens * 6 * moe.router.rnn_hidden
    # One cast of the rows for w1 and w3 (grouped_mm, CUDA); the loop backend (CPU) casts
    # each expert's rows once per matmul.
    out["experts_in"] = (2 if casts and device != "cuda" else 1) * c * rows * D
    # Saved SwiGLU values: w1 and w3 outputs and the product (w2's input), plus silu(w1 out)
    # for the eager gate; the fused Triton SwiGLU (grouped_mm on CUDA, kernel_backend
    # auto or triton) recomputes silu in its backward and keeps three.
    kernels = device == "cuda" and KernelBackend(moe.kernel_backend) != KernelBackend.torch
    fused = kernels and ExpertBackend(moe.expert_backend) != ExpertBackend.loop
    out["experts_mid"] = (3 if fused else 4) * c * rows * (F / t if etp else F)
    # The torch combine keeps the fp32 weighted rows; the fused kernel only the rows.
    out["combine"] = (c * rows * D * (2 if layout.ep > 1 else 1)
                      + (0 if kernels else 4 * C * tokens * K * D))
    if m.n_shared_experts:
        Fs = m.n_shared_experts * F
        # The fp32 norm output is already held by the router when nothing is cast.
        shared_in = (2 * c if casts else (0 if r == 4 else r)) * tokens * D
        out["shared"] = C * (shared_in + 4 * c * tokens * Fs / (t if etp else 1))
    return out, rows


def _ac_split(cfg: Config, layer: dict[str, float], block_in: float) -> tuple[float, float]:
    """(kept, recompute working set) of one layer under the configured recomputation."""
    ac = ActivationCheckpointing(cfg.parallel.ac)
    full = sum(layer.values())
    if ac == ActivationCheckpointing.full:
        return block_in, full
    experts = attn = 0.0
    if ac == ActivationCheckpointing.selective or cfg.moe.recompute_experts:
        experts = layer.get("experts_mid", 0.0)
    if ac == ActivationCheckpointing.selective and cfg.parallel.ac_attention:
        attn = layer["attn"]  # recomputed from its input, which the checkpoint keeps
        return full - experts - attn + block_in, max(experts, attn)
    return full - experts, experts


def _in_flight(cfg: Config, layout: Layout, pp_rank: int, accum: int) -> float:
    """Micro-batches whose activations a pipeline rank holds at once (per held stage)."""
    if layout.pp == 1:
        return 1
    from moetrain.config.schema import PipelineSchedule

    sched = PipelineSchedule(cfg.parallel.pp_schedule).value
    v = cfg.parallel.pp_virtual_stages
    if sched == "gpipe":
        return accum
    if v == 1:
        return min(layout.pp - pp_rank, accum)
    # Interleaved (Megatron): warm-up of 2 (pp - rank - 1) + (v - 1) pp chunk forwards.
    return min(accum * v, 2 * (layout.pp - pp_rank - 1) + (v - 1) * layout.pp + 1) / v


def estimate(cfg: Config, world_size: int, vocab_size: int | None = None, *,
             device: str = "cuda", imbalance: float = 1.0) -> MemoryEstimate:
    """Memory of the most loaded rank of ``cfg`` on ``world_size`` ranks (see module doc)."""
    layout = validate(cfg, world_size)
    vocab = vocab_size or resolve_vocab_size(cfg)
    params = model_params(cfg, vocab)
    dims = ParallelDims.from_layout(layout)
    stages = _stage_layers(cfg, vocab, layout)
    fsdp = _fsdp(cfg, layout)
    c, r, pb = _dtypes(cfg, layout, device)
    t = cfg.train
    T = t.micro_batch_size * t.seq_len
    accum = t.global_batch_size // (t.micro_batch_size * layout.dp)
    best: MemoryEstimate | None = None
    for pp_rank in range(layout.pp):
        # Rank 0 of every other axis holds the largest FSDP/TP chunks of its stage.
        rank = dims.rank(pp=pp_rank)
        coords = dims.coords(rank)
        held = stages[pp_rank]
        n, n_pad = _rank_numel(params, cfg, layout, held, coords)
        units = _fsdp_units(params, cfg, layout, held, coords) if fsdp else {}
        parts = {"params (fp32)": 4 * n_pad,
                 "grads (fp32)": 4 * _grad_numel(cfg, layout, accum, n_pad, units),
                 "adamw m+v (fp32)": 8 * n_pad}
        host = {}
        if cfg.optim.offload == OptimOffload.cpu and device != "cpu" and fsdp:
            # ZeRO-Offload under FSDP2's CPUOffloadPolicy: the fp32 parameter and gradient
            # shards and the moments live in CPU memory and are stepped there in place;
            # the device keeps the unsharded compute copies (param buffers) and, without a
            # per-micro-batch sync, the accumulation window's unsharded gradients.
            window = _grad_numel(cfg, layout, accum, n_pad, units)
            del parts["adamw m+v (fp32)"], parts["params (fp32)"]
            parts["grads (fp32)"] = 4 * window if window != n_pad else 0
            host = {"offload params (fp32)": 4 * n_pad, "offload grads (fp32)": 4 * n_pad,
                    "offload adam m+v (fp32)": 8 * n_pad}
        elif cfg.optim.offload == OptimOffload.cpu and device != "cpu":
            # ZeRO-Offload (train/offload.py) without sharding: the moments and an fp32
            # master copy live in CPU memory; the device keeps the parameters and grads.
            del parts["adamw m+v (fp32)"]
            host = {"offload master (fp32)": 4 * n, "offload adam m+v (fp32)": 8 * n}
        parts["param buffers"] = _param_buffers(units, layout, fsdp, c, pb, n_pad)
        layer_ids = sorted(i for i in held if 0 <= i < cfg.model.n_layers)
        kept = work = 0.0
        a2a = 0.0
        # CompeteSMoE: the worst step runs max_compete_layers layers densely.
        compete = (RouterType(cfg.moe.router.name) == RouterType.compete
                   and cfg.moe.router.compete_rate > 0)
        dense_left = cfg.moe.router.max_compete_layers if compete else 0
        for i in layer_ids:
            competes = dense_left > 0 and cfg.model.is_moe_layer(i)
            dense_left -= competes
            acts, rows = _layer_acts(cfg, layout, i, T, device, imbalance, competes)
            k, w = _ac_split(cfg, acts, r * T / layout.tp * cfg.model.dim)
            kept += k
            work = max(work, w)
            if layout.ep > 1:  # one layer's send and receive buffers (one chain round's)
                a2a = max(a2a, 2 * r * rows / cfg.moe.chain_iterations * cfg.model.dim)
        V, D, tp = vocab, cfg.model.dim, layout.tp
        head_kept = head = 0.0
        if cfg.model.n_layers in held:
            # final norm, the output projection's input, the fp32 log-softmax
            head_kept = 2 * r * T / tp * D + c * T * D + 4 * T * V / tp
            # the logits and their fp32 copy as the forward ends (then their gradients)
            head = (c + 4) * T * V / tp
        parts["activations"] = int((kept + head_kept) * _in_flight(cfg, layout, pp_rank, accum))
        # On top, at the peak: the logits as the forward ends, or one recomputed region as
        # the backward reaches it (the loss's saved tensors are freed by then).
        parts["logits / recompute"] = int(max(head, work - head_kept))
        parts["all-to-all buffers"] = int(a2a)
        est = MemoryEstimate(layout=layout, rank=rank, params=n, parts=parts, host=host)
        if best is None or est.total > best.total:
            best = est
    return best


def _fsdp_units(params, cfg, layout, held, coords) -> dict[str, int]:
    """Unsharded parameter count of each FSDP unit on the rank at ``coords``: a block, the
    root (embedding, final norm, output), and the units of their own (experts over edp,
    routers over dp x tp)."""
    units: dict[str, int] = {}
    for p in params:
        if p.layer not in held and not p.name.startswith("router_rnn."):  # on every stage
            continue
        if p.name == "output.weight" and cfg.model.tie_embeddings and -1 in held:
            continue  # one tensor with the embedding
        own_unit = _fsdp_rows(p, cfg, layout, coords)[2] != "dp"  # a separate FSDP unit
        key = (f"{p.name.rsplit('.', 1)[0]}" if own_unit
               else f"layer{p.layer}" if 0 <= p.layer < cfg.model.n_layers else "root")
        units[key] = units.get(key, 0) + math.prod(_local_shape(p, cfg, layout, coords))
    return units


def _grad_numel(cfg: Config, layout: Layout, accum: int, n_pad: int,
                units: dict[str, int]) -> int:
    """Gradient elements (fp32) a rank holds at the peak: the sharded gradient, or every
    FSDP unit's unsharded one when they are kept over an accumulation window."""
    keeps = grad_sync_mode(cfg.parallel, layout.dp, layout.pp) == FSDPGradSync.last_microbatch
    if units and keeps and accum > 1:
        return sum(units.values())
    return n_pad


def _param_buffers(units: dict[str, int], layout: Layout, fsdp: bool, c: int, pb: int,
                   n_pad: int) -> int:
    """FSDP's unsharded working set, or autocast's bf16 weight copies / flat DP gradients."""
    if not fsdp:
        copies = 2 * n_pad if c == 2 else 0  # autocast's bf16 weights saved for backward
        flat = 4 * n_pad if layout.dp > 1 else 0  # GradReplicator's flat all-reduce buffer
        return copies + flat
    largest = max(units.values(), default=0)
    reduce = largest * (pb + (4 if pb != 4 else 0))  # an unsharded gradient, fp32 reduce input
    if layout.pp > 1:  # stages stay gathered from forward to backward (parallel/pipeline.py)
        return sum(units.values()) * pb + reduce
    # Gathered (current + prefetched), its unsharded gradient, and the fp32 reduce input.
    return 2 * largest * pb + reduce


# ----------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class LayoutCost:
    """A layout, its memory estimate and a simple step-time model (seconds)."""

    estimate: MemoryEstimate
    compute_s: float
    comm_s: float
    bubble_s: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.comm_s + self.bubble_s


def _layouts(world_size: int) -> Iterator[tuple[int, int, int]]:
    for pp in range(1, world_size + 1):
        if world_size % pp:
            continue
        for tp in range(1, world_size // pp + 1):
            if (world_size // pp) % tp:
                continue
            dp = world_size // (pp * tp)
            for ep in range(1, dp * tp + 1):
                if (dp * tp) % ep == 0:
                    yield pp, tp, ep


def a2a_exposed_s(a2a_s: float, experts_s: float, chunks: int) -> float:
    """All-to-all time left on the critical path when it is split into ``chunks`` and
    pipelined against the experts: every chunk's exchange but the first (dispatch) or
    last (combine) can hide under another chunk's compute, so about (chunks-1)/chunks of
    the shorter of the two is hidden (Tutel, Hwang et al., 2023, arXiv 2206.03382)."""
    return a2a_s - (chunks - 1) / chunks * min(a2a_s, experts_s)


@dataclass(frozen=True)
class A2ALinks:
    """Planning figures for one expert-parallel all-to-all, per GPU and direction. The
    bandwidths are the layout ranker's (``suggest_layouts``: NVLink inside a node, one
    200 Gb/s NIC per GPU across); the per-message latencies and the copy bandwidth are
    assumptions of the same kind, not measurements."""

    intra_gbs: float = 300.0  # NVLink, GB/s
    inter_gbs: float = 25.0  # network, GB/s
    intra_latency_us: float = 2.0  # per message inside a node
    inter_latency_us: float = 10.0  # per message across nodes
    copy_gbs: float = 2000.0  # device memory, for a local regroup (read + write)


@dataclass(frozen=True)
class A2ATimes:
    """Seconds of one all-to-all (:func:`a2a_times`), and the messages each rank sends."""

    flat_s: float
    hierarchical_s: float
    flat_messages: tuple[int, int]  # (inside the node, across nodes)
    hierarchical_messages: tuple[int, int]

    @property
    def winner(self) -> str:
        return "hierarchical" if self.hierarchical_s < self.flat_s else "flat"


def a2a_times(send_bytes: float, nodes: int, local: int,
              links: A2ALinks = A2ALinks()) -> A2ATimes:
    """Time of one all-to-all in which every rank of N = ``nodes`` x G = ``local`` ranks
    sends S = ``send_bytes``, S/W to each of the W = N*G ranks (balanced routing), by the
    latency-bandwidth model t = messages * latency + bytes / bandwidth per link, hops in
    sequence (no overlap between them):

    - flat: G-1 messages of S/W over NVLink and (N-1)*G of S/W across nodes;
    - hierarchical (2DH, ``moetrain.parallel.hierarchical``): a local regroup (read and
      write S), G-1 messages of S/G over NVLink, a second regroup, then N-1 messages of
      S/N across nodes.

    Both send (N-1)/N * S across nodes; 2DH sends (N-1)(G-1) fewer network messages and
    pays (G-1)(S/G - S/W) more NVLink bytes and 4S bytes of copies, so it wins below
    :func:`a2a_break_even_bytes`. The rank's own slice is not counted (it stays local)."""
    N, G, S, L = nodes, local, float(send_bytes), links
    W = N * G
    ai, ae = L.intra_latency_us * 1e-6, L.inter_latency_us * 1e-6
    bi, be, bc = L.intra_gbs * 1e9, L.inter_gbs * 1e9, L.copy_gbs * 1e9
    flat = (G - 1) * (ai + S / W / bi) + (N - 1) * G * (ae + S / W / be)
    if N == 1 or G == 1:  # the hierarchical exchange falls back to the flat one
        return A2ATimes(flat, flat, (G - 1, (N - 1) * G), (G - 1, (N - 1) * G))
    hier = 2 * (2 * S / bc) + (G - 1) * (ai + S / G / bi) + (N - 1) * (ae + S / N / be)
    return A2ATimes(flat, hier, (G - 1, (N - 1) * G), (G - 1, N - 1))


def a2a_break_even_bytes(nodes: int, local: int, links: A2ALinks = A2ALinks()) -> float:
    """Bytes S per rank above which the flat all-to-all is faster than 2DH (same model as
    :func:`a2a_times`): S* = (N-1)(G-1) a_inter / ((G-1)(1/G - 1/W)/B_intra + 4/B_copy).
    0 where 2DH is the flat exchange (N = 1 or G = 1)."""
    N, G, L = nodes, local, links
    if N == 1 or G == 1:
        return 0.0
    saved = (N - 1) * (G - 1) * L.inter_latency_us * 1e-6
    per_byte = (G - 1) * (1 / G - 1 / (N * G)) / (L.intra_gbs * 1e9) + 4 / (L.copy_gbs * 1e9)
    return saved / per_byte


def a2a_table(nodes: int = 128, local: int = 8, dim: int = 4096, top_k: int = 2,
              elem_bytes: int = 2, tokens: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384,
                                                              32768, 65536),
              links: A2ALinks = A2ALinks()) -> str:
    """Flat vs hierarchical time of one all-to-all (the dispatch; the combine is the same)
    for ``tokens`` per rank, each sent to ``top_k`` experts as rows of ``dim`` values of
    ``elem_bytes``, on ``nodes`` x ``local`` GPUs (:func:`a2a_times`)."""
    W = nodes * local
    head = (f"{'tokens/rank':>11}  {'MB sent':>8}  {'KB/msg flat':>11}  {'KB/msg 2DH':>10}  "
            f"{'flat ms':>8}  {'2DH ms':>8}  {'speed-up':>8}  winner")
    title = (f"{nodes} nodes x {local} GPUs = {W} ranks, D={dim}, top-{top_k}, "
             f"{elem_bytes} B/value; NVLink {links.intra_gbs:g} GB/s + "
             f"{links.intra_latency_us:g} us/msg, network {links.inter_gbs:g} GB/s + "
             f"{links.inter_latency_us:g} us/msg, copies {links.copy_gbs:g} GB/s")
    lines = [title, head, "-" * len(head)]
    for t in tokens:
        S = t * top_k * dim * elem_bytes
        r = a2a_times(S, nodes, local, links)
        lines.append(f"{t:>11}  {S / 1e6:>8.1f}  {S / W / 1e3:>11.1f}  {S / nodes / 1e3:>10.1f}  "
                     f"{r.flat_s * 1e3:>8.2f}  {r.hierarchical_s * 1e3:>8.2f}  "
                     f"{r.flat_s / r.hierarchical_s:>7.2f}x  {r.winner}")
    be = a2a_break_even_bytes(nodes, local, links)
    if be:
        per_token = top_k * dim * elem_bytes
        lines.append(f"messages per rank: flat {local - 1} + {(nodes - 1) * local}, 2DH "
                     f"{local - 1} + {nodes - 1}; 2DH wins below {be / 1e6:.0f} MB sent per "
                     f"rank ({be / per_token:,.0f} tokens per rank)")
    return "\n".join(lines)


def _step_cost(cfg: Config, est: MemoryEstimate, vocab: int, *, peak_tflops: float,
               mfu: float, gpus_per_node: int, intra_gbs: float, inter_gbs: float) -> LayoutCost:
    """Compute at ``mfu`` of ``peak_tflops``, plus un-overlapped communication (ring
    collectives over NVLink inside a node, the network across) and the pipeline bubble.
    Deliberately simple: it ranks layouts, it does not predict a step time."""
    from moetrain.models import count_params

    lay, m, t = est.layout, cfg.model, cfg.train
    c = 2
    tokens = t.global_batch_size * t.seq_len
    active = count_params(m, vocab, cfg.moe).active
    compute = 6 * active * tokens / lay.world_size / (peak_tflops * 1e12 * mfu)
    accum = t.global_batch_size // (t.micro_batch_size * lay.dp)
    T = t.micro_batch_size * t.seq_len
    layers = m.n_layers / lay.pp
    moe_layers = sum(m.is_moe_layer(i) for i in range(m.n_layers)) / lay.pp

    def bw(span: int) -> float:
        return (intra_gbs if span <= gpus_per_node else inter_gbs) * 1e9

    comm = 0.0
    if lay.tp > 1:  # sequence parallel: 2 all-gathers + 2 reduce-scatters per layer and pass
        vol = 4 * 2 * layers * c * T * m.dim * (lay.tp - 1) / lay.tp
        comm += accum * vol / bw(lay.tp)
    if lay.ep > 1:  # dispatch + combine, forward and backward (again under full AC)
        n = 6 if ActivationCheckpointing(cfg.parallel.ac) == ActivationCheckpointing.full else 4
        # a chain of experts exchanges its rows once per round
        chain = cfg.moe.chain_iterations
        vol = n * chain * moe_layers * c * T / lay.tp * m.top_k * m.dim * (lay.ep - 1) / lay.ep
        # The routed experts' FLOPs on this rank (6 per weight and row; 8 with the forward
        # recomputed), which chunked all-to-all (moe.a2a_overlap_chunks) runs under.
        per_row = 3 * m.dim * _mean_hidden(m) * m.top_k * chain * moe_layers * lay.pp
        flops = (8 if n == 6 else 6) * per_row
        experts_s = flops * tokens / lay.world_size / (peak_tflops * 1e12 * mfu)
        chunks = cfg.moe.a2a_overlap_chunks
        if chunks == "auto":  # the tuner keeps the fastest; this model has no per-chunk cost
            from moetrain.parallel.overlap_tuner import CANDIDATES

            chunks = max(CANDIDATES)
        comm += a2a_exposed_s(accum * vol / bw(lay.ep), experts_s, chunks)
    if lay.dp > 1:
        n = est.params * lay.dp  # unsharded over dp: what one rank gathers each pass
        if cfg.parallel.dp_mode == DataParallelMode.fsdp:
            # all-gathers forward and backward per micro-batch; fp32 reduce-scatters
            every = grad_sync_mode(cfg.parallel, lay.dp, lay.pp) == FSDPGradSync.every_microbatch
            vol = (2 * accum * c + 4 * (accum if every else 1)) * n * (lay.dp - 1) / lay.dp
        else:
            vol = 2 * 4 * est.params * (lay.dp - 1) / lay.dp
        comm += vol / bw(lay.dp * lay.tp)
    if lay.pp > 1:  # activations forward and their gradients backward, per micro-batch
        comm += 2 * accum * c * T / lay.tp * m.dim / bw(2 * lay.dp * lay.tp)
    bubble = compute * (lay.pp - 1) / accum if lay.pp > 1 else 0.0
    return LayoutCost(est, compute, comm, bubble)


def suggest_layouts(cfg: Config, world_size: int, gpu_memory_gb: float, *,
                    vocab_size: int | None = None, reserve_gb: float = 2.0,
                    imbalance: float = 1.0, peak_tflops: float = 989.0, mfu: float = 0.4,
                    gpus_per_node: int = 8, intra_gbs: float = 300.0,
                    inter_gbs: float = 25.0) -> tuple[list[LayoutCost], int]:
    """Every valid (pp, dp, tp, ep) of ``world_size`` that fits ``gpu_memory_gb`` minus
    ``reserve_gb`` (CUDA context, NCCL, allocator slack), fastest first by
    :func:`_step_cost`; and how many valid layouts were tried."""
    vocab = vocab_size or resolve_vocab_size(cfg)
    budget = (gpu_memory_gb - reserve_gb) * GiB
    fits, tried = [], 0
    for pp, tp, ep in _layouts(world_size):
        par = dataclasses.replace(cfg.parallel, pp=pp, tp=tp, ep=ep, dp=-1, pp_split=None)
        if ExpertTP(par.expert_tp) == ExpertTP.etp and ep > 1:
            continue
        trial = dataclasses.replace(cfg, parallel=par)
        try:
            est = estimate(trial, world_size, vocab, imbalance=imbalance)
        except (ConfigError, ValueError):
            continue  # not a valid layout for this model and batch
        tried += 1
        if est.total <= budget:
            fits.append(_step_cost(trial, est, vocab, peak_tflops=peak_tflops, mfu=mfu,
                                   gpus_per_node=gpus_per_node, intra_gbs=intra_gbs,
                                   inter_gbs=inter_gbs))
    fits.sort(key=lambda x: (x.step_s, x.estimate.total))
    return fits, tried
