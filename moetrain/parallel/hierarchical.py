"""Two-dimensional hierarchical (2DH) all-to-all for expert parallelism across nodes
(``parallel.a2a=hierarchical``; Tutel, Hwang et al., 2023, arXiv 2206.03382, section 3.3).

A flat all-to-all over W = N x G ranks (N nodes of G ranks) sends W - 1 messages per rank,
(N - 1) * G of them across the network, each 1/W of the rank's rows: at large W they
are small and latency-bound. The 2DH exchange reaches the same result in two hops:

0. regroup the rows by destination local index g' (then by destination node);
1. all-to-all inside the node: block g' goes to local rank g' (G - 1 messages);
2. regroup the received rows by destination node n' (then by source local rank);
3. all-to-all among the N ranks of the same local index: block n' goes to node n'
   (N - 1 messages, each G times larger than a flat one).

Every rank ends with the rows of every source rank, in source-rank order, each source's
rows in their sent order: exactly what the flat all-to-all delivers (the test holds it
bitwise). The network bytes are the same; what changes is the number of messages (and the
rows cross NVLink once more, plus two local copies): ``moetrain.parallel.memory``'s
:func:`~moetrain.parallel.memory.a2a_times` models when that wins.

Rank layout (an assumption, checked when the exchange is built): a node is a block of G
consecutive ranks (torchrun numbers the ranks of one node consecutively), and an EP group
is a block of W consecutive ranks (``moetrain/parallel/mesh.py``: ``ep_i = dpt % ep``).
So in EP rank q = n * G + g, n is the node and g the local index, and a group spans
whole nodes (G divides W) or sits inside one (W divides G: no network hop, so the flat
all-to-all runs). Both hops' process groups are made once, by every rank, when the
exchange is built (:func:`hierarchical_exchange`, called from ``apply_ep``).

Variable splits (dropless) need the sizes of the intermediate blocks: what the other
ranks of my node send towards my local index. One extra all-to-all of N counts per node
peer (W int64 in all, inside the node) and one host read give them. Equal splits
(capacity mode) need no counts: both regroups are transposes, nothing is read back.

Legend: W ranks of the EP group, N nodes, G ranks per node, R rows, D row size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

from moetrain.config.schema import ConfigError

log = logging.getLogger(__name__)

LOCAL_SIZE_ENV = "LOCAL_WORLD_SIZE"  # set by torchrun: worker processes on this node


def node_shape(ep: int, local_size: int, where: str | None = None) -> tuple[int, int]:
    """(N, G): nodes and ranks per node of an EP group of ``ep`` consecutive ranks on
    nodes of ``local_size`` ranks. A group inside one node is (1, ep). ``where`` names the
    setting the local size came from (for the error)."""
    if ep % local_size == 0:
        return ep // local_size, local_size
    if local_size % ep == 0:
        return 1, ep
    where = where or f"parallel.a2a_local_size={local_size}"
    raise ConfigError(
        f"{where} with parallel.ep={ep}: an EP group of {ep} consecutive ranks must span "
        f"whole nodes of {local_size} ranks or sit inside one: "
        f"use a parallel.ep that is a multiple or a divisor of {local_size}, or "
        f"parallel.a2a=flat")


def _where(local_size: int | None) -> str:
    if local_size is not None:
        return f"parallel.a2a_local_size={local_size}"
    return f"parallel.a2a_local_size=null (${LOCAL_SIZE_ENV}={os.environ.get(LOCAL_SIZE_ENV) or 'unset'})"


def _local_size_value(local_size: int | None, world_size: int) -> int:
    if local_size is not None:
        return local_size
    env = os.environ.get(LOCAL_SIZE_ENV, "").strip()
    if env and not env.isdigit():
        raise ConfigError(f"{_where(None)} is not a number of ranks: set "
                          f"parallel.a2a_local_size to the ranks per node")
    return int(env) if env else world_size


def resolve_local_size(local_size: int | None, world_size: int) -> int:
    """Ranks per node: ``parallel.a2a_local_size``, else torchrun's ``LOCAL_WORLD_SIZE``,
    else the whole world (one node)."""
    where = _where(local_size)
    local_size = _local_size_value(local_size, world_size)
    if local_size < 1 or world_size % local_size:
        raise ConfigError(
            f"{where} gives {local_size} ranks per node, which does not divide the world "
            f"size {world_size}: set parallel.a2a_local_size to the ranks per node, or "
            f"parallel.a2a=flat")
    return local_size


def hop_groups(world_size: int, ep: int, local_size: int) -> tuple[list[list[int]],
                                                                     list[list[int]]]:
    """Member ranks of every intra-node and every inter-node group of the world, for EP
    groups of ``ep`` consecutive ranks split into (N, G) = :func:`node_shape` blocks.

    Intra: blocks of G consecutive ranks. Inter: in each EP group, the N ranks with the
    same local index, ordered by node."""
    N, G = node_shape(ep, local_size)
    intra = [list(range(b, b + G)) for b in range(0, world_size, G)]
    inter = [[base + n * G + g for n in range(N)]
             for base in range(0, world_size, ep) for g in range(G)]
    return intra, inter


def block_transpose_index(sizes: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """int64 (R,): the row gather that turns blocks laid out [a][b] (block (a, b) holds
    ``sizes[a][b]`` rows, row-major) into the layout [b][a], each block's rows in order."""
    A, B = len(sizes), len(sizes[0])
    flat = torch.tensor([s for row in sizes for s in row], dtype=torch.int64, device=device)
    start_AB = (torch.cumsum(flat, 0) - flat).view(A, B)
    size_BA, start_BA = flat.view(A, B).t().reshape(-1), start_AB.t().reshape(-1)
    out_start = torch.cumsum(size_BA, 0) - size_BA
    total = sum(s for row in sizes for s in row)
    shift = torch.repeat_interleave(start_BA - out_start, size_BA, output_size=total)
    return torch.arange(total, device=device) + shift


