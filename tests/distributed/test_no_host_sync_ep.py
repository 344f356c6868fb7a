"""Expert parallelism in capacity mode reads nothing on the host: 2 gloo ranks.

Capacity mode sends every expert a fixed block of C rows, so the all-to-all dispatcher
and the chunked one (``moe.a2a_overlap_chunks``) know every split on the host: the
forward and the backward of the expert-parallel MoE layer must make no host read
(:class:`tests._host_reads.HostReads`, as the single-process check in
tests/unit/models/test_no_host_sync.py). The layer must also give the single-process
layer's numbers: each rank's output, input gradient and router gradient are the local
layer's on that rank's tokens, and each rank's expert gradients are its experts' rows of
the local layers' gradients summed over the ranks' tokens.

One spawn of 2 ranks runs every case.
"""

from __future__ import annotations

import torch

from moetrain.config.schema import DropPolicy, ExpertBackend, KernelBackend, RouterType
from moetrain.testing import run_distributed

D, F, E, K, T = 16, 32, 4, 2, 16  # T tokens per rank: C = ceil(0.75 * 16 * 2 / 4) = 6
WORLD = 2

# (chunks, drop policy, router, expert backend, kernels); chunks = 1 is the plain
# all-to-all dispatcher. 3 chunks split C = 6 rows into 2 + 2 + 2; threshold routing
# leaves some slots inactive.
CASES = [
    (1, DropPolicy.probs, RouterType.topk, ExpertBackend.loop, KernelBackend.torch),
    (1, DropPolicy.slot, RouterType.threshold, ExpertBackend.loop, KernelBackend.torch),
    (1, DropPolicy.probs, RouterType.topk, ExpertBackend.grouped_mm, KernelBackend.torch),
    (1, DropPolicy.position, RouterType.topk, ExpertBackend.loop, KernelBackend.triton),
    (2, DropPolicy.probs, RouterType.topk, ExpertBackend.loop, KernelBackend.torch),
    (2, DropPolicy.position, RouterType.topk, ExpertBackend.grouped_mm, KernelBackend.torch),
    (2, DropPolicy.probs, RouterType.topk, ExpertBackend.loop, KernelBackend.triton),
    (3, DropPolicy.slot, RouterType.threshold, ExpertBackend.loop, KernelBackend.torch),
]


def _layer(chunks, policy, router, backend, kernel):
    """A capacity-mode layer (factor 0.75: it drops rows), the same weights on every rank."""
    from moetrain.config.schema import (
        DispatchMode,
        ModelConfig,
        MoEConfig,
        RouterConfig,
        ScoreFunc,
    )
    from moetrain.models.moe.layer import MoELayer

    torch.manual_seed(0)
    mcfg = ModelConfig(dim=D, n_heads=2, num_experts=E, top_k=K, expert_hidden=F)
    rcfg = RouterConfig(name=router, score_func=ScoreFunc.softmax, threshold=0.6)
    moe_cfg = MoEConfig(router=rcfg, dispatch=DispatchMode.capacity, capacity_factor=0.75,
                        expert_backend=backend, kernel_backend=kernel, drop_policy=policy,
                        aux_loss_coef=0.01, z_loss_coef=0.001, a2a_overlap_chunks=chunks)
    layer = MoELayer(D, mcfg, moe_cfg)
    layer.init_weights(0.5, 0.5)
    return layer, moe_cfg


def _x(rank: int) -> torch.Tensor:
    return torch.randn(2, T // 2, D, generator=torch.Generator().manual_seed(10 + rank))


def _run(layer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output, input gradient and (local shards of the) parameter gradients."""
    x = x.clone().requires_grad_()
    out = layer(x)
    g = torch.cos(torch.arange(out.numel(), dtype=out.dtype))
    out.backward(g.view(out.shape))
    grads = {"out": out.detach(), "x": x.grad}
    for name, p in layer.named_parameters():
        grads[name] = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
    return grads


def _ep_rank(rank: int, world: int, cases):
    """Each case: the expert-parallel layer under HostReads, then the local reference."""
    import os

    from torch.distributed.device_mesh import init_device_mesh

    from moetrain.parallel.expert import AllToAllDispatcher, ChunkedAllToAllDispatcher, apply_ep
    from tests._host_reads import HostReads

    os.environ["TRITON_INTERPRET"] = "1"  # the Triton kernels on the CPU
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    e = E // world
    out = []
    for case in cases:
        layer, moe_cfg = _layer(*case)
        apply_ep([layer], mesh, moe_cfg)
        assert type(layer.dispatcher) is (ChunkedAllToAllDispatcher if case[0] > 1
                                           else AllToAllDispatcher)
        with HostReads() as h:
            got = _run(layer, _x(rank))
        refs = [_run(_layer(*case)[0], _x(j)) for j in range(world)]
        want = {}
        for name, g in refs[rank].items():
            if name.startswith("experts."):  # this rank's experts, every rank's tokens
                g = sum(r[name] for r in refs)[rank * e:(rank + 1) * e]
            want[name] = g
        out.append({"reads": h.reads, "got": got, "want": want,
                    "num_dropped": int(layer.last_stats.num_dropped)})
    return out


def test_expert_parallel_capacity_layer_reads_nothing_and_matches_single_process():
    got = run_distributed(_ep_rank, WORLD, CASES, timeout_s=180)
    for i, case in enumerate(CASES):
        for rank in range(WORLD):
            r = got[rank][i]
            assert r["reads"] == [], (case, rank)
            assert r["num_dropped"] > 0, (case, rank)  # the capacity really drops rows
            assert r["got"].keys() == r["want"].keys(), (case, rank)
            for name, want in r["want"].items():
                where = f"{case} rank {rank} {name}"
                torch.testing.assert_close(r["got"][name], want, rtol=1e-5, atol=1e-5,
                                           msg=lambda m, where=where: f"{where}: {m}")
