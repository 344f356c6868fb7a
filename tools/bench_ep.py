"""Tutel's modes for sharded experts, side by side: run one MoE layer with fewer experts
than ranks under every mode r (and the cost model's choice), with balanced and with
deliberately skewed routing, and report per step the time, the bytes moved by weight
all-gathers and by all-to-alls, and the mode used.

    torchrun --nproc_per_node=4 tools/bench_ep.py [--steps 50] [--experts 2] [--dim 256]
        [--expert-hidden 512] [--tokens 512] [--skew 4.0] [--json out.json]

With 4 ranks and 2 experts each expert is split over 2 ranks (sharded count 2): modes
r = 0 (gathered), 1 (expert-parallel), 2 (expert-tensor-parallel), and ``adaptive``.
The router is top-1 (Switch), so the load follows the router: skewed routing adds
``--skew`` to expert 0's selection score (the router's expert bias), so most rows go to one expert and its
ranks receive most of the all-to-all traffic. Bytes are the forward's (all-gathers,
dispatch + combine); the backward moves as much again. CPU (gloo) times
say little about GPUs: the bytes and the choices are the point here; run the same
command on GPUs for the times.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

from moetrain.config.schema import ExpertMode, ModelConfig, MoEConfig
from moetrain.models.moe.layer import MoELayer
from moetrain.parallel.adaptive import (
    apply_sharded_ep,
    expert_modes,
    sharded_expert_mesh,
    valid_rs,
    weight_gather_bytes,
)
from moetrain.parallel.expert import ep_bytes_sent
from moetrain.parallel.mesh import destroy_distributed, init_distributed


def _layer(args, world: int, mode: ExpertMode, r: int | None, skew: float,
           device: torch.device) -> MoELayer:
    torch.manual_seed(0)
    model_cfg = ModelConfig(dim=args.dim, n_layers=1, n_heads=2, num_experts=args.experts,
                            top_k=1, expert_hidden=args.expert_hidden,
                            ffn_hidden=args.expert_hidden)
    layer = MoELayer(args.dim, model_cfg, MoEConfig()).to(device)
    layer.init_weights(0.02, 0.02)
    layer.set_layer_idx(0)
    with torch.no_grad():  # the selection bias (DeepSeek-V3's buffer): skews the choice only
        layer.router.expert_bias[0] = skew
    mesh, views = sharded_expert_mesh(torch.arange(world).view(1, 1, world), args.experts,
                                      device.type)
    ep = torch.distributed.device_mesh.DeviceMesh(device.type, torch.arange(world),
                                                  mesh_dim_names=("ep",))
    apply_sharded_ep([layer], ep, mesh, views, MoEConfig(), r, mode)
    return layer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(args, world: int, rank: int, name: str, mode: ExpertMode, r: int | None,
         skew: float, device: torch.device) -> dict:
    layer = _layer(args, world, mode, r, skew, device)
    g = torch.Generator().manual_seed(100 + rank)
    rows = []
    for step in range(args.steps):
        x = torch.randn(args.tokens, args.dim, generator=g).to(device).requires_grad_(True)
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        layer(x).square().mean().backward()
        _sync(device)
        dt = torch.tensor([time.perf_counter() - t0, float(ep_bytes_sent([layer])),
                           float(weight_gather_bytes([layer]))], dtype=torch.float64,
                          device=device)
        dist.all_reduce(dt[1:])  # bytes of every rank
        dist.all_reduce(dt[:1], op=dist.ReduceOp.MAX)  # the slowest rank's time
        picked = expert_modes([layer]).get(0)
        rows.append({"step": step, "time_s": dt[0].item(), "a2a_bytes": dt[1].item(),
                     "gather_bytes": dt[2].item(), "r": picked})
    warm = rows[2:] or rows  # the first steps build process-group buffers
    picks = {}
    for row in rows:
        picks[row["r"]] = picks.get(row["r"], 0) + 1
    return {"case": name, "skew": skew,
            "time_ms": 1e3 * sum(r["time_s"] for r in warm) / len(warm),
            "a2a_MB": sum(r["a2a_bytes"] for r in rows) / len(rows) / 1e6,
            "gather_MB": sum(r["gather_bytes"] for r in rows) / len(rows) / 1e6,
            "modes": {str(int(k) if k == int(k) else k): v for k, v in sorted(picks.items())},
            "steps": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--expert-hidden", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per rank per step")
    ap.add_argument("--skew", type=float, default=4.0, help="expert 0's logit bias")
    ap.add_argument("--json", help="write every step's numbers here")
    args = ap.parse_args()
    rank, world, device = init_distributed()  # nccl on CUDA, gloo on CPU
    if world <= args.experts or world % args.experts:
        raise SystemExit(f"--experts={args.experts} must divide the {world} ranks and be "
                         f"fewer: each expert is split over world/experts ranks")
    s = world // args.experts
    cases = [(f"r={r}", ExpertMode.fixed, r) for r in valid_rs(s)]
    cases.append(("adaptive", ExpertMode.adaptive, None))
    results = []
    for skew in (0.0, args.skew):
        for name, mode, r in cases:
            results.append(_run(args, world, rank, name, mode, r, skew, device))
    if rank == 0:
        where = f"{dist.get_backend()}, {device.type}"
        print(f"# {world} ranks ({where}), {args.experts} experts (sharded count {s}), "
              f"D={args.dim}, F={args.expert_hidden}, {args.tokens} tokens/rank, top-1, "
              f"{args.steps} steps")
        print("| routing | mode | ms/step (fwd+bwd) | all-to-all MB/step | weight all-gather "
              "MB/step | modes used (r: steps) |")
        print("|---|---|---|---|---|---|")
        for res in results:
            routing = "balanced" if not res["skew"] else f"skewed (+{res['skew']:g})"
            modes = ", ".join(f"{k}: {v}" for k, v in res["modes"].items())
            print(f"| {routing} | {res['case']} | {res['time_ms']:.1f} | {res['a2a_MB']:.3f} "
                  f"| {res['gather_MB']:.3f} | {modes} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    destroy_distributed()


if __name__ == "__main__":
    main()
