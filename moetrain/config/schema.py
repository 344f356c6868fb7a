"""The typed config tree.

Every component receives its own sub-config (never the root). Choices are ``str, Enum``
because OmegaConf rejects ``Literal``. Single-field rules live in ``__post_init__``;
cross-field rules live in :func:`moetrain.config.validate.validate`. Every error names
the field, the bad value and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING


class ConfigError(ValueError):
    """A config value is invalid. The message names the field, the value and the fix."""


def _require(cond: bool, field_name: str, value: Any, fix: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}={value!r} is invalid: {fix}")


# ----------------------------------------------------------------------------- enums
class ScoreFunc(str, Enum):
    softmax = "softmax"
    sigmoid = "sigmoid"


class RouterType(str, Enum):
    topk = "topk"  # softmax/sigmoid top-k (Mixtral, DeepSeek)
    switch = "switch"  # top-1 softmax (Switch Transformer)
    deepseek_v3 = "deepseek_v3"  # sigmoid, group-limited, route_scale, aux-free bias
    noisy_topk = "noisy_topk"  # Shazeer et al. 2017: noisy logits, importance + load losses
    expert_choice = "expert_choice"  # Zhou et al. 2022: each expert picks its tokens
    sinkhorn = "sinkhorn"  # S-BASE (Clark et al. 2022), as Megatron-core's "sinkhorn"
    selective_sinkhorn = "selective_sinkhorn"  # SSR (arXiv 2511.08972): OT on a fraction p of steps
    threshold = "threshold"  # XMoE (Yang et al. 2024): experts until cumulative p >= threshold
    dts = "dts"  # EvoMoE's DTS gate (Nie et al. 2021): Gumbel-softmax threshold; schedule=evomoe
    recurrent = "recurrent"  # RMoE (arXiv 2408.06793): a GRU state shared across MoE layers
    compete = "compete"  # CompeteSMoE (arXiv 2505.13380): experts compete on some steps


class RNNCell(str, Enum):
    """The cell of the recurrent router (moe/router=recurrent, RMoE's moe_router_type)."""

    gru = "gru"  # torch.nn.GRUCell, RMoE's default
    rnn = "rnn"  # torch.nn.RNNCell with tanh


class Mixer(str, Enum):
    """The sequence mixer of each block (model.mixer)."""

    attention = "attention"  # every block attends (the Transformer)
    mamba = "mamba"  # every block runs a Mamba-1 mixer (MoE-Mamba, arXiv 2401.04081)
    hybrid = "hybrid"  # attention iff i % attention_period == attention_offset (Jamba)


class MambaScan(str, Enum):
    sequential = "sequential"  # one step per position (mamba_ssm's selective_scan_ref)
    chunked = "chunked"  # Mamba-2's SSD over chunks of model.mamba_chunk_size positions


class PositionEncoding(str, Enum):
    rope = "rope"  # rotary embeddings on q and k
    none = "none"  # no positional encoding in attention (Jamba: the Mamba layers carry it)


class ChainRouter(str, Enum):
    """Chain-of-Experts (moe.chain_iterations > 1): routers of the C rounds."""

    per_iteration = "per_iteration"  # one router per round (CoE's use_igate=true, default)
    shared = "shared"  # the round-0 router scores every round (use_igate=false)


class ChainResidual(str, Enum):
    """Chain-of-Experts residuals: x_t = [x_{t-1} +] MoE_t(x_{t-1}); block out = [h +] x_C."""

    inner = "inner"  # x_t = x_{t-1} + MoE_t(x_{t-1}); out = x_C (CoE's default flags)
    outer = "outer"  # x_t = MoE_t(x_{t-1}); out = h + x_C (C = 1: the standard block)
    both = "both"  # x_t = x_{t-1} + MoE_t(x_{t-1}); out = h + x_C


class ScheduleName(str, Enum):
    """Dense-to-sparse and annealing schedules (``schedule=<name>``, docs/schedules.md)."""

    none = "none"  # the router runs as configured
    temperature = "temperature"  # router softmax temperature annealed
    topk = "topk"  # experts per token annealed from k_start to k_end
    capacity = "capacity"  # the dispatcher's capacity factor annealed
    dts_gate = "dts_gate"  # softmax(act(logits) / tau), tau annealed (arXiv 2401.13875)
    evomoe = "evomoe"  # EvoMoE (arXiv 2112.14397): one expert, spawn, DTS gate, top-k


class Anneal(str, Enum):
    """Shape of an annealed value v(t) from ``start`` to ``end`` over N steps."""

    linear = "linear"  # start + (end - start) t / N
    exp = "exp"  # start (end / start)^(t / N)  (EvoMoE's exponential decay)
    cosine = "cosine"  # end + (start - end) (1 + cos(pi t / N)) / 2


class GateActivation(str, Enum):
    """Non-linearity on the router logits before the temperature softmax (the "activation
    dense-to-sparse gate" of Nguyen et al. 2024, arXiv 2401.13875)."""

    none = "none"  # softmax(logits / tau): the plain temperature gate
    tanh = "tanh"
    sigmoid = "sigmoid"
    gelu = "gelu"


class SpawnOptimizer(str, Enum):
    """EvoMoE spawn: what the spawned experts' optimizer state (AdamW moments) becomes."""

    copy = "copy"  # expert 0's moments (exp_avg masked like the weights, exp_avg_sq whole)
    reset = "reset"  # zeros, as for a fresh parameter (Adam's step count is per tensor)


class GroupScore(str, Enum):
    """Score of an expert group in group-limited routing (DeepSeek-V2/V3).

    The frameworks differ; reference page section 2 has an example that tells them apart."""

    top2_sum = "top2_sum"  # sum of the group's 2 highest scores (DeepSeek-V3 code, torchtitan)
    topk_sum = "topk_sum"  # sum of its top (top_k / topk_groups) scores (Megatron-core)


class BiasUpdate(str, Enum):
    """Rule of the auxiliary-loss-free expert-bias update (once per optimizer step)."""

    sign = "sign"  # b += rate * sign(mean(c) - c): Loss-Free Balancing Alg. 1, Megatron-core
    sign_centered = "sign_centered"  # the same step minus its mean over experts (torchtitan)


class DropPolicy(str, Enum):
    """Which (token, slot) rows an over-full expert keeps (moe.dispatch=capacity)."""

    probs = "probs"  # each expert keeps its highest router weights (Megatron-core default)
    slot = "slot"  # every first choice before any second choice, then by token (GShard)
    position = "position"  # by flat position t*K + k (earlier tokens first)
    # every first choice before any second choice; within a choice, the highest router
    # weight (XMoE's main_thresholdGating: priority = choice rank + probability)
    rank = "rank"


class CapacityRule(str, Enum):
    """Rows one expert accepts in capacity mode (moe.dispatch=capacity), with C = the
    capacity, cf = moe.capacity_factor, T tokens, K slots per token, E experts."""

    slots = "slots"  # C = ceil(cf * T * K / E) (Switch with K slots; Megatron-core)
    tokens = "tokens"  # C = max(ceil(cf * T / E), 4) (DeepSpeed/XMoE _capacity, min_capacity 4)


class BalanceLoss(str, Enum):
    """The load-balancing loss weighted by moe.aux_loss_coef."""

    switch = "switch"  # Switch/GShard: E * sum_e f_e P_e over the micro-batch (or global batch)
    seq = "seq"  # DeepSeek-V3 sequence-wise: the same per sequence, averaged over sequences
    xmoe = "xmoe"  # XMoE: E * sum_e mean_t(p_te) * (share of tokens whose top-1 is e)
    evomoe = "evomoe"  # EvoMoE: E^2 * mean_e(me_e * ce_e), me = mean gate, ce = share chosen
    # HMoE (arXiv 2408.10681): the Switch loss with f_e weighted by F_e / mean F
    size_weighted = "size_weighted"


class DispatchMode(str, Enum):
    dropless = "dropless"  # every routed row reaches its expert
    capacity = "capacity"  # at most capacity_factor * T*K/E rows per expert; overflow dropped


class ExpertBackend(str, Enum):
    auto = "auto"  # grouped_mm on CUDA, loop elsewhere
    loop = "loop"  # reference: one GEMM per expert
    grouped_mm = "grouped_mm"  # torch._grouped_mm


class KernelBackend(str, Enum):
    auto = "auto"  # Triton on CUDA once its start-up self-test passes, else torch (kernels/backend.py)
    torch = "torch"
    triton = "triton"


class AuxLossScope(str, Enum):
    micro_batch = "micro_batch"  # statistics of the local micro-batch (default)
    global_batch = "global_batch"  # running counts over the step's micro-batches of all dp ranks


class LRSchedule(str, Enum):
    cosine = "cosine"  # linear warmup, cosine decay to min_lr_ratio * lr
    wsd = "wsd"  # warmup-stable-decay (MiniCPM): linear warmup, flat, linear decay
    constant = "constant"  # linear warmup, then flat


class OptimOffload(str, Enum):
    none = "none"  # optimizer state on the training device, torch AdamW
    cpu = "cpu"  # ZeRO-Offload: fp32 master weights + Adam moments in CPU memory, DeepSpeedCPUAdam


class Precision(str, Enum):
    auto = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"


class DataParallelMode(str, Enum):
    fsdp = "fsdp"  # FSDP2 fully_shard: parameters, gradients, optimizer state sharded
    replicate = "replicate"  # plain replication, gradients all-reduced


class FSDPGradSync(str, Enum):
    """When FSDP reduce-scatters gradients under gradient accumulation (see
    moetrain/parallel/fsdp.py and moetrain/parallel/memory.py)."""

    auto = "auto"  # every_microbatch with FSDP; last_microbatch under pp > 1 (its schedule)
    every_microbatch = "every_microbatch"  # reduce-scatter after each micro-batch
    last_microbatch = "last_microbatch"  # keep unsharded fp32 gradients until the last one


class ExpertMode(str, Enum):
    """How an MoE layer with fewer experts than parallel.ep ranks runs its sharded experts
    (Tutel's adaptive parallelism; moetrain/parallel/adaptive.py)."""

    fixed = "fixed"  # one mode for the whole run: parallel.expert_r, else r=1
    adaptive = "adaptive"  # per layer call, the mode that moves the fewest bytes
    cycle = "cycle"  # every valid mode in turn, one per step (measuring, testing)


class ExpertTP(str, Enum):
    """How routed experts use the tensor-parallel ranks (parallel.tp > 1).

    Attention and dense MLPs are tensor-parallel either way (moetrain/parallel/tensor.py).
    """

    ep = "ep"  # each tp rank routes its sequence shard; experts are expert-parallel
    # over parallel.ep ranks (parallel.ep=tp: the ep group is the tp group), else replicated
    etp = "etp"  # expert-tensor-parallel: tokens gathered over tp, every expert's hidden
    # dim F sharded over tp (needs parallel.ep=1 and model.expert_hidden % tp == 0)


class AllToAllMode(str, Enum):
    """How the expert-parallel all-to-all moves rows (moetrain/parallel/hierarchical.py)."""

    flat = "flat"  # one all-to-all over the EP group: W - 1 peers per rank
    # Tutel's 2DH: an all-to-all inside each node, then one across nodes among the ranks of
    # the same local index: G - 1 + N - 1 peers per rank, in fewer, larger messages
    hierarchical = "hierarchical"


class DropMode(str, Enum):
    """Which intermediate channels Drop-Upcycling re-initialises (Nakamura et al. 2025)."""

    per_expert = "per_expert"  # one channel set per expert, shared by w1, w3 and w2 (paper)
    per_matrix = "per_matrix"  # an independent set per matrix (the released code)


class RouterInit(str, Enum):
    """Law of an upcycled model's fresh router gate, zero-mean with std init.router_std."""

    auto = "auto"  # uniform with Drop-Upcycling (init.drop_ratio > 0), else normal
    normal = "normal"  # N(0, std^2) (sparse upcycling: a fresh zero-mean router)
    uniform = "uniform"  # U(-a, a), a = std * sqrt(3) (Drop-Upcycling's torch_rand_002)


# Pipeline schedules of torch.distributed.pipelining. Functional API: OmegaConf matches a
# config string to a member *name*, and "1f1b" is not a Python identifier.
PipelineSchedule = Enum(
    "PipelineSchedule",
    [
        ("gpipe", "gpipe"),  # all forwards, then all backwards (Huang et al., 2019)
        ("1f1b", "1f1b"),  # one forward, one backward in steady state (Narayanan et al., 2021)
        # several non-adjacent stages per rank (parallel.pp_virtual_stages >= 2)
        ("interleaved_1f1b", "interleaved_1f1b"),
        # backward split into input and weight halves that fill the bubble (Qi et al., 2024)
        ("zero_bubble", "zero_bubble"),
    ],
    type=str,
)


class ActivationCheckpointing(str, Enum):
    """What the backward recomputes instead of keeping (Chen et al., 2016; Korthikanti et
    al., 2022). Recomputation changes memory and speed, never the numbers."""

    none = "none"  # keep every activation
    full = "full"  # keep only each transformer block's input; recompute the block
    selective = "selective"  # recompute each MoE layer's routed experts (parallel.ac_attention
    # adds each attention sublayer); the all-to-all is not re-run


# ----------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """Architecture of the decoder-only MoE LM. Presets live in conf/model/."""

    name: str = "tiny"  # preset name (conf/model/<name>.yaml)
    dim: int = 128  # D: model width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads; head dim = dim / n_heads
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads
    vocab_size: int | None = None  # None = the tokenizer's vocabulary size
    ffn_hidden: int = 512  # hidden size of dense (non-MoE) SwiGLU MLPs
    max_seq_len: int = 2048  # RoPE table length; train.seq_len must not exceed it
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    init_std: float = 0.02  # std of the normal init (output projections: / sqrt(2 n_layers))
    tie_embeddings: bool = False  # output layer shares the embedding (not with pp > 1)
    # Biases on the query/key/value projections (Qwen2 has them; Llama, Mistral do not).
    qkv_bias: bool = False
    # --- MoE placement and shape
    num_experts: int = 8  # E: routed experts per MoE layer
    top_k: int = 2  # K: routed experts per token
    expert_hidden: int = 256  # F: hidden size of one routed expert
    moe_every: int = 1  # every n-th layer is MoE (after the first_dense_layers)
    first_dense_layers: int = 0  # DeepSeekMoE keeps the first k layers dense
    n_shared_experts: int = 0  # always-on experts (DeepSeekMoE), each of expert_hidden
    # HMoE (arXiv 2408.10681): the hidden size of each routed expert, [F_1, ..., F_E]
    # (null: every expert has expert_hidden).
    expert_sizes: list[int] | None = None
    # MoE++ (arXiv 2410.07348) zero-computation experts, scored by the router beside the
    # num_experts FFN experts: zero (output 0), copy (output x) and constant (a learned
    # vector mixed with x) experts. Computed where the token is: never dispatched.
    zero_experts: int = 0
    copy_experts: int = 0
    constant_experts: int = 0
    # --- sequence mixer (attention, Mamba, or Jamba's hybrid of both)
    mixer: Mixer = Mixer.attention
    attention_period: int = 8  # hybrid: layer i attends iff i % period == offset (Jamba)
    attention_offset: int = 4
    position_encoding: PositionEncoding = PositionEncoding.rope
    mamba_d_state: int = 16  # N (mamba_simple's d_state)
    mamba_d_conv: int = 4  # causal depthwise conv width
    mamba_expand: int = 2  # inner channels I = expand * dim
    mamba_dt_rank: int | None = None  # R; null: ceil(dim / 16)
    # Jamba's RMSNorms on dt, B and C inside the mixer (transformers' JambaMambaMixer)
    mamba_inner_norms: bool = False
    # The selective scan: sequential (the reference loop; the faster one measured, on CPU)
    # or chunked (Mamba-2's SSD form, exact, about chunk_size times the scan's work).
    mamba_scan: MambaScan = MambaScan.sequential
    mamba_chunk_size: int = 8

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "ffn_hidden", "max_seq_len"):
            _require(getattr(self, name) > 0, f"model.{name}", getattr(self, name), "must be > 0")
        _require(
            self.dim % self.n_heads == 0,
            "model.dim",
            self.dim,
            f"must be divisible by model.n_heads={self.n_heads}",
        )
        _require(self.n_kv_heads is None or self.n_kv_heads >= 1, "model.n_kv_heads",
                 self.n_kv_heads, "must be >= 1, or null for model.n_heads")
        kv = self.n_kv_heads or self.n_heads
        _require(
            self.n_heads % kv == 0,
            "model.n_kv_heads",
            self.n_kv_heads,
            f"must divide model.n_heads={self.n_heads}",
        )
        _require((self.dim // self.n_heads) % 2 == 0, "model.dim", self.dim,
                 "head dim (dim / n_heads) must be even for RoPE")
        _require(self.num_experts >= 1, "model.num_experts", self.num_experts, "must be >= 1")
        _require(
            1 <= self.top_k <= self.num_experts + self.null_experts,
            "model.top_k",
            self.top_k,
            f"must be in [1, model.num_experts={self.num_experts}]" + (
                f" + {self.null_experts} zero-computation experts" if self.null_experts else ""),
        )
        _require(self.expert_hidden > 0, "model.expert_hidden", self.expert_hidden, "must be > 0")
        _require(self.moe_every >= 1, "model.moe_every", self.moe_every,
                 "must be >= 1 (1 = every layer is MoE)")
        _require(
            0 <= self.first_dense_layers <= self.n_layers,
            "model.first_dense_layers",
            self.first_dense_layers,
            f"must be in [0, model.n_layers={self.n_layers}]",
        )
        _require(self.n_shared_experts >= 0, "model.n_shared_experts", self.n_shared_experts,
                 "must be >= 0")
        if self.expert_sizes is not None:
            sizes = list(self.expert_sizes)
            _require(len(sizes) == self.num_experts, "model.expert_sizes", sizes,
                     f"must list one hidden size per expert (model.num_experts="
                     f"{self.num_experts}), or be null")
            _require(all(isinstance(f, int) and f > 0 for f in sizes), "model.expert_sizes",
                     sizes, "every size must be an integer > 0")
        for name in ("zero_experts", "copy_experts", "constant_experts"):
            _require(isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
                     f"model.{name}", getattr(self, name), "must be an integer >= 0")
        _require(self.attention_period >= 1, "model.attention_period", self.attention_period,
                 "must be >= 1")
        _require(0 <= self.attention_offset < self.attention_period, "model.attention_offset",
                 self.attention_offset,
                 f"must be in [0, model.attention_period={self.attention_period})")
        for name in ("mamba_d_state", "mamba_d_conv", "mamba_expand"):
            _require(getattr(self, name) >= 1, f"model.{name}", getattr(self, name),
                     "must be >= 1")
        _require(self.mamba_chunk_size >= 1, "model.mamba_chunk_size", self.mamba_chunk_size,
                 "must be >= 1")
        _require(self.mamba_dt_rank is None or self.mamba_dt_rank >= 1, "model.mamba_dt_rank",
                 self.mamba_dt_rank, "must be >= 1, or null for ceil(model.dim / 16)")

    @property
    def null_experts(self) -> int:
        """MoE++'s zero-computation experts (zero + copy + constant)."""
        return self.zero_experts + self.copy_experts + self.constant_experts

    def uses_attention(self, layer_idx: int) -> bool:
        """Whether block ``layer_idx`` mixes with attention (else Mamba)."""
        mixer = Mixer(self.mixer)
        if mixer == Mixer.hybrid:
            return layer_idx % self.attention_period == self.attention_offset
        return mixer == Mixer.attention

    def is_moe_layer(self, layer_idx: int) -> bool:
        if layer_idx < self.first_dense_layers:
            return False
        return (layer_idx - self.first_dense_layers) % self.moe_every == 0


# ----------------------------------------------------------------------------- moe
@dataclass
class RouterConfig:
    """How tokens pick experts. Selected with ``moe/router=<name>``."""

    name: RouterType = RouterType.topk
    score_func: ScoreFunc = ScoreFunc.softmax
    # Renormalise the top-k weights to sum to 1 (Mixtral). Switch (k=1) keeps the raw prob.
    renormalize: bool = True
    # Softmax temperature for the scores (dense-to-sparse schedules anneal it).
    temperature: float = 1.0
    # Multiplies the combine weights after renormalisation (DeepSeek-V3: 2.5).
    route_scale: float = 1.0
    # Group-limited routing (DeepSeek-V2/V3): experts form n_groups groups; each token picks
    # its topk_groups best groups, then its top_k experts inside them. 1 = off.
    n_groups: int = 1
    topk_groups: int = 1
    group_score: GroupScore = GroupScore.top2_sum
    # Auxiliary-loss-free balancing (DeepSeek-V3; Wang et al. 2024): the expert bias moves
    # by this rate once per optimizer step (0 = the bias stays 0). Needs sigmoid scores.
    bias_update_rate: float = 0.0
    bias_update: BiasUpdate = BiasUpdate.sign
    # Freeze the bias once this many training tokens are consumed (DeepSeek-V3: rate 1e-3
    # for the first 14.3T tokens, then 0). 0 = update for the whole run.
    bias_update_tokens: int = 0
    # noisy_topk (Shazeer et al. 2017): weights of CV^2(importance) and CV^2(load), and the
    # floor added to the learned noise std (tensor2tensor's noise_epsilon).
    importance_coef: float = 1e-2
    load_coef: float = 1e-2
    noise_epsilon: float = 1e-2
    # noisy_topk: W_g and W_noise start at zero (the paper, App. A; tensor2tensor's
    # noisy_top_k_gating); false = W_g ~ N(0, model.init_std^2), W_noise zero.
    noisy_zero_init: bool = True
    # expert_choice (Zhou et al. 2022): each expert takes round(c * T / E) tokens, c = the
    # average number of experts per token.
    ec_capacity_factor: float = 2.0
    # sinkhorn / selective_sinkhorn: iteration cap and tolerance on the column scalings.
    sinkhorn_iters: int = 100
    sinkhorn_tol: float = 1e-4
    # selective_sinkhorn: fraction p of training steps routed by optimal transport, and the
    # entropic regularisation xi of the transport problem (cost = logits / xi).
    ssr_prob: float = 0.01
    ssr_epsilon: float = 0.05
    # threshold (XMoE): each token takes experts, best first, until their cumulative
    # probability reaches the threshold; at least 1 and at most max_k (null =
    # model.num_experts: no cap, as XMoE's main_thresholdGating).
    threshold: float = 0.9
    max_k: int | None = None
    # recurrent (RMoE, arXiv 2408.06793): each MoE layer projects its router input to
    # rnn_hidden, one cell shared by all layers carries the state from layer to layer, and
    # a per-layer head gives the logits (qiuzh20/RMoE: moe_router_rnn_hidden_size 256, gru).
    rnn_hidden: int = 256
    rnn_cell: RNNCell = RNNCell.gru
    # compete (CompeteSMoE, arXiv 2505.13380; Fsoft-AIC/CompeteSMoE LM pretraining):
    # after the first compete_warmup share of train.steps, each (step, MoE layer) competes
    # with probability compete_rate, at most max_compete_layers layers per step. On a
    # competition step every expert runs on every token and the router learns the
    # competition's choice (MSE weighted by compete_router_coef); the diversity and
    # competition balance losses are weighted by their coefficients.
    compete_rate: float = 0.07
    compete_warmup: float = 0.05
    max_compete_layers: int = 2
    compete_router_coef: float = 1e-2
    compete_diversity_coef: float = 1e-2
    compete_balance_coef: float = 1e-2
    # hybrid: also an MSE on the router entries at the competition's picks, times theta.
    compete_hybrid: bool = False
    compete_theta: float = 0.1

    def __post_init__(self) -> None:
        _require(self.temperature > 0, "moe.router.temperature", self.temperature, "must be > 0")
        _require(self.route_scale > 0, "moe.router.route_scale", self.route_scale, "must be > 0")
        _require(self.n_groups >= 1, "moe.router.n_groups", self.n_groups,
                 "must be >= 1 (1 disables group-limited routing)")
        _require(1 <= self.topk_groups <= self.n_groups, "moe.router.topk_groups",
                 self.topk_groups, f"must be in [1, moe.router.n_groups={self.n_groups}]")
        _require(self.bias_update_rate >= 0, "moe.router.bias_update_rate",
                 self.bias_update_rate, "must be >= 0 (0 disables the bias update)")
        _require(self.bias_update_tokens >= 0, "moe.router.bias_update_tokens",
                 self.bias_update_tokens, "must be >= 0 (0 = update for the whole run)")
        for name in ("importance_coef", "load_coef", "noise_epsilon"):
            _require(getattr(self, name) >= 0, f"moe.router.{name}", getattr(self, name),
                     "must be >= 0")
        _require(self.ec_capacity_factor > 0, "moe.router.ec_capacity_factor",
                 self.ec_capacity_factor, "must be > 0 (average experts per token)")
        _require(self.sinkhorn_iters >= 1, "moe.router.sinkhorn_iters", self.sinkhorn_iters,
                 "must be >= 1")
        _require(self.sinkhorn_tol > 0, "moe.router.sinkhorn_tol", self.sinkhorn_tol, "must be > 0")
        _require(0 <= self.ssr_prob <= 1, "moe.router.ssr_prob", self.ssr_prob,
                 "must be in [0, 1] (share of steps routed by optimal transport)")
        _require(self.ssr_epsilon > 0, "moe.router.ssr_epsilon", self.ssr_epsilon, "must be > 0")
        _require(0 < self.threshold <= 1, "moe.router.threshold", self.threshold,
                 "must be in (0, 1] (cumulative probability)")
        _require(self.max_k is None or self.max_k >= 1, "moe.router.max_k", self.max_k,
                 "must be >= 1, or null for model.num_experts (no cap)")
        _require(isinstance(self.rnn_hidden, int) and self.rnn_hidden >= 1,
                 "moe.router.rnn_hidden", self.rnn_hidden, "must be an integer >= 1")
        _require(0 <= self.compete_rate <= 1, "moe.router.compete_rate", self.compete_rate,
                 "must be in [0, 1] (probability that a layer competes on a step)")
        _require(0 <= self.compete_warmup <= 1, "moe.router.compete_warmup",
                 self.compete_warmup, "must be in [0, 1] (share of train.steps without "
                 "competition)")
        _require(isinstance(self.max_compete_layers, int) and self.max_compete_layers >= 1,
                 "moe.router.max_compete_layers", self.max_compete_layers,
                 "must be an integer >= 1 (MoE layers that may compete in one step)")
        for name in ("compete_router_coef", "compete_diversity_coef", "compete_balance_coef",
                     "compete_theta"):
            _require(getattr(self, name) >= 0, f"moe.router.{name}", getattr(self, name),
                     "must be >= 0")


@dataclass
class MoEConfig:
    """Routing, dispatch, compute backend and load-balancing losses."""

    router: RouterConfig = field(default_factory=RouterConfig)
    dispatch: DispatchMode = DispatchMode.dropless
    # dispatch=capacity: rows per expert = ceil(capacity_factor * T * K / E)
    # (capacity_rule=slots), or max(ceil(capacity_factor * T / E), 4) (tokens). Tutel's
    # adaptive capacity: 0 = the step's largest expert load (max over the EP group, no
    # drops); -c = min(that load, the rule's rows for factor c). <= 0 reads C back once
    # per MoE layer call.
    capacity_factor: float = 1.25
    expert_backend: ExpertBackend = ExpertBackend.auto
    # Routing/permute/combine kernels: auto = Triton on CUDA once its self-test against the
    # torch references passes on that device, torch otherwise; triton forces them.
    kernel_backend: KernelBackend = KernelBackend.auto
    # Recompute the routed experts' SwiGLU activations in the backward (torch checkpoint):
    # saves ~4*R*F activation values per MoE layer for ~1/3 more expert FLOPs.
    recompute_experts: bool = False
    # The training recipe: null takes the router's paper recipe (moetrain/config/recipes.py,
    # docs/routers.md#training-recipes), resolved by validate(); a value set here wins.
    # Coefficient of the balance loss (0 = logged, not trained on; Switch: 1e-2).
    aux_loss_coef: float | None = None
    # Router z-loss coefficient (ST-MoE: 1e-3; 0 = off; null: the recipe's).
    z_loss_coef: float | None = None
    aux_loss_scope: AuxLossScope = AuxLossScope.micro_batch
    # The balance loss that aux_loss_coef weights (null: the recipe's).
    balance_loss: BalanceLoss | None = None
    # Capacity mode: which rows an over-full expert keeps (null: the recipe's).
    drop_policy: DropPolicy | None = None
    # Capacity mode: rows per expert, counted by slots or by tokens (null: the recipe's).
    capacity_rule: CapacityRule | None = None
    # Expert parallelism: split each rank's routed rows into this many chunks and overlap
    # the all-to-all of one chunk with the experts' compute on another (Tutel's
    # a2a_ffn_overlap_degree). 1 = one exchange each way, no overlap. Same math either way.
    # auto: a tuner times the steps and picks the fastest of 1, 2, 4, 8 per load
    # (moetrain/parallel/overlap_tuner.py).
    a2a_overlap_chunks: int | str = 1
    # Chain-of-Experts (Wang et al., arXiv 2506.18945; ZihanWang314/CoE): C sequential
    # rounds of route -> dispatch -> experts -> combine inside each MoE layer, the experts
    # (and shared experts) reused every round. 1 = the standard MoE layer.
    chain_iterations: int = 1
    chain_router: ChainRouter = ChainRouter.per_iteration
    # null: inner for chain_iterations > 1 (CoE's default flags: the block's output is x_C,
    # h is not added back), outer for 1 (the standard pre-norm block).
    chain_residual: ChainResidual | None = None
    # MoE++ (arXiv 2410.07348, eq. 7): the balance loss weights the zero-computation
    # experts' terms by tau (FFN experts: 1); smaller tau sends more tokens to them. 0.75 is
    # the paper's 7B model's (it sweeps 0.1-1.0).
    null_expert_tau: float = 0.75

    def __post_init__(self) -> None:
        cf = self.capacity_factor
        _require(math.isfinite(cf), "moe.capacity_factor", cf,
                 "must be a finite number (> 0 fixed capacity, 1.0 = exactly T*K/E rows per "
                 "expert; 0 adaptive; < 0 adaptive with a cap)")
        _require(cf > 0 or DispatchMode(self.dispatch) == DispatchMode.capacity,
                 "moe.capacity_factor", cf,
                 "a factor <= 0 is the adaptive capacity of moe.dispatch=capacity: set "
                 "moe.dispatch=capacity, or a factor > 0 (dropless ignores it)")
        n = self.a2a_overlap_chunks
        if isinstance(n, str) and n.strip().isdigit():  # "4" from a quoted YAML value
            self.a2a_overlap_chunks = n = int(n)
        _require(n == AUTO if isinstance(n, str) else
                 isinstance(n, int) and not isinstance(n, bool) and n >= 1,
                 "moe.a2a_overlap_chunks", n,
                 "must be an integer >= 1 (1 = one exchange each way, no overlap), or auto "
                 "(tuned per step)")
        _require(isinstance(self.chain_iterations, int) and self.chain_iterations >= 1,
                 "moe.chain_iterations", self.chain_iterations,
                 "must be an integer >= 1 (1 = the standard MoE layer; CoE uses 2)")
        for name in ("aux_loss_coef", "z_loss_coef"):
            v = getattr(self, name)
            _require(v is None or v >= 0, f"moe.{name}", v,
                     "must be >= 0, or null for the router's recipe")


# ----------------------------------------------------------------------------- optim
@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak learning rate, after warmup
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr
    weight_decay: float = 0.1  # AdamW decoupled weight decay, matrices only
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    schedule: LRSchedule = LRSchedule.cosine
    warmup_steps: int = 20  # linear LR warmup, in optimizer steps
    decay_fraction: float = 0.2  # wsd: share of train.steps spent in the final decay
    # cpu: ZeRO-Offload (Ren et al., 2021). The fp32 master weights and Adam moments live in
    # CPU memory and DeepSpeed's SIMD CPU Adam steps them (pip install 'moetrain[deepspeed]').
    offload: OptimOffload = OptimOffload.none

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio,
                 "must be in [0, 1]")
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        _require(0 <= self.beta1 < 1, "optim.beta1", self.beta1, "must be in [0, 1)")
        _require(0 <= self.beta2 < 1, "optim.beta2", self.beta2, "must be in [0, 1)")
        _require(self.eps > 0, "optim.eps", self.eps, "must be > 0 (AdamW divides by it)")
        _require(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip,
                 "must be >= 0 (0 disables clipping)")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        _require(0 <= self.decay_fraction <= 1, "optim.decay_fraction", self.decay_fraction,
                 "must be in [0, 1]")


