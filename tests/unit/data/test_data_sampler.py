"""GlobalBatchSampler: the stream is per-epoch seeded permutations; micro-batch layout is
layout-independent; state_dict resumes exactly."""

import pytest
import torch

from moetrain.config.schema import ConfigError
from moetrain.data import GlobalBatchSampler


def _stream(n, seed, epochs):
    """Reference: concatenated torch.randperm(n) with seeds seed, seed+1, ..."""
    out = []
    for e in range(epochs):
        out += torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)).tolist()
    return out


def test_global_batches_follow_the_seeded_stream_across_epochs():
    n, G, seed = 10, 4, 7
    s = GlobalBatchSampler(n, G, seed)
    batches = [s.next_global_batch() for _ in range(5)]  # 20 samples = exactly 2 epochs
    ref = _stream(n, seed, 2)
    assert batches == [ref[i:i + G] for i in range(0, 20, G)]
    # batch 2 straddles the epoch boundary: 2 samples from epoch 0, 2 from epoch 1
    assert sorted(batches[0] + batches[1] + batches[2][:2]) == list(range(n))
    assert s.consumed == 20 and s.epoch == 2
    assert ref[:n] != ref[n:]  # each epoch has its own order


def test_global_batch_larger_than_dataset():
    s = GlobalBatchSampler(3, 8, 0)
    assert s.next_global_batch() == _stream(3, 0, 3)[:8]
    assert s.next_global_batch() == _stream(3, 0, 6)[8:16]


@pytest.mark.parametrize("dp", [1, 2, 4])
@pytest.mark.parametrize("micro", [1, 2])
def test_micro_batches_union_and_disjoint(dp, micro):
    G = 8
    batch = GlobalBatchSampler(100, G, 3).next_global_batch()
    per_rank = [GlobalBatchSampler.micro_batches(batch, r, dp, micro) for r in range(dp)]
    accum = G // (micro * dp)
    assert all(len(mbs) == accum and all(len(mb) == micro for mb in mbs) for mbs in per_rank)
    # interleaving step j over ranks r rebuilds the global batch in order
    rebuilt = [i for j in range(accum) for r in range(dp) for i in per_rank[r][j]]
    assert rebuilt == batch
    flat = [i for mbs in per_rank for mb in mbs for i in mb]
    assert len(set(flat)) == len(flat) == G


def test_micro_batches_hand_computed():
    batch = list(range(10, 18))
    # G=8, m=2, dp=2 -> a=2; rank 1 gets [(0*2+1)*2:(0*2+2)*2] and [(1*2+1)*2:(1*2+2)*2]
    assert GlobalBatchSampler.micro_batches(batch, 1, 2, 2) == [[12, 13], [16, 17]]
    assert GlobalBatchSampler.micro_batches(batch, 0, 2, 2) == [[10, 11], [14, 15]]
    with pytest.raises(ConfigError, match=r"train\.global_batch_size=8.*train\.micro_batch_size"):
        GlobalBatchSampler.micro_batches(batch, 0, 3, 1)
    with pytest.raises(ValueError, match="dp_rank"):
        GlobalBatchSampler.micro_batches(batch, 2, 2, 2)


def test_state_dict_resume_continues_exactly():
    n, G, seed = 13, 5, 1
    full = GlobalBatchSampler(n, G, seed)
    expected = [full.next_global_batch() for _ in range(9)]
    run = GlobalBatchSampler(n, G, seed)
    got = [run.next_global_batch() for _ in range(4)]  # stops mid-epoch 1
    state = run.state_dict()
    assert state == {"consumed_samples": 20, "seed": 1, "num_samples": 13}
    assert all(type(v) is int for v in state.values())
    resumed = GlobalBatchSampler(n, G, seed)
    # DCP may hand back 0-d tensors
    resumed.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
    got += [resumed.next_global_batch() for _ in range(5)]
    assert got == expected


def test_load_state_dict_mismatch_raises():
    state = GlobalBatchSampler(13, 5, 1).state_dict()
    with pytest.raises(ValueError, match="13 train samples.*now has 14.*data changed"):
        GlobalBatchSampler(14, 5, 1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=1.*seed=2"):
        GlobalBatchSampler(13, 5, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        GlobalBatchSampler(13, 5, 1).load_state_dict({"seed": 1})
