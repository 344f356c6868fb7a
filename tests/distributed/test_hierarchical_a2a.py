"""The hierarchical (2DH) all-to-all (``parallel.a2a=hierarchical``) against the flat one.

One spawn of 4 gloo ranks, laid out as 2 "nodes" x 2 ranks (``parallel.a2a_local_size=2``),
runs every multi-process case:
- Tutel's worked example (N=2, G=2, one slice per destination): the slices each phase
  leaves on every rank, checked by hand;
- random variable splits with zeros (a rank that sends nothing, a rank that receives
  nothing) and equal splits: every rank receives the flat all-to-all's rows in the same
  order, and the input gradient is the flat one's, bitwise;
- the all-to-all dispatcher (dispatch, experts, combine; and the dense step) dropless and
  in capacity mode, with experts that receive nothing: outputs, input, router-weight and
  expert-weight gradients equal the flat exchange's bitwise;
- 3 training steps (tiny model, parallel.ep=4, FSDP over the 4 ranks) with the flat and
  with the hierarchical exchange: the same losses and gradient norms.
"""

from __future__ import annotations

import pytest
import torch

from moetrain.testing import run_distributed
from tests.conftest import TINY

WORLD, NODES, LOCAL = 4, 2, 2
E, D, F, K = 8, 6, 10, 2


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def _flat(x, out_splits, in_splits, group):
    from moetrain.models.moe.dispatcher import _all_to_all

    return _all_to_all(x, out_splits, in_splits, group)


def _worked_example(rank, group, exchanges):
    """Tutel's 2DH example: rank i sends one row "i->j" (value 10*i + j) to every rank j.
    Returns the rows (as "i->j" strings) after each phase, for both split modes."""
    x = torch.tensor([[10.0 * rank + j] for j in range(WORLD)])
    out = {}
    for mode, ex in exchanges.items():
        phases = ex.phases(x, [1] * WORLD, [1] * WORLD)
        out[mode] = [[f"{int(v) // 10}->{int(v) % 10}" for v in p.flatten().tolist()]
                     for p in phases]
    return out


def _split_matrices():
    """W x W row counts M[src][dst] (shared by every rank): random with zeros, one source
    that sends nothing, one destination that receives nothing, and all zeros."""
    g = torch.Generator().manual_seed(3)
    rand = torch.randint(0, 5, (WORLD, WORLD), generator=g)
    rand[rand == 1] = 0
    quiet = torch.randint(1, 4, (WORLD, WORLD), generator=g)
    quiet[2, :] = 0  # rank 2 sends nothing
    quiet[:, 1] = 0  # rank 1 receives nothing
    return {"random": rand, "quiet": quiet, "empty": torch.zeros(WORLD, WORLD, dtype=torch.long)}


def _exchange_cases(rank, group, exchanges):
    """Flat vs hierarchical: received rows and input gradients, bitwise."""
    res = {}
    cases = [(name, M, "variable") for name, M in _split_matrices().items()]
    cases.append(("equal", torch.full((WORLD, WORLD), 3), "uniform"))
    cases.append(("equal_as_variable", torch.full((WORLD, WORLD), 3), "variable"))
    for name, M, mode in cases:
        in_splits, out_splits = M[rank].tolist(), M[:, rank].tolist()
        g = torch.Generator().manual_seed(50 + rank)
        x = torch.randn(sum(in_splits), D, generator=g)
        up = torch.randn(sum(out_splits), D, generator=torch.Generator().manual_seed(90 + rank))
        got = {}
        for kind, fn in (("flat", _flat), ("hier", exchanges[mode])):
            xi = x.clone().requires_grad_(True)
            y = fn(xi, out_splits, in_splits, group)
            (y * up).sum().backward()
            got[kind] = (y.detach(), xi.grad)
        (yf, gf), (yh, gh) = got["flat"], got["hier"]
        res[name] = {"rows": yh.shape[0], "expected_rows": sum(out_splits),
                     "y_equal": torch.equal(yh, yf), "grad_equal": torch.equal(gh, gf),
                     "max_abs": max(_max_abs(yh, yf), _max_abs(gh, gf))}
    return res


