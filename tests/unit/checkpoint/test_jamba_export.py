"""Export of Mamba and hybrid models to transformers' JambaForCausalLM (``--target jamba``):
every tensor lands in Jamba's names (nothing missing or left over on load), the logits equal
moetrain's within 1e-4 relative (float32, CPU, the maximum difference printed), and what
Jamba cannot hold is refused naming the field. The export from a multi-process checkpoint
is in tests/distributed/test_mamba_layouts.py."""

from __future__ import annotations

import json

import pytest
import torch

from moetrain.checkpoint.hf import HFConversionError, Target, choose_target, export_model
from moetrain.models import Transformer
from tests.conftest import TINY, compose, oracle

T = oracle("transformers", module_level=True)

V = 61
TOKENS = torch.randint(0, V, (2, 17), generator=torch.Generator().manual_seed(7))
# Jamba's pattern at small scale: Mamba at 0 and 2, attention at 1 and 3 (period 2,
# offset 1), MoE at 1 and 3 (expert period 2, offset 1), GQA, no positions in attention,
# Jamba's inner norms, softmax top-2 weights not renormalised.
JAMBA = [o for o in TINY if not o.startswith(("model.n_layers", "model.n_heads",
                                              "model.ffn_hidden"))] + [
    "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.mixer=hybrid",
    "model.attention_period=2", "model.attention_offset=1", "model.first_dense_layers=1",
    "model.moe_every=2", "model.ffn_hidden=32", "model.mamba_d_state=8",
    "model.mamba_inner_norms=true", "model.position_encoding=none",
    "moe.router.renormalize=false",
]
# MoE-Mamba (experiment=moe_mamba) in Jamba's form: every layer Mamba + Switch top-1 MoE.
MOE_MAMBA = [o for o in TINY if not o.startswith("model.top_k")] + ["experiment=moe_mamba", "model.mamba_inner_norms=true",
                    "model.mamba_d_state=8", "model.tie_embeddings=true",
                    "moe.router.temperature=0.7"]


def _model(overrides: list[str]) -> tuple[Transformer, object]:
    cfg = compose(overrides)
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.moe, V).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the initial values: norm scales, D, A_log, router, ...
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model, cfg


@pytest.mark.parametrize("name,overrides", [("hybrid", JAMBA), ("moe_mamba", MOE_MAMBA)])
def test_jamba_logits_equal_moetrains(tmp_path, name, overrides):
    model, cfg = _model(overrides)
    assert export_model(model, cfg, tmp_path / "hf", "auto", progress=False) == Target.jamba
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    hf, info = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                      output_loading_info=True)
    assert type(hf).__name__ == "JambaForCausalLM"
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    m = cfg.model
    assert hf.config.layers_block_type == [
        "attention" if m.uses_attention(i) else "mamba" for i in range(m.n_layers)]
    assert hf.config.layers_num_experts == [
        m.num_experts if m.is_moe_layer(i) else 1 for i in range(m.n_layers)]
    with torch.no_grad():
        ours, theirs = model(TOKENS), hf.eval()(TOKENS).logits
    rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    print(f"\njamba export ({name}, attn_layer_period={hf_cfg['attn_layer_period']}, "
          f"expert_layer_period={hf_cfg['expert_layer_period']}): max |logits diff| / "
          f"max |logits| = {rel:.2e}")
    assert rel <= 1e-4


def test_dense_mamba_model_exports_as_jamba_mlps(tmp_path):
    """No MoE layer (first_dense_layers = n_layers): Jamba with one expert everywhere is
    its dense MLP."""
    model, cfg = _model(JAMBA + ["model.first_dense_layers=4"])
    export_model(model, cfg, tmp_path / "hf", "jamba", progress=False)
    hf, info = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                      output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        ours, theirs = model(TOKENS), hf.eval()(TOKENS).logits
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-4


@pytest.mark.parametrize("extra,target,match", [
    (["model.position_encoding=rope"], "jamba", "model.position_encoding=rope"),
    (["model.mamba_inner_norms=false"], "jamba", "model.mamba_inner_norms=false"),
    (["moe.router.renormalize=true"], "jamba", "moe.router.renormalize=True"),
    (["model.n_shared_experts=1"], "jamba", "model.n_shared_experts=1"),
    (["model.ffn_hidden=48"], "jamba", "model.ffn_hidden=48 != model.expert_hidden=32"),
    (["model.qkv_bias=true"], "jamba", "model.qkv_bias=true"),
    (["moe/router=deepseek_v3"], "jamba", "score_func=sigmoid"),
    ([], "mixtral", "model.mixer=hybrid: mixtral has attention in every layer"),
    (["model.mixer=mamba"], "qwen2_moe", "model.mixer=mamba"),
    (["model.mixer=attention"], "qwen2_moe", "model.position_encoding=none: qwen2_moe"),
])
def test_what_jamba_cannot_hold_is_refused(extra, target, match):
    model, cfg = _model(JAMBA + extra)
    with pytest.raises(HFConversionError, match=match):
        choose_target(model, cfg, target)


def test_auto_never_picks_jamba_for_a_rope_transformer():
    model, cfg = _model(TINY + ["moe.router.renormalize=false"])
    assert choose_target(model, cfg, "auto") == Target.qwen2_moe
    with pytest.raises(HFConversionError, match="Jamba's attention applies no positional"):
        choose_target(model, cfg, "jamba")
