"""Triton kernels for MoE routing and token movement, and their launchers.

Legend: T tokens, D model dim, E experts, K top-k, N = T*K routed (token, slot) pairs,
R dispatched rows, NB blocks of the flat slot index.

The bottom layer of three (as in OLMo-core: kernels -> autograd ops -> modules). Launchers
take contiguous tensors and return new ones; they know nothing of autograd. Every kernel
matches a torch function in :mod:`moetrain.kernels.reference` (the semantics are there):

- routing metadata: per-block histogram and in-block ranks in one sweep of the expert ids,
  a scan over the (NB, E) block counts, then each slot's position (stable sort order,
  capacity drop) and the inverse permutation. No atomics, so the order is deterministic.
  An id outside [0, E) marks an inactive slot: not counted, not dispatched, position -1.
- permute: gather token rows into expert-sorted order; its backward sums each token's
  K slot gradients (a gather, not an atomic scatter-add: deterministic).
- unpermute + combine: out_t = sum_k w_tk y[pos_tk] in float32, fused; the backward gives
  the rows' gradient (w_tk g_t, written once per row) and the weights' (<g_t, y[pos_tk]>).
- fused router: softmax or sigmoid, expert bias for the selection, iterative top-k
  (ties go to the lower expert id), renormalisation; the backward recomputes the scores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moetrain.kernels.jit import CompileSpec, block_d, lazy_jit, pow2

from moetrain.config.schema import DropPolicy

# Pairs per program in the routing kernels (the in-block rank is a BLOCK x BLOCK compare).
ROUTE_BLOCK = 128
# Experts per step of the block histogram.
ROUTE_E_BLOCK = 64


# ----------------------------------------------------------------------------- routing
@lazy_jit
def _route_count_kernel(ids_ptr, rank_ptr, table_ptr, N, E,
                        BLOCK: tl.constexpr, E_BLOCK: tl.constexpr):
    """Per block of slots: each slot's rank among earlier same-expert slots of the block,
    and the block's histogram (one row of the (NB, E) table); ids outside [0, E) are not
    counted (inactive slots)."""
    pid = tl.program_id(0)
    idx = tl.arange(0, BLOCK)
    offs = pid * BLOCK + idx
    m = offs < N
    e = tl.load(ids_ptr + offs, mask=m, other=-1).to(tl.int32)
    earlier = (e[:, None] == e[None, :]) & (idx[None, :] < idx[:, None])
    rank = tl.sum(earlier.to(tl.int32), axis=1)
    tl.store(rank_ptr + offs, rank, mask=m)
    for e0 in range(0, E, E_BLOCK):
        ex = e0 + tl.arange(0, E_BLOCK)
        cnt = tl.sum((e[:, None] == ex[None, :]).to(tl.int32), axis=0)
        tl.store(table_ptr + pid * E + ex, cnt, mask=ex < E)


@lazy_jit
def _route_scatter_kernel(ids_ptr, rank_ptr, offset_ptr, starts_ptr, pos_ptr, row_index_ptr,
                          N, E, capacity, BLOCK: tl.constexpr):
    """pos_n = start(e_n) + rank_n if rank_n < capacity else -1; row_index[pos_n] = n.

    A slot whose id is outside [0, E) is inactive: pos_n = -1, and it is not dispatched
    (the count kernel has not counted it either)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    e = tl.load(ids_ptr + offs, mask=m, other=-1).to(tl.int32)
    act = m & (e >= 0) & (e < E)
    rank = (tl.load(rank_ptr + offs, mask=act, other=0)
            + tl.load(offset_ptr + pid * E + e, mask=act, other=0))
    kept = act & (rank < capacity)
    pos = tl.load(starts_ptr + e, mask=act, other=0) + rank
    pos = tl.where(kept, pos, -1)
    tl.store(pos_ptr + offs, pos, mask=m)
    tl.store(row_index_ptr + pos, offs.to(tl.int64), mask=kept)


