"""MambaMixer (moetrain/models/mamba.py) held to transformers' MambaMixer and JambaMambaMixer,
the chunked scan held to the sequential one (values and gradients), and both to the
hand-worked answers of the reference sheet (state-spaces/mamba@e9594ce's equations)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moetrain.models.mamba import MambaMixer, selective_scan_chunked, selective_scan_sequential
from tests.conftest import oracle

DIM, N, R = 16, 4, 3  # model dim, state dim, dt rank; inner dim I = 2 * DIM
F32, F64 = torch.float32, torch.float64


def _perturb(module: torch.nn.Module, seed: int, dt_shift: float = 0.0) -> None:
    """Move every parameter off its initial value (A_log off log(1..N), D off 1, norm scales
    off 1, conv bias off 0), so a swapped or ignored parameter shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            if name == "dt_proj.bias":
                p.add_(dt_shift)


def _mixer(dtype=F64, seed: int = 0, dt_shift: float = 0.0, **kw) -> MambaMixer:
    torch.manual_seed(seed)
    m = MambaMixer(DIM, d_state=N, dt_rank=R, **kw).to(dtype)
    _perturb(m, seed + 1, dt_shift)
    return m


def _forward_and_grads(module, names, x, w):
    """Output, and the gradients of sum(y * w) w.r.t. x and the parameters ``names``."""
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    params = dict(module.named_parameters())
    grads = torch.autograd.grad((y * w).sum(), [x] + [params[n] for n in names])
    return y.detach(), dict(zip(["x", *names], grads))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------ transformers oracles
@pytest.mark.parametrize("dtype", [F32, F64])
def test_sequential_matches_transformers_mamba_mixer(dtype):
    """Forward and every gradient against transformers' MambaMixer (on CPU its forward is
    the reference loop), to 1e-6 of the output's scale. float64 agrees only to float32
    rounding as well: transformers 5.x casts A_log, the dt bias, D, B and x to float32
    inside its scan whatever the module dtype."""
    oracle("transformers")
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer as HFMambaMixer

    cfg = MambaConfig(hidden_size=DIM, state_size=N, expand=2, conv_kernel=4,
                      time_step_rank=R, use_bias=False, use_conv_bias=True,
                      num_hidden_layers=1)
    torch.manual_seed(0)
    hf = HFMambaMixer(cfg, layer_idx=0).to(dtype).eval()  # eval: no fused-kernel attempt
    _perturb(hf, seed=1)
    ours = MambaMixer(DIM, d_state=N, dt_rank=R, scan="sequential").to(dtype)
    ours.load_state_dict(hf.state_dict())  # strict: the names match one to one

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 11, DIM, generator=gen, dtype=dtype)
    w = torch.randn(2, 11, DIM, generator=gen, dtype=dtype)
    names = [n for n, _ in hf.named_parameters()]
    y_hf, g_hf = _forward_and_grads(hf, names, x, w)
    y, g = _forward_and_grads(ours, names, x, w)
    diff = (y - y_hf).abs().max().item()
    scale = y_hf.abs().max().item()
    print(f"\n{dtype}: max |y - y_transformers| = {diff:.3e} (max |y| {scale:.2f}); "
          f"max rel grad diff {max(_rel(g[k], g_hf[k]) for k in g):.3e}")
    assert diff <= 1e-6 * max(1.0, scale)
    for k in g:
        assert _rel(g[k], g_hf[k]) <= 1e-5, k