# ----------------------------------------------------------------------------- data
@dataclass
class DataSourceConfig:
    """One source of a weighted mixture (``data.sources``)."""

    # A directory written by tools/prepare_data.py, megatron:PATH_PREFIX, or default.
    path: str = ""
    weight: float = 1.0  # relative share of the training samples (normalised to sum to 1)
    name: str = ""  # metrics.jsonl's val_loss/<name>; empty = the directory (prefix) name

    def __post_init__(self) -> None:
        _require(bool(self.path), "data.sources[].path", self.path,
                 "give each source a path: a prepared data directory or megatron:PREFIX")
        _require(self.weight > 0 and math.isfinite(self.weight), "data.sources[].weight",
                 self.weight, "must be a finite number > 0")


@dataclass
class DataConfig:
    # "default" = the embedded corpus (text of the Python installation, byte-level).
    # Otherwise a directory written by tools/prepare_data.py, or megatron:PATH_PREFIX: the
    # PATH_PREFIX.bin/.idx pair of Megatron-LM's preprocess_data.py, read in place (it
    # carries no tokenizer: model.vocab_size sets the vocabulary).
    source: str = "default"
    # A weighted mixture instead of one source, e.g.
    # [{path: data/a, weight: 0.3, name: a}, {path: megatron:/data/b_text_document, weight: 0.7}]
    # (a deterministic blend; validation per source as val_loss/<name>). Empty = data.source.
    sources: list[DataSourceConfig] = field(default_factory=list)
    # The tokenizer of megatron: sources, for decoding and export: a Hugging Face
    # tokenizer.json or directory, or a prepared data directory. Empty = none.
    tokenizer: str = ""
    # Where the default corpus is cached as token shards. Empty = ~/.cache/moetrain
    # (or $MOETRAIN_CACHE).
    cache_dir: str = ""
    # Size cap of the default corpus in MiB of text (it is cut deterministically).
    default_corpus_mb: float = 8.0
    # Share of the documents (the last ones) held out for validation, for the default
    # corpus and megatron: sources (a prepared directory fixed its own split).
    val_fraction: float = 0.01

    def __post_init__(self) -> None:
        _require(0 < self.val_fraction < 0.5, "data.val_fraction", self.val_fraction,
                 "must be in (0, 0.5)")
        _require(self.default_corpus_mb > 0, "data.default_corpus_mb", self.default_corpus_mb,
                 "must be > 0")
        _require(not (self.sources and self.source != "default"), "data.source", self.source,
                 "data.sources is set too: give one source with data.source, or a mixture "
                 "with data.sources (and leave data.source=default)")