def routing_metadata(ids_TK: torch.Tensor, num_experts: int, capacity: int | None = None,
                     block: int = ROUTE_BLOCK, *, policy: DropPolicy | str = DropPolicy.position,
                     weights_TK: torch.Tensor | None = None,
                     active_TK: torch.Tensor | None = None):
    """Triton twin of :func:`moetrain.kernels.reference.routing_metadata_ref`.

    Inactive slots (``active_TK`` False) reach the kernels with id -1. ``position`` drops
    inside the scatter kernel (rank < capacity); ``slot`` and ``probs`` first choose the
    kept slots with :func:`~moetrain.kernels.reference.capacity_keep` (one sort), then run
    dropless over those. Dropless with every slot active needs no host sync; otherwise the
    number of kept rows is read back once to size ``row_index_R`` (the reference too).
    """
    from moetrain.kernels.reference import RoutingMeta, capacity_keep, expert_counts

    T, K = ids_TK.shape
    N, E, dev = T * K, num_experts, ids_TK.device
    policy = DropPolicy(policy)
    every_slot_routed = capacity is None and active_TK is None  # then R = N, no host sync
    ids_N = ids_TK.reshape(-1)
    if active_TK is not None:
        ids_N = torch.where(active_TK.reshape(-1), ids_N, -1)
    counts_E = None  # active rows per expert before the drop, when the kernels miss some
    if capacity is not None and policy != DropPolicy.position:
        counts_E = expert_counts(torch.where(ids_N < 0, E, ids_N), E + 1)[:E]
        keep_N = capacity_keep(ids_TK, E, capacity, policy, weights_TK, active_TK)
        ids_N = torch.where(keep_N.reshape(-1), ids_N, -1)
        capacity = None  # dropless over the kept slots
    ids_N = ids_N.contiguous()
    nb = triton.cdiv(N, block)
    rank_N = torch.empty(N, dtype=torch.int32, device=dev)
    table = torch.zeros(max(nb, 1), E, dtype=torch.int32, device=dev)
    if N > 0:
        _route_count_kernel[(nb,)](ids_N, rank_N, table, N, E, BLOCK=block,
                                   E_BLOCK=min(ROUTE_E_BLOCK, pow2(E, 16)))
    cum = torch.cumsum(table, 0, dtype=torch.int32)
    offsets = (cum - table).contiguous()  # rows of each expert in earlier blocks
    routed_E = cum[-1].to(torch.int64)
    kept_E = routed_E if capacity is None else routed_E.clamp(max=capacity)
    if counts_E is None:
        counts_E = routed_E
    starts_E = (torch.cumsum(kept_E, 0) - kept_E).to(torch.int32)
    R = N if every_slot_routed else int(kept_E.sum())  # otherwise the one host sync
    pos_N = torch.empty(N, dtype=torch.int32, device=dev)
    row_index_R = torch.empty(R, dtype=torch.int64, device=dev)
    if N > 0:
        cap = N if capacity is None else min(int(capacity), N)
        _route_scatter_kernel[(nb,)](ids_N, rank_N, offsets, starts_E, pos_N, row_index_R,
                                     N, E, cap, BLOCK=block)
    return RoutingMeta(row_index_R, pos_N.view(T, K), kept_E, counts_E)


# ----------------------------------------------------------------------------- permute
@lazy_jit
def _permute_kernel(x_ptr, row_index_ptr, out_ptr, D, K, BLOCK_D: tl.constexpr):
    """out[r] = x[row_index[r] // K], one program per dispatched row."""
    r = tl.program_id(0).to(tl.int64)
    src = tl.load(row_index_ptr + r) // K
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = d < D
        tl.store(out_ptr + r * D + d, tl.load(x_ptr + src * D + d, mask=m), mask=m)


@lazy_jit
def _permute_bwd_kernel(grad_rows_ptr, pos_ptr, grad_x_ptr, D, K,
                        BLOCK_D: tl.constexpr, K_PAD: tl.constexpr):
    """grad_x[t] = sum over kept slots k of grad_rows[pos[t, k]], in float32."""
    t = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, K_PAD)
    p = tl.load(pos_ptr + t * K + kk, mask=kk < K, other=-1).to(tl.int64)
    valid = p >= 0
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < D
        g = tl.load(grad_rows_ptr + p[:, None] * D + d[None, :],
                    mask=valid[:, None] & dm[None, :], other=0.0).to(tl.float32)
        acc = tl.sum(g, axis=0)
        tl.store(grad_x_ptr + t * D + d, acc.to(grad_x_ptr.dtype.element_ty), mask=dm)


