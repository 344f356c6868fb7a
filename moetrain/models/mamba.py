"""Mamba-1 selective state-space sequence mixer (Gu & Dao, 2023, arXiv 2312.00752).

Shapes: B batch, T time, D model dim, I inner dim (expand * D), N state dim (d_state),
R dt rank, K conv kernel. Chunked scan: c chunks, L position in a chunk, S source
position in the same chunk (both of length chunk_size).
The SSM tensors keep the paper's names before the shape suffix: A_IN (decay rates),
B_BTN / C_BTN (input / output matrices, the leading B is the matrix), D_I (skip),
dt_BTI (step size Delta).

Per channel i and state n, with h_0 = 0 (the paper's Algorithm 2, mamba_simple.py):
    h_t = exp(dt_t,i A_i,n) h_t-1 + dt_t,i x_t,i B_t,n        y_t,i = sum_n C_t,n h_t,i,n
Two scans compute this: ``selective_scan_sequential`` (a loop over time, the oracle) and
``selective_scan_chunked`` (Mamba-2's SSD form, Dao & Gu, 2024, arXiv 2405.21060, made
exact for Mamba-1's per-channel, per-state A). The state-dict names are those of
mamba_ssm's ``Mamba`` and transformers' ``MambaMixer`` (and ``JambaMambaMixer`` with
``inner_norms``), so weights copy across by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config.schema import ModelConfig
from moetrain.models.norms import build_norm, init_norm

SCANS = ("sequential", "chunked")


def selective_scan_sequential(x_BTI: torch.Tensor, dt_BTI: torch.Tensor, A_IN: torch.Tensor,
                              B_BTN: torch.Tensor, C_BTN: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence, one step per time index: ``(y_BTI, h_BIN)`` (h after the last step).

    ``dt_BTI`` is Delta after softplus; the D skip and the gate are the caller's. This is
    the reference the chunked scan is tested against (mamba_ssm's selective_scan_ref)."""
    decay_BTIN = torch.exp(dt_BTI[..., None] * A_IN)
    inp_BTIN = (dt_BTI * x_BTI)[..., None] * B_BTN[:, :, None, :]
    h_BIN = x_BTI.new_zeros(x_BTI.shape[0], *A_IN.shape)
    ys = []
    # unbind, not [:, t]: the backward of T slicings would write T full-size gradients.
    for decay_BIN, inp_BIN, C_BN in zip(decay_BTIN.unbind(1), inp_BTIN.unbind(1),
                                        C_BTN.unbind(1)):
        h_BIN = decay_BIN * h_BIN + inp_BIN
        ys.append(torch.einsum("bin,bn->bi", h_BIN, C_BN))
    return torch.stack(ys, dim=1), h_BIN


def _segment_sums(dt_BcLI: torch.Tensor) -> torch.Tensor:
    """``seg[.., l, s, i] = sum_{k=s+1..l} dt[.., k, i]`` for s <= l (0 where s >= l).

    A cumulative sum of the masked, repeated steps rather than a difference of two cumsums
    (ssd_minimal.py's segsum), so a short segment late in a chunk loses no precision to
    cancellation."""
    Q = dt_BcLI.shape[2]
    later_LS = torch.ones(Q, Q, dtype=torch.bool, device=dt_BcLI.device).tril(-1)  # l > s
    steps_BcLSI = torch.where(later_LS[:, :, None], dt_BcLI[:, :, :, None, :], 0.0)
    return steps_BcLSI.cumsum(dim=2)


