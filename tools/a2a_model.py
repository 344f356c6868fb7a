"""Flat vs hierarchical (2DH) expert-parallel all-to-all, by a latency-bandwidth model.

    python tools/a2a_model.py                          # 128 nodes x 8 GPUs, D=4096, top-2
    python tools/a2a_model.py --nodes 16 --inter-latency-us 5 --tokens 4096,16384
    python tools/a2a_model.py --measure --world 4 --gpus-per-node 2 --dim 1024  # gloo, CPU
    torchrun --nnodes 16 --nproc-per-node 8 ... tools/a2a_model.py --measure     # a cluster

Prints the time of one all-to-all (the dispatch; the combine is its mirror) for each
number of tokens per rank, with the flat exchange and with Tutel's 2DH exchange
(``parallel.a2a=hierarchical``), and the message size below which 2DH wins. The EP group
is every GPU of the layout. The model and its planning figures are
``moetrain.parallel.memory.a2a_times`` and ``A2ALinks``; they rank the two, they do not
predict a measured time.

``--measure`` times both exchanges instead: under torchrun on the launched ranks (nodes
of ``LOCAL_WORLD_SIZE`` ranks, NCCL on GPUs), otherwise on ``--world`` local gloo
processes in nodes of ``--gpus-per-node``. Each rank sends ``top_k`` rows per token,
spread evenly over the ranks, with variable splits (dropless: the 2DH exchange includes
its count exchange). The figure is the median over ``--iters`` of the slowest rank.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import moetrain  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moetrain.parallel.memory import A2ALinks, a2a_table


def _measure_rank(rank: int, world: int, tokens: tuple[int, ...], dim: int, top_k: int,
                  local: int | None, iters: int) -> list[tuple[int, float, float]]:
    """(tokens, flat s, 2DH s) per token count, on an initialised default group."""
    import statistics
    import time

    import torch
    import torch.distributed as dist

    from moetrain.models.moe.dispatcher import _all_to_all
    from moetrain.parallel.hierarchical import hierarchical_exchange

    group = dist.group.WORLD
    hier = hierarchical_exchange(group, local)
    if hier is None:
        raise SystemExit("a2a_model: one node (or one rank per node): 2DH is the flat "
                         "exchange; set --gpus-per-node below --world")
    cuda = torch.cuda.is_available() and "nccl" in dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    for t in tokens:
        R = t * top_k
        splits = [R // world + (q < R % world) for q in range(world)]
        x = torch.randn(R, dim, device=device, dtype=dtype)
        times = {}
        for name, fn in (("flat", _all_to_all), ("hier", hier)):
            runs = []
            for i in range(iters + 2):  # 2 warm-ups
                dist.barrier()
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn(x, splits, splits, group)
                if cuda:
                    torch.cuda.synchronize()
                slowest = torch.tensor([time.perf_counter() - start], device=device)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                if i >= 2:
                    runs.append(float(slowest))
            times[name] = statistics.median(runs)
        rows.append((t, times["flat"], times["hier"]))
    return rows


def _measure(args, tokens: tuple[int, ...]) -> int:
    import os

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        from moetrain.parallel.mesh import destroy_distributed, init_distributed

        rank, world, _ = init_distributed()
        try:
            rows = _measure_rank(rank, world, tokens, args.dim, args.top_k, None, args.iters)
        finally:
            destroy_distributed()
        where = f"{world} ranks (torchrun, nodes of ${{LOCAL_WORLD_SIZE}})"
    else:
        from moetrain.testing import run_distributed

        rank, world = 0, args.world
        rows = run_distributed(_measure_rank, world, tokens, args.dim, args.top_k,
                               args.gpus_per_node, args.iters, timeout_s=600)[0]
        where = f"{world} local gloo processes in nodes of {args.gpus_per_node}"
    if rank == 0:
        print(f"measured on {where}: D={args.dim}, top-{args.top_k}, median of {args.iters}")
        print(f"{'tokens/rank':>11}  {'flat ms':>8}  {'2DH ms':>8}  {'2DH / flat':>10}")
        for t, flat, hier in rows:
            print(f"{t:>11}  {flat * 1e3:>8.2f}  {hier * 1e3:>8.2f}  {hier / flat:>10.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    links = A2ALinks()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=128)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--dim", type=int, default=4096, help="model dim D (values per row)")
    ap.add_argument("--top-k", type=int, default=2, help="rows sent per token")
    ap.add_argument("--bytes-per-value", type=int, default=2, help="2 for bf16")
    ap.add_argument("--tokens", default="1024,2048,4096,8192,16384,32768,65536",
                    help="tokens per rank, comma-separated")
    for name, value, what in (("intra-gbs", links.intra_gbs, "NVLink GB/s per GPU"),
                              ("inter-gbs", links.inter_gbs, "network GB/s per GPU"),
                              ("intra-latency-us", links.intra_latency_us,
                               "per message inside a node"),
                              ("inter-latency-us", links.inter_latency_us,
                               "per message across nodes"),
                              ("copy-gbs", links.copy_gbs, "device-memory GB/s of a regroup")):
        ap.add_argument(f"--{name}", type=float, default=value, help=f"{what} (default {value:g})")
    ap.add_argument("--measure", action="store_true",
                    help="time the flat and the 2DH exchange instead of modelling them")
    ap.add_argument("--world", type=int, default=4,
                    help="--measure outside torchrun: local gloo processes")
    ap.add_argument("--iters", type=int, default=10, help="--measure: timed exchanges")
    args = ap.parse_args(argv)
    try:
        tokens = tuple(int(t) for t in args.tokens.split(",") if t.strip())
    except ValueError:
        print(f"a2a_model: --tokens={args.tokens!r} is not a comma-separated list of integers",
              file=sys.stderr)
        return 2
    if args.nodes < 1 or args.gpus_per_node < 1 or not tokens:
        print("a2a_model: --nodes and --gpus-per-node must be >= 1, --tokens non-empty",
              file=sys.stderr)
        return 2
    if args.measure:
        return _measure(args, tokens)
    links = A2ALinks(args.intra_gbs, args.inter_gbs, args.intra_latency_us,
                     args.inter_latency_us, args.copy_gbs)
    print(a2a_table(args.nodes, args.gpus_per_node, args.dim, args.top_k, args.bytes_per_value,
                    tokens, links))
    return 0


if __name__ == "__main__":
    sys.exit(main())
