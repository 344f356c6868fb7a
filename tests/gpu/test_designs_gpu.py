"""The GPU paths of the newer MoE designs, each against its torch reference on the same
device: HMoE's ragged experts (one grouped_mm per size class, bf16 on CUDA) against the
loop backend in fp32 and the zero-padded stack; MoE++'s zero-computation experts with the
Triton dispatcher (its active_TK mask) against the torch path; CompeteSMoE's dense step in
bf16 against fp32; the Mamba mixer's chunked scan against the sequential one; RMoE's
recurrent router under bf16 autocast against fp32.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, R routed rows.

Every test takes a ``device``: the ``cuda`` case skips without a CUDA device and is the
check (realistic sizes, bf16 where training uses it); the ``cpu`` case runs the same
comparison on tiny sizes so the code path is exercised off a GPU (the whole CPU part takes
a few seconds: this directory is in the CI suite). On CPU, grouped_mm and the "bf16"
expert GEMMs compute in fp32 and autocast is CPU autocast; the Triton case runs under the
interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from moetrain.config.schema import (
    ConfigError,
    DispatchMode,
    ExpertBackend,
    KernelBackend,
    ModelConfig,
    MoEConfig,
    RouterConfig,
    RouterType,
)
from moetrain.models.mamba import MambaMixer
from moetrain.models.moe.dispatcher import LocalDispatcher
from moetrain.models.moe.experts import RaggedExperts
from moetrain.models.moe.layer import MoELayer
from moetrain.models.moe.router import build_rnn_cell, build_router

_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=_cuda)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of ``a`` against ``b`` in the Frobenius norm."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _grads(module: torch.nn.Module, out: torch.Tensor, x: torch.Tensor) -> dict:
    """Output, and the gradients of sum(out * cos) w.r.t. x and every parameter."""
    g = torch.cos(torch.arange(out.numel(), device=out.device, dtype=torch.float32))
    names, params = zip(*[(n, p) for n, p in module.named_parameters() if p.requires_grad])
    got = torch.autograd.grad((out.float() * g.view(out.shape)).sum(), [x, *params],
                              allow_unused=True)
    return {"out": out.detach(), "x": got[0],
            **{n: gr for n, gr in zip(names, got[1:]) if gr is not None}}


# ----------------------------------------------------------------------------- HMoE
def _ragged_case(device: str):
    """Three size classes (interleaved ids, every F a multiple of 8 as bf16 grouped_mm
    needs), skewed routing with one expert of the small class left empty."""
    if device == "cuda":
        D, T, sizes = 256, 2048, [256, 128, 256, 512, 128, 128, 256, 512]
    else:
        D, T, sizes = 16, 24, [16, 8, 16, 32, 8, 8, 16, 32]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, D, generator=g, device=device)
    logits = torch.randn(T, len(sizes), generator=g, device=device)
    logits[:, 4] = -1e4  # expert 4 (class F_min) gets no rows
    w, ids = torch.softmax(logits, -1).topk(2)
    return D, sizes, x, ids, w


def _run_experts(ex: RaggedExperts, x: torch.Tensor, ids, w) -> dict:
    d = LocalDispatcher(ex.num_experts, expert_order=ex.expert_order)
    x = x.clone().requires_grad_()
    x_RD, meta = d.dispatch(x, ids, w)
    return _grads(ex, d.combine(ex(x_RD, meta.tokens_per_expert), meta), x)


def _pad_from(ragged: RaggedExperts, padded: RaggedExperts) -> None:
    """Copy each expert's (F_e, D) weights into the zero-padded (E, F_max, D) stack."""
    pad = padded.padded
    with torch.no_grad():
        for c, (f, members) in enumerate(zip(ragged.class_hidden, ragged.class_members)):
            g = ragged.classes[c]
            for s, e in enumerate(members):
                pad.w1_EFD[e, :f] = g.w1_EFD[s]
                pad.w3_EFD[e, :f] = g.w3_EFD[s]
                pad.w2_EDF[e, :, :f] = g.w2_EDF[s]


