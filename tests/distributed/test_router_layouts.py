"""Every router gives the same numbers under every parallel layout: a multi-process CPU
run (gloo) logs the 1-process per-step loss, gradient norm and balance statistics within
1e-5 relative; the auxiliary-loss-free expert bias ends on the same tensor; every router
resumes from a mid-run checkpoint on the uninterrupted losses; misconfigured routers fail
in validation naming the field; and global-batch balance statistics are invariant to the
layouts they should be invariant to (ep, tp, pp, dp_mode at a fixed dp).

Runs are cached per module so each 1-process reference is trained once (and its step-3
checkpoint seeds the resume tests).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, compose
from tests.distributed._runs import Runs, assert_same_trajectory, step_rows

# 8 experts so ep=2 leaves 4 per rank (as test_ep_equivalence); 6 steps, each of 4
# micro-batches of 2 sequences; checkpoints at steps 3 and 6 (all kept).
BASE = [o for o in TINY if not o.startswith("model.num_experts")] + [
    "model.num_experts=8", "eval.every=0", "checkpoint.every=3", "checkpoint.keep=0",
]
# The pipeline model of test_pp_equivalence: 4 layers (one dense, three MoE with a shared
# expert), 4 heads; with pp=2 x dp=2 each pipeline runs 2 micro-batches per step.
PP_BASE = [o for o in TINY if not o.startswith(("model.n_heads", "model.n_layers"))] + [
    "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.first_dense_layers=1",
    "model.n_shared_experts=1", "eval.every=0", "checkpoint.every=3", "checkpoint.keep=0",
]

# Each router trains with its recipe (docs/routers.md#training-recipes) unless set here.
# The coefficients set below make the auxiliary gradients large enough to tell layouts
# apart (DeepSeek-V3's recipe trains the sequence-wise loss at 1e-4, no z-loss).
STRONG_AUX = ["moe.aux_loss_coef=0.01", "moe.z_loss_coef=0.001"]
ROUTERS = {
    "topk": ["moe/router=topk"],
    # auxiliary-loss-free bias (rate 1e-3) plus the Switch loss and the z-loss
    "deepseek_v3": ["moe/router=deepseek_v3", "moe.balance_loss=switch"] + STRONG_AUX,
    # DeepSeek-V3's sequence-wise balance loss with the bias
    "deepseek_v3_seq": ["moe/router=deepseek_v3", "moe.balance_loss=seq"] + STRONG_AUX,
    # its recipe: zero-initialised gates, its own importance and load losses only
    "noisy_topk": ["moe/router=noisy_topk"],
    "expert_choice": ["moe/router=expert_choice"],
    "sinkhorn": ["moe/router=sinkhorn"],
    # optimal-transport steps on half the (step, layer) draws: several within 6 steps; the
    # losses of topk's recipe, so its trajectory is topk's up to the first transport step
    "selective_sinkhorn": ["moe/router=selective_sinkhorn", "moe.router.ssr_prob=0.5"]
                          + STRONG_AUX,
    # its recipe: 1 to E experts per token, XMoE's top-1 balance loss
    "threshold": ["moe/router=threshold"],
}
BIAS_ROUTERS = ("deepseek_v3", "deepseek_v3_seq")
KEYS = ("loss", "grad_norm", "aux_loss", "z_loss", "load_imbalance", "unrouted_frac")


def _keys(router: str, n_moe: int) -> tuple[str, ...]:
    keys = KEYS
    if router == "noisy_topk":
        keys += ("router_loss",)
    if router in BIAS_ROUTERS:
        keys += ("expert_bias_spread",) + tuple(
            f"moe/layer{i}/expert_bias_spread" for i in range(n_moe))
    return keys


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    return Runs(tmp_path_factory.mktemp("runs"), cache)


def _ref(runs: Runs, router: str) -> list[dict]:
    return runs.get(f"ref_{router}", BASE + ROUTERS[router])


def _pp_ref(runs: Runs, router: str) -> list[dict]:
    return runs.get(f"ppref_{router}", PP_BASE + ROUTERS[router])


def expert_biases(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every router's ``expert_bias`` saved in a checkpoint, by global FQN (read without
    a process group, whatever the layout that wrote it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(ckpt)).read_metadata()
    keys = [k for k in md.state_dict_metadata if k.endswith("router.expert_bias")]
    sd = {k: torch.empty(md.state_dict_metadata[k].size) for k in keys}
    dcp.load(sd, checkpoint_id=str(ckpt), no_dist=True)
    return sd


def _assert_same_bias(ref_ckpt: Path, got_ckpt: Path, n_moe: int) -> None:
    ref, got = expert_biases(ref_ckpt), expert_biases(got_ckpt)
    assert len(ref) == n_moe and sorted(got) == sorted(ref)
    for k in ref:
        # the sign update moves every entry by +-rate each step: equal counts give the
        # bitwise-same tensor, one different sign moves an entry by 1e-3 or more
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-7, msg=k)
        assert ref[k].abs().max() > 0, f"{k}: the bias never moved"


# ----------------------------------------------------------------------------- 1. EP
@pytest.mark.parametrize("router", list(ROUTERS))
def test_router_ep2_matches_single_process(runs, router):
    """parallel.ep=2 on 4 processes (EP carved out of dp=4: ep=2 x edp=2)."""
    ref = _ref(runs, router)
    got = runs.get(f"ep2_{router}", BASE + ROUTERS[router] + ["parallel.ep=2"], world=4)
    assert len(step_rows(got)) == 6
    assert_same_trajectory(ref, got, keys=_keys(router, 2))
    assert all(r["a2a_bytes"] > 0 for r in step_rows(got))
    if router in BIAS_ROUTERS:
        assert step_rows(ref)[-1]["expert_bias_spread"] > 0
        _assert_same_bias(runs.ckpt(f"ref_{router}", 6), runs.ckpt(f"ep2_{router}", 6), 2)
    if router == "expert_choice":  # expert-choice leaves some tokens without an expert
        assert any(r["unrouted_frac"] > 0 for r in step_rows(ref))
    if router == "noisy_topk":
        assert all(r["router_loss"] > 0 for r in step_rows(ref))


def test_selective_sinkhorn_takes_transport_steps(runs):
    """ssr_prob=0.5 really routes some steps by optimal transport: the trajectory equals
    plain softmax top-k (ssr_prob=0 is bit-identical to it) up to the first step whose
    keyed draw picks transport in some layer, and differs from there on."""
    from moetrain.models.moe.routing import keyed_uniform

    seed = compose(BASE).seed
    ot = [any(keyed_uniform(torch.tensor([s]), seed, layer, 0x55A).item() < 0.5
              for layer in (0, 1)) for s in range(6)]
    assert any(ot), "no transport step in 6 steps: pick another ssr_prob"
    first = ot.index(True)  # 0-based step; its loss is metrics row step first + 1
    ssr, topk = step_rows(_ref(runs, "selective_sinkhorn")), step_rows(_ref(runs, "topk"))
    for a, b in zip(ssr[:first], topk[:first]):
        assert a["loss"] == b["loss"] and a["aux_loss"] == b["aux_loss"]
    assert abs(ssr[first]["aux_loss"] - topk[first]["aux_loss"]) > 1e-6


# ----------------------------------------------------------------------------- 2-3. PP, TP
@pytest.mark.parametrize("router", ["deepseek_v3", "noisy_topk"])
def test_router_pp2_ep2_matches_single_process(runs, router):
    """pp=2 x dp=2 (FSDP) with experts over ep=2: the bias update sums the counts over
    both stages' layers, the noise keys follow each micro-batch through the schedule."""
    ref = _pp_ref(runs, router)
    name = f"pp2_ep2_{router}"
    got = runs.get(name, PP_BASE + ROUTERS[router] + ["parallel.pp=2", "parallel.ep=2"],
                   world=4)
    assert_same_trajectory(ref, got, keys=_keys(router, 3))
    if router in BIAS_ROUTERS:
        _assert_same_bias(runs.ckpt(f"ppref_{router}", 6), runs.ckpt(name, 6), 3)


