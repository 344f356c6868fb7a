"""Chain-of-Experts, RMoE's recurrent router and CompeteSMoE give the same numbers under
the parallel layouts that split what they add: a multi-process CPU run (gloo, float32)
logs the 1-process per-step loss, gradient norm and routing statistics within 1e-5
relative, and each design resumes from a mid-run checkpoint (written by the 1-process
run, read under a multi-process layout) on the uninterrupted steps 4-6.

- Chain-of-Experts (moe.chain_iterations=2, a shared expert, 8 experts): both rounds
  dispatch over ep=2 x dp=2, dropless and with capacity (the capacity applies per round;
  factor 1.0 drops rows), and the rounds run on their stage under pp=2.
- RMoE (moe/router=recurrent): the router state crosses the stage boundary beside the
  hidden states under pp=2 (both stages hold MoE layers) and pp=2 x ep=2, the shared
  cell's gradient is summed over the stages and counted once in the norm; under tp=2
  (expert_tp=ep) each rank carries the state of its sequence shard.
- CompeteSMoE (moe/router=compete): competition steps (every expert on every token:
  an all-gather of the tokens over ep and an all-to-all back) and routed steps in the
  same run under ep=2 x dp=2; the competing (step, layer) pairs are those of
  ``compete_schedule``.

Runs are cached per module so each 1-process reference is trained once, and its step-3
checkpoint seeds the resume tests. The measured max relative differences are printed
(``pytest -s``) and kept in the assertion messages.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.conftest import TINY, compose
from tests.distributed._runs import Runs, assert_same_trajectory, step_rows

RTOL = 1e-5
STEPS = 6
RESUME_AT = 3  # the reference's checkpoint the resume tests start from

# 8 experts so ep=2 leaves 4 per rank (as test_ep_equivalence); 6 steps, each of 4
# micro-batches of 2 sequences; checkpoints at steps 3 and 6 (all kept).
BASE = [o for o in TINY if not o.startswith("model.num_experts")] + [
    "model.num_experts=8", "eval.every=0", "checkpoint.every=3", "checkpoint.keep=0",
]
# The pipeline model of test_pp_equivalence: 4 layers (one dense, three MoE with a shared
# expert), 4 heads (2 kv heads, so tp=2 splits them too).
PP_BASE = [o for o in TINY if not o.startswith(("model.n_heads", "model.n_layers"))] + [
    "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.first_dense_layers=1",
    "model.n_shared_experts=1", "eval.every=0", "checkpoint.every=3", "checkpoint.keep=0",
]
# Stage 0: layers 0 (dense) and 1 (MoE), stage 1: layers 2 and 3 (MoE): the recurrent
# state leaves stage 0 after one MoE layer and reaches two more on stage 1 (the balanced
# default split today, pinned so that it stays so).
PP_SPLIT = "parallel.pp_split=[0,2]"

# CoE's default flags: per-iteration routers, inner residual, and its recipe's
# per-sequence balance loss in every round, with the coefficients of test_router_layouts'
# STRONG_AUX. At CoE's own 1e-3 and no z-loss, some router gradients are so small that
# AdamW's first steps (g / (|g| + eps), eps 1e-8) turn their float32 summation-order
# noise into ~1e-5 relative differences after two steps (gone with optim.eps=1e-5): a
# property of the optimizer at those scales, not of the layout.
COE = ["moe.chain_iterations=2", "model.n_shared_experts=1", "moe.aux_loss_coef=0.01",
       "moe.z_loss_coef=0.001"]
# Capacity per round at factor 1.0: the tiny model's skewed routing drops rows.
CAPACITY = ["moe.dispatch=capacity", "moe.capacity_factor=1.0"]
RMOE = ["moe/router=recurrent", "moe.router.rnn_hidden=8"]
# Half the (step, layer) draws compete from step 0 on: see test_compete_schedule_mixes_steps.
COMPETE_RATE, COMPETE_WARMUP, COMPETE_MAX_LAYERS = 0.5, 0.0, 2
COMPETE = ["moe/router=compete", f"moe.router.compete_rate={COMPETE_RATE}",
           f"moe.router.compete_warmup={COMPETE_WARMUP}",
           f"moe.router.max_compete_layers={COMPETE_MAX_LAYERS}"]

KEYS = ("loss", "grad_norm", "aux_loss", "z_loss", "load_imbalance")
# Chain-of-Experts: the drops and each round's own balance loss and load, per MoE layer
# (moe/layer{i}: the i-th MoE layer, whatever its block index).
COE_KEYS = KEYS + ("dropped_frac",) + tuple(
    f"moe/layer{i}/round{t}/{k}" for i in range(2) for t in range(2)
    for k in ("aux_loss", "load_imbalance"))
COE_PP_KEYS = KEYS + tuple(
    f"moe/layer{i}/round{t}/aux_loss" for i in range(3) for t in range(2))
# KEYS' z_loss is logged although RMoE's recipe trains without it: a function of the
# logits, so of the recurrent state each MoE layer received (a state dropped at the
# stage boundary moves it by ~1e-3 relative, the gradient norm by ~4e-4).
RMOE_KEYS = KEYS + tuple(f"moe/layer{i}/load_imbalance" for i in range(3))
# router_loss: the competition's weighted losses; competed_layers: the step's competitions.
COMPETE_KEYS = KEYS + ("router_loss", "competed_layers", "compete/router_mse",
                       "compete/diversity", "compete/balance")

# name -> {metric: max relative difference to the 1-process run}, printed at the end.
MEASURED: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    yield Runs(tmp_path_factory.mktemp("runs"), cache)
    if MEASURED:
        print("\nmax |rel diff| to the 1-process run:")
        for name, diffs in MEASURED.items():
            print(f"  {name}: loss {diffs['loss']:.2e}, grad_norm {diffs['grad_norm']:.2e}, "
                  f"max over all {max(diffs.values()):.2e}")


def _rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(a - b) / abs(a) if a != 0 else float("inf")


def assert_matches(name: str, ref: list[dict], got: list[dict], keys: tuple[str, ...]) -> None:
    """``got``'s steps equal ``ref``'s within RTOL on ``keys``; the max relative difference
    of each key is recorded in MEASURED, printed, and named in the failure message."""
    ref, got = step_rows(ref), step_rows(got)
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    diffs = {k: max(_rel(a[k], b[k]) for a, b in zip(ref, got)) for k in keys}
    MEASURED[name] = diffs
    print(f"\n{name}: max |rel diff| " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    bad = {k: v for k, v in diffs.items() if v > RTOL}
    assert not bad, f"{name}: over rtol {RTOL}: {bad} (all measured: {diffs})"
    assert_same_trajectory(ref, got, rtol=RTOL, keys=keys)


def _resume(runs: Runs, name: str, ref_name: str, overrides: list[str], world: int,
            keys: tuple[str, ...]) -> list[dict]:
    """Resume the 1-process reference's step-3 checkpoint under ``overrides`` on ``world``
    processes; steps 4-6 must be the reference's."""
    ref = runs.rows[ref_name]
    got = runs.get(name, overrides + [f"checkpoint.resume={runs.ckpt(ref_name, RESUME_AT)}"],
                   world=world)
    assert [r["step"] for r in step_rows(got)] == list(range(RESUME_AT + 1, STEPS + 1))
    assert_matches(name, step_rows(ref)[RESUME_AT:], got, keys)
    return got


