"""load_hf_dense: tiny Hugging Face Llama / Qwen2 / Mistral models, built with transformers'
config classes and saved with save_pretrained, give the same logits as moetrain's dense
Transformer loaded from the imported state dict; bad directories fail naming the cause."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from moetrain.checkpoint.hf import HFConversionError, load_hf_dense
from moetrain.config.schema import MoEConfig
from moetrain.models import Transformer
from tests.conftest import oracle

T = oracle("transformers", module_level=True)

V = 97
SMALL = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "max_position_embeddings": 64, "rms_norm_eps": 1e-5}


def _save(path, config, max_shard_size=None):
    """A float32 HF model with non-trivial norms and biases, saved as safetensors."""
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.normal_(1.0, 0.2)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return model


def _moetrain(path):
    cfg, sd = load_hf_dense(path)
    model = Transformer(cfg, MoEConfig(), cfg.vocab_size).eval()
    model.load_state_dict(sd)  # strict: every key present, none extra
    return cfg, model


def _max_diff(hf, ours, seq_len):
    x = torch.randint(0, V, (2, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (hf(x).logits - ours(x)).abs().max().item()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """GQA (4 query heads, 2 kv heads), tied embeddings, rope theta 5e5, sharded save."""
    path = tmp_path_factory.mktemp("llama")
    hf = _save(path, T.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True,
                                   rope_theta=500000.0, **SMALL), max_shard_size="20KB")
    return path, hf


def test_llama_gqa_tied_sharded(llama_dir):
    path, hf = llama_dir
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 1
    cfg, ours = _moetrain(path)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.tie_embeddings) == (4, 2, True)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.max_seq_len) == (500000.0, 1e-5, 64)
    assert cfg.first_dense_layers == cfg.n_layers and not cfg.is_moe_layer(0)
    assert ours.output.weight is ours.tok_embeddings.weight
    assert _max_diff(hf, ours, 64) < 1e-5


def test_qwen2_qkv_biases(tmp_path):
    hf = _save(tmp_path, T.Qwen2Config(num_key_value_heads=1, **SMALL))
    cfg, ours = _moetrain(tmp_path)
    assert cfg.qkv_bias and cfg.n_kv_heads == 1 and not cfg.tie_embeddings
    assert ours.layers["0"].attention.wq.bias.abs().sum() > 0
    assert _max_diff(hf, ours, 48) < 1e-5


def test_mistral_sliding_window_caps_max_seq_len(tmp_path):
    hf = _save(tmp_path, T.MistralConfig(num_key_value_heads=2, sliding_window=16, **SMALL))
    cfg, ours = _moetrain(tmp_path)
    assert cfg.max_seq_len == 16  # full attention equals the 16-token window up to 16 tokens
    assert _max_diff(hf, ours, 16) < 1e-5
    x = torch.randint(0, V, (1, 32))
    with torch.no_grad():
        hf_long = hf(x).logits
    # Past the window the HF model attends to fewer tokens: the cap is what keeps them equal.
    full = Transformer(dataclasses.replace(cfg, max_seq_len=32), MoEConfig(), V).eval()
    full.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (hf_long - full(x)).abs().max() > 1e-3


# ----------------------------------------------------------------------------- bad input
def _copy(src, dst, **config_changes):
    shutil.copytree(src, dst)
    if config_changes:
        cfg = json.loads((dst / "config.json").read_text())
        for k, v in config_changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("change,needle", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type='gpt2'"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "rope_type='llama3'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"head_dim": 16}, "head_dim=16"),
    ({"intermediate_size": 40}, "model.layers.0.mlp.gate_proj.weight"),
])
def test_unsupported_config_fields_are_named(llama_dir, tmp_path, change, needle):
    bad = _copy(llama_dir[0], tmp_path / "bad", **change)
    with pytest.raises(HFConversionError) as e:
        load_hf_dense(bad)
    assert needle in str(e.value)


def test_missing_files_are_named(llama_dir, tmp_path):
    with pytest.raises(HFConversionError, match="is not a directory"):
        load_hf_dense(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HFConversionError, match="config.json is missing"):
        load_hf_dense(empty)
    no_shard = _copy(llama_dir[0], tmp_path / "no_shard")
    victim = sorted(no_shard.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(HFConversionError, match=victim.name):
        load_hf_dense(no_shard)


def test_corrupt_safetensors_is_named(llama_dir, tmp_path):
    bad = _copy(llama_dir[0], tmp_path / "corrupt")
    victim = min(bad.glob("model-*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:100])  # a truncated download
    with pytest.raises(HFConversionError, match=f"{victim.name}: not a readable safetensors"):
        load_hf_dense(bad)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _save(tmp_path, T.LlamaConfig(**SMALL))
    f = tmp_path / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(HFConversionError, match="model.layers.1.self_attn.k_proj.weight"):
        load_hf_dense(tmp_path)
