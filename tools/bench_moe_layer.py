"""Benchmark one MoE layer, forward + backward, side by side in one process.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, R = T*K routed rows.

Implementations, all on the same shapes (inputs (T/S, S, D), S = min(2048, T)):
- ``moetrain``: :class:`moetrain.models.moe.MoELayer` (softmax top-k, renormalised; aux
  and z-loss coefficients 0, as the peers compute none) with ``--kernel-backend``
  (default ``auto``: the Triton kernels on CUDA once their start-up self-test passed);
- ``moetrain_torch`` and ``moetrain_triton``: the same layer with
  ``moe.kernel_backend=torch`` and ``=triton``, so one run shows what the kernels buy;
- ``naive_loop``: a Python loop over experts (index, SwiGLU, index_add) with the same
  router and weights: the correctness reference, checked before anything is timed;
- ``dense_limit``: one SwiGLU GEMM chain over all R routed rows, the roofline a perfectly
  load-balanced grouped GEMM could reach (no routing, no permutation);
- ``hf_mixtral`` and ``hf_mixtral_grouped_mm``: Hugging Face transformers'
  ``MixtralSparseMoeBlock`` (default, and ``config._experts_implementation="grouped_mm"``);
- ``torchtitan``: torchtitan's ``MoE`` (softmax top-k, route_norm, no bias);
- ``megatron``: megatron-core's ``MoELayer`` with its local (no Transformer Engine) spec:
  ``SequentialMLP`` experts, the all-gather dispatcher, fp32 routing. Its router moves its
  weight to ``torch.cuda.current_device()``, so it runs on CUDA only (one-rank process group).
Peers that are not importable are reported as skipped with the reason.

``--capacity-factor CF`` (repeatable) adds ``capacity_cf<CF>``: the same layer with
``moe.dispatch=capacity`` and ``moe.capacity_factor=CF`` (``--kernel-backend``'s kernels):
a fixed capacity for CF > 0, Tutel's adaptive capacity for CF <= 0 (0: C = the largest
expert load; -c: min(that, the factor-c capacity)). Each row notes its C, its E x C rows
against the T*K routed rows, and the share of rows dropped; these rows are not judged
against the targets (a dropping layer is another function). With CF = 0 nothing is dropped
and the row must match the naive loop.

Every moetrain variant is checked against the naive loop before anything is timed. On a GPU
the report marks whether the fastest moetrain variant meets the shape's targets, ratios
measured in the same run: at most ``max_vs_torchtitan`` x torchtitan's time, and at least
``min_pct_dense`` % of the dense limit's throughput.

Each figure is the mean of ``--iters`` timed iterations after ``--warmup`` warm-ups
(CUDA events on GPU, perf_counter on CPU). Expert FLOPs of one forward + backward are
18 * T * K * D * F (three GEMMs of 2 R D F each, forward once and backward twice).

    python tools/bench_moe_layer.py --json bench.json            # GPU, the three shapes
    python tools/bench_moe_layer.py --device cpu --shape tiny    # CPU smoke run
    python tools/bench_moe_layer.py --device cpu --shape qwen3_like --scale 32   # E, K kept
    python tools/bench_moe_layer.py --device cpu --shape tiny --impl moetrain_torch \
        --capacity-factor 1.25 --capacity-factor 0 --capacity-factor -1   # capacity modes
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import moetrain  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moetrain.config.schema import ConfigError


@dataclass(frozen=True)
class Shape:
    name: str
    D: int
    F: int
    E: int
    K: int
    T: int
    # moetrain's targets on one GPU, bf16, forward + backward, as ratios to peers measured
    # in the same run: time <= max_vs_torchtitan x torchtitan's, throughput >= min_pct_dense
    # % of the dense limit's.
    max_vs_torchtitan: float | None = None
    min_pct_dense: float | None = None

    @property
    def seq(self) -> int:
        return min(2048, self.T)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.T // self.seq, self.seq, self.D)

    def scaled(self, factor: int) -> Shape:
        """The same E and K with D, F and T divided by ``factor`` (multiples of 8, so the
        grouped GEMMs stay aligned): the shape's routing on a CPU budget."""
        if factor <= 1:
            return self

        def div(n: int) -> int:
            return max(8, n // factor // 8 * 8)

        T = div(self.T)
        T = T // 2048 * 2048 if T > 2048 else T  # whole sequences of 2048
        return replace(self, name=f"{self.name}/{factor}", D=div(self.D), F=div(self.F), T=T)


SHAPES = {
    "mixtral_like": Shape("mixtral_like", D=4096, F=14336, E=8, K=2, T=8192,
                          max_vs_torchtitan=0.9),
    "fine_grained": Shape("fine_grained", D=2048, F=1408, E=64, K=6, T=16384,
                          max_vs_torchtitan=0.8, min_pct_dense=70.0),
    "qwen3_like": Shape("qwen3_like", D=2048, F=768, E=128, K=8, T=16384,
                        max_vs_torchtitan=0.8, min_pct_dense=70.0),
    "tiny": Shape("tiny", D=64, F=96, E=8, K=2, T=256),  # CPU smoke test
}
DEFAULT_SHAPES = ("mixtral_like", "fine_grained", "qwen3_like")
IMPLS = ("moetrain", "moetrain_torch", "moetrain_triton", "naive_loop", "dense_limit",
         "hf_mixtral", "hf_mixtral_grouped_mm", "torchtitan", "megatron")


def expert_flops(s: Shape) -> int:
    """Expert GEMM FLOPs of one forward + backward: 18 * T * K * D * F."""
    return 18 * s.T * s.K * s.D * s.F


# ----------------------------------------------------------------------------- weights
@dataclass
class Weights:
    """One set of MoE weights shared by every implementation (moetrain's layout)."""

    gate_ED: torch.Tensor
    w1_EFD: torch.Tensor
    w3_EFD: torch.Tensor
    w2_EDF: torch.Tensor


def make_weights(s: Shape, device: torch.device, dtype: torch.dtype, seed: int) -> Weights:
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, std):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

    return Weights(randn(s.E, s.D, std=0.02), randn(s.E, s.F, s.D, std=0.02),
                   randn(s.E, s.F, s.D, std=0.02), randn(s.E, s.D, s.F, std=0.02))