def test_inner_norms_match_transformers_jamba_mamba_mixer():
    """``inner_norms=True`` against transformers' JambaMambaMixer (RMSNorms on dt, B, C),
    float32 (Jamba's RMSNorm computes in float32 whatever the module dtype)."""
    oracle("transformers")
    from transformers import JambaConfig
    from transformers.models.jamba.modeling_jamba import JambaMambaMixer

    cfg = JambaConfig(hidden_size=DIM, mamba_d_state=N, mamba_d_conv=4, mamba_expand=2,
                      mamba_dt_rank=R, mamba_conv_bias=True, mamba_proj_bias=False,
                      rms_norm_eps=1e-6, num_hidden_layers=1, vocab_size=11,
                      num_attention_heads=2, num_key_value_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    hf = JambaMambaMixer(cfg, layer_idx=0).eval()
    _perturb(hf, seed=3)
    ours = MambaMixer(DIM, d_state=N, dt_rank=R, inner_norms=True, norm_eps=1e-6,
                      scan="sequential")
    ours.load_state_dict(hf.state_dict())
    plain = MambaMixer(DIM, d_state=N, dt_rank=R, scan="sequential")
    plain.load_state_dict(hf.state_dict(), strict=False)

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, DIM, generator=gen)
    w = torch.randn(2, 9, DIM, generator=gen)
    names = [n for n, _ in hf.named_parameters()]
    y_hf, g_hf = _forward_and_grads(hf, names, x, w)
    y, g = _forward_and_grads(ours, names, x, w)
    diff = (y - y_hf).abs().max().item()
    print(f"\nJamba float32: max |y - y_transformers| = {diff:.3e}; max rel grad diff "
          f"{max(_rel(g[k], g_hf[k]) for k in g):.3e}")
    assert diff <= 1e-5
    for k in g:
        assert _rel(g[k], g_hf[k]) <= 1e-5, k
    # The norms matter: without them the same weights give another output.
    assert (plain(x) - y_hf).abs().max() > 1e-2


# ------------------------------------------------------------- chunked == sequential
@pytest.mark.parametrize("T,chunk", [(1, 8), (5, 8), (16, 8), (23, 8), (70, 64)])
@pytest.mark.parametrize("dtype,tol,gtol", [(F64, 1e-10, 1e-10), (F32, 1e-5, 1e-5)])
def test_chunked_equals_sequential_values_and_gradients(T, chunk, dtype, tol, gtol):
    """T = 1, T < chunk, T a multiple of it, T not a multiple, and the default chunk of
    64 with T > 64; dt shifted up so that some decays underflow within a chunk. Values to
    ``tol`` of the output's scale, gradients (x and every parameter) to ``gtol`` of
    theirs."""
    seq = _mixer(dtype, seed=T, dt_shift=1.0, scan="sequential")
    chk = MambaMixer(DIM, d_state=N, dt_rank=R, scan="chunked", chunk_size=chunk).to(dtype)
    chk.load_state_dict(seq.state_dict())
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(2, T, DIM, generator=gen, dtype=dtype)
    w = torch.randn(2, T, DIM, generator=gen, dtype=dtype)
    names = [n for n, _ in seq.named_parameters()]
    y_s, g_s = _forward_and_grads(seq, names, x, w)
    y_c, g_c = _forward_and_grads(chk, names, x, w)
    diff, scale = (y_c - y_s).abs().max().item(), y_s.abs().max().item()
    gdiff = max(_rel(g_c[k], g_s[k]) for k in g_s)
    print(f"\nT={T} chunk={chunk} {dtype}: max |y_chunked - y_seq| = {diff:.3e} (max |y| "
          f"{scale:.1f}), max rel grad diff {gdiff:.3e}")
    assert diff <= tol * max(1.0, scale)
    for k in g_s:  # x and all 9 parameters
        assert _rel(g_c[k], g_s[k]) <= gtol, k


def test_chunked_equals_sequential_with_inner_norms():
    seq = _mixer(F64, seed=5, inner_norms=True, scan="sequential")
    chk = MambaMixer(DIM, d_state=N, dt_rank=R, inner_norms=True, chunk_size=4).to(F64)
    chk.load_state_dict(seq.state_dict())
    x = torch.randn(3, 10, DIM, dtype=F64, generator=torch.Generator().manual_seed(5))
    assert (chk(x) - seq(x)).abs().max() <= 1e-10