# ----------------------------------------------------------------------------- 1. CoE
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_coe_ep2_dp2_matches_single_process(runs, dispatch):
    """Two rounds, each dispatched over ep=2 (4 processes: ep=2 x edp=2), the shared
    expert re-run every round; with capacity each round drops its own rows."""
    extra = COE + (CAPACITY if dispatch == "capacity" else [])
    ref = runs.get(f"ref_coe_{dispatch}", BASE + extra)
    got = runs.get(f"ep2_coe_{dispatch}", BASE + extra + ["parallel.ep=2"], world=4)
    assert len(step_rows(got)) == STEPS
    assert_matches(f"coe_ep2_dp2_{dispatch}", ref, got, COE_KEYS)
    assert all(r["a2a_bytes"] > 0 for r in step_rows(got))
    # both rounds route (and are logged) on every step
    assert all(r["moe/layer0/round1/aux_loss"] > 0 for r in step_rows(ref))
    if dispatch == "capacity":  # rows are really dropped, so a wrong capacity would show
        assert all(r["dropped_frac"] > 0 for r in step_rows(ref))
    else:
        assert all(r["dropped_frac"] == 0 for r in step_rows(ref))


def test_coe_global_batch_counts_per_round_under_ep2_dp2(runs):
    """``moe.aux_loss_scope=global_batch``: each round keeps its own running counts over
    the step's micro-batches, in global order over the dp ranks (4 processes)."""
    switch = COE + ["moe.balance_loss=switch"]  # CoE's seq loss counts each sequence alone
    extra = switch + ["moe.aux_loss_scope=global_batch"]
    ref = runs.get("ref_coe_global", BASE + extra)
    got = runs.get("ep2_coe_global", BASE + extra + ["parallel.ep=2"], world=4)
    assert_matches("coe_ep2_dp2_global", ref, got, COE_KEYS)
    local = step_rows(runs.get("ref_coe_switch", BASE + switch))
    # the scope changes the rounds' losses (else this test could not tell them apart)
    assert step_rows(ref)[0]["moe/layer0/round1/aux_loss"] != pytest.approx(
        local[0]["moe/layer0/round1/aux_loss"], rel=1e-6)


