"""The real Hydra config composes, overrides reach the typed objects, bad values fail
with a message that names the field and the fix."""

import pytest

from moetrain.config import ConfigError, validate
from moetrain.config.schema import Config, DispatchMode, RouterType, ScoreFunc
from tests.conftest import compose


def test_defaults_compose_to_typed_config():
    cfg = compose(["run.dir=/tmp/x"])
    assert isinstance(cfg, Config)
    assert cfg.model.name == "tiny" and cfg.checkpoint.dir == "/tmp/x/checkpoints"
    assert cfg.moe.router.name == RouterType.topk


@pytest.mark.parametrize("preset,experts,top_k,dim", [
    ("small", 16, 2, 768), ("mixtral_8x7b", 8, 2, 4096), ("deepseekmoe_16b", 64, 6, 2048)])
def test_model_presets(preset, experts, top_k, dim):
    cfg = compose([f"model={preset}", "run.dir=/tmp/x"])
    assert (cfg.model.num_experts, cfg.model.top_k, cfg.model.dim) == (experts, top_k, dim)


def test_overrides_and_groups():
    cfg = compose(["moe/router=sigmoid_topk", "moe.dispatch=capacity", "train.steps=7",
                   "parallel.ep=2", "run.dir=/tmp/x"])
    assert cfg.moe.router.score_func == ScoreFunc.sigmoid
    assert cfg.moe.dispatch == DispatchMode.capacity
    assert cfg.train.steps == 7 and cfg.parallel.ep == 2
    exp = compose(["experiment=tiny_switch", "run.dir=/tmp/x"])
    assert exp.moe.router.name == RouterType.switch and exp.model.top_k == 1


@pytest.mark.parametrize("override,words", [
    ("model.top_k=20", ["model.top_k", "20"]),
    ("model.dim=130", ["model.dim", "130", "n_heads"]),
    ("optim.lr=-1", ["optim.lr"]),
    ("moe.capacity_factor=0", ["moe.capacity_factor"]),
    ("data.val_fraction=0.9", ["data.val_fraction"]),
    ("model.n_kv_heads=-2", ["model.n_kv_heads", "-2", ">= 1"]),
    ("optim.eps=0", ["optim.eps", "> 0"]),
    ("logging.heatmap_every=-1", ["logging.heatmap_every", ">= 0"]),
])
def test_bad_values_name_the_field(override, words):
    with pytest.raises(ConfigError) as e:
        compose([override, "run.dir=/tmp/x"])
    for w in words:
        assert w in str(e.value)


def test_bad_type_fails_at_composition():
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ValidationError

    with pytest.raises((ValidationError, ConfigCompositionException)) as e:
        compose(["model.dim=abc", "run.dir=/tmp/x"])
    assert "dim" in str(e.value)


@pytest.mark.parametrize("overrides,world,words", [
    (["train.global_batch_size=10", "train.micro_batch_size=4"], 1,
     ["train.global_batch_size=10", "micro_batch_size"]),
    (["parallel.ep=3"], 6, ["model.num_experts=8", "parallel.ep=3"]),
    (["parallel.ep=4"], 2, ["parallel.ep=4"]),
    (["parallel.dp=3"], 4, ["parallel.dp", "world size is 4"]),
    (["parallel.tp=3"], 4, ["not divisible", "parallel.tp"]),
    (["train.seq_len=1024"], 1, ["train.seq_len=1024", "model.max_seq_len"]),
    (["model.n_layers=3", "parallel.pp=2"], 2, ["model.n_layers=3", "parallel.pp=2"]),
])
def test_cross_field_rules(overrides, world, words):
    cfg = compose(overrides + ["run.dir=/tmp/x"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, world)
    for w in words:
        assert w in str(e.value)


def test_valid_layout_resolves_dp():
    cfg = compose(["parallel.ep=2", "train.global_batch_size=16", "train.micro_batch_size=2",
                   "run.dir=/tmp/x"])
    layout = validate(cfg, 4)
    assert (layout.dp, layout.ep, layout.edp) == (4, 2, 2)
