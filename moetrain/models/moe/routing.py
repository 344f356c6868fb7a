"""Routing math as pure functions: scores, selection, gates, Sinkhorn, bias updates and
keyed random draws. The router modules (``router.py``) compose them; tests hold each to
its paper's formula and to Megatron-core's ``moe_utils`` where both implement it.

Legend: T tokens, E experts, K top-k (slots per token), G expert groups, L layers.
"""

from __future__ import annotations

import functools
import itertools
import math
import struct

import torch
import torch.nn.functional as F

from moetrain.config.schema import BiasUpdate, GroupScore, ScoreFunc


# ----------------------------------------------------------------------------- scores
def score(logits_TE: torch.Tensor, score_func: ScoreFunc) -> torch.Tensor:
    """float32 softmax over experts, or element-wise sigmoid (DeepSeek-V3)."""
    if ScoreFunc(score_func) == ScoreFunc.softmax:
        return torch.softmax(logits_TE.float(), dim=-1)
    return torch.sigmoid(logits_TE.float())


def normalized(raw_TE: torch.Tensor) -> torch.Tensor:
    """Per-token probabilities for the losses: sigmoid scores divided by their sum
    (DeepSeek-V3 eq. 19's s'); softmax scores already sum to 1 and pass through."""
    return raw_TE / raw_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def sigmoid_probs(z_TE: torch.Tensor) -> torch.Tensor:
    """sigmoid(z) / sum_e sigmoid(z_e), computed as softmax(logsigmoid(z)): the same
    values, but they sum to 1 even when every sigmoid underflows. A division by the sum
    with an epsilon lets a router push all its scores below the epsilon and drive the
    balance loss under its minimum (Megatron-LM #1545)."""
    return torch.softmax(F.logsigmoid(z_TE.float()), dim=-1)