@pytest.mark.parametrize("router", BIAS_ROUTERS)
def test_bias_router_tp2_ep2_matches_single_process(runs, router):
    """tp=2 x dp=2 with experts over ep=2 (expert_tp=ep: each tp rank routes a sequence
    shard): the bias counts are summed over dp x tp; the sequence-wise loss sums each
    sequence's counts over its tp shards."""
    ref = _ref(runs, router)
    got = runs.get(f"tp2_ep2_{router}", BASE + ROUTERS[router] + [
        "parallel.tp=2", "parallel.ep=2"], world=4)
    assert_same_trajectory(ref, got, keys=_keys(router, 2))
    _assert_same_bias(runs.ckpt(f"ref_{router}", 6), runs.ckpt(f"tp2_ep2_{router}", 6), 2)


# ----------------------------------------------------------------------------- 4. resume
@pytest.mark.parametrize("router", list(ROUTERS))
def test_router_resumes_mid_run(runs, router):
    """The reference's step-3 checkpoint continues on the uninterrupted steps 4-6 (router
    keys follow the step, the bias is restored)."""
    ref = _ref(runs, router)
    got = runs.get(f"resumed_{router}", BASE + ROUTERS[router] + [
        f"checkpoint.resume={runs.ckpt(f'ref_{router}', 3)}"])
    assert [r["step"] for r in step_rows(got)] == [4, 5, 6]
    assert_same_trajectory(step_rows(ref)[3:], got, keys=_keys(router, 2))
    if router in BIAS_ROUTERS:
        _assert_same_bias(runs.ckpt(f"ref_{router}", 6), runs.ckpt(f"resumed_{router}", 6), 2)