@pytest.mark.parametrize("device", DEVICES)
def test_ragged_grouped_mm_matches_loop_fp32_and_padded(device):
    """One grouped_mm per size class (bf16 on CUDA) against the loop backend in fp32 on the
    same weights, forward and every gradient; the zero-padded stack with the same weights
    gives the same function, and its padding gets exactly zero gradient."""
    D, sizes, x, ids, w = _ragged_case(device)
    torch.manual_seed(0)
    loop = RaggedExperts(sizes, D, ExpertBackend.loop).to(device)
    loop.init_weights(0.05, 0.05)
    gmm = RaggedExperts(sizes, D, ExpertBackend.grouped_mm).to(device)
    gmm.load_state_dict(loop.state_dict())
    padded = RaggedExperts(sizes, D, ExpertBackend.grouped_mm, padded=True).to(device)
    padded.init_weights(0.05, 0.05)
    _pad_from(loop, padded)
    ref, got, pad = (_run_experts(m, x, ids, w) for m in (loop, gmm, padded))
    tol = 2e-2 if device == "cuda" else 1e-5  # bf16 GEMMs against fp32
    for name in ref:
        assert _rel(got[name], ref[name]) < tol, name
    assert _rel(pad["out"], got["out"]) < tol and _rel(pad["x"], got["x"]) < tol
    mask_EF = padded.pad_mask_EF(device).bool()
    g1, g2 = pad["padded.w1_EFD"], pad["padded.w2_EDF"].transpose(1, 2)
    assert (g1[~mask_EF] == 0).all() and (g2[~mask_EF] == 0).all()
    assert (g1[mask_EF] != 0).any()
    # the empty expert (slot 1 of class F_min) gets exactly zero gradient on both paths
    assert torch.count_nonzero(got["classes.0.w1_EFD"][1]) == 0


@_cuda
def test_ragged_bf16_grouped_mm_refuses_a_misaligned_class_and_auto_falls_back():
    """On CUDA bf16 grouped_mm needs each class's F a multiple of 8: the explicit backend
    names the field; ``auto`` runs that class with the loop (and the others grouped)."""
    D, sizes = 64, [64, 12, 64, 12]
    x = torch.randn(32, D, device="cuda")
    ids = torch.arange(32, device="cuda").remainder(4)[:, None]
    w = torch.ones(32, 1, device="cuda")
    gmm = RaggedExperts(sizes, D, ExpertBackend.grouped_mm).cuda()
    gmm.init_weights(0.05, 0.05)
    with pytest.raises(ConfigError, match="model.expert_sizes"):
        _run_experts(gmm, x, ids, w)
    auto = RaggedExperts(sizes, D, ExpertBackend.auto).cuda()
    loop = RaggedExperts(sizes, D, ExpertBackend.loop).cuda()
    auto.load_state_dict(gmm.state_dict())
    loop.load_state_dict(gmm.state_dict())
    assert [g.resolve_backend(x) for g in auto.classes] == [ExpertBackend.loop,
                                                           ExpertBackend.grouped_mm]
    ref, got = _run_experts(loop, x, ids, w), _run_experts(auto, x, ids, w)
    for name in ref:
        assert _rel(got[name], ref[name]) < 2e-2, name