def test_coe_pp2_matches_single_process(runs):
    """pp=2 (1F1B, 4 micro-batches): the chained MoE layers of each stage."""
    ref = runs.get("ppref_coe", PP_BASE + COE)
    got = runs.get("pp2_coe", PP_BASE + COE + ["parallel.pp=2"], world=2)
    assert_matches("coe_pp2", ref, got, COE_PP_KEYS)


def test_coe_resumes_mid_run_under_ep2(runs):
    """The 1-process capacity run's step-3 checkpoint (both rounds' routers) continues
    under ep=2 x dp=2 on the uninterrupted steps 4-6."""
    runs.get("ref_coe_capacity", BASE + COE + CAPACITY)
    _resume(runs, "coe_resumed_ep2_dp2_capacity", "ref_coe_capacity",
            BASE + COE + CAPACITY + ["parallel.ep=2"], 4, COE_KEYS)


# ----------------------------------------------------------------------------- 2. RMoE
def _rmoe_ref(runs: Runs) -> list[dict]:
    return runs.get("ppref_rmoe", PP_BASE + RMOE)


@pytest.mark.parametrize("layout,overrides,world", [
    ("pp2", ["parallel.pp=2", PP_SPLIT], 2),
    ("pp2_ep2", ["parallel.pp=2", PP_SPLIT, "parallel.ep=2"], 4),  # pp=2 x dp=2 (FSDP)
    ("tp2", ["parallel.tp=2", "parallel.expert_tp=ep"], 2),
    # tp=2 x dp=2 (FSDP): the cell sharded over dp, its gradients summed over tp by hand
    ("tp2_dp2", ["parallel.tp=2", "parallel.expert_tp=ep"], 4),
])
def test_rmoe_layout_matches_single_process(runs, layout, overrides, world):
    """The state carried from layer to layer (and across the stage boundary, packed
    beside the hidden states; per sequence shard under tp) gives the 1-process logits,
    and the shared cell's gradients (summed over the stages) the 1-process norm."""
    name = f"rmoe_{layout}"
    ref = _rmoe_ref(runs)
    got = runs.get(name, PP_BASE + RMOE + overrides, world=world)
    assert len(step_rows(got)) == STEPS
    assert_matches(name, ref, got, RMOE_KEYS)


def test_rmoe_virtual_stages_sum_both_local_copies_of_the_cell(runs):
    """pp=2 with 2 virtual stages per rank (interleaved 1F1B, one layer per stage): each
    rank holds two stage modules, so two copies of the shared cell, whose gradients are
    summed locally before the pp all-reduce; the stage-0 copy alone enters the norm."""
    ref = _rmoe_ref(runs)
    got = runs.get("rmoe_pp2_v2", PP_BASE + RMOE + [
        "parallel.pp=2", "parallel.pp_virtual_stages=2", "parallel.pp_schedule=interleaved_1f1b",
        "parallel.pp_split=[0,1,2,3]"], world=2)
    assert_matches("rmoe_pp2_virtual2", ref, got, RMOE_KEYS)


def test_rmoe_full_activation_checkpointing_under_pp2(runs):
    """``parallel.ac=full`` recomputes each block in the backward with the router state
    it got as an input: the 1-process numbers under pp=2."""
    ref = _rmoe_ref(runs)
    got = runs.get("rmoe_pp2_ac", PP_BASE + RMOE + ["parallel.pp=2", PP_SPLIT,
                                                     "parallel.ac=full"], world=2)
    assert_matches("rmoe_pp2_ac_full", ref, got, RMOE_KEYS)


def test_rmoe_resumes_mid_run_under_pp2(runs):
    """The 1-process step-3 checkpoint (one router_rnn) seeds both stages' copies of the
    cell under pp=2 and continues on the uninterrupted steps 4-6."""
    _rmoe_ref(runs)
    _resume(runs, "rmoe_resumed_pp2", "ppref_rmoe",
            PP_BASE + RMOE + [PP_SPLIT, "parallel.pp=2"], 2, RMOE_KEYS)