def _dispatcher_cases(rank, group, exchanges):
    """AllToAllDispatcher with the flat and with the hierarchical exchange: dispatch,
    experts, combine (dropless, capacity) and the dense step, forward and backward."""
    from moetrain.config.schema import ExpertBackend
    from moetrain.models.moe.dispatcher import AllToAllDispatcher
    from moetrain.models.moe.experts import GroupedExperts
    from tests._host_reads import HostReads

    T, e = 7, E // WORLD
    res = {}
    for routing in ("hand", "random"):
        for dispatch in ("dropless", "capacity", "dense"):
            capacity = 1.0 if dispatch == "capacity" else None
            out = {}
            for kind in ("flat", "hier"):
                g = torch.Generator().manual_seed(100 + rank)
                x_TD = torch.randn(T, D, generator=g, requires_grad=True)
                if routing == "hand":  # experts 0-2 only: EP ranks 2, 3 receive nothing
                    ids_TK = torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0], [2, 1],
                                           [0, 1]]).roll(rank, 0)
                else:
                    ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
                w_TK = torch.rand(T, K, generator=g).requires_grad_(True)
                experts = GroupedExperts(e, D, F, ExpertBackend.loop)
                wg = torch.Generator().manual_seed(7)
                with torch.no_grad():
                    for p in (experts.w1_EFD, experts.w3_EFD, experts.w2_EDF):
                        p.copy_(0.3 * torch.randn(E, *p.shape[1:], generator=wg)[rank * e:(rank + 1) * e])
                disp = AllToAllDispatcher(E, group, capacity)
                if kind == "hier":
                    disp.exchange = exchanges["uniform" if capacity else "variable"]
                with HostReads() as h:
                    if dispatch == "dense":
                        y = disp.dense(x_TD, experts)
                    else:
                        x_RD, meta = disp.dispatch(x_TD, ids_TK, w_TK)
                        y_RD = experts(x_RD, meta.tokens_per_expert, meta.rows_per_expert)
                        y = disp.combine(y_RD, meta)
                    (y * torch.linspace(-1.0, 1.0, D)).sum().backward()
                reads = len(h.reads)
                tpe = dropped = None
                if dispatch != "dense":
                    tpe, dropped = meta.tokens_per_expert.tolist(), int(meta.num_dropped)
                dW = [p.grad.clone() for p in (experts.w1_EFD, experts.w3_EFD, experts.w2_EDF)]
                out[kind] = ([y.detach(), x_TD.grad, w_TK.grad, *dW], tpe, disp.bytes_sent,
                             dropped, reads)
            (a, tpe_f, sent_f, drop_f, reads_f), (b, tpe_h, sent_h, drop_h, reads_h) = (
                out["flat"], out["hier"])
            pairs = [(u, v) for u, v in zip(a, b) if u is not None]
            res[(routing, dispatch)] = {
                "equal": all(torch.equal(u, v) for u, v in pairs),
                "max_abs": max(_max_abs(u, v) for u, v in pairs),
                "tokens_per_expert": (tpe_f, tpe_h), "bytes_sent": (sent_f, sent_h),
                "dropped": (drop_f, drop_h), "host_reads": (reads_f, reads_h),
                "dW_abs": float(sum(w.abs().sum() for w in b[3:])),
            }
    return res


def _train_runs(rank, world, runs):
    """Train each run in turn on the spawn's process group (no re-initialisation);
    rank 0 returns each run's metrics.jsonl rows."""
    from pathlib import Path

    from moetrain.config import validate
    from moetrain.metrics import read_metrics
    from moetrain.parallel.mesh import init_distributed
    from moetrain.train.trainer import Trainer
    from tests.conftest import compose

    out = {}
    for name, overrides in runs.items():
        cfg = compose(overrides)
        layout = validate(cfg, world)
        _, _, device = init_distributed()
        trainer = Trainer(cfg, layout, device)
        trainer.fit()
        run_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("run.dir="))
        out[name] = read_metrics(Path(run_dir) / "metrics.jsonl") if rank == 0 else None
        out[f"{name}_exchanges"] = sorted({repr(layer.dispatcher.exchange)
                                           for layer in trainer.pm.moe_layers})
    return out


def _four_ranks(rank: int, world: int, runs):
    """Every multi-process case of this file, in one spawn."""
    import torch.distributed as dist

    from moetrain.parallel.hierarchical import hierarchical_exchange

    group = dist.group.WORLD
    exchanges = {mode: hierarchical_exchange(group, LOCAL, uniform=mode == "uniform")
                 for mode in ("variable", "uniform")}
    shape = {m: (ex.nodes, ex.local) for m, ex in exchanges.items()}
    # One node of 4, or 4 nodes of 1: no 2DH exchange (the flat one runs).
    fallback = [hierarchical_exchange(group, local) for local in (4, 1)]
    return {"shape": shape, "fallback": fallback,
            "worked": _worked_example(rank, group, exchanges),
            "exchange": _exchange_cases(rank, group, exchanges),
            "dispatcher": _dispatcher_cases(rank, group, exchanges),
            "train": _train_runs(rank, world, runs)}