# ----------------------------------------------------------------------------- train
AUTO = "auto"  # train.micro_batch_size=auto, moe.a2a_overlap_chunks=auto


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    # Sequences per rank per forward; accumulation is derived. "auto": validate() picks the
    # largest size <= max_micro_batch_size that divides each data-parallel rank's share
    # global_batch_size / dp (and, with parallel.pp > 1, leaves >= pp micro-batches for
    # the pipeline schedule); every user after validate() sees that int.
    micro_batch_size: int | str = "auto"
    max_micro_batch_size: int = 8  # cap of micro_batch_size=auto (activation memory)
    seq_len: int = 128  # tokens per sequence
    precision: Precision = Precision.auto
    log_every: int = 1  # metrics.jsonl / TensorBoard cadence, in steps
    progress: bool = True  # rank 0: a tqdm bar on a terminal, else a line per 5% of steps or 10 s
    # A step whose loss or gradient norm is NaN/inf is always skipped (no weight or
    # optimizer update; docs/nonfinite.md). fail_on_nonfinite: stop the run with
    # NonFiniteLossError after max_skipped_steps consecutive skipped steps (false or
    # max_skipped_steps=0: skip forever and never stop).
    fail_on_nonfinite: bool = True
    max_skipped_steps: int = 10
    # Stop this invocation after step N (checkpointing there) although the LR schedule
    # runs to train.steps; 0 = run to the end. For time-sliced jobs: re-launch to resume.
    stop_at: int = 0

    def uses_bf16(self, device_type: str) -> bool:
        """bf16 autocast (and bf16 FSDP parameters on CUDA): precision=bf16, or auto on CUDA."""
        p = Precision(self.precision)
        return p == Precision.bf16 or (p == Precision.auto and device_type == "cuda")

    def __post_init__(self) -> None:
        mb = self.micro_batch_size
        if isinstance(mb, str) and mb.strip().isdigit():  # "4" from a quoted YAML value
            self.micro_batch_size = mb = int(mb)
        _require(mb == AUTO if isinstance(mb, str) else mb > 0, "train.micro_batch_size", mb,
                 "must be a positive int, or auto (the largest that divides each "
                 "data-parallel rank's share of train.global_batch_size)")
        for name in ("steps", "global_batch_size", "max_micro_batch_size", "seq_len",
                     "log_every"):
            _require(getattr(self, name) > 0, f"train.{name}", getattr(self, name), "must be > 0")
        _require(self.max_skipped_steps >= 0, "train.max_skipped_steps", self.max_skipped_steps,
                 "must be >= 0 (0 = never stop on skipped steps)")
        _require(0 <= self.stop_at <= self.steps, "train.stop_at", self.stop_at,
                 f"must be in [0, train.steps={self.steps}] (0 = run to the end)")


