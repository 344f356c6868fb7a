"""The Mamba mixer's config wiring: the scan choice reaches every mixer, AdamW does not
decay A_log and D (mamba_simple's ``_no_weight_decay``), and the FLOPs per token count
attention only where a layer attends and each Mamba layer's scan."""

from __future__ import annotations

import torch

from moetrain.config.schema import ModelConfig, MoEConfig, OptimConfig
from moetrain.metrics.flops import model_flops_per_token
from moetrain.models.transformer import Transformer
from moetrain.train.optim import build_optimizer

HYBRID = {"dim": 32, "n_layers": 4, "n_heads": 2, "max_seq_len": 16, "num_experts": 4,
          "top_k": 2, "expert_hidden": 16, "mixer": "hybrid", "attention_period": 2,
          "attention_offset": 1}


def test_the_scan_choice_reaches_every_mixer_and_gives_the_same_logits():
    x = torch.randint(0, 50, (2, 12))
    outs = []
    for scan in ("sequential", "chunked"):
        torch.manual_seed(0)
        m = Transformer(ModelConfig(**HYBRID, mamba_scan=scan, mamba_chunk_size=4),
                        MoEConfig(expert_backend="loop"), 50)
        mixers = [b.mamba for b in m.layers.values() if hasattr(b, "mamba")]
        assert len(mixers) == 2 and all(mx.scan == scan and mx.chunk_size == 4 for mx in mixers)
        with torch.no_grad():
            outs.append(m(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


def test_adamw_does_not_decay_a_log_and_d():
    m = Transformer(ModelConfig(**HYBRID), MoEConfig(), 50)
    opt = build_optimizer(m, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {n for n, p in m.named_parameters() if id(p) not in decayed}
    assert {"layers.0.mamba.A_log", "layers.0.mamba.D", "layers.2.mamba.A_log"} <= names
    assert "layers.0.mamba.in_proj.weight" not in names  # matrices are still decayed


def test_flops_count_attention_and_scans_by_layer():
    cfg = ModelConfig(**HYBRID)
    N_active, S = 1000, 16
    I, N = cfg.mamba_expand * cfg.dim, cfg.mamba_d_state
    want = 6 * N_active + 12 * 2 * cfg.dim * S + 2 * 3 * (7 * I * N + 7 * I)
    assert model_flops_per_token(N_active, 4, cfg.dim, S, cfg) == want
    attention = ModelConfig(**{**HYBRID, "mixer": "attention"})
    assert model_flops_per_token(N_active, 4, cfg.dim, S, attention) == (
        model_flops_per_token(N_active, 4, cfg.dim, S))