def _train_base(data_cache: str) -> list[str]:
    return [o for o in TINY if not o.startswith("train.steps")] + [
        "train.steps=3", "eval.every=0", f"data.cache_dir={data_cache}", "parallel.ep=4"]


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("hier_a2a")
    base = _train_base(data_cache)
    runs = {"flat": base + [f"run.dir={root / 'flat'}"],
            "hier": base + ["parallel.a2a=hierarchical", "parallel.a2a_local_size=2",
                            f"run.dir={root / 'hier'}"]}
    return run_distributed(_four_ranks, WORLD, runs, timeout_s=240)


def test_tutel_worked_example_phase_by_phase(four_ranks):
    """N=2, G=2 (the reference sheet's example): rank 0's slices after each phase, and
    after phase 3 every rank holds "i->rank" from every i, in order."""
    assert four_ranks[0]["shape"] == {"variable": (NODES, LOCAL), "uniform": (NODES, LOCAL)}
    assert all(r["fallback"] == [None, None] for r in four_ranks)
    rank0 = [["0->0", "0->2", "0->1", "0->3"], ["0->0", "0->2", "1->0", "1->2"],
             ["0->0", "1->0", "0->2", "1->2"], ["0->0", "1->0", "2->0", "3->0"]]
    for rank, res in enumerate(four_ranks):
        for mode in ("variable", "uniform"):
            phases = res["worked"][mode]
            if rank == 0:
                assert phases == rank0, (mode, phases)
            assert phases[3] == [f"{i}->{rank}" for i in range(WORLD)], (rank, mode, phases)
    # Rank 3 = node 1, local 1: phase 1 holds what node 1's ranks 2 and 3 send to local 1.
    assert four_ranks[3]["worked"]["variable"][1] == ["2->1", "2->3", "3->1", "3->3"]


def test_hierarchical_exchange_equals_flat_bitwise(four_ranks):
    for rank, res in enumerate(four_ranks):
        for name, r in res["exchange"].items():
            assert r["rows"] == r["expected_rows"], (rank, name, r)
            assert r["y_equal"] and r["grad_equal"] and r["max_abs"] == 0.0, (rank, name, r)
    assert four_ranks[1]["exchange"]["quiet"]["rows"] == 0  # receives nothing
    assert four_ranks[2]["exchange"]["quiet"]["rows"] > 0  # sends nothing, still receives


def test_dispatcher_with_hierarchical_exchange_equals_flat_bitwise(four_ranks):
    for rank, res in enumerate(four_ranks):
        for key, r in res["dispatcher"].items():
            assert r["equal"] and r["max_abs"] == 0.0, (rank, key, r)
            assert r["tokens_per_expert"][0] == r["tokens_per_expert"][1], (rank, key, r)
            assert r["dropped"][0] == r["dropped"][1], (rank, key, r)
            # Host reads: none in capacity mode; one more per exchange (its block counts)
            # with variable splits: dispatch and combine, or the dense step's return.
            extra = {"capacity": 0, "dropless": 2, "dense": 1}[key[1]]
            assert r["host_reads"][1] == r["host_reads"][0] + extra, (rank, key, r)
            if key[1] == "capacity":
                assert r["host_reads"] == (0, 0), (rank, key, r)
            assert r["bytes_sent"][0] == r["bytes_sent"][1] > 0, (rank, key, r)
            if key[0] == "hand" and key[1] != "dense" and rank >= 2:
                # Experts 4-7 receive no routed row: exactly zero weight gradients.
                assert r["dW_abs"] == 0.0, (rank, key, r)
    # Capacity 1.0 (C = 2 rows per expert and source) with every row on experts 0-2 drops
    # rows, and experts 3-7 get only unfilled rows: the capacity paths ran.
    assert all(r["dispatcher"][("hand", "capacity")]["dropped"][0] > 0 for r in four_ranks)
    assert four_ranks[0]["dispatcher"][("hand", "capacity")]["tokens_per_expert"][0] == [8, 8]


