"""Capacity mode runs the MoE layer without a device-to-host read.

A host read (``.item()``, ``int(t)``, ``if t:``, ``.tolist()``, a boolean-mask index,
``nonzero``) makes the host wait for the device in every layer of every micro-batch. In
capacity mode every expert owns exactly C rows, so no shape depends on the routing. Two
checks hold the layer to that:
- :class:`HostReads` records every operator whose result the host must read (eager,
  torch and Triton paths, forward and backward);
- ``torch.compile(fullgraph=True)`` must trace the whole layer into one graph whose every
  shape is static, and give the eager layer's outputs and gradients. (A graph break fails
  ``fullgraph``; recent torch traces ``.item()``, ``.tolist()`` and boolean masks into
  the graph as unbacked, data-dependent sizes, which still read the device at run time,
  so the backend also rejects any unbacked size.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from moetrain.config.schema import (
    DispatchMode,
    DropPolicy,
    ExpertBackend,
    KernelBackend,
    ModelConfig,
    MoEConfig,
    RouterConfig,
    RouterType,
    ScoreFunc,
)
from moetrain.models.moe.dispatcher import LocalDispatcher
from moetrain.models.moe.layer import MoELayer
from tests._host_reads import HostReads
from tests.conftest import compose, needs

D, F, E, K, T = 16, 32, 4, 2, 32
needs_triton = needs("triton")


def _layer(policy=DropPolicy.probs, backend=ExpertBackend.loop,
           router: RouterType | RouterConfig = RouterType.topk, kernel=KernelBackend.torch,
           dispatch=DispatchMode.capacity) -> MoELayer:
    """A capacity-mode layer that drops rows (factor 0.75); ``router`` is a RouterType
    (softmax scores, threshold 0.6) or a whole RouterConfig."""
    torch.manual_seed(0)
    mcfg = ModelConfig(dim=D, n_heads=2, num_experts=E, top_k=K, expert_hidden=F)
    rcfg = (router if isinstance(router, RouterConfig)
            else RouterConfig(name=router, score_func=ScoreFunc.softmax, threshold=0.6))
    moe_cfg = MoEConfig(router=rcfg, dispatch=dispatch, capacity_factor=0.75,
                        expert_backend=backend, kernel_backend=kernel, drop_policy=policy,
                        aux_loss_coef=0.01, z_loss_coef=0.001)
    layer = MoELayer(D, mcfg, moe_cfg)
    layer.init_weights(0.5, 0.5)
    return layer


def _run(layer: MoELayer, x: torch.Tensor, fn=None) -> dict[str, torch.Tensor]:
    """Output and gradients of ``fn`` (default: the layer itself) on x."""
    x = x.clone().requires_grad_()
    out = (layer if fn is None else fn)(x)
    g = torch.cos(torch.arange(out.numel(), dtype=out.dtype, device=out.device))
    out.backward(g.view(out.shape))
    grads = {"out": out.detach(), "x": x.grad}
    grads.update({n: p.grad for n, p in layer.named_parameters()})
    return grads


def _x() -> torch.Tensor:
    return torch.randn(2, T // 2, D, generator=torch.Generator().manual_seed(1))


def test_host_reads_catches_every_kind_of_sync():
    x = torch.arange(6.0)
    for read in (lambda: x.sum().item(), lambda: int(x[0]), lambda: bool(x[1] > 0),
                 lambda: x.tolist(), lambda: x[x > 2], lambda: x.nonzero(),
                 lambda: torch.repeat_interleave(x.long(), x.long())):
        with HostReads() as h:
            read()
        assert h.reads, read
    with HostReads() as h:  # integer indexing and a sized repeat_interleave read nothing
        x[torch.tensor([1, 2])], torch.repeat_interleave(x.long(), x.long(), output_size=15)
    assert h.reads == []
    # The dropless dispatch with inactive slots sizes x_RD from the routing: one read.
    with HostReads() as h:
        LocalDispatcher(E, None).dispatch(torch.randn(4, D), torch.tensor([[0, 1]] * 4),
                                          torch.rand(4, 2), torch.rand(4, 2) > 0.5)
    assert h.reads


_EAGER_CASES = [(p, ExpertBackend.loop, RouterType.topk) for p in DropPolicy] + [
    (DropPolicy.probs, ExpertBackend.grouped_mm, RouterType.topk),
    (DropPolicy.slot, ExpertBackend.loop, RouterType.threshold),  # variable k: inactive slots
]


@pytest.mark.parametrize("kernel", [
    KernelBackend.torch,
    pytest.param(KernelBackend.triton, marks=[needs_triton]),
])
@pytest.mark.parametrize("policy,backend,router", _EAGER_CASES)
def test_capacity_layer_reads_nothing_on_the_host(policy, backend, router, kernel,
                                                  monkeypatch):
    if kernel == KernelBackend.triton:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer = _layer(policy, backend, router, kernel)
    with HostReads() as h:
        got = _run(layer, _x())
    assert h.reads == []
    assert int(layer.last_stats.num_dropped) > 0  # the capacity really drops rows
    if router == RouterType.threshold:
        assert int(layer.last_stats.num_routed) < T * K  # some slots are inactive
    if kernel == KernelBackend.triton:  # the kernels give the torch path's numbers
        ref = _run(_layer(policy, backend, router, KernelBackend.torch), _x())
        for name, want in ref.items():
            torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-5, msg=name)


# moe/router=<group> (conf/moe/router/) with the overrides that reach the path under test:
# group-limited selection, keyed noise, selective Sinkhorn's keyed step draw (p = 0.01:
# top-k at step 0) and its optimal-transport step (p = 1).
_ROUTER_GROUPS = {
    "deepseek_v3-grouped": ("deepseek_v3", "moe.router.n_groups=2", "moe.router.topk_groups=1"),
    "noisy_topk": ("noisy_topk",),
    "selective_sinkhorn": ("selective_sinkhorn",),
    "selective_sinkhorn-ot": ("selective_sinkhorn", "moe.router.ssr_prob=1.0"),
}


def _router_group(case: str) -> RouterConfig:
    name, *overrides = _ROUTER_GROUPS[case]
    return compose([f"moe/router={name}", *overrides]).moe.router


@pytest.mark.parametrize("kernel", [
    KernelBackend.torch,
    pytest.param(KernelBackend.triton, marks=[needs_triton]),
])
@pytest.mark.parametrize("case", list(_ROUTER_GROUPS))
def test_capacity_layer_with_each_router_reads_nothing_on_the_host(case, kernel, monkeypatch):
    if kernel == KernelBackend.triton:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    rcfg = _router_group(case)
    layer = _layer(router=rcfg, kernel=kernel)
    assert layer.training  # the training forward: noise and the transport step draw
    with HostReads() as h:
        got = _run(layer, _x())
    assert h.reads == []
    assert int(layer.last_stats.num_dropped) > 0
    # The configured path really ran.
    router = layer.router
    with torch.no_grad():
        ids_TK = router(_x().reshape(-1, D)).ids_TK
    if case == "deepseek_v3-grouped":  # every pick inside the token's one best group
        group_TK = ids_TK // (E // rcfg.n_groups)
        assert torch.equal(group_TK, group_TK[:, :1].expand_as(group_TK))
        assert group_TK.unique().numel() == rcfg.n_groups
    elif case == "noisy_topk":  # the noise changes some picks; its own loss is trained on
        clean_TK = router.gate(_x().reshape(-1, D)).topk(K, dim=-1).indices
        assert not torch.equal(ids_TK, clean_TK)
        assert float(layer.last_stats.router_loss) > 0
    else:
        assert router.ot_step() == case.endswith("-ot")
    if kernel == KernelBackend.triton:  # the kernels give the torch path's numbers
        ref = _run(_layer(router=rcfg, kernel=KernelBackend.torch), _x())
        for name, want in ref.items():
            torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-5, msg=name)


def test_dropless_layer_still_reads_the_counts():
    """Dropless sizes its rows from the routing: the loop backend reads the counts back
    (documented; grouped_mm keeps them on the device)."""
    with HostReads() as h:
        _run(_layer(dispatch=DispatchMode.dropless), _x())
    assert "tolist" in h.reads


def _static_shapes_backend(unbacked: list[str], name: str = "aot_eager"):
    """The compile backend ``name``, after recording every graph node whose value has a
    data-dependent size."""
    compile_with = torch._dynamo.lookup_backend(name)

    def backend(gm: torch.fx.GraphModule, example_inputs):
        for node in gm.graph.nodes:
            if free_unbacked_symbols(node.meta.get("example_value")):
                unbacked.append(node.format_node())
        return compile_with(gm, example_inputs)

    return backend


# grouped_mm is left to the eager check above: its fake (meta) kernel takes only bf16,
# while the CPU kernel computes in float32.
@pytest.mark.parametrize("policy,router", [
    (DropPolicy.probs, RouterType.topk),
    (DropPolicy.position, RouterType.topk),
    (DropPolicy.slot, RouterType.threshold),
])
def test_capacity_layer_compiles_fullgraph_and_matches_eager(policy, router):
    torch._dynamo.reset()
    eager = _layer(policy, ExpertBackend.loop, router)
    compiled = copy.deepcopy(eager)
    unbacked: list[str] = []
    # fullgraph=True: a graph break is an error. aot_eager traces forward and backward
    # like inductor, without its code generation (seconds on a CPU).
    fn = torch.compile(compiled, fullgraph=True, backend=_static_shapes_backend(unbacked))
    want, got = _run(eager, _x()), _run(compiled, _x(), fn)
    assert unbacked == []
    assert int(eager.last_stats.num_dropped) > 0
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(compiled.last_stats.num_dropped, eager.last_stats.num_dropped)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kernel", [
    KernelBackend.torch,
    pytest.param(KernelBackend.triton, marks=[needs_triton]),
])
def test_capacity_layer_never_synchronises_on_cuda(kernel):
    """The device's own check: CUDA's sync debug mode raises on any synchronising call."""
    layer = _layer(DropPolicy.probs, ExpertBackend.grouped_mm, RouterType.topk, kernel)
    layer = layer.cuda()
    x = torch.randn(4, 64, D, device="cuda")
    _run(layer, x)  # warm-up: kernel compilation and lazy CUDA initialisation may sync
    layer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run(layer, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