# ----------------------------------------------------------------------------- 5. bad input
def _config_error(overrides: list[str], world: int = 1, build_router: bool = False) -> str:
    from moetrain.config.schema import ConfigError
    from moetrain.config.validate import validate

    with pytest.raises(ConfigError) as info:
        cfg = compose(BASE + overrides)
        validate(cfg, world)
        if build_router:
            from moetrain.models.moe.router import build_router as build

            build(cfg.model.dim, cfg.model.num_experts, cfg.model.top_k, cfg.moe.router)
    return str(info.value)


@pytest.mark.parametrize("overrides,world,field", [
    (["moe/router=expert_choice", "moe.dispatch=capacity"], 1, "moe.dispatch"),
    (["moe/router=noisy_topk", "moe.router.bias_update_rate=0.001"], 1,
     "moe.router.bias_update_rate"),
    (["moe/router=deepseek_v3", "moe.router.n_groups=3"], 1, "moe.router.n_groups"),
    (["moe.balance_loss=seq", "moe.aux_loss_scope=global_batch"], 1, "moe.aux_loss_scope"),
    # DeepSeek-V3's recipe is the sequence-wise loss: the same rule, named
    (["moe/router=deepseek_v3", "moe.aux_loss_scope=global_batch"], 1, "moe.aux_loss_scope"),
])
def test_bad_router_config_fails_in_validation(overrides, world, field):
    msg = _config_error(overrides, world)
    assert field in msg, msg


def test_deepseek_v3_rejects_softmax_when_building_the_router():
    msg = _config_error(["moe/router=deepseek_v3", "moe.router.score_func=softmax"],
                        build_router=True)
    assert "moe.router.score_func" in msg and "sigmoid" in msg, msg


# ----------------------------------------------------------------------------- 6. global batch
# moe.aux_loss_scope=global_batch: global micro-batch g of a step (rank r's j-th is
# g = j * dp + r, see GlobalBatchSampler.micro_batches) uses the counts of micro-batches
# 0..g of the step, gathered over the data-parallel ranks in that order. One process with
# the same micro_batch_size sees the same running counts, so every layout matches it.
GLOBAL = ["moe.aux_loss_scope=global_batch", "train.global_batch_size=16"]