# ----------------------------------------------------------------------------- selection
def group_limited_mask(scores_TE: torch.Tensor, n_groups: int, topk_groups: int,
                       group_score: GroupScore, top_k: int) -> torch.Tensor:
    """bool (T, E): True for the experts of each token's ``topk_groups`` best groups.

    Group-limited routing (DeepSeek-V2 device-limited, DeepSeek-V3 node-limited): the E
    experts form G consecutive groups of E/G; a group's score is the sum of its 2 best
    scores (``top2_sum``: DeepSeek-V3's code and torchtitan) or of its best
    ``max(1, top_k // topk_groups)`` (``topk_sum``: Megatron-core). The two agree when
    top_k / topk_groups = 2 (DeepSeek-V3's 8 / 4).
    """
    T, E = scores_TE.shape
    # At least 1: with top_k < topk_groups (a schedule may lower top_k at run time) the
    # top-0 sum would score every group 0 and pick groups regardless of the scores.
    per_group = (2 if GroupScore(group_score) == GroupScore.top2_sum
                 else max(1, top_k // topk_groups))
    s_TGe = scores_TE.view(T, n_groups, E // n_groups)
    group_TG = s_TGe.topk(min(per_group, E // n_groups), dim=-1).values.sum(dim=-1)
    groups_TK = group_TG.topk(topk_groups, dim=-1, sorted=False).indices
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, groups_TK, True)
    return keep_TG.unsqueeze(-1).expand(T, n_groups, E // n_groups).reshape(T, E)


def topk_select(raw_TE: torch.Tensor, top_k: int, bias_E: torch.Tensor | None = None,
                n_groups: int = 1, topk_groups: int = 1,
                group_score: GroupScore = GroupScore.top2_sum) -> torch.Tensor:
    """int64 (T, K) expert ids, best first, chosen on ``raw + bias`` (no gradient).

    The bias steers the selection only (auxiliary-loss-free balancing, Wang et al. 2024);
    group limits apply to the biased scores, as in DeepSeek-V3.
    """
    sel_TE = raw_TE.detach().float()
    if bias_E is not None:
        sel_TE = sel_TE + bias_E.float()
    if n_groups > 1:
        keep_TE = group_limited_mask(sel_TE, n_groups, topk_groups, group_score, top_k)
        sel_TE = sel_TE.masked_fill(~keep_TE, float("-inf"))
    return torch.topk(sel_TE, top_k, dim=-1, sorted=True).indices


def topk_gates(raw_TE: torch.Tensor, ids_TK: torch.Tensor, renormalize: bool,
               route_scale: float = 1.0) -> torch.Tensor:
    """float32 (T, K) combine weights: the unbiased scores of the picks, renormalised to
    sum to 1 when ``renormalize`` and K > 1 (one weight renormalised is 1.0 and would
    cut the router's gradient from the LM loss), then times ``route_scale``."""
    w_TK = raw_TE.gather(1, ids_TK)
    if renormalize and ids_TK.shape[1] > 1:
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return w_TK * route_scale if route_scale != 1.0 else w_TK


def threshold_select(probs_TE: torch.Tensor, threshold: float, max_k: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """XMoE threshold routing (Yang et al. 2024, arXiv 2403.18926): experts in decreasing
    probability until their cumulative mass reaches ``threshold``; at least 1, at most
    ``max_k``. Returns (ids_TK, active_TK) with K = max_k; an expert is kept while the
    mass *before* it is below the threshold (p = [.5, .3, .15, .05], t = 0.9 -> 3)."""
    p_TK, ids_TK = torch.topk(probs_TE.detach().float(), max_k, dim=-1, sorted=True)
    before_TK = torch.cumsum(p_TK, dim=-1) - p_TK
    active_TK = before_TK < threshold
    active_TK[:, 0] = True
    return ids_TK, active_TK


def expert_choice_select(scores_TE: torch.Tensor, capacity: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert-choice routing (Zhou et al. 2022): each expert takes its ``capacity`` tokens
    of highest score (ties to the lower token index). Returns (ids_TE, active_TE) in slot
    layout: slot e of token t is expert e, active when e chose t."""
    T, E = scores_TE.shape
    order_ET = torch.argsort(scores_TE.detach().float().t(), dim=-1, descending=True,
                             stable=True)
    chosen_CE = order_ET[:, : min(capacity, T)].t()
    active_TE = torch.zeros(T, E, dtype=torch.bool, device=scores_TE.device)
    active_TE.scatter_(0, chosen_CE, True)
    ids_TE = torch.arange(E, device=scores_TE.device).expand(T, E).contiguous()
    return ids_TE, active_TE


# ----------------------------------------------------------------------------- Sinkhorn
def sinkhorn_log(cost_TE: torch.Tensor, row_mass: float, col_mass: float,
                 max_iters: int = 100, tol: float = 1e-4, *, sync: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-domain Sinkhorn on the kernel exp(cost): scalings (log_d0_T, log_d1_E) with
    plan = exp(cost + log_d0[:, None] + log_d1[None, :]) whose rows sum to ``row_mass``
    and columns to ``col_mass`` (the last update is the columns', so they hold exactly).

    Megatron-core's ``sinkhorn`` (S-BASE) iterates d0 = (1/T)/(K d1), d1 = (1/E)/(d0 K)
    on K = exp(cost) until mean|d1 - d1_old| <= tol, with no cap: this is the same
    iteration in the log domain (no overflow for large costs), with the same stopping
    rule on d1 and an iteration cap. Runs in float32 without gradient.

    ``sync=False`` reads nothing back on the host: it runs all ``max_iters`` iterations
    and freezes the scalings from the one where the stopping rule first holds, so it
    returns the early exit's scalings bit for bit, without its finite check (non-finite
    logits give non-finite scalings, as in the other routers).
    """
    with torch.no_grad():
        c = cost_TE.detach().float()
        T, E = c.shape
        log_r, log_c = math.log(row_mass), math.log(col_mass)
        log_d1 = torch.zeros(E, device=c.device)
        log_d0 = torch.zeros(T, device=c.device)
        done = torch.zeros((), dtype=torch.bool, device=c.device)
        for _ in range(max_iters):
            new_d0 = log_r - torch.logsumexp(c + log_d1, dim=1)
            new = log_c - torch.logsumexp(c + new_d0[:, None], dim=0)
            err = (new.exp() - log_d1.exp()).abs().mean()
            if not sync:  # the iterations after the stopping point change nothing
                log_d0 = torch.where(done, log_d0, new_d0)
                log_d1 = torch.where(done, log_d1, new)
                done = done | (err <= tol)
                continue
            log_d0, log_d1 = new_d0, new
            # One host read per iteration, as Megatron-core: the same stopping point, so
            # the same plan. (On a GPU this syncs once per iteration; Sinkhorn routers
            # cost a few ms more per layer than top-k.)
            if err <= tol:
                break
        if sync and not (torch.isfinite(log_d0).all() and torch.isfinite(log_d1).all()):
            raise FloatingPointError("Sinkhorn scalings are not finite: the router logits "
                                     "hold NaN/inf (lower optim.lr or raise moe.z_loss_coef)")
    return log_d0, log_d1


def sinkhorn_plan(cost_TE: torch.Tensor, max_iters: int = 100, tol: float = 1e-4
                  ) -> torch.Tensor:
    """Megatron-core's S-BASE normalisation: the plan with columns summing to 1/E and rows
    to 1/T (within ``tol``). No gradient."""
    T, E = cost_TE.shape
    log_d0, log_d1 = sinkhorn_log(cost_TE, 1.0 / T, 1.0 / E, max_iters, tol)
    return (cost_TE.detach().float() + log_d0[:, None] + log_d1[None, :]).exp()


# ----------------------------------------------------------------------------- bias
def bias_delta(counts_LE: torch.Tensor, rate: float,
               rule: BiasUpdate = BiasUpdate.sign) -> torch.Tensor:
    """float32 (L, E) step of the expert bias from the step's counts per layer.

    ``sign`` (Loss-Free Balancing, Wang et al. 2024, Alg. 1; Megatron-core):
    rate * sign(mean(c) - c): under-loaded experts go up, over-loaded ones down.
    ``sign_centered`` (torchtitan) subtracts the step's mean over experts, so the bias
    keeps mean 0. Counts [9, 1, 1, 1]: sign -> [-1, 1, 1, 1] * rate; centred ->
    [-1.5, .5, .5, .5] * rate. Scaling the counts (e.g. doubled by a recompute) changes
    nothing.
    """
    c = counts_LE.float()
    delta = rate * torch.sign(c.mean(dim=-1, keepdim=True) - c)
    if BiasUpdate(rule) == BiasUpdate.sign_centered:
        delta = delta - delta.mean(dim=-1, keepdim=True)
    return delta


# ----------------------------------------------------------------------------- keyed draws
_M32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2^32)."""
    h = h & _M32
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def keyed_uniform(keys: torch.Tensor, *salt: int | torch.Tensor) -> torch.Tensor:
    """float32 uniforms in (0, 1), one per entry of the int64 ``keys``, that depend only on
    (key, salt...): a counter-based draw. Routers key their noise by (seed, step, layer,
    global token position, expert), so every layout, rank count and resume draws the same
    numbers for the same token, which a stateful generator on each rank cannot do."""
    h = torch.zeros((), dtype=torch.int64, device=keys.device)
    for s in salt:  # python ints, or int64 0-dim tensors (no recompile when they change)
        s = s.to(h.device) if isinstance(s, torch.Tensor) else int(s)
        h = _fmix32(h ^ (s & _M32)) + 0x9E3779B9
    lo = _fmix32(keys.long() & _M32 ^ h)
    h = _fmix32(lo + ((keys.long() >> 32) & _M32) + 0x7F4A7C15)
    # (0, 1) in float32 too: the largest hashes would otherwise round up to 1.0.
    return ((h.double() + 0.5) / 4294967296.0).float().clamp(max=1.0 - 2.0 ** -24)


def keyed_uniform_host(key: int, *salt: int) -> float:
    """:func:`keyed_uniform` of one python-int key and salts, computed on the host in
    integer arithmetic: the same float32 value, as a Python float. A draw that picks a
    code path (selective Sinkhorn's step) is then made without a tensor to read back."""
    h = 0
    for s in salt:
        h = _fmix32(h ^ (int(s) & _M32)) + 0x9E3779B9
    lo = _fmix32((int(key) & _M32) ^ h)
    h = _fmix32(lo + ((int(key) >> 32) & _M32) + 0x7F4A7C15)
    u = struct.unpack("f", struct.pack("f", (h + 0.5) / 4294967296.0))[0]  # to float32
    return min(u, 1.0 - 2.0 ** -24)


def keyed_normal(keys: torch.Tensor, *salt: int | torch.Tensor) -> torch.Tensor:
    """Standard normals keyed like :func:`keyed_uniform` (Box-Muller on two draws)."""
    u1 = keyed_uniform(keys, *salt, 1)
    u2 = keyed_uniform(keys, *salt, 2)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


@functools.lru_cache(maxsize=16)
def compete_schedule(seed: int, total_steps: int, layers: tuple[int, ...], rate: float,
                     warmup: float, max_layers: int) -> frozenset[tuple[int, int]]:
    """CompeteSMoE's competition steps: the (step, layer) pairs whose layer competes.

    The logic of Fsoft-AIC/CompeteSMoE ``set_total_steps`` (moe_pretrain_model/layers/
    moe/competesmoe.py), with its draws keyed by (seed, step, layer) instead of rank 0's
    generator: no step before ``int(warmup * total_steps)`` competes. For each MoE layer
    in order, each later step flags with probability ``rate``; a flag on a step where
    ``max_layers`` earlier layers already compete moves to the nearest step, searching
    left first (down to the first step after the warm-up) then right, that has room and
    no flag of this layer yet; with no such step it is dropped. As in the reference, the
    direct placement does not check for a flag this layer already moved there (the two
    then count as one). Pure in its arguments, so every rank and every resume agrees.
    """
    start = int(warmup * total_steps)
    n = total_steps - start
    if n <= 0 or rate <= 0:
        return frozenset()
    used = [0] * n  # competing layers per step, over the layers placed so far
    pairs = []
    steps = torch.arange(start, total_steps, dtype=torch.int64)
    for layer in layers:
        draws = (keyed_uniform(steps, seed, layer, 0xC0E) < rate).nonzero().flatten().tolist()
        flag = [False] * n
        freq = list(used)
        for i in draws:
            if freq[i] < max_layers:
                flag[i] = True
                freq[i] += 1
                continue
            for j in itertools.chain(range(i - 1, -1, -1), range(i + 1, n)):
                if freq[j] < max_layers and not flag[j]:
                    flag[j] = True
                    freq[j] += 1
                    break
        for i in (i for i, f in enumerate(flag) if f):
            used[i] += 1
            pairs.append((start + i, layer))
    return frozenset(pairs)
