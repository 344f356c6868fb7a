"""Parameter, FLOP, memory and pipeline-split accounting of the MoE designs that change
the layer's cost: Chain-of-Experts (``moe.chain_iterations``: C rounds), RMoE's recurrent
router (a per-layer projection and head plus one shared cell) and CompeteSMoE (dense
competition steps). Each count is checked against the module itself or a hand count."""

from __future__ import annotations

import pytest
import torch

from moetrain.config.schema import ModelConfig, MoEConfig, RouterConfig
from moetrain.models.transformer import Transformer, count_params
from moetrain.parallel.memory import estimate
from moetrain.parallel.pipeline import pipeline_costs
from tests.conftest import compose

V = 10
# D=4, 2 heads, layer 0 dense (ffn 8), layers 1.. MoE (E=4, K=2, F=2), one shared expert
MODEL = {"dim": 4, "n_heads": 2, "ffn_hidden": 8, "max_seq_len": 8, "num_experts": 4,
         "top_k": 2, "expert_hidden": 2, "first_dense_layers": 1, "n_shared_experts": 1,
         "n_layers": 3}
MOES = {
    "chain3": MoEConfig(chain_iterations=3),
    "chain3_shared_router": MoEConfig(chain_iterations=3, chain_router="shared"),
    "recurrent_gru": MoEConfig(router=RouterConfig(name="recurrent", rnn_hidden=5)),
    "recurrent_rnn": MoEConfig(router=RouterConfig(name="recurrent", rnn_hidden=5,
                                                   rnn_cell="rnn")),
}


def _unique_numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("name", sorted(MOES))
def test_count_params_total_is_the_module(name):
    m = ModelConfig(**MODEL)
    with torch.device("meta"):
        model = Transformer(m, MOES[name], V)
    assert count_params(m, V, MOES[name]).total == _unique_numel(model)


def test_chain_active_counts_every_round_by_hand():
    m, moe = ModelConfig(**MODEL), MOES["chain3"]
    base = count_params(m, V)
    got = count_params(m, V, moe)
    D, E, K, F = 4, 4, 2, 2
    expert = 3 * D * F
    # per MoE layer: 3 rounds of (router E*D, shared expert, K routed experts), not 1
    per_layer_extra = (3 - 1) * (E * D + expert + K * expert)
    assert got.active - base.active == 2 * per_layer_extra
    # the two later rounds' routers are the only extra parameters held
    assert got.total - base.total == 2 * 2 * E * D
    shared_router = count_params(m, V, MOES["chain3_shared_router"])
    assert shared_router.total == base.total and shared_router.active == got.active


def test_recurrent_router_costs_by_hand():
    m = ModelConfig(**MODEL)
    D, E, H = 4, 4, 5
    for name, gates in (("recurrent_gru", 3), ("recurrent_rnn", 1)):
        got, base = count_params(m, V, MOES[name]), count_params(m, V)
        cell = 2 * gates * (H * H + H)  # weight_ih, weight_hh (g*H x H) and their biases
        per_layer = H * D + E * H - E * D  # projection + head instead of the gate
        assert got.total - base.total == cell + 2 * per_layer
        # a token uses, per MoE layer, the projection, one cell step (weights only) and
        # the head
        assert got.active - base.active == 2 * (per_layer + 2 * gates * H * H)


@pytest.mark.parametrize("name", sorted(MOES))
def test_pipeline_costs_sum_to_count_params_and_count_rounds(name):
    m, moe = ModelConfig(**MODEL), MOES[name]
    head, layers, tail = pipeline_costs(m, V, 3, moe)
    assert head.params + sum(c.params for c in layers) + tail.params == count_params(
        m, V, moe).total
    base = pipeline_costs(m, V, 3)[1]
    if name.startswith("chain3"):
        D, E, K, F = 4, 4, 2, 2
        extra = 2 * (3 - 1) * (E * D + 3 * D * F + K * 3 * D * F)
        assert layers[1].flops - base[1].flops == extra
        assert layers[0] == base[0]  # the dense layer is unchanged


def _estimate(*overrides: str):
    cfg = compose(["model.dim=64", "model.n_layers=2", "model.n_heads=4",
                   "model.num_experts=8", "model.top_k=2", "model.expert_hidden=64",
                   "model.max_seq_len=128", "train.seq_len=128",
                   "train.global_batch_size=4", "train.micro_batch_size=4", *overrides])
    return estimate(cfg, 1, 257, device="cuda")


def test_memory_estimate_grows_with_rounds_and_competition():
    one = _estimate().parts["activations"]
    two = _estimate("moe.chain_iterations=2").parts["activations"]
    three = _estimate("moe.chain_iterations=3").parts["activations"]
    # each round keeps the same MoE activations again: linear in C
    assert two - one == pytest.approx(three - two) and two > one
    topk = _estimate("moe/router=topk").parts["activations"]
    compete = _estimate("moe/router=compete").parts["activations"]
    assert compete > topk  # a competition step runs all 8 experts on every token