def _transpose_blocks(x: torch.Tensor, sizes: list[list[int]]) -> torch.Tensor:
    if len(sizes) == 1 or len(sizes[0]) == 1:  # one row or column of blocks: already there
        return x
    return x.index_select(0, block_transpose_index(sizes, x.device))


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
    y = funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)
    return funcol.wait_tensor(y)


class HierarchicalAllToAll:
    """The 2DH all-to-all of one EP group, with the contract of the dispatcher's flat
    exchange: ``exchange(x, out_splits, in_splits, group)`` sends ``in_splits[q]`` rows of
    ``x`` (in order) to EP rank q and returns the ``out_splits[q]`` rows of every rank q,
    in rank order. Autograd-aware: the backward is the reverse exchange (each hop's
    all-to-all reversed, each regroup undone).

    ``uniform``: every split of every call is the same number of rows on every rank
    (capacity mode): the regroups are transposes and no counts are exchanged. A call with
    unequal splits then raises.

    Build it with :func:`hierarchical_exchange` (collective: it creates the hop groups).
    """

    def __init__(self, group: dist.ProcessGroup, nodes: int, local: int,
                 intra: dist.ProcessGroup, inter: dist.ProcessGroup, uniform: bool = False):
        self.group, self.nodes, self.local = group, nodes, local
        self.intra, self.inter, self.uniform = intra, inter, uniform

    def __repr__(self) -> str:
        return (f"HierarchicalAllToAll(nodes={self.nodes}, local={self.local}, "
                f"uniform={self.uniform})")

    def __call__(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                 group: dist.ProcessGroup) -> torch.Tensor:
        if group is not self.group:
            raise ValueError("this hierarchical all-to-all was built for another process "
                             "group than the one it is called with")
        return self.phases(x, out_splits, in_splits)[-1]

    def phases(self, x: torch.Tensor, out_splits: list[int],
               in_splits: list[int]) -> list[torch.Tensor]:
        """The buffers after phases 0-3 (see the module docstring); the last is the
        result. Collective over the EP group."""
        W = self.nodes * self.local
        if len(in_splits) != W or len(out_splits) != W:
            raise ValueError(f"splits of {len(in_splits)} and {len(out_splits)} ranks for "
                             f"an EP group of {W}")
        if self.uniform:
            return self._uniform(x, out_splits, in_splits)
        return self._variable(x, out_splits, in_splits)

    def _uniform(self, x, out_splits, in_splits):
        c = in_splits[0]
        if any(s != c for s in in_splits) or any(s != c for s in out_splits):
            raise ValueError(f"a uniform hierarchical all-to-all got unequal splits "
                             f"(in {in_splits}, out {out_splits})")
        N, G, rest = self.nodes, self.local, x.shape[1:]
        # [node n'][local g'][c] -> [local g'][node n'][c]: block g' for local rank g'.
        x0 = x.reshape(N, G, c, *rest).transpose(0, 1).reshape(N * G * c, *rest)
        y1 = _all_to_all(x0, [N * c] * G, [N * c] * G, self.intra)
        # [source local h][node n'][c] -> [node n'][source local h][c]: block n' for node n'.
        y2 = y1.view(G, N, c, *rest).transpose(0, 1).reshape(N * G * c, *rest)
        y3 = _all_to_all(y2, [G * c] * N, [G * c] * N, self.inter)  # [node][local][c]
        return [x0, y1, y2, y3]

    def _variable(self, x, out_splits, in_splits):
        N, G = self.nodes, self.local
        by_dest = [list(in_splits[n * G:(n + 1) * G]) for n in range(N)]  # [n'][g']
        # mates[h][n']: rows that local rank h of my node sends to rank n' * G + (my local
        # index). Each rank sends, to local rank g', its N counts for destinations n'*G+g'.
        counts = torch.tensor(by_dest, dtype=torch.int64, device=x.device).t().contiguous()
        got = torch.empty_like(counts)
        dist.all_to_all_single(got, counts, group=self.intra)
        mates = got.view(G, N).tolist()  # the one host read of the hierarchical exchange
        x0 = _transpose_blocks(x, by_dest)  # [g'][n']
        y1 = _all_to_all(x0, [sum(r) for r in mates],
                         [sum(by_dest[n][g] for n in range(N)) for g in range(G)], self.intra)
        y2 = _transpose_blocks(y1, mates)  # [h][n'] -> [n'][h]
        y3 = _all_to_all(y2, [sum(out_splits[n * G:(n + 1) * G]) for n in range(N)],
                         [sum(mates[h][n] for h in range(G)) for n in range(N)], self.inter)
        return [x0, y1, y2, y3]