# ----------------------------------------------------------------------------- 3. CompeteSMoE
def _compete_pairs() -> frozenset[tuple[int, int]]:
    """The (0-based step, layer) pairs that compete in the BASE + COMPETE run."""
    from moetrain.models.moe.routing import compete_schedule

    cfg = compose(BASE + COMPETE)
    layers = tuple(i for i in range(cfg.model.n_layers) if cfg.model.is_moe_layer(i))
    return compete_schedule(cfg.seed, cfg.train.steps, layers, cfg.moe.router.compete_rate,
                            cfg.moe.router.compete_warmup,
                            cfg.moe.router.max_compete_layers)


def test_compete_schedule_mixes_steps(runs):
    """The schedule has competition steps before and after the resume point and a step
    where no layer competes, and the run competes exactly there."""
    pairs = _compete_pairs()
    per_step = Counter(step for step, _ in pairs)
    assert any(s < RESUME_AT for s in per_step) and any(s >= RESUME_AT for s in per_step), (
        f"competition pairs {sorted(pairs)}: pick another compete_rate")
    assert len(per_step) < STEPS, f"every step competes ({sorted(pairs)}): no routed step"
    ref = runs.get("ref_compete", BASE + COMPETE)
    # metrics row s + 1 is 0-based step s
    assert [r["competed_layers"] for r in step_rows(ref)] == [
        per_step[s] for s in range(STEPS)], sorted(pairs)
    # the competition's terms are logged on its steps only (0 elsewhere)
    for s, r in enumerate(step_rows(ref)):
        assert (r["compete/router_mse"] > 0) == (per_step[s] > 0), (s, r["compete/router_mse"])
        assert (r["compete/balance"] > 0) == (per_step[s] > 0)


def test_compete_ep2_dp2_matches_single_process(runs):
    """ep=2 x dp=2 (4 processes): on competition steps each rank all-gathers the ep
    group's tokens, runs its 4 experts on all of them and sends the outputs back."""
    assert _compete_pairs(), "no competition step in the run"
    ref = runs.get("ref_compete", BASE + COMPETE)
    got = runs.get("ep2_compete", BASE + COMPETE + ["parallel.ep=2"], world=4)
    assert len(step_rows(got)) == STEPS
    assert_matches("compete_ep2_dp2", ref, got, COMPETE_KEYS)
    assert all(r["a2a_bytes"] > 0 for r in step_rows(got))


def test_compete_pp2_matches_single_process(runs):
    """pp=2: each stage's layers draw their competition steps from (seed, step, layer),
    so the stages compete exactly where the 1-process run does."""
    ref = runs.get("ppref_compete", PP_BASE + COMPETE)
    got = runs.get("pp2_compete", PP_BASE + COMPETE + ["parallel.pp=2"], world=2)
    assert_matches("compete_pp2", ref, got, COMPETE_KEYS)
    assert any(r["competed_layers"] > 0 for r in step_rows(ref))


def test_compete_tp2_matches_single_process(runs):
    """tp=2 (sequence shards, expert_tp=ep): each rank's competition runs on its own
    tokens, and the competition balance term counts the micro-batch's top-1 picks."""
    ref = runs.get("ref_compete", BASE + COMPETE)
    got = runs.get("tp2_compete", BASE + COMPETE + ["parallel.tp=2"], world=2)
    assert_matches("compete_tp2", ref, got, COMPETE_KEYS)


def test_compete_resumes_mid_run_under_ep2(runs):
    """The 1-process step-3 checkpoint continues under ep=2 x dp=2 on the uninterrupted
    steps 4-6, competing at the same (step, layer) pairs (the schedule is keyed by the
    seed and the step, not by a generator's state)."""
    assert any(s >= RESUME_AT for s, _ in _compete_pairs())
    runs.get("ref_compete", BASE + COMPETE)
    _resume(runs, "compete_resumed_ep2_dp2", "ref_compete",
            BASE + COMPETE + ["parallel.ep=2"], 4, COMPETE_KEYS)