@dataclass
class EvalConfig:
    every: int = 50  # validate every N optimizer steps (and after the last); 0 disables
    batches: int = 8  # micro-batches per validation

    def __post_init__(self) -> None:
        _require(self.every >= 0, "eval.every", self.every, "must be >= 0 (0 disables)")
        _require(self.batches > 0, "eval.batches", self.batches, "must be > 0")


@dataclass
class CheckpointConfig:
    dir: str = "${run.dir}/checkpoints"  # holds the step_NNNNNNN/ checkpoints
    every: int = 100  # save every N optimizer steps (and after the last); 0 disables
    resume: str = "auto"  # auto = latest complete checkpoint in dir; none; or a PATH
    keep: int = 3  # complete checkpoints kept; older ones are deleted; 0 keeps all
    # Also keep every checkpoint whose step is a multiple of keep_every (long-term
    # milestones beyond the last `keep`); 0 = off.
    keep_every: int = 0
    async_save: bool = False  # save in the background (dcp.async_save)
    # Load-time check against the checkpoint's MANIFEST.json: size (file sizes, cheap),
    # full (sizes + CRC32 of every byte) or none. docs/checkpoint_integrity.md
    verify: str = "size"

    def __post_init__(self) -> None:
        _require(self.every >= 0, "checkpoint.every", self.every, "must be >= 0 (0 disables)")
        _require(self.verify in ("size", "full", "none"), "checkpoint.verify", self.verify,
                 "must be one of size, full, none")
        _require(self.keep >= 0, "checkpoint.keep", self.keep, "must be >= 0 (0 keeps all)")
        _require(self.keep_every >= 0, "checkpoint.keep_every", self.keep_every,
                 "must be >= 0 (0 = off; N also keeps every checkpoint whose step is a "
                 "multiple of N)")