def hierarchical_exchange(group: dist.ProcessGroup, local_size: int | None, *,
                          uniform: bool = False) -> HierarchicalAllToAll | None:
    """The 2DH exchange of EP group ``group`` (this rank's), or None where it would be the
    flat all-to-all (one node, or one rank per node).

    Collective over the whole world: every rank calls it, with the same ``local_size``
    (``parallel.a2a_local_size``, resolved by :func:`resolve_local_size`), and every rank
    creates every hop group in the same order. One all-reduce first checks that every rank
    agrees on the node size and that every EP group is a block of consecutive ranks (the
    layout of ``moetrain/parallel/mesh.py``), so a mismatch fails on every rank instead of
    hanging in the group creation."""
    world = dist.get_world_size()
    G = _local_size_value(local_size, world)  # checked once every rank is known to agree
    ranks = dist.get_process_group_ranks(group)
    ep, me = len(ranks), dist.get_rank()
    base = me - me % ep
    consecutive = world % ep == 0 and ranks == list(range(base, base + ep))
    # MAX of (G, -G, not consecutive): equal G everywhere iff max(G) == -max(-G).
    backend = dist.get_backend()
    device = (torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend
              else torch.device("cpu"))
    check = torch.tensor([G, -G, int(not consecutive)], dtype=torch.int64, device=device)
    dist.all_reduce(check, op=dist.ReduceOp.MAX)
    hi, neg_lo, bad = check.tolist()
    if hi != -neg_lo:
        raise ConfigError(
            f"parallel.a2a=hierarchical: the ranks disagree on the ranks per node (from "
            f"{-neg_lo} to {hi}; parallel.a2a_local_size={local_size}): set "
            f"parallel.a2a_local_size, or launch the same number of ranks on every node")
    if bad:
        raise ConfigError(
            "parallel.a2a=hierarchical needs every EP group to be a block of consecutive "
            "ranks (moetrain/parallel/mesh.py's layout); some rank's group is not "
            f"(this rank's: {ranks[:8]}{'...' if ep > 8 else ''}): use parallel.a2a=flat")
    N, G = node_shape(ep, resolve_local_size(local_size, world), _where(local_size))
    if N == 1 or G == 1:
        log.info("parallel.a2a=hierarchical: the EP group of %d ranks is %d node(s) of %d "
                 "rank(s); the flat all-to-all runs", ep, N, G)
        return None
    intra_lists, inter_lists = hop_groups(world, ep, G)
    intra, _ = dist.new_subgroups_by_enumeration(intra_lists, group_desc="ep_intra_node")
    inter, _ = dist.new_subgroups_by_enumeration(inter_lists, group_desc="ep_inter_node")
    return HierarchicalAllToAll(group, N, G, intra, inter, uniform=uniform)
