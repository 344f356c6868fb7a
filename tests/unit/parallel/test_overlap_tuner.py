"""The overlap tuner of ``moe.a2a_overlap_chunks=auto`` (moetrain/parallel/overlap_tuner.py),
driven by made-up step times: exploration order, the best count kept per load bucket, the
rare re-probe, the same decisions from the same inputs, the ranks' maxima as its inputs;
and the config key."""

from __future__ import annotations

import dataclasses
from itertools import pairwise
from types import SimpleNamespace

import pytest

from moetrain.parallel.overlap_tuner import CANDIDATES, ChunkTable, OverlapTuner, load_bucket


def _run(table: ChunkTable, seconds_of, steps: int, bucket_of=lambda step: 5,
         start: int = 1) -> list[int]:
    """Counts used by ``steps`` steps: step s runs with the count chosen after step s-1
    and takes ``seconds_of(step, count)``."""
    used, c = [], start
    for step in range(steps):
        used.append(c)
        b = bucket_of(step)
        table.record(b, c, seconds_of(step, c))
        c = table.next_chunks(b, c)
    return used


def test_load_bucket_is_floor_log2():
    assert [load_bucket(r) for r in (0, 1, 2, 3, 4, 7, 8, 1023, 1024, 5000)] == \
        [0, 0, 1, 1, 2, 2, 3, 9, 10, 12]


def test_exploration_runs_every_count_once_then_keeps_the_fastest():
    times = {1: 4.0, 2: 3.0, 4: 2.0, 8: 2.5}
    used = _run(ChunkTable(), lambda s, c: times[c], 10)
    assert used == [1, 2, 4, 8, 4, 4, 4, 4, 4, 4]


def test_exploration_starts_after_the_current_count_and_changes_every_step():
    """A new bucket mid-run: its unexplored counts are taken from the one after the count
    just used, so the count still changes at every step until all are timed."""
    table = ChunkTable()
    times = {1: 1.0, 2: 2.0, 4: 3.0, 8: 4.0}
    # Steps 0-1 in bucket 3, then bucket 4 from step 2 on.
    used = _run(table, lambda s, c: times[c], 8, bucket_of=lambda s: 3 if s < 2 else 4)
    assert used == [1, 2, 4, 8, 1, 2, 1, 1]
    assert all(a != b for a, b in pairwise(used[:7]))  # exploring until step 6
    assert set(table.times[3]) == {1, 2} and set(table.times[4]) == set(CANDIDATES)


def test_best_count_is_kept_per_bucket():
    table = ChunkTable()
    for c, s in {1: 5.0, 2: 1.0, 4: 3.0, 8: 4.0}.items():
        table.record(3, c, s)
    for c, s in {1: 9.0, 2: 7.0, 4: 6.0, 8: 2.0}.items():
        table.record(6, c, s)
    assert [table.next_chunks(b, 1) for b in (3, 6, 3, 6)] == [2, 8, 2, 8]
    assert table.next_chunks(7, 2) == 4  # a bucket never seen: exploration, after 2


def test_median_of_the_last_window_times_and_ties_to_fewer_chunks():
    table = ChunkTable(window=3)
    for s in (9.0, 1.0, 2.0, 100.0):  # the oldest (9.0) falls out of the window
        table.record(0, 2, s)
    assert table.times[0][2] == [1.0, 2.0, 100.0]
    assert table.score(0, 2) == 2.0
    assert table.score(0, 4) == float("inf")
    for c in (1, 4, 8):
        table.record(0, c, 2.0)
    assert table.best(0) == 1  # 1, 2 and 4 tie at 2.0


def test_rare_reprobe_visits_the_other_counts_in_turn():
    times = {1: 4.0, 2: 3.0, 4: 2.0, 8: 2.5}
    used = _run(ChunkTable(reprobe_every=5), lambda s, c: times[c], 4 + 20)
    # After exploration (steps 0-3) choice n of the bucket is used at step 3 + n.
    assert used[:4] == [1, 2, 4, 8]
    probes = {i: c for i, c in enumerate(used) if i >= 4 and c != 4}
    assert probes == {8: 1, 13: 2, 18: 8, 23: 1}


def test_reprobe_corrects_an_unlucky_first_time():
    """8 chunks is really the fastest but its exploration step was slow (a noisy step):
    the re-probes find it. With reprobe_every=4 choices 4, 8, 12, ... of the bucket (steps
    7, 11, 15, ...) probe the others of the best (4: [1, 2, 8]) in turn. 8's first probe
    leaves its window at [10, 1] (median 5.5 > 2.0); its second, at step 27, at
    [10, 1, 1] (median 1.0): from then on 8 is kept."""
    def seconds(step, c):
        if c == 8 and step == 3:
            return 10.0
        return {1: 4.0, 2: 3.0, 4: 2.0, 8: 1.0}[c]

    used = _run(ChunkTable(reprobe_every=4), seconds, 31)
    assert used == [1, 2, 4, 8, 4, 4, 4, 1, 4, 4, 4, 2, 4, 4, 4, 8,
                    4, 4, 4, 1, 4, 4, 4, 2, 4, 4, 4, 8, 8, 8, 8]
    # A window of 1 forgets the noisy time at 8's first probe (step 15) and keeps 8; its
    # next probe (step 19) tries the others of the best 8 in turn: 1 first.
    used = _run(ChunkTable(reprobe_every=4, window=1), seconds, 23)
    assert used[15:] == [8, 8, 8, 8, 1, 8, 8, 8]