def test_global_batch_accumulation_dp2_matches_one_process(runs):
    """4 micro-batches of 4 per step: 1 process == dp=2 (2 per rank) under ep=2 (FSDP),
    under plain replication, and dp=2 x tp=2 (counts summed over each micro-batch's
    sequence shards, running over dp)."""
    ref = runs.get("global_1p_m4", BASE + GLOBAL + ["train.micro_batch_size=4"])
    ep2 = runs.get("global_dp2_ep2_m4", BASE + GLOBAL + [
        "train.micro_batch_size=4", "parallel.ep=2"], world=2)
    rep = runs.get("global_dp2_rep_m4", BASE + GLOBAL + [
        "train.micro_batch_size=4", "parallel.dp_mode=replicate"], world=2)
    tp2 = runs.get("global_dp2_tp2_m4", BASE + GLOBAL + [
        "train.micro_batch_size=4", "parallel.tp=2", "parallel.ep=2"], world=4)
    assert_same_trajectory(ref, ep2, keys=KEYS)
    assert_same_trajectory(ref, rep, keys=KEYS)
    assert_same_trajectory(ref, tp2, keys=KEYS)
    # Accumulation matters: micro-batch statistics give another aux loss.
    local = runs.get("local_1p_m4", BASE + GLOBAL[1:] + ["train.micro_batch_size=4"])
    assert abs(step_rows(local)[0]["aux_loss"] - step_rows(ref)[0]["aux_loss"]) > 1e-6


def test_global_batch_invariant_to_tp_and_pp_at_dp1(runs):
    """dp=1, 4 micro-batches per step: tp=2 x ep=2 (sequence shards: counts summed over
    tp) and pp=2 (1F1B: stage forwards of micro-batches 1..j precede j's loss) match 1
    process."""
    ref = runs.get("global_1p", BASE + GLOBAL[:1])
    tp = runs.get("global_tp2_ep2", BASE + GLOBAL[:1] + ["parallel.tp=2", "parallel.ep=2"],
                  world=2)
    assert_same_trajectory(ref, tp, keys=KEYS)
    pp_ref = runs.get("global_pp_1p", PP_BASE + GLOBAL[:1])
    pp = runs.get("global_pp2", PP_BASE + GLOBAL[:1] + ["parallel.pp=2"], world=2)
    assert_same_trajectory(pp_ref, pp, keys=KEYS)


@pytest.mark.parametrize("expert_tp", ["etp", "ep"])
@pytest.mark.parametrize("router", ["expert_choice", "sinkhorn", "noisy_topk"])
def test_whole_batch_router_tp2_matches_single_process(runs, router, expert_tp):
    """Routers that look at the whole micro-batch (or balance over it) under tp=2. With
    parallel.expert_tp=etp every tp rank routes all tokens; with ep each tp rank holds a
    sequence shard, and the router routes the all-gathered micro-batch and keeps its own
    tokens (Router.forward_gathered).

    Expert-choice is held to the loss at 1e-5 but to the rest at 1e-4 only: TP's
    row-parallel partial sums move the hidden states by an ulp, and each expert ranks the
    64 tokens of a micro-batch, where the char-level corpus has near-equal tokens. At
    step 1 (layer 0, micro-batch 0) tokens 32 and 34 score 0.12707138 and 0.12707137 for
    expert 0, one ulp apart, in the opposite order under tp=2, at the capacity boundary:
    the two trade places (same counts, same unrouted share) and grad_norm moves by
    ~1e-5 relative. A float tie, not a layout bug; top-k style routers rank 8 experts
    per token and stay within 2e-7 here."""
    ref = _ref(runs, router)
    got = runs.get(f"tp2_{expert_tp}_{router}", BASE + ROUTERS[router] + [
        "parallel.tp=2", f"parallel.expert_tp={expert_tp}"], world=2)
    if router == "expert_choice":
        assert_same_trajectory(ref, got, keys=("loss", "load_imbalance", "unrouted_frac"))
        assert_same_trajectory(ref, got, rtol=1e-4, keys=_keys(router, 2))
    else:
        assert_same_trajectory(ref, got, keys=_keys(router, 2))
