"""Mamba and hybrid models (``model.mixer``): the block's wiring against a hand-composed
forward, Jamba's layer pattern against transformers' JambaConfig, exact parameter counts,
attention without positions, causality, the chunked scan inside the model, activation
checkpointing and compile against the plain model, and the config rules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from moetrain.config import ConfigError
from moetrain.models import Transformer, count_params
from moetrain.models.attention import Attention
from moetrain.models.mamba import MambaMixer, mamba_flops, mamba_params
from moetrain.parallel.activation_checkpoint import apply_ac, apply_compile, is_checkpointed
from moetrain.parallel.pipeline import pipeline_costs
from tests.conftest import TINY, compose, oracle

V = 61
# 4 layers: Mamba at 0 and 2, attention at 1 and 3 (period 2, offset 1); MoE at 1 and 3
# (first_dense_layers=1, moe_every=2), dense MLPs at 0 and 2.
HYBRID = [o for o in TINY if not o.startswith(("model.n_layers", "model.n_heads"))] + [
    "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.mixer=hybrid",
    "model.attention_period=2", "model.attention_offset=1", "model.first_dense_layers=1",
    "model.moe_every=2", "model.mamba_d_state=8", "model.mamba_inner_norms=true",
    "model.position_encoding=none",
]
TOKENS = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(5))


def _model(overrides: list[str], seed: int = 0) -> Transformer:
    cfg = compose(overrides)
    torch.manual_seed(seed)
    return Transformer(cfg.model, cfg.moe, V)


def _perturb(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Move every parameter off its initial value (norm scales off 1, D off 1, ...)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(TOKENS[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, V), TOKENS[:, 1:].reshape(-1))
    loss.backward()
    strip = "_checkpoint_wrapped_module."
    return loss.detach(), {n.replace(strip, ""): p.grad.clone()
                           for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- wiring
def test_hybrid_block_wiring_and_names():
    model = _model(HYBRID)
    kinds = [(b.uses_attention, b.moe_enabled) for b in model.layers.values()]
    assert kinds == [(False, False), (True, True), (False, False), (True, True)]
    names = set(model.state_dict())
    assert "layers.0.mamba.in_proj.weight" in names and "layers.0.mamba.A_log" in names
    assert "layers.0.mamba.dt_layernorm.weight" in names  # mamba_inner_norms=true
    assert "layers.1.attention.wq.weight" in names
    assert not any(n.startswith(("layers.0.attention.", "layers.1.mamba.")) for n in names)
    # Every block keeps one pre-mixer norm under the attention model's name.
    assert all(f"layers.{i}.attention_norm.weight" in names for i in range(4))
    m = model.layers["0"].mamba
    assert isinstance(m, MambaMixer) and (m.d_inner, m.d_state, m.dt_rank) == (64, 8, 2)


def test_mamba_block_is_the_pre_norm_residual_of_its_parts():
    """A Mamba block equals x + mamba(norm(x)), then + ffn(norm(h)), composed by hand."""
    model = _model(HYBRID)
    _perturb(model)
    block = model.layers["0"]
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
    cos, sin = model.rope_cos[:7], model.rope_sin[:7]
    with torch.no_grad():
        h = x + block.mamba(block.attention_norm(x))
        want = h + block.feed_forward(block.ffn_norm(h))
        assert torch.equal(block(x, cos, sin), want)


def test_hybrid_pattern_is_jambas_layers_block_type():
    """``uses_attention`` is JambaConfig's ``layers_block_type`` for the same period and
    offset (the rule the Jamba export relies on)."""
    oracle("transformers")
    from transformers import JambaConfig

    from moetrain.config.schema import ModelConfig

    for n, period, offset in ((4, 2, 1), (9, 8, 4), (7, 3, 0), (5, 1, 0)):
        ours = ModelConfig(dim=32, n_heads=2, n_layers=n, mixer="hybrid",
                           attention_period=period, attention_offset=offset)
        theirs = JambaConfig(num_hidden_layers=n, attn_layer_period=period,
                             attn_layer_offset=offset, hidden_size=32,
                             num_attention_heads=2, num_key_value_heads=2)
        assert [("attention" if ours.uses_attention(i) else "mamba")
                for i in range(n)] == theirs.layers_block_type, (n, period, offset)


# ----------------------------------------------------------------------------- counts
def test_mamba_params_hand_count_and_module():
    """D=32, expand 2 (I=64), N=8, R=ceil(32/16)=2, K=4: in_proj 2*64*32 = 4096, conv
    64*4 + 64 = 320, x_proj 64*(2+16) = 1152, dt_proj 2*64 + 64 = 192, A_log 64*8 = 512,
    D 64, out_proj 64*32 = 2048: 8384; the inner norms add 2 + 8 + 8 = 18."""
    for inner, want in ((False, 8384), (True, 8402)):
        cfg = compose(HYBRID + [f"model.mamba_inner_norms={str(inner).lower()}"]).model
        assert mamba_params(cfg) == want
        mixer = _model(HYBRID + [f"model.mamba_inner_norms={str(inner).lower()}"]).layers[
            "0"].mamba
        assert sum(p.numel() for p in mixer.parameters()) == want
    # flops: 2 * (4096 + 1152 + 128 + 2048 + 256) + 7 * 512 + 7 * 64
    assert mamba_flops(cfg) == 2 * (4096 + 1152 + 128 + 2048 + 256) + 7 * 512 + 7 * 64


@pytest.mark.parametrize("extra", [
    ["model.mixer=mamba"],
    ["model.mixer=mamba", "model.mamba_inner_norms=false", "model.mamba_dt_rank=5",
     "model.mamba_expand=3", "model.mamba_d_conv=2", "model.tie_embeddings=true"],
    [],  # the hybrid
    ["model.mixer=attention", "model.qkv_bias=true"],
])
def test_count_params_and_pipeline_costs_are_the_module(extra):
    cfg = compose(HYBRID + extra)
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.moe, V)
    counts = count_params(cfg.model, V, cfg.moe)
    assert counts.total == model.num_params()
    assert counts.active == model.num_params(active_only=True)
    head, layers, tail = pipeline_costs(cfg.model, V, 32, cfg.moe)
    assert head.params + sum(c.params for c in layers) + tail.params == counts.total
    for i, c in enumerate(layers):  # each layer's piece is that block's parameters
        assert c.params == sum(p.numel() for p in model.layers[str(i)].parameters()), i


# ----------------------------------------------------------------------------- attention
def test_position_encoding_none_is_attention_without_rope():
    """``model.position_encoding=none``: the attention is softmax(q k^T / sqrt(Hd)) v under
    the causal mask, no rotation (by hand, GQA 4 query heads on 2 kv heads)."""
    cfg = compose(HYBRID).model
    torch.manual_seed(0)
    attn = Attention(cfg)
    attn.init_weights(0.2, 0.2)
    rope = Attention(compose(HYBRID + ["model.position_encoding=rope"]).model)
    rope.load_state_dict(attn.state_dict())
    model = _model(HYBRID)
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(3))
    cos, sin = model.rope_cos[:6], model.rope_sin[:6]
    q = (x @ attn.wq.weight.T).view(2, 6, 4, 8).transpose(1, 2)
    k = (x @ attn.wk.weight.T).view(2, 6, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    v = (x @ attn.wv.weight.T).view(2, 6, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    s = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    s = s.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    want = (s.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 32) @ attn.wo.weight.T
    with torch.no_grad():
        got = attn(x, cos, sin)
        assert (got - want).abs().max() < 1e-6
        assert (rope(x, cos, sin) - want).abs().max() > 1e-3  # RoPE would change it


@pytest.mark.parametrize("mixer", ["mamba", "hybrid"])
def test_model_is_causal(mixer):
    """Changing token t changes no logit before t (the scan and conv look back only; the
    attention is masked), and does change the logits from t on."""
    model = _model(HYBRID + [f"model.mixer={mixer}"]).eval()
    _perturb(model)
    other = TOKENS.clone()
    other[:, 6] = (other[:, 6] + 1) % V
    with torch.no_grad():
        a, b = model(TOKENS), model(other)
    assert torch.equal(a[:, :6], b[:, :6])
    assert (a[:, 6:] - b[:, 6:]).abs().amax(dim=-1).min() > 0


def test_chunked_scan_inside_the_model_equals_sequential():
    """The same model with every mixer on the chunked (SSD) scan, chunk 4 over 12
    positions (three chunks): loss and every gradient within float32 rounding."""
    model = _model(HYBRID)
    _perturb(model)
    ref_loss, ref_grads = _loss_and_grads(model)
    chunked = copy.deepcopy(model)
    for block in chunked.layers.values():
        if not block.uses_attention:
            block.mamba.scan, block.mamba.chunk_size = "chunked", 4
    loss, grads = _loss_and_grads(chunked)
    rel = max(((grads[k] - g).abs().max() / g.abs().max()).item() for k, g in ref_grads.items())
    print(f"\nchunked vs sequential in the model: rel loss diff "
          f"{abs(loss - ref_loss).item() / ref_loss.item():.2e}, max rel grad diff {rel:.2e}")
    assert abs(loss - ref_loss).item() <= 1e-6 * ref_loss.item()
    assert rel < 1e-5


# ----------------------------------------------------------------------------- AC, compile
@pytest.mark.parametrize("mode,attention", [("full", False), ("selective", True)])
def test_activation_checkpointing_is_bitwise(mode, attention):
    """``parallel.ac=full`` (whole blocks) and ``selective`` with ac_attention (the
    sequence mixer: attention or Mamba, and the experts): same loss and gradients,
    bitwise, and the same parameter names."""
    model = _model(HYBRID)
    _perturb(model)
    ref_loss, ref_grads = _loss_and_grads(model)
    wrapped = copy.deepcopy(model)
    apply_ac(wrapped, mode, attention=attention)
    if mode == "selective":
        assert is_checkpointed(wrapped.layers["0"].mamba)
        assert is_checkpointed(wrapped.layers["1"].attention)
    else:
        assert all(is_checkpointed(b) for b in wrapped.layers.values())
    assert list(wrapped.state_dict()) == list(model.state_dict())
    loss, grads = _loss_and_grads(wrapped)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads)


def test_compile_traces_the_mamba_block():
    """``parallel.compile`` (per-block torch.compile) with full AC on the hybrid: dynamo
    and AOT autograd trace the scan loop (backend aot_eager: inductor's C++ build is the
    other activation-checkpointing test's cost); loss and gradients within 1e-6."""
    model = _model(HYBRID)
    _perturb(model)
    ref_loss, ref_grads = _loss_and_grads(model)
    compiled = copy.deepcopy(model)
    apply_ac(compiled, "full")
    apply_compile(compiled, backend="aot_eager")
    loss, grads = _loss_and_grads(compiled)
    assert abs(loss - ref_loss).item() <= 1e-6 * ref_loss.item()
    for k, g in ref_grads.items():
        assert ((grads[k] - g).norm() / g.norm()).item() < 1e-6, k


# ----------------------------------------------------------------------------- config
def test_config_rules_name_the_field():
    from moetrain.config import validate

    with pytest.raises(ConfigError, match=r"parallel.tp=2 with model.mixer=hybrid.*parallel.tp=1"):
        validate(compose(HYBRID + ["parallel.tp=2"]), 2)
    with pytest.raises(ConfigError, match="leaves no attention layer"):
        validate(compose(HYBRID + ["model.attention_period=8", "model.n_layers=1"]), 1)
    with pytest.raises(ConfigError, match="init.from_dense with model.mixer=mamba"):
        validate(compose(HYBRID + ["model.mixer=mamba", "init.from_dense=/nonexistent"]), 1)
    validate(compose(HYBRID + ["parallel.tp=2", "model.mixer=attention"]), 2)  # no Mamba


def test_moe_mamba_experiment():
    """experiment=moe_mamba: every block a Mamba mixer and a Switch top-1 MoE FFN."""
    cfg = compose(["experiment=moe_mamba"])
    m = cfg.model
    assert (m.mixer.value, m.top_k, m.name) == ("mamba", 1, "tiny")
    assert cfg.moe.router.name.value == "switch" and not cfg.moe.router.renormalize
    assert all(not m.uses_attention(i) and m.is_moe_layer(i) for i in range(m.n_layers))