def test_training_with_hierarchical_all_to_all_matches_flat(four_ranks):
    """parallel.ep=4 on 4 ranks as 2 nodes x 2: the flat run's losses, aux losses and
    gradient norms, exactly (the same rows reach the same experts in the same order)."""
    from tests.distributed._runs import step_rows

    for res in four_ranks:  # the wiring: every layer's dispatcher got the 2DH exchange
        assert res["train"]["hier_exchanges"] == [
            "HierarchicalAllToAll(nodes=2, local=2, uniform=False)"]
        assert res["train"]["flat_exchanges"][0].startswith("<function _all_to_all")
    flat, hier = (step_rows(four_ranks[0]["train"][k]) for k in ("flat", "hier"))
    assert len(flat) == len(hier) == 3
    for a, b in zip(flat, hier):
        assert a["step"] == b["step"]
        for k in ("loss", "grad_norm", "aux_loss"):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])
        assert a["a2a_bytes"] == b["a2a_bytes"] > 0


# ----------------------------------------------------------------------------- no processes
def test_hop_groups_and_node_shape():
    from moetrain.parallel.hierarchical import hop_groups, node_shape

    # 8 ranks, EP groups of 4, nodes of 2: intra blocks of 2, inter pairs per EP group.
    intra, inter = hop_groups(8, 4, 2)
    assert intra == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert inter == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert node_shape(16, 8) == (2, 8)
    assert node_shape(4, 8) == (1, 4)  # inside one node: the flat all-to-all runs
    from moetrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"parallel\.a2a_local_size=4 with parallel\.ep=6"):
        node_shape(6, 4)


def test_local_size_from_config_or_torchrun(monkeypatch):
    from moetrain.config import ConfigError
    from moetrain.parallel.hierarchical import LOCAL_SIZE_ENV, resolve_local_size

    monkeypatch.delenv(LOCAL_SIZE_ENV, raising=False)
    assert resolve_local_size(None, 16) == 16  # not under torchrun: one node
    assert resolve_local_size(4, 16) == 4
    monkeypatch.setenv(LOCAL_SIZE_ENV, "8")
    assert resolve_local_size(None, 16) == 8
    assert resolve_local_size(2, 16) == 2  # the config key wins
    monkeypatch.setenv(LOCAL_SIZE_ENV, "3")
    with pytest.raises(ConfigError, match=r"a2a_local_size=null \(\$LOCAL_WORLD_SIZE=3\) "
                                          r"gives 3 ranks per node, which does not divide"):
        resolve_local_size(None, 16)


def test_block_transpose_index_by_hand():
    from moetrain.parallel.hierarchical import block_transpose_index

    # Blocks [a][b] of sizes [[2, 0, 1], [1, 3, 0]]: rows a0b0=0,1 a0b2=2 a1b0=3 a1b1=4,5,6.
    idx = block_transpose_index([[2, 0, 1], [1, 3, 0]], torch.device("cpu"))
    # [b][a]: b0: a0 (0, 1), a1 (3); b1: a1 (4, 5, 6); b2: a0 (2).
    assert idx.tolist() == [0, 1, 3, 4, 5, 6, 2]


def test_a2a_config_errors_name_the_field_and_fix():
    from moetrain.config import ConfigError
    from moetrain.config.schema import ParallelConfig
    from moetrain.config.validate import validate
    from tests.conftest import compose

    with pytest.raises(ConfigError, match=r"parallel\.a2a_local_size=2 .*parallel\.a2a=hierarchical"):
        ParallelConfig(a2a_local_size=2)
    with pytest.raises(ConfigError, match=r"parallel\.a2a_local_size=0"):
        ParallelConfig(a2a="hierarchical", a2a_local_size=0)
    hier = ["model=tiny", "parallel.ep=4", "parallel.a2a=hierarchical"]
    with pytest.raises(ConfigError, match=r"parallel\.a2a_local_size=3 does not divide"):
        validate(compose(hier + ["parallel.a2a_local_size=3"]), 8)
    with pytest.raises(ConfigError, match=r"parallel\.a2a_local_size=8 with parallel\.ep=12"):
        validate(compose(["model=tiny", "model.num_experts=12", "parallel.ep=12",
                          "train.global_batch_size=24", "parallel.a2a=hierarchical",
                          "parallel.a2a_local_size=8"]), 24)
    with pytest.raises(ConfigError, match=r"moe\.a2a_overlap_chunks=2: .*moe\.a2a_overlap_chunks=1"):
        validate(compose(hier + ["moe.a2a_overlap_chunks=2"]), 8)
    # Valid: groups spanning 2 nodes of 2, or sitting inside a node of 8.
    for local, world in ((2, 8), (8, 8)):
        assert validate(compose(hier + [f"parallel.a2a_local_size={local}"]), world).ep == 4