def test_compete_a2a_bytes(runs):
    """The bytes of a competition step under ep=2 x dp=2 are the dense exchange's: per
    rank, layer and micro-batch, ep * T * D values into the gather and ep * e * T * D
    into the return (``AllToAllDispatcher.dense``; a rank's own share counts, as in a
    routed step's T * K * D each way); ``a2a_bytes`` sums the ranks. With every row
    routed (dropless), a routed step's bytes are exactly 2 * T * K * D per rank and
    layer: the ratio is ep * (1 + e) / (2 * K)."""
    cfg = compose(BASE + COMPETE + ["parallel.ep=2"])
    ep, world = 2, 4
    T = cfg.train.micro_batch_size * cfg.train.seq_len
    D, e = cfg.model.dim, cfg.model.num_experts // ep
    micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * world)
    layers = [i for i in range(cfg.model.n_layers) if cfg.model.is_moe_layer(i)]
    dense = world * micro * ep * (T * D + e * T * D) * 4  # float32, one layer
    routed_bytes = world * micro * 2 * T * cfg.model.top_k * D * 4
    per_step = Counter(step for step, _ in _compete_pairs())
    rows = step_rows(runs.get("ep2_compete", BASE + COMPETE + ["parallel.ep=2"], world=4))
    all_dense = [s for s in range(STEPS) if per_step[s] == len(layers)]
    routed = [s for s in range(STEPS) if per_step[s] == 0]
    assert all_dense and routed, sorted(per_step.items())
    for s in all_dense:
        assert rows[s]["a2a_bytes"] == len(layers) * dense, (s, rows[s]["a2a_bytes"])
    for s in routed:
        assert rows[s]["a2a_bytes"] == len(layers) * routed_bytes, (s, rows[s]["a2a_bytes"])
    assert dense / routed_bytes == ep * (1 + e) / (2 * cfg.model.top_k)
    print(f"\ncompete a2a bytes, all ranks: dense step {len(layers) * dense}, routed steps "
          f"{[rows[s]['a2a_bytes'] for s in routed]}")


# ----------------------------------------------------------------------------- 4. MoE++
# 8 FFN experts plus a zero and a constant expert: 2 of the 10 the router scores, so about
# a fifth of the routed slots go to zero-computation experts; MoE++'s recipe (its balance
# loss with tau = 0.75 on them) beside a z-loss to keep the router gradients large.
MOEPP = ["model.zero_experts=1", "model.constant_experts=1", "moe.aux_loss_coef=0.01",
         "moe.z_loss_coef=0.001"]
MOEPP_KEYS = KEYS + ("null_frac",)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_null_experts_ep2_dp2_match_single_process(runs, dispatch):
    """ep=2 x dp=2 (4 processes): the zero-computation experts' rows are computed where
    the token is and never enter the all-to-all; the bytes they save are logged."""
    # Capacity keeps rows by position: with the probs policy, rows whose weights tie
    # within a rounding (a token on the zero expert gives its FFN expert exactly 1) are
    # ranked by bits that the ep ranks' larger expert GEMMs change in the last place.
    position = ["moe.drop_policy=position"]
    extra = MOEPP + (CAPACITY + position if dispatch == "capacity" else [])
    ref = runs.get(f"ref_moepp_{dispatch}", BASE + extra)
    got = runs.get(f"ep2_moepp_{dispatch}", BASE + extra + ["parallel.ep=2"], world=4)
    assert_matches(f"moepp_ep2_dp2_{dispatch}", ref, got, MOEPP_KEYS)
    rows = step_rows(got)
    assert all(0.05 < r["null_frac"] < 0.5 for r in rows), [r["null_frac"] for r in rows]
    if dispatch == "dropless":
        cfg = compose(BASE + extra)
        # every routed slot, as plain top-k would send it (dispatch + combine, float32)
        slots = cfg.train.global_batch_size * cfg.train.seq_len * cfg.model.top_k * 2
        plain = slots * 2 * cfg.model.dim * 4
        for r in rows:
            assert r["a2a_bytes"] + r["a2a_bytes_saved"] == plain
            assert r["a2a_bytes_saved"] == pytest.approx(r["null_frac"] * plain, rel=1e-9)
        print(f"\nMoE++ a2a bytes per step: sent {[r['a2a_bytes'] for r in rows]}, saved "
              f"{[r['a2a_bytes_saved'] for r in rows]} "
              f"(null_frac {[round(r['null_frac'], 3) for r in rows]})")


def test_null_experts_resume_mid_run_under_ep2(runs):
    runs.get("ref_moepp_dropless", BASE + MOEPP)
    _resume(runs, "moepp_resumed_ep2_dp2", "ref_moepp_dropless",
            BASE + MOEPP + ["parallel.ep=2"], 4, MOEPP_KEYS)