# ----------------------------------------------------------------------------- modules
def build_moetrain(s: Shape, w: Weights, kernel_backend: str, expert_backend: str,
                   capacity_factor: float | None = None) -> nn.Module:
    """moetrain's MoELayer with the shared weights: dropless, or ``moe.dispatch=capacity``
    with ``capacity_factor`` (<= 0: the adaptive capacity)."""
    from moetrain.config.schema import DispatchMode, ModelConfig, MoEConfig
    from moetrain.models.moe.layer import MoELayer

    mcfg = ModelConfig(dim=s.D, n_heads=1, num_experts=s.E, top_k=s.K, expert_hidden=s.F)
    capacity = {} if capacity_factor is None else {"dispatch": DispatchMode.capacity,
                                                   "capacity_factor": capacity_factor}
    moe_cfg = MoEConfig(aux_loss_coef=0.0, z_loss_coef=0.0, kernel_backend=kernel_backend,
                        expert_backend=expert_backend, **capacity)
    layer = MoELayer(s.D, mcfg, moe_cfg).to(device=w.w1_EFD.device, dtype=w.w1_EFD.dtype)
    with torch.no_grad():
        layer.router.gate.weight.copy_(w.gate_ED)
        layer.experts.w1_EFD.copy_(w.w1_EFD)
        layer.experts.w3_EFD.copy_(w.w3_EFD)
        layer.experts.w2_EDF.copy_(w.w2_EDF)
    return layer


