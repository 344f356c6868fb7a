"""Forward + backward time of HMoE's ragged experts: one grouped GEMM per size class
(``RaggedExperts``) against the zero-padded reference (every expert at F_max).

Each variant runs dispatch (sorted by slot) -> experts -> combine on the same routing
(uniform random top-k over E experts) and the same weights (the padded copy holds the
ragged weights and zeros), so the outputs agree; the time is the mean of ``--iters``
timed iterations after ``--warmup``. The expert FLOPs each variant computes are printed
beside it (6 * 3 D * sum over rows of F: the padded path computes F_max for every row).

Example (CPU, one thread):

    python tools/bench_ragged_experts.py --sizes 64,64,128,128,256,256,512,512 --threads 1
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from moetrain.config.schema import ExpertBackend
from moetrain.models.moe.dispatcher import LocalDispatcher
from moetrain.models.moe.experts import RaggedExperts


def geometric_sizes(lo: int, hi: int, n: int, multiple: int = 16) -> list[int]:
    """n sizes from lo to hi in geometric progression, rounded to ``multiple``."""
    return [round(lo * (hi / lo) ** (i / (n - 1)) / multiple) * multiple for i in range(n)]


def _variant(sizes, dim, backend, padded, ref: RaggedExperts | None):
    ex = RaggedExperts(sizes, dim, backend, padded=padded)
    ex.init_weights(0.02, 0.02)
    if ref is not None:  # the padded stack holds the ragged weights and zeros
        with torch.no_grad():
            for c, ids in enumerate(ref.class_members):
                g = ref.classes[c]
                f = ref.class_hidden[c]
                for s, e in enumerate(ids):
                    ex.padded.w1_EFD[e, :f] = g.w1_EFD[s]
                    ex.padded.w3_EFD[e, :f] = g.w3_EFD[s]
                    ex.padded.w2_EDF[e, :, :f] = g.w2_EDF[s]
    return ex


def bench(sizes: list[int], dim: int, tokens: int, top_k: int, backend: ExpertBackend,
          warmup: int, iters: int, seed: int = 0) -> dict[str, tuple[float, float]]:
    """{variant: (ms per forward+backward, expert GFLOP per iteration)}."""
    torch.manual_seed(seed)
    E = len(sizes)
    x = torch.randn(tokens, dim, requires_grad=True)
    w, ids = torch.softmax(torch.randn(tokens, E), -1).topk(top_k)
    ragged = _variant(sizes, dim, backend, False, None)
    padded = _variant(sizes, dim, backend, True, ragged)
    rows_E = torch.bincount(ids.flatten(), minlength=E).double()
    out, ys = {}, {}
    for name, ex in (("grouped per size class", ragged), ("zero-padded to F_max", padded)):
        d = LocalDispatcher(E, expert_order=ex.expert_order)

        def step(d=d, ex=ex):
            x_RD, meta = d.dispatch(x, ids, w)
            y = d.combine(ex(x_RD, meta.tokens_per_expert), meta)
            y.square().mean().backward()
            return y

        for _ in range(warmup):
            ys[name] = step().detach()
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        ms = (time.perf_counter() - t0) / iters * 1e3
        F_E = torch.tensor(sizes if ex.padded is None else [max(sizes)] * E, dtype=torch.float64)
        out[name] = (ms, float(6 * 3 * dim * (rows_E * F_E).sum()) / 1e9)
    diff = (ys["grouped per size class"] - ys["zero-padded to F_max"]).abs().max().item()
    out["max |y diff|"] = (diff, 0.0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="geometric",
                   help="comma-separated expert hidden sizes, or 'geometric' (64..512, 8 experts)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--backend", default="loop", choices=[b.value for b in ExpertBackend])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    sizes = (geometric_sizes(64, 512, 8) if a.sizes == "geometric"
             else [int(s) for s in a.sizes.split(",")])
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; sizes={sizes}, D={a.dim}, T={a.tokens}, "
          f"K={a.top_k}, backend={a.backend}")
    res = bench(sizes, a.dim, a.tokens, a.top_k, ExpertBackend(a.backend), a.warmup, a.iters)
    for name, (ms, gflop) in res.items():
        if name.startswith("max"):
            print(f"  {name}: {ms:.2e}")
        else:
            print(f"  {name:<24} {ms:9.1f} ms  ({gflop:.2f} expert GFLOP)")
    g, z = res["grouped per size class"][0], res["zero-padded to F_max"][0]
    print(f"  padded / grouped: {z / g:.2f}x")


if __name__ == "__main__":
    main()