def test_identical_inputs_give_identical_decisions():
    def seconds(step, c):  # deterministic "noise"
        return 1.0 + 0.1 * ((step * 7 + c * 3) % 5)

    def bucket(step):
        return 4 + (step // 9) % 2

    runs = [_run(ChunkTable(reprobe_every=3), seconds, 60, bucket) for _ in range(2)]
    assert runs[0] == runs[1]
    assert len(set(runs[0])) == len(CANDIDATES)


def test_tuner_feeds_the_ranks_maxima_and_sets_every_dispatcher():
    """Two ranks with different own times and rows: each calls its reduce once per step
    with [seconds, rows]; both see the maxima, make the same choices and set them on all
    their dispatchers. The first step's time is not recorded."""
    own = {0: [(9.0, 100), (1.0, 40), (2.0, 40), (1.0, 40), (2.0, 40), (1.0, 40)],
           1: [(8.0, 300), (1.5, 70), (1.0, 70), (1.2, 70), (3.0, 70), (1.1, 70)]}
    maxima = [(max(own[0][s][0], own[1][s][0]), max(own[0][s][1], own[1][s][1]))
              for s in range(6)]
    seen, used, tuners = {0: [], 1: []}, {0: [], 1: []}, {}
    for rank in (0, 1):
        disp = [SimpleNamespace(chunks=None, rows_received=0) for _ in range(2)]

        def reduce_max(values, rank=rank):
            seen[rank].append(values)
            s = len(seen[rank]) - 1
            return [float(maxima[s][0]), float(maxima[s][1])]

        tuners[rank] = OverlapTuner(disp, reduce_max=reduce_max)
        assert [d.chunks for d in disp] == [1, 1]
        for s in range(6):
            seconds, rows = own[rank][s]
            disp[0].rows_received, disp[1].rows_received = rows - rows // 3, rows // 3
            used[rank].append(tuners[rank].step(seconds))
            assert [d.chunks for d in disp] == [tuners[rank].chunks] * 2
            assert [d.rows_received for d in disp] == [0, 0]
        assert seen[rank] == [[float(a), float(b)] for a, b in own[rank]]
    # Exploration, then the fastest: 8 (1.2 s) < 2 (1.5) < 4 (2.0) < 1 (3.0).
    assert used[0] == used[1] == [1, 2, 4, 8, 1, 8]
    # Step 0's 9 s went unrecorded; 70 rows: bucket 6 (step 0's 300 rows: bucket 8).
    assert tuners[0].table.times == tuners[1].table.times == {
        6: {2: [1.5], 4: [2.0], 8: [1.2, 1.1], 1: [3.0]}}
    assert tuners[0].chunks == tuners[1].chunks == 8


def test_for_layers_only_under_auto_and_ep():
    from moetrain.config.schema import MoEConfig

    assert OverlapTuner.for_layers(MoEConfig(a2a_overlap_chunks=4), 2, [], None) is None
    assert OverlapTuner.for_layers(MoEConfig(a2a_overlap_chunks="auto"), 1, [], None) is None
    tuner = OverlapTuner.for_layers(MoEConfig(a2a_overlap_chunks="auto"), 2, [], None)
    assert isinstance(tuner, OverlapTuner) and tuner.dispatchers == []


def test_config_accepts_auto_and_integers_and_names_the_fix():
    from moetrain.config import ConfigError
    from moetrain.config.schema import MoEConfig

    assert MoEConfig(a2a_overlap_chunks="auto").a2a_overlap_chunks == "auto"
    assert MoEConfig(a2a_overlap_chunks="4").a2a_overlap_chunks == 4
    for bad in (0, -1, "fast", 2.5, True):
        with pytest.raises(ConfigError, match=r"moe\.a2a_overlap_chunks=.*or auto"):
            MoEConfig(a2a_overlap_chunks=bad)


def test_composed_config_and_step_time_model_take_auto():
    """From the command line; the layout cost model charges auto like the tuner's largest
    count (it has no per-chunk cost, so more chunks is never slower there)."""
    from moetrain.parallel import memory
    from tests.conftest import compose

    cfg = compose(["model=tiny", "parallel.ep=4", "moe.a2a_overlap_chunks=auto"])
    assert cfg.moe.a2a_overlap_chunks == "auto"
    cost = {}
    for n in ("auto", max(CANDIDATES)):
        c = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, a2a_overlap_chunks=n))
        est = memory.estimate(c, 8, 32000)
        cost[n] = memory._step_cost(c, est, 32000, peak_tflops=989.0, mfu=0.4,
                                    gpus_per_node=8, intra_gbs=300.0, inter_gbs=25.0)
    assert cost["auto"].comm_s == cost[8].comm_s