def permute(x_TD: torch.Tensor, row_index_R: torch.Tensor, top_k: int) -> torch.Tensor:
    """x_RD[r] = x_TD[row_index_R[r] // K]."""
    x_TD = x_TD.contiguous()
    R, D = row_index_R.numel(), x_TD.shape[1]
    out = torch.empty(R, D, dtype=x_TD.dtype, device=x_TD.device)
    if R > 0 and D > 0:
        _permute_kernel[(R,)](x_TD, row_index_R, out, D, top_k, BLOCK_D=block_d(D))
    return out


def permute_backward(grad_RD: torch.Tensor, pos_TK: torch.Tensor) -> torch.Tensor:
    """grad_x_TD[t] = sum_k grad_RD[pos_TK[t, k]] over kept slots (float32 accumulation)."""
    grad_RD = grad_RD.contiguous()
    T, K = pos_TK.shape
    D = grad_RD.shape[1]
    out = torch.empty(T, D, dtype=grad_RD.dtype, device=grad_RD.device)
    if T > 0 and D > 0:
        _permute_bwd_kernel[(T,)](grad_RD, pos_TK.contiguous(), out, D, K,
                                  BLOCK_D=block_d(D), K_PAD=pow2(K))
    return out


# ----------------------------------------------------------------------------- combine
@triton.jit
def _token_slots(pos_ptr, w_ptr, K, K_PAD: tl.constexpr):
    """This program's token t, its K slots (index, mask), their rows in the dispatched order
    (int64, -1 where dropped or inactive) with a validity mask, and their float32 weights
    (0 where not valid: such a slot adds exactly zero, whatever its weight holds)."""
    t = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, K_PAD)
    km = kk < K
    p = tl.load(pos_ptr + t * K + kk, mask=km, other=-1).to(tl.int64)
    valid = p >= 0
    w = tl.load(w_ptr + t * K + kk, mask=km & valid, other=0.0).to(tl.float32)
    return t, kk, km, p, valid, w


@lazy_jit
def _combine_kernel(y_ptr, w_ptr, pos_ptr, out_ptr, D, K,
                    BLOCK_D: tl.constexpr, K_PAD: tl.constexpr):
    """out[t] = sum_k w[t, k] * y[pos[t, k]] in float32; dropped or inactive slots
    (pos = -1) add zero."""
    t, _kk, _km, p, valid, w = _token_slots(pos_ptr, w_ptr, K, K_PAD)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < D
        y = tl.load(y_ptr + p[:, None] * D + d[None, :],
                    mask=valid[:, None] & dm[None, :], other=0.0).to(tl.float32)
        acc = tl.sum(y * w[:, None], axis=0)
        tl.store(out_ptr + t * D + d, acc.to(out_ptr.dtype.element_ty), mask=dm)