@dataclass
class LoggingConfig:
    tensorboard: bool = True  # scalars and expert-load images in <run.dir>/tensorboard
    heatmap_every: int = 50  # expert-load heatmap image cadence, in steps; 0 disables
    # Peak device FLOP/s used for MFU. 0 = look up the GPU (H100/A100...) or skip on CPU.
    peak_tflops: float = 0.0
    # Expert-collapse warning: an expert whose load stays below collapse_fraction of its
    # fair share (1/E of the rows) for collapse_steps consecutive steps is reported in the
    # log and as a metrics.jsonl event. collapse_steps=0 disables it.
    collapse_fraction: float = 0.1
    collapse_steps: int = 50

    def __post_init__(self) -> None:
        _require(0 <= self.collapse_fraction < 1, "logging.collapse_fraction",
                 self.collapse_fraction, "must be in [0, 1)")
        _require(self.collapse_steps >= 0, "logging.collapse_steps", self.collapse_steps,
                 "must be >= 0 (0 disables the warning)")
        _require(self.heatmap_every >= 0, "logging.heatmap_every", self.heatmap_every,
                 "must be >= 0 (0 disables)")
        _require(self.peak_tflops >= 0, "logging.peak_tflops", self.peak_tflops,
                 "must be >= 0 (0 = look up the GPU)")