# ----------------------------------------------------------------------------- MoE++
def _null_layer(device: str, kernel: KernelBackend, dispatch: DispatchMode) -> MoELayer:
    D, E, Fh = (256, 8, 512) if device == "cuda" else (16, 4, 16)
    torch.manual_seed(0)
    m = ModelConfig(dim=D, n_heads=2, num_experts=E, top_k=2, expert_hidden=Fh,
                    zero_experts=1, copy_experts=1, constant_experts=2)
    moe = MoEConfig(router=RouterConfig(renormalize=True), dispatch=dispatch,
                    capacity_factor=1.0, expert_backend=ExpertBackend.loop,
                    kernel_backend=kernel, aux_loss_coef=0.01, z_loss_coef=0.001)
    layer = MoELayer(D, m, moe).to(device)
    layer.init_weights(0.5, 0.3)
    layer.router.init_weights(1.5)  # routing that visits every kind of expert
    return layer


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("dispatch", [DispatchMode.dropless, DispatchMode.capacity])
@pytest.mark.parametrize("device", DEVICES)
def test_null_experts_triton_dispatch_matches_torch(device, dispatch, monkeypatch):
    """MoE++: the zero-computation slots reach the Triton dispatcher as inactive slots
    (active_TK); outputs, every gradient and the statistics equal the torch path's."""
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    T = 1024 if device == "cuda" else 12
    ref_layer = _null_layer(device, KernelBackend.torch, dispatch)
    tri_layer = _null_layer(device, KernelBackend.triton, dispatch)
    tri_layer.load_state_dict(ref_layer.state_dict())
    x = torch.randn(T, ref_layer.dim, generator=torch.Generator().manual_seed(1)).to(device)
    results = []
    for layer in (ref_layer, tri_layer):
        xi = x.clone().requires_grad_()
        results.append(_grads(layer, layer(xi), xi))
    ref, got = results
    s_ref, s_got = ref_layer.last_stats, tri_layer.last_stats
    assert int(s_ref.num_null) > 0  # some slots really went to the null experts
    for name in ("num_null", "num_routed", "num_dropped", "load_E"):
        assert torch.equal(getattr(s_got, name), getattr(s_ref, name)), name
    for name, want in ref.items():
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------- CompeteSMoE
def _compete_layer(device: str, backend: ExpertBackend, sizes: list[int] | None):
    D, E, Fh = (256, 8, 256) if device == "cuda" else (16, 4, 16)
    if sizes is not None and device == "cpu":
        sizes = [f // 16 for f in sizes]
    torch.manual_seed(0)
    m = ModelConfig(dim=D, n_heads=2, num_experts=E if sizes is None else len(sizes),
                    top_k=2, expert_hidden=Fh, expert_sizes=sizes)
    rcfg = RouterConfig(name=RouterType.compete, compete_router_coef=0.3,
                        compete_diversity_coef=0.2, compete_balance_coef=0.1)
    layer = MoELayer(D, m, MoEConfig(router=rcfg, expert_backend=backend)).to(device)
    layer.init_weights(D ** -0.5, Fh ** -0.5)  # outputs of order 1: fewer near-ties
    layer.router.force = True  # compete on every training forward
    layer.train()
    return layer


@pytest.mark.parametrize("sizes", [None, [256, 128, 256, 512, 128, 256]],
                         ids=["uniform", "ragged"])
@pytest.mark.parametrize("device", DEVICES)
def test_compete_dense_step_bf16_matches_fp32(device, sizes):
    """A competition step under bf16 autocast with the device's fast experts (grouped_mm
    on CUDA; ragged: one per size class, outputs back in expert-id order) against the fp32
    loop backend. ``dispatcher.dense`` (every expert on every token): its (E, T, D) output
    and every expert gradient to bf16 error. The whole step: the picks come from the
    experts' mean softplus response, so a near-tie may flip in bf16; all but a few tokens'
    outputs, and the three competition losses, to bf16 error."""
    ref = _compete_layer(device, ExpertBackend.loop, sizes)
    fast = _compete_layer(device, ExpertBackend.auto, sizes)
    fast.load_state_dict(ref.state_dict())
    T = 512 if device == "cuda" else 8
    tol = 3e-2  # bf16 GEMMs (CPU autocast makes the loop backend's matmuls bf16 too)
    x = torch.randn(T, ref.dim, generator=torch.Generator().manual_seed(2)).to(device)

    x_ref, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = _grads(ref.experts, ref.dispatcher.dense(x_ref, ref.experts), x_ref)
    with torch.autocast(device, dtype=torch.bfloat16):
        o_ETD = fast.dispatcher.dense(x_fast, fast.experts)
    got = _grads(fast.experts, o_ETD, x_fast)
    assert o_ETD.shape == (fast.num_experts, T, fast.dim)
    for name, w in want.items():
        assert _rel(got[name], w) < tol, name

    out_ref = ref(x)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = fast(x)
    assert ref.competed and fast.competed
    tok_rel = ((out.float() - out_ref).norm(dim=-1) / out_ref.norm(dim=-1))
    assert int((tok_rel > tol).sum()) <= max(1, T // 20)  # flipped near-ties
    for name, w in ref.last_compete.items():
        assert abs(float(fast.last_compete[name]) - float(w)) <= 5e-2 * abs(float(w)) + 1e-5, name


# ----------------------------------------------------------------------------- Mamba
def _mixers(device: str, chunk: int) -> tuple[MambaMixer, MambaMixer]:
    D, N = (256, 16) if device == "cuda" else (16, 4)
    torch.manual_seed(0)
    seq = MambaMixer(D, d_state=N, scan="sequential").to(device)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the initial values, dt shifted up (decays that underflow)
        for name, p in seq.named_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen).to(device))
            if name == "dt_proj.bias":
                p.add_(1.0)
    chk = MambaMixer(D, d_state=N, scan="chunked", chunk_size=chunk).to(device)
    chk.load_state_dict(seq.state_dict())
    return seq, chk