class NaiveLoopMoE(nn.Module):
    """Loop over experts: gather the expert's (token, slot) pairs, SwiGLU, weighted index_add.

    Routing equals moetrain's default: float32 softmax, top-k, renormalised weights.
    """

    def __init__(self, w: Weights, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate_ED = nn.Parameter(w.gate_ED.clone())
        self.w1_EFD = nn.Parameter(w.w1_EFD.clone())
        self.w3_EFD = nn.Parameter(w.w3_EFD.clone())
        self.w2_EDF = nn.Parameter(w.w2_EDF.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        probs_TE = torch.softmax(F.linear(x_TD.float(), self.gate_ED.float()), dim=-1)
        w_TK, ids_TK = probs_TE.topk(self.top_k, dim=-1)
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
        out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x.device)
        for e in range(self.w1_EFD.shape[0]):
            t_idx, k_idx = torch.where(ids_TK == e)
            x_rD = x_TD[t_idx]
            h_rF = F.silu(x_rD @ self.w1_EFD[e].T) * (x_rD @ self.w3_EFD[e].T)
            y_rD = h_rF @ self.w2_EDF[e].T
            out_TD = out_TD.index_add(0, t_idx, y_rD.float() * w_TK[t_idx, k_idx, None])
        return out_TD.to(x.dtype).view_as(x)


class DenseLimit(nn.Module):
    """One SwiGLU over all R = T*K routed rows: the grouped GEMM's upper bound."""

    def __init__(self, w: Weights) -> None:
        super().__init__()
        self.w1_FD = nn.Parameter(w.w1_EFD[0].clone())
        self.w3_FD = nn.Parameter(w.w3_EFD[0].clone())
        self.w2_DF = nn.Parameter(w.w2_EDF[0].clone())

    def forward(self, x_RD: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x_RD, self.w1_FD)) * F.linear(x_RD, self.w3_FD),
                        self.w2_DF)


def build_hf(s: Shape, w: Weights, grouped_mm: bool) -> nn.Module:
    """transformers' MixtralSparseMoeBlock with our weights (both of its weight layouts)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=s.D, intermediate_size=s.F, num_local_experts=s.E,
                        num_experts_per_tok=s.K, router_jitter_noise=0.0)
    try:  # transformers >= 5: experts implementations behind one interface
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        ALL_EXPERTS_FUNCTIONS = None
    if grouped_mm:
        if ALL_EXPERTS_FUNCTIONS is None or "grouped_mm" not in ALL_EXPERTS_FUNCTIONS:
            import transformers

            raise RuntimeError(f"transformers {transformers.__version__} has no grouped_mm "
                               f"experts implementation (transformers >= 5 has)")
        cfg._experts_implementation = "grouped_mm"
    elif ALL_EXPERTS_FUNCTIONS is not None:
        cfg._experts_implementation = "eager"  # the block's own loop over experts
    block = MixtralSparseMoeBlock(cfg).to(device=w.w1_EFD.device, dtype=w.w1_EFD.dtype)
    params = dict(block.named_parameters())
    with torch.no_grad():
        params["gate.weight"].copy_(w.gate_ED)
        if "experts.gate_up_proj" in params:  # transformers 5: fused (E, 2F, D) or (E, D, 2F)
            gu, down = params["experts.gate_up_proj"], params["experts.down_proj"]
            w13 = torch.cat([w.w1_EFD, w.w3_EFD], dim=1)
            gu.copy_(w13 if gu.shape == w13.shape else w13.transpose(1, 2))
            down.copy_(w.w2_EDF if down.shape == w.w2_EDF.shape else w.w2_EDF.transpose(1, 2))
        else:  # transformers 4: one MLP per expert
            for e in range(s.E):
                params[f"experts.{e}.w1.weight"].copy_(w.w1_EFD[e])
                params[f"experts.{e}.w3.weight"].copy_(w.w3_EFD[e])
                params[f"experts.{e}.w2.weight"].copy_(w.w2_EDF[e])
    return _FirstOutput(block)


class _FirstOutput(nn.Module):
    """Returns only the hidden states of a block that may also return router logits."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        out = out[0] if isinstance(out, tuple) else out
        return out.view_as(x)


def _copy_weights(module: nn.Module, w: Weights) -> None:
    """Load the shared weights into a peer's MoE, matching parameters by name suffix
    (transposed where the peer stores (E, D, F) for (E, F, D)); fails naming what is left."""
    by_suffix = {"gate.weight": w.gate_ED, "w1_EFD": w.w1_EFD, "w3_EFD": w.w3_EFD,
                 "w2_EDF": w.w2_EDF, "w1": w.w1_EFD, "w3": w.w3_EFD, "w2": w.w2_EDF}
    with torch.no_grad():
        for name, p in module.named_parameters():
            src = next((v for k, v in by_suffix.items() if name.split(".")[-1] == k
                        or name.endswith("." + k)), None)
            if src is None or p.numel() != src.numel():
                raise RuntimeError(f"cannot map {name} {tuple(p.shape)} to moetrain's weights")
            p.copy_(src if p.shape == src.shape else src.transpose(-2, -1))