def test_chunked_scan_extreme_decays_stay_finite_and_exact():
    """Steps up to 20 and rates up to -50: exp(A * sum dt) underflows to 0 inside a chunk.
    A form that exponentiates a positive cumulative sum would overflow here (inf * 0 =
    nan); the masked segment sums must not, in value or in gradient."""
    gen = torch.Generator().manual_seed(6)
    Bsz, T, I = 2, 37, 5
    x = torch.randn(Bsz, T, I, generator=gen, dtype=F32)
    dt = (20 * torch.rand(Bsz, T, I, generator=gen)).requires_grad_(True)
    A = (-50 * torch.rand(I, N, generator=gen)).requires_grad_(True)
    Bm = torch.randn(Bsz, T, N, generator=gen)
    C = torch.randn(Bsz, T, N, generator=gen)
    outs = []
    for scan in (selective_scan_sequential,
                 lambda *a: selective_scan_chunked(*a, chunk_size=16)):
        y, h = scan(x, dt, A, Bm, C)
        g = torch.autograd.grad(y.sum() + h.sum(), [dt, A])
        assert all(torch.isfinite(t).all() for t in (y, h, *g))
        outs.append((y, h, *g))
    for a, b in zip(*outs):
        assert _rel(a, b) <= 1e-5


# ------------------------------------------------------------------ known answers
def _reference_scan_inputs():
    """architectures.md, Mamba section: I=2, N=2, L=3, A_log = log[[1,2],[1,2]], D = 1."""
    x_BTI = torch.tensor([[1, .5, -1], [0, 2, 1]], dtype=F64).T[None]
    dt_pre_BTI = torch.tensor([[0, 0, 0], [1, -1, 0]], dtype=F64).T[None]
    A_IN = -torch.exp(torch.log(torch.tensor([[1., 2.], [1., 2.]], dtype=F64)))
    B_BTN = torch.tensor([[1, 0], [0, 1], [1, 1]], dtype=F64)[None]
    C_BTN = torch.tensor([[1, 1], [1, 0], [0, 1]], dtype=F64)[None]
    z_BTI = torch.tensor([[0, 1, -1], [2, 0, 1]], dtype=F64).T[None]
    return x_BTI, dt_pre_BTI, A_IN, B_BTN, C_BTN, z_BTI


@pytest.mark.parametrize("chunk", [None, 1, 2, 3])
def test_scan_reproduces_the_reference_hand_worked_answer(chunk):
    x, dt_pre, A, Bm, C, z = _reference_scan_inputs()
    dt = F.softplus(dt_pre)
    assert torch.allclose(dt[0].T, torch.tensor([[.693147] * 3, [1.313262, .313262, .693147]],
                                                dtype=F64), atol=5e-7)
    if chunk is None:
        y, h = selective_scan_sequential(x, dt, A, Bm, C)
    else:
        y, h = selective_scan_chunked(x, dt, A, Bm, C, chunk_size=chunk)
    y = y + 1.0 * x  # D = 1
    out = y * F.silu(z)
    want_y = torch.tensor([[1.693147, 0.846574, -1.606504], [0, 2, 1.849778]], dtype=F64)
    want_out = torch.tensor([[0, 0.618895, 0.432055], [0, 0, 1.352296]], dtype=F64)
    want_h = torch.tensor([[-0.519860, -0.606504], [0.693147, 0.849778]], dtype=F64)
    # The sheet prints 6 decimals.
    assert (y[0].T - want_y).abs().max() <= 5e-7
    assert (out[0].T - want_out).abs().max() <= 5e-7
    assert (h[0] - want_h).abs().max() <= 5e-7


@pytest.mark.parametrize("dt,bias", [(1e-3, -6.907255), (1e-2, -4.600166), (1e-1, -2.252168)])
def test_dt_bias_init_is_the_inverse_softplus_known_answer(dt, bias):
    m = MambaMixer(DIM, d_state=N, dt_min=dt, dt_max=dt).to(F64)
    assert (m.dt_proj.bias - bias).abs().max() <= 5e-6  # float32 draw, 6 printed decimals
    assert torch.allclose(F.softplus(m.dt_proj.bias), torch.full_like(m.dt_proj.bias, dt),
                          rtol=1e-6)