@pytest.mark.parametrize("device", DEVICES)
def test_mamba_chunked_scan_matches_sequential(device):
    """The chunked (SSD) scan against the sequential scan on the same device, T not a
    multiple of the chunk: fp32 to a few ulps of accumulated error; under bf16 autocast
    (the trainer's precision) both within bf16 error of the fp32 sequential output."""
    T, chunk = (500, 64) if device == "cuda" else (23, 8)
    seq, chk = _mixers(device, chunk)
    x = torch.randn(2, T, seq.in_proj.in_features,
                    generator=torch.Generator().manual_seed(3)).to(device)

    def run(m, autocast):
        xi = x.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out = m(xi)
        return _grads(m, out, xi)

    want = run(seq, False)
    got = run(chk, False)
    for name, w in want.items():
        assert _rel(got[name], w) < 1e-4, name
    for m in (seq, chk):
        got = run(m, True)
        for name in ("out", "x"):
            assert _rel(got[name], want[name]) < 3e-2, (m.scan, name)


# ----------------------------------------------------------------------------- RMoE
@pytest.mark.parametrize("device", DEVICES)
def test_recurrent_router_under_bf16_autocast_equals_fp32(device):
    """RMoE's GRU router runs in fp32 with autocast off: under bf16 autocast its picks,
    weights, logits, new state and gradients equal the fp32 run's exactly, for an fp32 or
    a bf16 input (a bf16 input is routed as its fp32 value)."""
    D, E, H, T = (256, 16, 128, 1024) if device == "cuda" else (16, 4, 8, 8)
    cfg = RouterConfig(name=RouterType.recurrent, rnn_hidden=H, renormalize=True)
    torch.manual_seed(0)
    cell = build_rnn_cell(cfg).to(device)
    router = build_router(D, E, 2, cfg).to(device)
    router.init_weights(0.1)
    router.bind_cell(cell)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(T, D, generator=gen).to(device)
    h = torch.randn(T, H, generator=gen).to(device)
    params = [*router.parameters(), *cell.parameters()]

    def run(x_in, autocast):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            o = router(x_in, h)
        loss = (o.weights_TK.square().sum() + o.state_TH.sin().sum()
                + o.logits_TE.logsumexp(-1).sum())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return o, [g for g in grads if g is not None]

    for x_in in (x, x.bfloat16()):
        want, g_want = run(x_in.float(), False)
        got, g_got = run(x_in, True)
        assert torch.equal(got.ids_TK, want.ids_TK)
        for name in ("weights_TK", "logits_TE", "scores_TE", "state_TH"):
            a, b = getattr(got, name), getattr(want, name)
            assert a.dtype == torch.float32, name
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        assert len(g_got) == len(g_want) > 0
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

