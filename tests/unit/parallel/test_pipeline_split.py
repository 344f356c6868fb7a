"""The pipeline split: hand-computed costs and splits, stage modules that chain to the
full model, and the pipeline config rules (before any process group exists)."""

from __future__ import annotations

import pytest
import torch

from moetrain.config import ConfigError, validate
from moetrain.config.schema import ModelConfig, MoEConfig
from moetrain.models import Transformer, count_params
from moetrain.parallel.pipeline import (
    LOSS_FLOPS_PER_LOGIT,
    StageCost,
    balanced_split,
    default_split,
    pipeline_costs,
    split_model,
)
from tests.conftest import compose

# D=4, 2 heads of dim 2, V=10, S=3; layer 0 dense (ffn 8), layers 1.. MoE (E=4, K=1, F=2).
CFG = {"dim": 4, "n_heads": 2, "ffn_hidden": 8, "max_seq_len": 8, "num_experts": 4,
       "top_k": 1, "expert_hidden": 2, "first_dense_layers": 1}


def test_costs_by_hand():
    head, layers, tail = pipeline_costs(ModelConfig(n_layers=2, **CFG), vocab_size=10,
                                        seq_len=3)
    # attention: wq, wk, wv, wo = 4 * (4*4) = 64 weights (+ 2 norms of 4); FLOPs 2*64 + 4*S*D
    attn_p, attn_f = 64 + 8, 2 * 64 + 4 * 3 * 4
    assert layers[0] == StageCost(params=attn_p + 3 * 4 * 8, flops=attn_f + 2 * 3 * 4 * 8)
    # MoE: router 4*4; 4 experts of 3*4*2 = 24 params held, only top_k=1 computed
    assert layers[1] == StageCost(params=attn_p + 16 + 4 * 24, flops=attn_f + 2 * (16 + 24))
    assert (layers[0], layers[1]) == (StageCost(168, 368), StageCost(184, 256))
    assert head == StageCost(params=40, flops=0)  # a lookup
    assert tail == StageCost(params=4 + 40, flops=2 * 40 + LOSS_FLOPS_PER_LOGIT * 10)


def test_cost_params_match_count_params():
    cfg = ModelConfig(n_layers=5, n_kv_heads=1, n_shared_experts=2, moe_every=2,
                      qkv_bias=True, **{**CFG, "n_heads": 2})
    head, layers, tail = pipeline_costs(cfg, vocab_size=10, seq_len=3)
    total = head.params + sum(c.params for c in layers) + tail.params
    assert total == count_params(cfg, 10).total


@pytest.mark.parametrize("costs,n,head,tail,want", [
    ([1, 1, 1, 1], 2, 0, 0, [0, 2]),
    ([1, 1, 1, 1], 2, 0, 2, [0, 3]),  # a heavy output moves a layer off the last stage
    ([1, 1, 1, 1], 2, 2, 0, [0, 1]),  # a heavy embedding off the first
    ([1, 1, 1], 2, 0, 0, [0, 1]),  # tie (2 | 1 vs 1 | 2): the earlier stage lighter
    ([5, 1, 1, 1, 1, 1], 3, 0, 0, [0, 1, 3]),  # max 5 forced; then 2 | 3 (not 1 | 4)
    ([3, 1, 2], 3, 0, 0, [0, 1, 2]),
])
def test_balanced_split_by_hand(costs, n, head, tail, want):
    assert balanced_split(costs, n, head, tail) == want


def test_balanced_split_needs_a_layer_per_stage():
    with pytest.raises(ValueError, match="3 layers into 4 stages"):
        balanced_split([1, 1, 1], 4)


def test_default_split_weighs_params_and_flops():
    # Costs (params, flops): head (40, 0), dense (168, 368), 3 MoE (184, 256), tail (44, 120);
    # totals P=804, F=1256; weight = params/P + flops/F:
    # head .0498, dense .5020, MoE .4327, tail .1503. 3 stages: [0,1,3] -> .552|.865|.583
    # beats [0,2,3] -> .984|.433|.583 and [0,1,2] -> .552|.433|1.016.
    cfg = ModelConfig(n_layers=4, **CFG)
    assert default_split(cfg, vocab_size=10, seq_len=3, n_stages=3) == [0, 1, 3]
    assert default_split(cfg, vocab_size=10, seq_len=3, n_stages=2) == [0, 2]


def test_stage_modules_chain_to_the_full_model():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=4, **CFG), MoEConfig(), vocab_size=10)
    tokens = torch.randint(0, 10, (2, 5))
    ref = model(tokens)
    layer2 = model.layers["2"]
    first, last = split_model(model, [0, 2], [0, 1])
    assert list(first.layers) == ["0", "1"] and list(last.layers) == ["2", "3"]
    assert last.layers["2"] is layer2  # moved, not copied
    assert first.norm is None and first.output is None and last.tok_embeddings is None
    names = {n for part in (first, last) for n, _ in part.named_parameters()}
    assert {"tok_embeddings.weight", "layers.3.moe.router.gate.weight", "output.weight"} <= names
    torch.testing.assert_close(last(first(tokens)), ref, rtol=0, atol=0)


@pytest.mark.parametrize("overrides,world,words", [
    (["parallel.pp=2", "train.global_batch_size=8", "train.micro_batch_size=8"], 2,
     ["parallel.pp_schedule=1f1b", "1 micro-batches", "train.global_batch_size to 16"]),
    (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"], 2,
     ["parallel.pp_virtual_stages=1", "parallel.pp_virtual_stages >= 2"]),
    (["parallel.pp=2", "parallel.pp_virtual_stages=2"], 2,
     ["parallel.pp_virtual_stages=2", "interleaved_1f1b"]),
    (["parallel.pp=2", "parallel.pp_split=[0,1,3]"], 2, ["parallel.pp_split=[0, 1, 3]", "2 stages"]),
    (["parallel.pp=2", "model.n_layers=3"], 2, ["model.n_layers=3", "parallel.pp_split"]),
    (["parallel.pp=2", "model.tie_embeddings=true"], 2, ["model.tie_embeddings"]),
    (["parallel.pp=2", "parallel.pp_schedule=zero_bubble", "parallel.pp_virtual_stages=2",
      "train.global_batch_size=40", "train.micro_batch_size=8"], 2,
     ["zero_bubble", "multiple of 2 rounds", "5 micro-batches", "global_batch_size = 32"]),
    (["parallel.pp_split=[0,2]"], 1, ["parallel.pp_split", "parallel.pp=1"]),
])
def test_pipeline_rules(overrides, world, words):
    cfg = compose(overrides + ["run.dir=/tmp/x"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, world)
    for w in words:
        assert w in str(e.value)


def test_custom_split_relaxes_divisibility():
    cfg = compose(["parallel.pp=2", "model.n_layers=3", "parallel.pp_split=[0,2]",
                   "run.dir=/tmp/x"])
    assert validate(cfg, 2).pp == 2


def test_bad_split_fails_at_composition():
    with pytest.raises(Exception, match="parallel.pp_split"):
        compose(["parallel.pp_split=[1,2]", "run.dir=/tmp/x"])