def selective_scan_chunked(x_BTI: torch.Tensor, dt_BTI: torch.Tensor, A_IN: torch.Tensor,
                           B_BTN: torch.Tensor, C_BTN: torch.Tensor, chunk_size: int = 64
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same scan in chunks of ``chunk_size`` steps (SSD, arXiv 2405.21060 sec. 6).

    Unrolled, y_l,i = sum_{s<=l} sum_n C_l,n B_s,n exp(A_i,n sum_{k=s+1..l} dt_k,i) u_s,i
    with u = dt * x. The log-decay from s to l is A_i,n times a segment sum of dt over
    channel i alone (Delta is per channel, A per channel and state), so one segment-sum
    tensor over (l, s, i) serves all N states. Within a chunk the sum is a masked matrix
    product: the segment sums are masked to 0 for s >= l before exp, so every exponent is
    A <= 0 times a sum of steps dt >= 0 and nothing overflows, and the terms s > l are
    masked out of C_l . B_s. The chunks exchange only their end states, through a
    recurrence of T / chunk_size steps. Exact for any T: the tail is padded with dt = 0
    (decay 1) and u = 0. Memory and work grow as B*T*chunk_size*I*N, chunk_size times the
    sequential scan's (the price of Mamba-1's per-channel, per-state decay in this form)."""
    Bsz, T, I = x_BTI.shape
    Q = max(1, min(chunk_size, T))
    pad = (-T) % Q
    u_BTI = dt_BTI * x_BTI
    if pad:
        u_BTI, dt_BTI = F.pad(u_BTI, (0, 0, 0, pad)), F.pad(dt_BTI, (0, 0, 0, pad))
        B_BTN, C_BTN = F.pad(B_BTN, (0, 0, 0, pad)), F.pad(C_BTN, (0, 0, 0, pad))
    c = (T + pad) // Q
    u_BcLI, dt_BcLI = u_BTI.view(Bsz, c, Q, I), dt_BTI.view(Bsz, c, Q, I)
    B_BcLN, C_BcLN = B_BTN.view(Bsz, c, Q, -1), C_BTN.view(Bsz, c, Q, -1)

    # 1. Within a chunk: y_l += sum_{s<=l} (C_l . decay_ls . B_s) u_s. The segment sums
    # are 0 above the diagonal (decay 1, finite); the causal mask zeroes C_l . B_s there,
    # on a tensor I times smaller than the decays.
    causal_LS = torch.ones(Q, Q, dtype=torch.bool, device=x_BTI.device).tril()
    decay_BcLSIN = torch.exp(_segment_sums(dt_BcLI)[..., None] * A_IN)
    CB_BcLSN = torch.where(causal_LS[:, :, None],
                           C_BcLN[:, :, :, None, :] * B_BcLN[:, :, None, :, :], 0.0)
    mix_BcLSI = torch.einsum("bclsin,bclsn->bclsi", decay_BcLSIN, CB_BcLSN)
    y_BcLI = torch.einsum("bclsi,bcsi->bcli", mix_BcLSI, u_BcLI)

    # 2. Each chunk's own inputs carried to its last step (row l = Q-1 of the decay).
    state_BcIN = torch.einsum("bcsin,bcsi,bcsn->bcin", decay_BcLSIN[:, :, -1], u_BcLI,
                              B_BcLN)

    # 3. Across chunks: H_c = exp(A sum_chunk dt) H_c-1 + state_c, H_-1 = 0.
    cum_BcLI = dt_BcLI.cumsum(dim=2)  # inclusive: the decay from the chunk start to l
    chunk_decay_BcIN = torch.exp(cum_BcLI[:, :, -1, :, None] * A_IN)
    h_BIN = x_BTI.new_zeros(Bsz, *A_IN.shape)
    entering = []
    for chunk_decay_BIN, state_BIN in zip(chunk_decay_BcIN.unbind(1), state_BcIN.unbind(1)):
        entering.append(h_BIN)
        h_BIN = chunk_decay_BIN * h_BIN + state_BIN
    h_in_BcIN = torch.stack(entering, dim=1)

    # 4. The state entering each chunk, decayed to l and read out by C_l.
    decay_in_BcLIN = torch.exp(cum_BcLI[..., None] * A_IN)
    y_BcLI = y_BcLI + torch.einsum("bcln,bclin,bcin->bcli", C_BcLN, decay_in_BcLIN,
                                   h_in_BcIN)
    return y_BcLI.reshape(Bsz, c * Q, I)[:, :T], h_BIN


class MambaMixer(nn.Module):
    """The Mamba-1 block's mixer (mamba_ssm ``modules/mamba_simple.py``), causal, no cache.

    in_proj -> (x, z); x -> causal depthwise conv1d -> SiLU; x_proj -> (dt, B, C);
    dt_proj + softplus; selective scan with A = -exp(A_log) and the D skip; y * SiLU(z);
    out_proj. The scan runs in float32 for a bf16/fp16 module, as mamba_ssm's reference
    does (in float64 for a float64 module). ``inner_norms``: RMSNorms on dt, B and C
    before dt_proj and the scan (Jamba, Lieber et al., 2024, arXiv 2403.19887;
    transformers' ``JambaMambaMixer``)."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, dt_scale: float = 1.0, conv_bias: bool = True,
                 bias: bool = False, inner_norms: bool = False, norm_eps: float = 1e-6,
                 scan: str = "sequential", chunk_size: int = 8) -> None:
        # The default is the loop: with Mamba-1's per-channel, per-state decay the chunked
        # (SSD) form does chunk_size times the loop's work and keeps chunk_size times its
        # B*T*I*N values; on the CPU it measured 0.05x to 0.78x the loop's speed
        # (tools/bench_mamba_scan.py, docs/mamba.md#scans). The GPU fast path this calls
        # for is a fused selective-scan kernel, not this form.
        super().__init__()
        if scan not in SCANS:
            raise ValueError(f"scan={scan!r} is not one of {SCANS}: pick 'chunked' (the SSD "
                             f"form) or 'sequential' (the reference loop)")
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1: 8 is the default")
        if dt_rank != "auto" and (not isinstance(dt_rank, int) or dt_rank < 1):
            raise ValueError(f"dt_rank={dt_rank!r} must be 'auto' (ceil(dim / 16)) or a "
                             f"positive int")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min={dt_min}, dt_max={dt_max}: need 0 < dt_min <= dt_max "
                             f"(defaults 0.001 and 0.1)")
        self.dim, self.d_state, self.d_conv = dim, d_state, d_conv
        self.d_inner = expand * dim
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else dt_rank
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.dt_scale = dt_scale
        self.scan, self.chunk_size = scan, chunk_size
        I, N, R = self.d_inner, d_state, self.dt_rank

        self.in_proj = nn.Linear(dim, 2 * I, bias=bias)
        self.conv1d = nn.Conv1d(I, I, d_conv, groups=I, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(I, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, I, bias=True)
        self.A_log = nn.Parameter(torch.empty(I, N))
        self.D = nn.Parameter(torch.empty(I))
        self.out_proj = nn.Linear(I, dim, bias=bias)
        # mamba_ssm marks these; an optimizer may read the flag to exempt them from decay.
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.dt_layernorm = build_norm(R, norm_eps) if inner_norms else None
        self.b_layernorm = build_norm(N, norm_eps) if inner_norms else None
        self.c_layernorm = build_norm(N, norm_eps) if inner_norms else None
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """The Mamba initialisation of A_log, D and dt_proj (mamba_simple.py).

        A_log[i, n] = log(n + 1) (S4D-real: A = -(n + 1)); D = 1; dt_proj.weight ~
        U(+-dt_scale / sqrt(R)); dt ~ exp(U[log dt_min, log dt_max]) clamped at
        dt_init_floor, and dt_proj.bias = softplus^-1(dt) = dt + log(-expm1(-dt)), so the
        initial steps are log-uniform in [dt_min, dt_max]."""
        I, N = self.A_log.shape
        dev = self.A_log.device
        a_N = torch.arange(1, N + 1, dtype=torch.float32, device=dev)
        self.A_log.copy_(torch.log(a_N).expand(I, N))
        nn.init.ones_(self.D)
        bound = self.dt_scale * self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        lo, hi = math.log(self.dt_min), math.log(self.dt_max)
        dt_I = torch.exp(torch.rand(I, device=dev) * (hi - lo) + lo).clamp(
            min=self.dt_init_floor)
        self.dt_proj.bias.copy_(dt_I + torch.log(-torch.expm1(-dt_I)))

    @torch.no_grad()
    def init_weights(self, init_std: float, out_std: float) -> None:
        """normal(0, init_std) for in_proj and x_proj, normal(0, out_std) for out_proj (the
        model's scheme, where mamba_ssm keeps torch's default), zero linear biases, torch's
        default for the conv (as mamba_ssm), norms 1, and the SSM parameters as above."""
        for lin, std in ((self.in_proj, init_std), (self.x_proj, init_std),
                         (self.out_proj, out_std)):
            nn.init.normal_(lin.weight, mean=0.0, std=std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        self.conv1d.reset_parameters()
        for norm in (self.dt_layernorm, self.b_layernorm, self.c_layernorm):
            init_norm(norm)
        self.reset_ssm_parameters()

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        T = x_BTD.shape[1]
        N, R = self.d_state, self.dt_rank
        x_BTI, z_BTI = self.in_proj(x_BTD).chunk(2, dim=-1)
        # Causal: pad K-1 steps on both sides, keep the first T outputs.
        x_BTI = F.silu(self.conv1d(x_BTI.transpose(1, 2))[..., :T].transpose(1, 2))
        delta_BTR, B_BTN, C_BTN = self.x_proj(x_BTI).split([R, N, N], dim=-1)
        if self.dt_layernorm is not None:
            delta_BTR = self.dt_layernorm(delta_BTR)
            B_BTN, C_BTN = self.b_layernorm(B_BTN), self.c_layernorm(C_BTN)

        f = torch.promote_types(x_BTI.dtype, torch.float32)
        dt_BTI = F.softplus(F.linear(delta_BTR, self.dt_proj.weight).to(f)
                            + self.dt_proj.bias.to(f))
        A_IN = -torch.exp(self.A_log.to(f))
        x_BTI, B_BTN, C_BTN = x_BTI.to(f), B_BTN.to(f), C_BTN.to(f)
        # The scan in float32 even under autocast (whose bf16 matmuls would round the state
        # at every step): the projections around it keep the autocast dtype.
        with torch.autocast(device_type=x_BTI.device.type, enabled=False):
            if self.scan == "chunked":
                y_BTI, _ = selective_scan_chunked(x_BTI, dt_BTI, A_IN, B_BTN, C_BTN,
                                                  self.chunk_size)
            else:
                y_BTI, _ = selective_scan_sequential(x_BTI, dt_BTI, A_IN, B_BTN, C_BTN)
        y_BTI = (y_BTI + x_BTI * self.D.to(f)) * F.silu(z_BTI.to(f))
        return self.out_proj(y_BTI.to(x_BTD.dtype))


# ----------------------------------------------------------------------------- the model's
def _dims(model_cfg: ModelConfig) -> tuple[int, int, int, int, int]:
    """(D, I, N, R, K) of the model's Mamba mixers."""
    D = model_cfg.dim
    R = model_cfg.mamba_dt_rank or math.ceil(D / 16)
    return D, model_cfg.mamba_expand * D, model_cfg.mamba_d_state, R, model_cfg.mamba_d_conv


def build_mamba(model_cfg: ModelConfig) -> MambaMixer:
    """The mixer of a block whose ``model_cfg.uses_attention(i)`` is false: mamba_simple's
    defaults (no in/out biases, conv bias, dt in [1e-3, 0.1]); the inner norms (Jamba)
    share the model's ``norm_eps``, as Jamba's one ``rms_norm_eps`` does. The scan is
    ``model.mamba_scan`` (sequential by default, see :class:`MambaMixer`)."""
    return MambaMixer(model_cfg.dim, d_state=model_cfg.mamba_d_state,
                      d_conv=model_cfg.mamba_d_conv, expand=model_cfg.mamba_expand,
                      dt_rank=model_cfg.mamba_dt_rank or "auto",
                      inner_norms=model_cfg.mamba_inner_norms, norm_eps=model_cfg.norm_eps,
                      scan=getattr(model_cfg.mamba_scan, "value", model_cfg.mamba_scan),
                      chunk_size=model_cfg.mamba_chunk_size)


def mamba_params(model_cfg: ModelConfig) -> int:
    """Parameters of one :func:`build_mamba` mixer: in_proj 2ID, conv I(K + 1), x_proj
    I(R + 2N), dt_proj RI + I, A_log IN, D I, out_proj ID, and R + 2N for the inner
    norms."""
    D, I, N, R, K = _dims(model_cfg)
    norms = R + 2 * N if model_cfg.mamba_inner_norms else 0
    return 2 * I * D + I * (K + 1) + I * (R + 2 * N) + R * I + I + I * N + I + I * D + norms


def mamba_flops(model_cfg: ModelConfig) -> int:
    """Forward FLOPs per token of one mixer: 2 per multiply-accumulate of in_proj, x_proj,
    dt_proj and out_proj and of the conv (K taps); the sequential scan's 7 per channel and
    state (discretise: dt A, its exp, (dt x) B; update h = a h + b: 2; read-out C . h: 2);
    7 per channel (softplus, dt x, the D skip's 2, the two SiLUs, the gate product). An
    exp counts as one FLOP. The chunked scan computes the same values with about
    chunk_size times the scan's FLOPs."""
    D, I, N, R, K = _dims(model_cfg)
    return 2 * (2 * I * D + I * (R + 2 * N) + R * I + I * D + I * K) + 7 * I * N + 7 * I