def build_torchtitan(s: Shape, w: Weights) -> nn.Module:
    """torchtitan's MoE (softmax top-k, route_norm=True, no load-balancing bias) on (B, S, D)
    inputs, with the shared weights."""
    try:  # torchtitan 0.3: nested Config objects
        from torchtitan.models.common import moe as tt
        from torchtitan.models.common.linear import Linear
        from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

        cfg = tt.MoE.Config(
            num_experts=s.E, load_balance_coeff=None,
            router=tt.TokenChoiceTopKRouter.Config(
                num_experts=s.E, top_k=s.K, route_norm=True, score_func="softmax",
                gate=Linear.Config(in_features=s.D, out_features=s.E)),
            routed_experts=tt.RoutedExperts.Config(
                inner_experts=tt.GroupedExperts.Config(dim=s.D, hidden_dim=s.F,
                                                       num_experts=s.E),
                token_dispatcher=LocalTokenDispatcher.Config(num_experts=s.E, top_k=s.K)))
        moe = cfg.build()
    except ImportError:  # torchtitan <= 0.2: MoE(MoEArgs, dim, hidden_dim)
        from torchtitan.models.moe import MoE, MoEArgs

        args = MoEArgs(num_experts=s.E, top_k=s.K, score_func="softmax", route_norm=True,
                       load_balance_coeff=None, num_shared_experts=0)
        moe = MoE(args, dim=s.D, hidden_dim=s.F)
    moe = moe.to(device=w.w1_EFD.device, dtype=w.w1_EFD.dtype)
    _copy_weights(moe, w)
    return _FirstOutput(moe)


class _MegatronMoE(nn.Module):
    """megatron-core's ``MoELayer`` on (B, S, D) inputs (it takes (S, B, D))."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _bias = self.layer(x.transpose(0, 1))
        return out.transpose(0, 1)


def _one_rank_group(device: torch.device) -> None:
    """A one-process group for megatron-core's parallel state (its groups are all of size 1)."""
    import socket

    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()


def build_megatron(s: Shape, w: Weights, cuda_only: bool = True) -> nn.Module:
    """megatron-core's MoELayer (local spec: SequentialMLP experts, no Transformer Engine),
    softmax top-k over fp32 logits (top-k, then softmax over the k: the renormalised
    weights), no aux loss, with the shared weights."""
    device, dtype = w.w1_EFD.device, w.w1_EFD.dtype
    if device.type != "cuda" and cuda_only:
        raise RuntimeError("megatron-core's router moves its weight to "
                           "torch.cuda.current_device(): runs on CUDA only")
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    if not hasattr(moe_utils, "te_general_gemm"):
        # megatron-core 0.16 without Transformer Engine leaves this name undefined, and its
        # router gate reads it: None selects the plain torch matmul.
        moe_utils.te_general_gemm = None
    _one_rank_group(device)
    cfg = TransformerConfig(
        num_layers=1, hidden_size=s.D, ffn_hidden_size=s.F, moe_ffn_hidden_size=s.F,
        num_attention_heads=1, num_moe_experts=s.E, moe_router_topk=s.K,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0, moe_router_dtype="fp32", perform_initialization=False,
        params_dtype=dtype, bf16=dtype == torch.bfloat16,
        use_cpu_initialization=device.type != "cuda")
    spec = get_moe_module_spec(use_te=False, num_experts=s.E, moe_grouped_gemm=False)
    layer = MoELayer(cfg, spec.submodules).to(device=device, dtype=dtype)
    params = dict(layer.named_parameters())
    with torch.no_grad():
        params["router.weight"].copy_(w.gate_ED)
        for e in range(s.E):  # fc1 = [gate; up]: silu on the first half
            pre = f"experts.local_experts.{e}."
            params[pre + "linear_fc1.weight"].copy_(torch.cat([w.w1_EFD[e], w.w3_EFD[e]]))
            params[pre + "linear_fc2.weight"].copy_(w.w2_EDF[e])
    return _MegatronMoE(layer)


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, warmup: int,
                 iters: int) -> float:
    """Mean milliseconds of one forward + backward (gradients reset outside the timing)."""
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        out = module(x)
        out.backward(grad)

    def reset() -> None:
        x.grad = None
        for p in params:
            p.grad = None

    for _ in range(warmup):
        reset()
        step()
    _sync(x.device)
    total = 0.0
    for _ in range(iters):
        reset()
        if x.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            total += start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            step()
            total += (time.perf_counter() - t0) * 1e3
    return total / iters


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def capacity_name(cf: float) -> str:
    """The row name of a capacity variant: capacity_cf1.25, capacity_cf0, capacity_cf-1."""
    return f"capacity_cf{cf:g}"