@lazy_jit
def _combine_bwd_kernel(g_ptr, y_ptr, w_ptr, pos_ptr, grad_y_ptr, grad_w_ptr, D, K,
                        BLOCK_D: tl.constexpr, K_PAD: tl.constexpr):
    """grad_y[pos[t, k]] = w[t, k] g[t] (each row written once); grad_w[t, k] = <g[t], y[pos]>."""
    t, kk, km, p, valid, w = _token_slots(pos_ptr, w_ptr, K, K_PAD)
    gw = tl.zeros([K_PAD], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < D
        g = tl.load(g_ptr + t * D + d, mask=dm, other=0.0).to(tl.float32)
        rows = p[:, None] * D + d[None, :]
        rm = valid[:, None] & dm[None, :]
        y = tl.load(y_ptr + rows, mask=rm, other=0.0).to(tl.float32)
        gw += tl.sum(y * g[None, :], axis=1)
        tl.store(grad_y_ptr + rows, (w[:, None] * g[None, :]).to(grad_y_ptr.dtype.element_ty),
                 mask=rm)
    tl.store(grad_w_ptr + t * K + kk, gw.to(grad_w_ptr.dtype.element_ty), mask=km)


def unpermute_combine(y_RD: torch.Tensor, weights_TK: torch.Tensor, pos_TK: torch.Tensor,
                      out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out_TD[t] = sum_k w_tk * y_RD[pos_tk], float32 accumulation, cast to ``out_dtype``."""
    y_RD = y_RD.contiguous()
    T, K = pos_TK.shape
    D = y_RD.shape[1]
    out = torch.empty(T, D, dtype=out_dtype or y_RD.dtype, device=y_RD.device)
    if T > 0 and D > 0:
        _combine_kernel[(T,)](y_RD, weights_TK.contiguous(), pos_TK.contiguous(), out, D, K,
                              BLOCK_D=block_d(D), K_PAD=pow2(K))
    return out


def unpermute_combine_backward(grad_TD: torch.Tensor, y_RD: torch.Tensor,
                               weights_TK: torch.Tensor, pos_TK: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_y_RD in y's dtype, grad_weights_TK in the weights' dtype)."""
    y_RD, grad_TD = y_RD.contiguous(), grad_TD.contiguous()
    T, K = pos_TK.shape
    D = y_RD.shape[1]
    grad_y = torch.empty_like(y_RD)
    grad_w = torch.zeros(T, K, dtype=weights_TK.dtype, device=weights_TK.device)
    if T > 0 and D > 0:
        _combine_bwd_kernel[(T,)](grad_TD, y_RD, weights_TK.contiguous(), pos_TK.contiguous(),
                                  grad_y, grad_w, D, K, BLOCK_D=block_d(D), K_PAD=pow2(K))
    return grad_y, grad_w


# ----------------------------------------------------------------------------- router
ROUTER_BLOCK_T = 16


@triton.jit
def _router_tile(logits_ptr, T, E, temperature, SIGMOID: tl.constexpr, BLOCK_T: tl.constexpr,
                 E_PAD: tl.constexpr):
    """This program's BLOCK_T rows of the logits and their raw scores f(logits / temperature)
    (softmax or sigmoid; padded columns hold 0), with the row, column and tile masks."""
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    rm = rows < T
    cols = tl.arange(0, E_PAD)
    cm = cols < E
    tile = rm[:, None] & cm[None, :]
    z = tl.load(logits_ptr + rows[:, None] * E + cols[None, :], mask=tile, other=0.0)
    z = z.to(tl.float32) / temperature
    if SIGMOID:
        raw = tl.where(cm[None, :], 1.0 / (1.0 + tl.exp(-z)), 0.0)
    else:
        z = tl.where(cm[None, :], z, float("-inf"))
        ex = tl.exp(z - tl.max(z, axis=1)[:, None])
        raw = ex / tl.sum(ex, axis=1)[:, None]
    return rows, rm, cols, cm, tile, raw


@lazy_jit
def _router_fwd_kernel(logits_ptr, bias_ptr, ids_ptr, w_ptr, scores_ptr, T, E, temperature,
                       K: tl.constexpr, SIGMOID: tl.constexpr, RENORM: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr,
                       K_PAD: tl.constexpr):
    rows, rm, cols, cm, tile, raw = _router_tile(logits_ptr, T, E, temperature, SIGMOID,
                                                 BLOCK_T, E_PAD)
    if SIGMOID:
        scores = raw / tl.sum(raw, axis=1)[:, None]
    else:
        scores = raw
    tl.store(scores_ptr + rows[:, None] * E + cols[None, :], scores, mask=tile)
    if HAS_BIAS:
        biased = raw + tl.load(bias_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    else:
        biased = raw
    biased = tl.where(cm[None, :], biased, float("-inf"))
    kcols = tl.arange(0, K_PAD)
    w = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    for k in tl.static_range(K):
        idx = tl.argmax(biased, axis=1, tie_break_left=True)
        sel = cols[None, :] == idx[:, None]
        wk = tl.sum(tl.where(sel, raw, 0.0), axis=1)
        w = tl.where(kcols[None, :] == k, wk[:, None], w)
        biased = tl.where(sel, float("-inf"), biased)
        tl.store(ids_ptr + rows * K + k, idx.to(tl.int64), mask=rm)
    if RENORM:
        w = w / tl.maximum(tl.sum(w, axis=1), 1e-20)[:, None]
    tl.store(w_ptr + rows[:, None] * K + kcols[None, :], w, mask=rm[:, None] & (kcols < K)[None, :])


@lazy_jit
def _router_bwd_kernel(logits_ptr, ids_ptr, gw_ptr, gs_ptr, glogits_ptr, T, E, temperature,
                       K: tl.constexpr, SIGMOID: tl.constexpr, RENORM: tl.constexpr,
                       HAS_GW: tl.constexpr, HAS_GS: tl.constexpr, BLOCK_T: tl.constexpr,
                       E_PAD: tl.constexpr):
    """Gradient of the gate logits from the gradients of the weights and of the scores.

    raw = f(z), z = logits / temperature. Weights w_k = raw[id_k] (/ S, S = sum_k raw[id_k],
    when renormalised): d/d raw[id_j] = (gw_j - sum_k gw_k w_k) / S. Sigmoid scores
    s = raw / Q: d/d raw = (gs - <gs, s>) / Q. Then softmax: dz = raw (graw - <graw, raw>);
    sigmoid: dz = graw raw (1 - raw).
    """
    rows, rm, cols, _cm, tile, raw = _router_tile(logits_ptr, T, E, temperature, SIGMOID,
                                                 BLOCK_T, E_PAD)
    graw = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32)
    if HAS_GW:
        picked = tl.zeros([BLOCK_T, E_PAD], dtype=tl.int1)
        s = tl.zeros([BLOCK_T], dtype=tl.float32)
        dot = tl.zeros([BLOCK_T], dtype=tl.float32)
        for k in tl.static_range(K):
            idk = tl.load(ids_ptr + rows * K + k, mask=rm, other=-1)
            gwk = tl.load(gw_ptr + rows * K + k, mask=rm, other=0.0).to(tl.float32)
            sel = cols[None, :] == idk[:, None]
            picked = picked | sel
            graw += tl.where(sel, gwk[:, None], 0.0)
            rk = tl.sum(tl.where(sel, raw, 0.0), axis=1)
            s += rk
            dot += gwk * rk
        if RENORM:
            sc = tl.maximum(s, 1e-20)
            corr = tl.where(s > 1e-20, dot / (sc * sc), 0.0)
            graw = graw / sc[:, None] - tl.where(picked, corr[:, None], 0.0)
    if HAS_GS:
        gs = tl.load(gs_ptr + rows[:, None] * E + cols[None, :], mask=tile, other=0.0)
        gs = gs.to(tl.float32)
        if SIGMOID:
            q = tl.sum(raw, axis=1)
            sc_s = raw / q[:, None]
            graw += (gs - tl.sum(gs * sc_s, axis=1)[:, None]) / q[:, None]
        else:
            graw += gs
    if SIGMOID:
        gz = graw * raw * (1.0 - raw)
    else:
        gz = raw * (graw - tl.sum(graw * raw, axis=1)[:, None])
    tl.store(glogits_ptr + rows[:, None] * E + cols[None, :], gz / temperature, mask=tile)


def topk_router(logits_TE: torch.Tensor, expert_bias_E: torch.Tensor | None, top_k: int,
                sigmoid: bool, renormalize: bool, temperature: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`moetrain.kernels.reference.topk_router_ref` (forward only)."""
    logits_TE = logits_TE.float().contiguous()
    T, E = logits_TE.shape
    dev = logits_TE.device
    ids = torch.empty(T, top_k, dtype=torch.int64, device=dev)
    w = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    scores = torch.empty(T, E, dtype=torch.float32, device=dev)
    if T > 0:
        has_bias = expert_bias_E is not None
        bias = expert_bias_E.float().contiguous() if has_bias else logits_TE
        _router_fwd_kernel[(triton.cdiv(T, ROUTER_BLOCK_T),)](
            logits_TE, bias, ids, w, scores, T, E, float(temperature), K=top_k,
            SIGMOID=sigmoid, RENORM=renormalize, HAS_BIAS=has_bias, BLOCK_T=ROUTER_BLOCK_T,
            E_PAD=pow2(E), K_PAD=pow2(top_k))
    return ids, w, scores


def topk_router_backward(logits_TE: torch.Tensor, ids_TK: torch.Tensor,
                         grad_weights_TK: torch.Tensor | None,
                         grad_scores_TE: torch.Tensor | None, sigmoid: bool, renormalize: bool,
                         temperature: float = 1.0) -> torch.Tensor:
    """float32 gradient of the logits; a None gradient counts as zero."""
    logits_TE = logits_TE.float().contiguous()
    T, E = logits_TE.shape
    K = ids_TK.shape[1]
    grad = torch.empty(T, E, dtype=torch.float32, device=logits_TE.device)
    if T > 0:
        gw = grad_weights_TK.contiguous() if grad_weights_TK is not None else logits_TE
        gs = grad_scores_TE.contiguous() if grad_scores_TE is not None else logits_TE
        _router_bwd_kernel[(triton.cdiv(T, ROUTER_BLOCK_T),)](
            logits_TE, ids_TK.contiguous(), gw, gs, grad, T, E, float(temperature), K=K,
            SIGMOID=sigmoid, RENORM=renormalize, HAS_GW=grad_weights_TK is not None,
            HAS_GS=grad_scores_TE is not None, BLOCK_T=ROUTER_BLOCK_T, E_PAD=pow2(E))
    return grad


# ----------------------------------------------------------------------------- AOT specs
def _compile_specs() -> list[CompileSpec]:
    """The instantiations the launchers above make for bf16 and float32 activations
    (compiled ahead of time by tools/check_kernels.py)."""
    n, ix, blk = {"N": "i32", "E": "i32"}, "*i64", {"BLOCK": ROUTE_BLOCK}
    specs = [
        CompileSpec(_route_count_kernel, {"ids_ptr": ix, "rank_ptr": "*i32",
                                          "table_ptr": "*i32", **n},
                    {**blk, "E_BLOCK": ROUTE_E_BLOCK}),
        CompileSpec(_route_scatter_kernel, {"ids_ptr": ix, "rank_ptr": "*i32",
                                            "offset_ptr": "*i32", "starts_ptr": "*i32",
                                            "pos_ptr": "*i32", "row_index_ptr": ix, **n,
                                            "capacity": "i32"}, blk),
    ]
    rows = {"D": "i32", "K": "i32"}
    for act in ("*bf16", "*fp32"):
        tiles = {"BLOCK_D": 1024, "K_PAD": 8}
        specs += [
            CompileSpec(_permute_kernel, {"x_ptr": act, "row_index_ptr": ix, "out_ptr": act,
                                          **rows}, {"BLOCK_D": 1024}),
            CompileSpec(_permute_bwd_kernel, {"grad_rows_ptr": act, "pos_ptr": "*i32",
                                              "grad_x_ptr": act, **rows}, tiles),
            CompileSpec(_combine_kernel, {"y_ptr": act, "w_ptr": "*fp32", "pos_ptr": "*i32",
                                          "out_ptr": act, **rows}, tiles),
            CompileSpec(_combine_bwd_kernel, {"g_ptr": act, "y_ptr": act, "w_ptr": "*fp32",
                                              "pos_ptr": "*i32", "grad_y_ptr": act,
                                              "grad_w_ptr": "*fp32", **rows}, tiles),
        ]
    f32 = "*fp32"
    for sigmoid in (False, True):
        common = {"K": 6, "SIGMOID": sigmoid, "RENORM": True, "BLOCK_T": ROUTER_BLOCK_T,
                  "E_PAD": 64}
        specs += [
            CompileSpec(_router_fwd_kernel, {"logits_ptr": f32, "bias_ptr": f32,
                                             "ids_ptr": ix, "w_ptr": f32, "scores_ptr": f32,
                                             "T": "i32", "E": "i32", "temperature": "fp32"},
                        {**common, "HAS_BIAS": sigmoid, "K_PAD": 8}),
            CompileSpec(_router_bwd_kernel, {"logits_ptr": f32, "ids_ptr": ix, "gw_ptr": f32,
                                             "gs_ptr": f32, "glogits_ptr": f32, "T": "i32",
                                             "E": "i32", "temperature": "fp32"},
                        {**common, "HAS_GW": True, "HAS_GS": True}),
        ]
    return specs


COMPILE_SPECS = _compile_specs()