@dataclass
class ParallelConfig:
    """Layout. world = pp * dp * tp; ep is carved out of dp * tp (see parallel/mesh.py)."""

    dp: int = -1  # -1 infers world_size / (pp * tp)
    ep: int = 1  # expert-parallel degree, carved out of dp * tp
    tp: int = 1  # tensor-parallel degree (innermost: keep it inside a node)
    pp: int = 1  # pipeline stages (outermost)
    dp_mode: DataParallelMode = DataParallelMode.fsdp
    # Gradient accumulation under FSDP: every_microbatch (reduce-scatter each micro-batch:
    # sharded gradients) | last_microbatch (sync once, but every unit's unsharded fp32
    # gradient is kept for the whole step) | auto. See moetrain/parallel/fsdp.py.
    fsdp_grad_sync: FSDPGradSync = FSDPGradSync.auto
    # Routed experts under tensor parallelism: ep (expert-parallel, tokens stay sequence-
    # sharded) | etp (expert-tensor-parallel). See ExpertTP and moetrain/parallel/tensor.py.
    expert_tp: ExpertTP = ExpertTP.ep
    # Fewer experts than parallel.ep (Tutel): each expert's hidden dim F is split over
    # ep / num_experts ranks, and each layer call runs in mode r: 0 gathers every expert
    # (no all-to-all), 1 gathers each expert on its ranks (expert-parallel), ep/num_experts
    # moves no weights (expert-tensor-parallel). expert_mode=adaptive picks r per call by
    # a cost model; expert_r pins it (null: 1, or the cost model's). See
    # moetrain/parallel/adaptive.py.
    expert_mode: ExpertMode = ExpertMode.fixed
    expert_r: int | None = None
    # Activation checkpointing, applied by parallelize() after TP/EP and before compile/FSDP
    # (see moetrain/parallel/activation_checkpoint.py). Checkpoints load across settings.
    ac: ActivationCheckpointing = ActivationCheckpointing.none
    ac_attention: bool = False  # with ac=selective: also recompute every attention sublayer
    compile: bool = False  # torch.compile each transformer block in place (FQNs unchanged)
    # Pipeline parallelism (parallel.pp > 1; see moetrain/parallel/pipeline.py). The
    # micro-batches of the schedule are the train.micro_batch_size micro-batches of one step.
    pp_schedule: PipelineSchedule = PipelineSchedule["1f1b"]
    pp_virtual_stages: int = 1  # stages per rank (interleaved_1f1b, zero_bubble)
    # First layer of each of the pp * pp_virtual_stages stages, e.g. [0, 3] for pp=2 on 6
    # layers; null = balance parameters and FLOPs (pipeline.default_split).
    pp_split: list[int] | None = None
    # Expert-parallel all-to-all (parallel.ep > 1): flat | hierarchical (Tutel's 2DH: inside
    # each node, then across nodes; the same rows arrive, in the same order). See
    # moetrain/parallel/hierarchical.py.
    a2a: AllToAllMode = AllToAllMode.flat
    # Ranks per node for a2a=hierarchical; null = torchrun's LOCAL_WORLD_SIZE (the whole
    # world when unset). Nodes are blocks of consecutive ranks; an EP group inside one node
    # falls back to the flat all-to-all.
    a2a_local_size: int | None = None

    def __post_init__(self) -> None:
        _require(self.dp == -1 or self.dp >= 1, "parallel.dp", self.dp, "must be >= 1 or -1 (infer)")
        a2a = AllToAllMode(self.a2a).value
        if self.a2a_local_size is not None:
            _require(self.a2a_local_size >= 1, "parallel.a2a_local_size", self.a2a_local_size,
                     "must be >= 1 (ranks per node), or null for torchrun's LOCAL_WORLD_SIZE")
            _require(a2a == "hierarchical", "parallel.a2a_local_size", self.a2a_local_size,
                     f"only applies to parallel.a2a=hierarchical (got parallel.a2a={a2a}): "
                     f"set parallel.a2a=hierarchical or drop parallel.a2a_local_size")
        ac = ActivationCheckpointing(self.ac).value
        _require(not self.ac_attention or ac == "selective", "parallel.ac_attention",
                 self.ac_attention, f"only applies to parallel.ac=selective (got parallel.ac="
                 f"{ac}): set parallel.ac=selective or drop parallel.ac_attention")
        _require(self.expert_r is None or (isinstance(self.expert_r, int) and self.expert_r >= 0),
                 "parallel.expert_r", self.expert_r,
                 "must be null or an int >= 0 (0 gathered, 1 expert-parallel, a divisor of "
                 "parallel.ep / model.num_experts)")
        for name in ("ep", "tp", "pp"):
            _require(getattr(self, name) >= 1, f"parallel.{name}", getattr(self, name), "must be >= 1")
        _require(self.pp_virtual_stages >= 1, "parallel.pp_virtual_stages",
                 self.pp_virtual_stages, "must be >= 1 (stages per pipeline rank)")
        if self.pp_split is not None:
            split = list(self.pp_split)
            _require(bool(split) and split[0] == 0
                     and sorted(set(split)) == split, "parallel.pp_split",
                     split, "must start at 0 and strictly increase (the first layer of each "
                     "stage), or be null for the balanced default")


