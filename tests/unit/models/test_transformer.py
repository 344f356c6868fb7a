import math

import pytest
import torch

from moetrain.config.schema import ModelConfig, MoEConfig
from moetrain.models.moe.layer import MoELayer
from moetrain.models.rope import apply_rope, precompute_rope
from moetrain.models.transformer import Transformer, count_params

V = 50


def _cfg(**kw) -> ModelConfig:
    base = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 48,
            "max_seq_len": 16, "num_experts": 4, "top_k": 2, "expert_hidden": 16}
    base.update(kw)
    return ModelConfig(**base)


def _model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(_cfg(**kw), MoEConfig(), V)


def test_forward_shape_and_dtype():
    m = _model()
    logits = m(torch.randint(0, V, (3, 7)))
    assert logits.shape == (3, 7, V) and logits.dtype == torch.float32


def test_causality_future_token_does_not_change_earlier_logits():
    m = _model()
    tokens = torch.randint(0, V, (1, 10))
    changed = tokens.clone()
    changed[0, 6] = (changed[0, 6] + 1) % V
    a, b = m(tokens), m(changed)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_init_is_deterministic_given_the_seed():
    s1, s2, s3 = (_model(seed).state_dict() for seed in (7, 7, 8))
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not torch.equal(s1["layers.0.attention.wq.weight"], s3["layers.0.attention.wq.weight"])
    m = _model(7)
    torch.manual_seed(7)
    m.init_weights()  # re-running init from the same RNG state reproduces the weights
    assert all(torch.equal(s1[k], v) for k, v in m.state_dict().items())
    # Building on the meta device, then seeding and initialising, gives the same weights.
    with torch.device("meta"):
        lazy = Transformer(_cfg(), MoEConfig(), V)
    lazy.to_empty(device="cpu")
    torch.manual_seed(7)
    lazy.init_weights()
    assert all(torch.equal(s1[k], v) for k, v in lazy.state_dict().items())


def test_init_statistics():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=128, n_layers=8, n_heads=4, ffn_hidden=128, max_seq_len=8,
                      num_experts=2, top_k=1, expert_hidden=64, init_std=0.02)
    m = Transformer(cfg, MoEConfig(), V)
    blk = m.layers["3"]
    out_std = 0.02 / math.sqrt(16)
    assert math.isclose(blk.attention.wq.weight.std().item(), 0.02, rel_tol=0.05)
    assert math.isclose(blk.attention.wo.weight.std().item(), out_std, rel_tol=0.05)
    assert math.isclose(blk.moe.experts.w2_EDF.std().item(), out_std, rel_tol=0.05)
    assert math.isclose(blk.moe.experts.w1_EFD.std().item(), 0.02, rel_tol=0.05)
    assert torch.equal(blk.attention_norm.weight, torch.ones(128))
    assert torch.equal(blk.moe.router.expert_bias, torch.zeros(2))


def test_moe_placement_first_dense_and_every():
    m = _model(n_layers=5, first_dense_layers=1, moe_every=2, n_shared_experts=1)
    assert [b.moe_enabled for b in m.layers.values()] == [False, True, False, True, False]
    moes = m.moe_layers()
    assert moes == [m.layers["1"].moe, m.layers["3"].moe]
    assert all(isinstance(x, MoELayer) and x.shared_experts is not None for x in moes)
    assert m.layers["0"].feed_forward.w1.weight.shape == (48, 32)


def test_count_params_matches_the_module():
    for kw in ({}, {"tie_embeddings": True}, {"n_shared_experts": 2, "first_dense_layers": 1},
               {"qkv_bias": True, "n_kv_heads": 2}):
        m = _model(**kw)
        pc = count_params(m.model_cfg, V)
        assert pc.total == m.num_params() == sum(p.numel() for p in set(m.parameters()))
        assert pc.active == m.num_params(active_only=True)
        assert pc.embedding == V * 32
    # Hand count for the default: each of 2 MoE layers holds 4 experts of 3*32*16, uses 2.
    m = _model()
    pc = count_params(m.model_cfg, V)
    assert pc.total - pc.active == 2 * (4 - 2) * 3 * 32 * 16


def test_tied_embeddings_share_the_tensor():
    m = _model(tie_embeddings=True)
    assert m.output.weight is m.tok_embeddings.weight


def test_rope_tables_are_not_persistent_and_rebuilt_by_init_weights():
    m = _model()
    assert not any("rope" in k for k in m.state_dict())
    cos = m.rope_cos.clone()
    with torch.device("meta"):
        meta_model = Transformer(_cfg(), MoEConfig(), V)
    meta_model.to_empty(device="cpu")
    meta_model.init_weights()
    assert torch.equal(meta_model.rope_cos, cos)


def test_pipeline_style_stages_chain_to_the_full_model():
    m = _model(n_layers=3)
    tokens = torch.randint(0, V, (2, 6))
    full = m(tokens)
    first, last = _model(n_layers=3), _model(n_layers=3)
    del first.layers["2"]
    first.norm = None
    first.output = None
    del last.layers["0"], last.layers["1"]
    last.tok_embeddings = None
    assert "layers.2.attention.wq.weight" in last.state_dict()  # FQNs survive
    h = first(tokens)
    assert h.shape == (2, 6, 32)
    assert torch.allclose(last(h), full, atol=1e-6)
    assert len(last.moe_layers()) == 1


def test_sequence_longer_than_rope_table_is_rejected():
    with pytest.raises(ValueError, match="model.max_seq_len=16"):
        _model()(torch.randint(0, V, (1, 17)))


def test_attention_matches_naive_gqa_reference():
    m = _model()
    attn = m.layers["0"].attention
    x = torch.randn(1, 5, 32)
    cos, sin = m.rope_cos[:5], m.rope_sin[:5]
    got = attn(x, cos, sin)
    hd = 8
    q = (x @ attn.wq.weight.T).view(5, 4, hd)
    k = (x @ attn.wk.weight.T).view(5, 2, hd)
    v = (x @ attn.wv.weight.T).view(5, 2, hd)
    out = torch.zeros(5, 4, hd)
    for h in range(4):
        kv = h // 2  # query heads 0,1 share kv head 0; 2,3 share kv head 1
        for i in range(5):
            qi = _rotate(q[i, h], i)
            s = torch.stack([qi @ _rotate(k[j, kv], j) for j in range(i + 1)]) / math.sqrt(hd)
            out[i, h] = torch.softmax(s, 0) @ v[: i + 1, kv]
    ref = out.reshape(5, 32) @ attn.wo.weight.T
    assert torch.allclose(got[0], ref, atol=1e-5)


def _rotate(vec: torch.Tensor, pos: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE of one head vector, pair i = (vec[i], vec[i + hd/2])."""
    half = vec.shape[0] // 2
    outv = vec.clone()
    for i in range(half):
        a = pos * theta ** (-2 * i / vec.shape[0])
        c, s = math.cos(a), math.sin(a)
        outv[i] = vec[i] * c - vec[i + half] * s
        outv[i + half] = vec[i + half] * c + vec[i] * s
    return outv


def test_rope_scores_depend_on_relative_position_only():
    cos, sin = precompute_rope(8, 32, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q, cos[m : m + 1], sin[m : m + 1])
        kn = apply_rope(k, cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum().item()

    assert math.isclose(score(5, 2), score(20, 17), rel_tol=1e-5)
    rotated = apply_rope(q, cos[9:10], sin[9:10])
    assert math.isclose(rotated.norm().item(), q.norm().item(), rel_tol=1e-6)