# ----------------------------------------------------------------------- causality
@pytest.mark.parametrize("scan,chunk", [("sequential", 64), ("chunked", 4), ("chunked", 64)])
def test_perturbing_time_t_changes_no_earlier_output(scan, chunk):
    m = _mixer(F64, seed=7, scan=scan, chunk_size=chunk)
    x = torch.randn(2, 13, DIM, dtype=F64, generator=torch.Generator().manual_seed(7))
    y = m(x)
    for t in (0, 5, 8, 12):
        x2 = x.clone()
        x2[:, t] += 1.0
        y2 = m(x2)
        assert torch.equal(y2[:, :t], y[:, :t]), t  # bit for bit: masked terms are exact 0s
        assert (y2[:, t] - y[:, t]).abs().max() > 1e-3  # and the perturbation does act


# ------------------------------------------------------------------ initialisation
def test_initialisation_statistics():
    dt_min, dt_max = 1e-3, 1e-1
    torch.manual_seed(8)
    m = MambaMixer(256, d_state=N)  # I = 512 channels for the statistics
    I = m.d_inner
    assert m.dt_rank == 16 and m.A_log.shape == (I, N) and m.A_log.dtype == F32
    assert torch.allclose(m.A_log, torch.log(torch.arange(1, N + 1.0)).expand(I, N))
    assert torch.equal(m.D, torch.ones(I))
    dt = F.softplus(m.dt_proj.bias.double())
    assert dt.min() >= dt_min * (1 - 1e-6) and dt.max() <= dt_max * (1 + 1e-6)
    # log-uniform: the mean of log dt is the midpoint, within 4 standard errors
    lo, hi = math.log(dt_min), math.log(dt_max)
    se = (hi - lo) / math.sqrt(12 * I)
    assert abs(dt.log().mean().item() - (lo + hi) / 2) <= 4 * se
    bound = m.dt_rank ** -0.5
    w = m.dt_proj.weight
    assert w.abs().max() <= bound and w.abs().max() >= 0.9 * bound
    assert abs(w.var().item() - bound ** 2 / 3) <= 0.1 * bound ** 2 / 3  # U(+-b): b^2/3


def test_dt_floor_clamps_the_initial_step():
    m = MambaMixer(DIM, d_state=N, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-4).to(F64)
    assert torch.allclose(F.softplus(m.dt_proj.bias), torch.full((2 * DIM,), 1e-4, dtype=F64),
                          rtol=1e-6)


def test_init_weights_after_meta_materialisation():
    """Built on the meta device, materialised, then init_weights: the model's path."""
    with torch.device("meta"):
        m = MambaMixer(DIM, d_state=N, inner_norms=True)
    m = m.to_empty(device="cpu")
    torch.manual_seed(9)
    m.init_weights(init_std=0.02, out_std=0.005)
    assert torch.allclose(m.A_log, torch.log(torch.arange(1, N + 1.0)).expand(2 * DIM, N))
    assert torch.equal(m.D, torch.ones(2 * DIM))
    assert torch.equal(m.b_layernorm.weight, torch.ones(N))
    assert abs(m.in_proj.weight.std().item() - 0.02) < 0.002
    assert abs(m.out_proj.weight.std().item() - 0.005) < 0.0005
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)


# ------------------------------------------------------------------ dtypes and errors
def test_bfloat16_module_scans_in_float32():
    """A bf16 module returns bf16, computed through a float32 scan: it stays within bf16
    rounding of the float32 module with the same (bf16-rounded) weights."""
    m32 = _mixer(F32, seed=10)
    m16 = MambaMixer(DIM, d_state=N, dt_rank=R).to(torch.bfloat16)
    m16.load_state_dict(m32.state_dict())
    m32.load_state_dict({k: v.float() for k, v in m16.state_dict().items()})
    x = torch.randn(2, 20, DIM, generator=torch.Generator().manual_seed(10)).bfloat16()
    y16, y32 = m16(x), m32(x.float())
    assert y16.dtype == torch.bfloat16
    assert _rel(y16.float(), y32) <= 3e-2


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="scan='fast'"):
        MambaMixer(DIM, scan="fast")
    with pytest.raises(ValueError, match="chunk_size=0"):
        MambaMixer(DIM, chunk_size=0)
    with pytest.raises(ValueError, match="dt_rank"):
        MambaMixer(DIM, dt_rank=0)