@dataclass
class ScheduleConfig:
    """Dense-to-sparse and annealing schedules, chosen with ``schedule=<name>``
    (conf/schedule/, docs/schedules.md). A callback computes the values from the global
    step, so a resume lands mid-phase with the exact values. ``none`` keeps the router as
    configured. Fields that a schedule does not read are ignored."""

    name: ScheduleName = ScheduleName.none
    anneal: Anneal = Anneal.linear
    # Steps N from the start value to the end value (EvoMoE: from the spawn on); null = the
    # rest of the run less one step (train.steps - 1, minus diversify_steps for evomoe).
    steps: int | None = None
    # temperature, dts_gate, evomoe (the Gumbel-softmax tau): router temperature.
    temperature_start: float = 2.0
    temperature_end: float = 0.5
    # topk: experts per token, rounded toward k_start (docs/schedules.md).
    k_start: int | None = None  # null = model.num_experts (dense)
    k_end: int | None = None  # null = model.top_k
    # capacity (moe.dispatch=capacity): the dispatcher's capacity factor.
    capacity_start: float = 2.0
    capacity_end: float | None = None  # null = moe.capacity_factor
    # dts_gate: sigma in softmax(sigma(logits) / tau).
    activation: GateActivation = GateActivation.none
    # evomoe: steps training expert 0 alone before it is spawned into E experts, each a
    # copy masked with a keyed Bernoulli(mask_ratio) mask (mask_seed null = seed).
    diversify_steps: int = 0
    mask_ratio: float = 0.5
    mask_seed: int | None = None
    spawn_optimizer: SpawnOptimizer = SpawnOptimizer.copy
    # evomoe: an expert is used where its Gumbel-softmax value exceeds this (EvoMoE: 1e-3).
    gumbel_threshold: float = 1e-3
    # evomoe: first step of hard top-k routing; null = diversify_steps + steps.
    hard_step: int | None = None
    # evomoe: experts per token k of the hard phase and of evaluation (EvoMoE: top-1, the
    # argmax of the Gumbel softmax); null = model.top_k.
    hard_k: int | None = None
    # evomoe: combine with the Gumbel-softmax values g = softmax((logits + G) / tau) at the
    # chosen experts instead of softmax(logits) (EvoMoE's --use-gumbel-gates; off there).
    gumbel_gates: bool = False

    def __post_init__(self) -> None:
        _require(self.steps is None or self.steps >= 1, "schedule.steps", self.steps,
                 "must be >= 1, or null for the rest of the run")
        for name in ("temperature_start", "temperature_end", "capacity_start"):
            _require(getattr(self, name) > 0, f"schedule.{name}", getattr(self, name),
                     "must be > 0")
        _require(self.capacity_end is None or self.capacity_end > 0, "schedule.capacity_end",
                 self.capacity_end, "must be > 0, or null for moe.capacity_factor")
        for name in ("k_start", "k_end"):
            v = getattr(self, name)
            _require(v is None or v >= 1, f"schedule.{name}", v, "must be >= 1, or null")
        _require(self.diversify_steps >= 0, "schedule.diversify_steps", self.diversify_steps,
                 "must be >= 0 (0 = no expert-diversify phase)")
        _require(0 <= self.mask_ratio < 1, "schedule.mask_ratio", self.mask_ratio,
                 "must be in [0, 1) (share of expert 0's weights zeroed in each spawn)")
        _require(0 < self.gumbel_threshold < 1, "schedule.gumbel_threshold",
                 self.gumbel_threshold, "must be in (0, 1) (EvoMoE uses 0.001)")
        _require(self.hard_step is None or self.hard_step >= 0, "schedule.hard_step",
                 self.hard_step, "must be >= 0, or null for diversify_steps + steps")
        _require(self.hard_k is None or self.hard_k >= 1, "schedule.hard_k", self.hard_k,
                 "must be >= 1, or null for model.top_k (EvoMoE: 1)")


