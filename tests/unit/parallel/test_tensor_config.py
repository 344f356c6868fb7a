"""Tensor-parallel layouts are checked before any process group exists: a bad one fails
with a message naming the field, the value and the fix; a good one resolves."""

import pytest

from moetrain.config import ConfigError, validate
from moetrain.config.schema import ExpertTP
from tests.conftest import TINY, compose


def _cfg(overrides):
    return compose(TINY + overrides + ["run.dir=/tmp/x"])


@pytest.mark.parametrize("overrides,words", [
    (["parallel.tp=2", "train.seq_len=31"], ["train.seq_len=31", "parallel.tp=2", "multiple of 2"]),
    (["parallel.tp=2", "model.first_dense_layers=1", "model.ffn_hidden=63"],
     ["model.ffn_hidden=63", "multiple of 2"]),
    (["parallel.tp=2", "parallel.expert_tp=etp", "parallel.ep=2"],
     ["parallel.ep=2", "parallel.expert_tp=etp", "set parallel.ep=1"]),
    (["parallel.tp=2", "parallel.expert_tp=etp", "model.expert_hidden=33"],
     ["model.expert_hidden=33", "parallel.expert_tp=ep"]),
    (["parallel.tp=2", "moe.dispatch=capacity"],
     ["moe.dispatch=capacity", "parallel.expert_tp=etp", "moe.dispatch=dropless"]),
])
def test_bad_tp_layouts_name_the_field_and_fix(overrides, words):
    with pytest.raises(ConfigError) as e:
        validate(_cfg(overrides), 4)
    for w in words:
        assert w in str(e.value)


def test_good_tp_layouts_resolve():
    layout = validate(_cfg(["parallel.tp=2", "parallel.ep=2"]), 4)
    assert (layout.dp, layout.tp, layout.ep, layout.edp) == (2, 2, 2, 2)
    cfg = _cfg(["parallel.tp=2", "parallel.expert_tp=etp", "moe.dispatch=capacity"])
    assert cfg.parallel.expert_tp == ExpertTP.etp
    assert validate(cfg, 4).tp == 2
    # Odd vocabularies are fine: the embedding and output shard unevenly over tp.
    assert validate(_cfg(["parallel.tp=2", "model.vocab_size=257"]), 2).tp == 2


def test_unknown_expert_tp_fails_at_composition():
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ValidationError

    with pytest.raises((ValidationError, ConfigCompositionException)) as e:
        _cfg(["parallel.expert_tp=megatron"])
    assert "expert_tp" in str(e.value)
