"""The flat vs hierarchical all-to-all model (``moetrain.parallel.memory.a2a_times``) on
hand-worked cases, and ``tools/a2a_model.py``'s table for 128 nodes x 8 GPUs."""

from __future__ import annotations

import pytest

from moetrain.parallel.memory import A2ALinks, a2a_break_even_bytes, a2a_table, a2a_times
from tests.conftest import load_tool

# Round figures for hand arithmetic: NVLink 100 GB/s + 1 us, network 10 GB/s + 10 us,
# copies 1000 GB/s.
LINKS = A2ALinks(intra_gbs=100.0, inter_gbs=10.0, intra_latency_us=1.0, inter_latency_us=10.0,
                 copy_gbs=1000.0)


def test_two_nodes_of_two_by_hand():
    """N = 2, G = 2 (W = 4), S bytes sent per rank, S/4 to each rank.

    S = 4 MB: flat = 1 x (1 us + 1 MB / 100 GB/s) + 2 x (10 us + 1 MB / 10 GB/s)
    = 11 us + 220 us = 231 us; 2DH = 2 copies x 8 MB / 1000 GB/s + (1 us + 2 MB / 100 GB/s)
    + (10 us + 2 MB / 10 GB/s) = 16 + 21 + 210 = 247 us: flat wins.
    S = 1 MB: flat = 3.5 + 70 = 73.5 us; 2DH = 4 + 6 + 60 = 70 us: 2DH wins.
    Break-even: 2DH saves (N-1)(G-1) = 1 network message (10 us) and pays
    (G-1)(1/G - 1/W) / 100 GB/s + 4 / 1000 GB/s = 6.5e-12 s per byte: S* = 1.538 MB."""
    big = a2a_times(4e6, 2, 2, LINKS)
    assert big.flat_s == pytest.approx(231e-6, rel=1e-12)
    assert big.hierarchical_s == pytest.approx(247e-6, rel=1e-12)
    assert big.winner == "flat"
    small = a2a_times(1e6, 2, 2, LINKS)
    assert small.flat_s == pytest.approx(73.5e-6, rel=1e-12)
    assert small.hierarchical_s == pytest.approx(70e-6, rel=1e-12)
    assert small.winner == "hierarchical"
    assert (small.flat_messages, small.hierarchical_messages) == ((1, 2), (1, 1))
    be = a2a_break_even_bytes(2, 2, LINKS)
    assert be == pytest.approx(1e-5 / 6.5e-12, rel=1e-12)
    at = a2a_times(be, 2, 2, LINKS)
    assert at.flat_s == pytest.approx(at.hierarchical_s, rel=1e-12)


def test_one_node_or_one_rank_per_node_is_flat():
    for nodes, local in ((1, 8), (16, 1)):
        r = a2a_times(1e8, nodes, local, LINKS)
        assert r.hierarchical_s == r.flat_s and r.winner == "flat"
        assert a2a_break_even_bytes(nodes, local, LINKS) == 0.0


def test_table_for_1024_gpus():
    """128 x 8, D=4096 bf16, top-2 with the planning figures: per rank, flat sends 7 + 1016
    messages and 2DH 7 + 127; 2DH saves 127 * 7 * 10 us = 8.89 ms of network latency, so it
    wins up to S* = 8.89 ms / (7 * (1/8 - 1/1024) / 300 GB/s + 4 / 2000 GB/s) = 1817 MB
    per rank, i.e. 110,874 tokens of 16 KiB (2 rows of 8 KiB)."""
    be = a2a_break_even_bytes(128, 8)
    expected = 127 * 7 * 10e-6 / (7 * (1 / 8 - 1 / 1024) / 300e9 + 4 / 2000e9)
    assert be == pytest.approx(expected, rel=1e-12)
    assert round(be / (2 * 4096 * 2)) == 110874
    text = a2a_table()
    rows = [line.split() for line in text.splitlines()[3:10]]
    assert [int(r[0]) for r in rows] == [1024 * 2**i for i in range(7)]
    assert all(r[-1] == "hierarchical" for r in rows)
    # 1024 tokens: S = 16.8 MB; flat = 7 x (2 us + 16.4 KB / 300 GB/s) + 1016 x (10 us +
    # 16.4 KB / 25 GB/s) = 10.84 ms.
    assert rows[0][4] == "10.84"
    assert "flat 7 + 1016, 2DH 7 + 127" in text and "(110,874 tokens per rank)" in text
    tool = load_tool("a2a_model")
    assert tool.main(["--nodes", "4", "--tokens", "1024,65536"]) == 0