@dataclass
class InitConfig:
    """Where the weights start: a fresh initialisation, or upcycled from a dense model."""

    # A dense moetrain checkpoint (step_N directory) or a Hugging Face Llama/Qwen2/Mistral
    # directory to upcycle into this config's MoE; "" = fresh initialisation.
    # Used when no checkpoint is resumed (moetrain/checkpoint/upcycle.py, docs/upcycling.md).
    from_dense: str = ""
    # Drop-Upcycling (Nakamura et al. 2025, arXiv 2502.19261): share r of every expert's
    # intermediate channels re-initialised from N(mean, std) of the weights they replace.
    # 0 = plain sparse upcycling (every expert an exact copy); the paper recommends 0.5.
    drop_ratio: float = 0.0
    drop_mode: DropMode = DropMode.per_expert
    # Seeds the router init and the dropped channels, per (seed, layer, expert).
    seed: int = 0
    # The fresh router gate has mean 0 and std router_std; its expert bias starts at 0.
    router_std: float = 0.02
    # Its law: normal, uniform U(-a, a) with a = router_std * sqrt(3) (Drop-Upcycling's
    # released recipe), or auto = uniform when drop_ratio > 0, else normal.
    router_init: RouterInit = RouterInit.auto
    # Carry the dense checkpoint's AdamW moments over (copied to every expert like the
    # weights, zero for the router and dropped channels); false = a fresh optimizer.
    reuse_optimizer: bool = False

    def __post_init__(self) -> None:
        _require(0 <= self.drop_ratio <= 1, "init.drop_ratio", self.drop_ratio,
                 "must be in [0, 1] (share of each expert's channels re-initialised)")
        _require(self.router_std > 0, "init.router_std", self.router_std, "must be > 0")
        _require(self.seed >= 0, "init.seed", self.seed, "must be >= 0")


@dataclass
class RunConfig:
    dir: str = "outputs/${now:%Y-%m-%d_%H-%M-%S}"  # every output; Hydra's run dir follows it


@dataclass
class Config:
    """The root config. ``train.py`` builds it once with ``OmegaConf.to_object``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    init: InitConfig = field(default_factory=InitConfig)
    seed: int = 0  # model init, data order and every keyed random draw
    # Extra trainer callbacks by name (moetrain/train/callbacks/). The ones the config
    # needs (router context, expert bias, balance metrics) are always added.
    callbacks: list[str] = field(default_factory=list)


__all__ = [name for name in dir() if not name.startswith("_")] + ["MISSING"]