def capacity_stats(layer: nn.Module, x: torch.Tensor) -> dict:
    """C, the E x C rows the experts compute and the share of routed rows dropped, for
    ``layer`` (a capacity-mode MoELayer) on ``x``."""
    with torch.no_grad():
        x_TD = x.reshape(-1, x.shape[-1])
        r = layer.router(x_TD)
        extra = () if r.active_TK is None else (r.active_TK,)
        x_RD, meta = layer.dispatcher.dispatch(x_TD, r.ids_TK, r.weights_TK, *extra)
    routed = r.ids_TK.numel() if r.active_TK is None else int(r.active_TK.sum())
    return {"rows_per_expert": meta.rows_per_expert, "rows": x_RD.shape[0],
            "routed_rows": routed, "dropped_frac": int(meta.num_dropped) / max(routed, 1)}


def _fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    xi = x.clone().requires_grad_()
    y = module(xi)
    y.backward(grad)
    return y.detach(), xi.grad


def bench_shape(s: Shape, impls: list[str], device: torch.device, dtype: torch.dtype,
                warmup: int, iters: int, seed: int, kernel_backend: str = "auto",
                expert_backend: str = "auto", check_tol: float | None = None,
                capacity_factors: tuple[float, ...] = ()) -> dict:
    """Verify moetrain against the naive loop, then time every implementation, then the
    capacity variants of ``capacity_factors``."""
    w = make_weights(s, device, dtype, seed)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(*s.input_shape, generator=g, device=device).to(dtype)
    grad = torch.randn(*s.input_shape, generator=g, device=device).to(dtype)
    x_RD = torch.randn(s.T * s.K, s.D, generator=g, device=device).to(dtype)
    grad_RD = torch.randn(s.T * s.K, s.D, generator=g, device=device).to(dtype)
    flops = expert_flops(s)
    tol = check_tol if check_tol is not None else (1e-4 if dtype == torch.float32 else 3e-2)

    # Correctness first: every moetrain variant asked for against the naive loop.
    variants = {"moetrain": kernel_backend, "moetrain_torch": "torch",
                "moetrain_triton": "triton"}
    with torch.device(device):
        ref_out = _fwd_bwd(NaiveLoopMoE(w, s.K), x, grad)
    checks = {}
    for name in [n for n in impls if n in variants] or ["moetrain"]:
        try:
            with torch.device(device):
                out = _fwd_bwd(build_moetrain(s, w, variants[name], expert_backend), x, grad)
        except ConfigError as e:  # e.g. triton on a CPU without the interpreter
            checks[name] = {"ok": None, "note": str(e)}
            continue
        c = {"output_rel_err": _rel_err(out[0], ref_out[0]),
             "input_grad_rel_err": _rel_err(out[1], ref_out[1]), "tol": tol}
        c["ok"] = max(c["output_rel_err"], c["input_grad_rel_err"]) <= tol
        if not c["ok"]:
            raise RuntimeError(f"{s.name}: {name}'s MoE layer disagrees with the naive loop: {c}")
        checks[name] = c
    ref_y = ref_out[0]
    del ref_out

    builders: dict[str, Callable[[], nn.Module]] = {
        **{n: functools.partial(build_moetrain, s, w, kb, expert_backend)
           for n, kb in variants.items()},
        "naive_loop": lambda: NaiveLoopMoE(w, s.K),
        "dense_limit": lambda: DenseLimit(w),
        "hf_mixtral": lambda: build_hf(s, w, grouped_mm=False),
        "hf_mixtral_grouped_mm": lambda: build_hf(s, w, grouped_mm=True),
        "torchtitan": lambda: build_torchtitan(s, w),
        "megatron": lambda: build_megatron(s, w),
    }
    factor = {capacity_name(cf): cf for cf in capacity_factors}
    builders.update({n: functools.partial(build_moetrain, s, w, kernel_backend, expert_backend,
                                          cf) for n, cf in factor.items()})
    rows = []
    for name in [*impls, *factor]:
        row: dict = {"impl": name, "status": "ok", "ms": None, "tflops": None,
                     "pct_of_dense": None, "peak_mem_gib": None, "rel_err_vs_naive": None,
                     "note": ""}
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            with torch.device(device):  # build on the device: no slow CPU init
                module = builders[name]()
        except Exception as e:  # noqa: BLE001 - a peer that is missing or whose API moved
            row.update(status="skipped", note=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
            continue
        inp, g_out = (x_RD, grad_RD) if name == "dense_limit" else (x, grad)
        inp = inp.clone().requires_grad_()
        try:
            if name != "dense_limit":  # the same function of the same weights?
                with torch.no_grad():
                    row["rel_err_vs_naive"] = _rel_err(module(x), ref_y)
            if name in factor:
                st = capacity_stats(module, x)
                row.update(st, note=f"C={st['rows_per_expert']}: {st['rows']} rows for "
                                    f"{st['routed_rows']} routed, "
                                    f"{100 * st['dropped_frac']:.1f}% dropped")
                if factor[name] == 0 and row["rel_err_vs_naive"] > tol:  # drops nothing
                    raise RuntimeError(f"{name} disagrees with the naive loop: "
                                       f"{row['rel_err_vs_naive']:.2e} > {tol}")
            ms = time_fwd_bwd(module, inp, g_out, warmup, iters)
        except ConfigError as e:  # a variant this machine cannot run (triton on a CPU)
            row.update(status="skipped", note=str(e)[:300])
            rows.append(row)
            continue
        except Exception as e:  # noqa: BLE001 - report the failure, time the others
            row.update(status="failed", note=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
            continue
        row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
        if device.type == "cuda":
            row["peak_mem_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        rows.append(row)
        del module, inp
    dense = next((r["ms"] for r in rows if r["impl"] == "dense_limit" and r["ms"]), None)
    for r in rows:
        if dense and r["ms"]:
            r["pct_of_dense"] = 100.0 * dense / r["ms"]
    return {**asdict(s), "input_shape": list(s.input_shape), "expert_flops": flops,
            "check": checks, **judge(s, rows, device.type == "cuda"), "results": rows}


def judge(s: Shape, rows: list[dict], on_gpu: bool) -> dict:
    """moetrain's best time against the shape's targets (ratios within the same run).

    ``vs_torchtitan`` = moetrain's best ms / torchtitan's ms; ``pct_of_dense`` = the dense
    limit's ms / moetrain's best ms in percent. ``target_met`` is None off a GPU, when no
    target is set, or when a peer a target needs did not run."""
    ms = {r["impl"]: r["ms"] for r in rows if r["ms"]}
    ours = {n: v for n, v in ms.items() if n.startswith("moetrain")}
    best = min(ours, key=ours.get) if ours else None
    out = {"best_moetrain": best, "vs_torchtitan": None, "best_pct_of_dense": None,
           "target_met": None, "target_notes": []}
    if best is None:
        return out
    if "torchtitan" in ms:
        out["vs_torchtitan"] = ours[best] / ms["torchtitan"]
    if "dense_limit" in ms:
        out["best_pct_of_dense"] = 100.0 * ms["dense_limit"] / ours[best]
    verdicts = []
    checks = ((s.max_vs_torchtitan, out["vs_torchtitan"], "<=", "{:.2f}x torchtitan"),
              (s.min_pct_dense, out["best_pct_of_dense"], ">=", "{:.0f}% of dense"))
    for limit, value, op, label in checks:
        if limit is None:
            continue
        ok = None if value is None else (value <= limit if op == "<=" else value >= limit)
        shown = "-" if value is None else label.format(value)
        verdict = {True: "met", False: "MISSED", None: "not measured"}[ok]
        out["target_notes"].append(f"{op} {label.format(limit)}: {shown}, {verdict}")
        verdicts.append(ok)
    if on_gpu and verdicts and None not in verdicts:
        out["target_met"] = all(verdicts)
    return out


# ----------------------------------------------------------------------------- report
def format_table(report: dict) -> str:
    lines = [f"device: {report['device']}  dtype: {report['dtype']}  torch {report['torch']}"]
    for sh in report["shapes"]:
        lines.append("")
        if sh.get("error"):
            lines.append(f"{sh['name']}  FAILED: {sh['error']}")
            continue
        checked = ", ".join(f"{n} {c['output_rel_err']:.1e}" for n, c in sh["check"].items()
                            if c.get("ok"))
        lines.append(f"{sh['name']}  D={sh['D']} F={sh['F']} E={sh['E']} K={sh['K']} "
                     f"T={sh['T']}  input {tuple(sh['input_shape'])}  expert GFLOP "
                     f"{sh['expert_flops'] / 1e9:.1f}  rel err vs naive loop: {checked}")
        if sh.get("target_notes"):
            lines.append(f"  targets ({sh['best_moetrain']}): " + "; ".join(sh["target_notes"]))
        lines.append(f"  {'impl':<24}{'ms':>10}{'TFLOP/s':>10}{'% dense':>10}{'peak GiB':>10}"
                     f"{'err':>10}")
        for r in sh["results"]:
            if r["status"] != "ok":
                lines.append(f"  {r['impl']:<24}{r['status']}: {r['note']}")
                continue

            def fmt(v, spec):
                return format(v, spec) if v is not None else format("-", ">10")

            lines.append(f"  {r['impl']:<24}{fmt(r['ms'], '10.2f')}{fmt(r['tflops'], '10.1f')}"
                         f"{fmt(r['pct_of_dense'], '10.1f')}{fmt(r['peak_mem_gib'], '10.2f')}"
                         f"{fmt(r['rel_err_vs_naive'], '10.1e')}"
                         + (f"  {r['note']}" if r.get("note") else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", action="append", choices=sorted(SHAPES),
                   help=f"repeatable; default: {', '.join(DEFAULT_SHAPES)}")
    p.add_argument("--scale", type=int, default=1,
                   help="divide D, F and T of each shape by this (E and K kept): a CPU run "
                        "of the real routing")
    p.add_argument("--impl", action="append", choices=IMPLS, help="repeatable; default: all")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kernel-backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--expert-backend", default="auto", choices=["auto", "loop", "grouped_mm"])
    p.add_argument("--capacity-factor", type=float, action="append", default=[],
                   help="repeatable: also time the layer with moe.dispatch=capacity and "
                        "this moe.capacity_factor (<= 0: adaptive); rows capacity_cf<CF>")
    p.add_argument("--json", default=None, help="write the report to this path")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype_name = a.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    shapes = a.shape or list(DEFAULT_SHAPES)
    impls = a.impl or list(IMPLS)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    report = {"device": name or device.type, "torch": torch.__version__, "dtype": dtype_name,
              "warmup": a.warmup, "iters": a.iters, "scale": a.scale,
              "capacity_factors": a.capacity_factor, "shapes": []}
    for n in shapes:
        s = SHAPES[n].scaled(1 if n == "tiny" else a.scale)
        try:
            report["shapes"].append(bench_shape(s, impls, device, dtype, a.warmup, a.iters,
                                                a.seed, a.kernel_backend, a.expert_backend,
                                                capacity_factors=tuple(a.capacity_factor)))
        except Exception as e:  # noqa: BLE001 - e.g. a failed correctness check: report it
            report["shapes"].append({**asdict(s), "error": f"{type(e).__name__}: {e}"[:2000],
                                     "results": []})
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if a.json:  # after each shape: a run stopped part-way keeps what it measured
            with open(a.json, "w") as f:
                json.dump(report, f, indent=2)
    print(format_table(report), flush=True)
    return report


if __name__ == "__main__":
    raise SystemExit(1 if any(sh.get("error") for sh in main()["shapes"]) else 0)
