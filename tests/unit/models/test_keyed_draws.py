"""The keyed random draws are a fixed function of (key, salts).

:func:`routing.keyed_uniform` and :func:`routing.keyed_normal` draw noisy top-k's noise,
the dense-to-sparse gate's Gumbel noise, selective Sinkhorn's step and Drop-Upcycling's
masks. Every layout, rank count and resume relies on them drawing the same numbers for
the same (seed, step, layer, token, expert, ...) keys, so a change of the hash would
silently change every run's randomness. The draws are pinned two ways:
- to the algorithm written out below in plain Python integers, independently of the
  implementation: MurmurHash3's 32-bit finaliser fmix32 (anchored to MurmurHash3's
  published test vectors), each salt folded in as h = fmix32(h ^ salt) + 0x9E3779B9, the
  key's low word hashed with h, then its high word added; u = (h + 0.5) / 2^32 rounded
  to float32, at most 1 - 2^-24; normals by Box-Muller on the draws with salts 1 and 2;
- to literal values, a guard that needs no reading of the algorithm.
The uniforms are integer arithmetic and one correctly rounded division: they must match
bit for bit on every processor. The normals go through float32 log and cos, whose last
bit may depend on the processor's vector code: they match within float32 rounding.
"""

from __future__ import annotations

import math
import struct

import pytest
import torch

from moetrain.models.moe import routing

M32 = 0xFFFFFFFF
C1, C2 = 0x85EBCA6B, 0xC2B2AE35  # MurmurHash3 fmix32 multipliers
SALT_STEP, HIGH_WORD = 0x9E3779B9, 0x7F4A7C15  # added after each salt / to the high word


def fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finaliser."""
    h &= M32
    h ^= h >> 16
    h = (h * C1) & M32
    h ^= h >> 13
    h = (h * C2) & M32
    return h ^ (h >> 16)


def unfmix32(h: int) -> int:
    """The inverse of :func:`fmix32` (it is a bijection of 32-bit words)."""
    h ^= h >> 16
    h = (h * pow(C2, -1, 2**32)) & M32
    h ^= (h >> 13) ^ (h >> 26)
    h = (h * pow(C1, -1, 2**32)) & M32
    return h ^ (h >> 16)


def hash32(key: int, *salt: int) -> int:
    h = 0
    for s in salt:
        h = fmix32(h ^ (s & M32)) + SALT_STEP
    lo = fmix32((key & M32) ^ h)
    return fmix32(lo + ((key >> 32) & M32) + HIGH_WORD)


def to_f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]  # round to nearest float32


def uniform(key: int, *salt: int) -> float:
    return min(to_f32((hash32(key, *salt) + 0.5) / 2**32), 1.0 - 2.0**-24)


def normal(key: int, *salt: int) -> float:
    u1, u2 = uniform(key, *salt, 1), uniform(key, *salt, 2)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


# Token keys as the routers build them (position * E + expert), past 2^32 too (the high
# word), and salts as (seed, step, layer, tag) tuples.
KEYS = [0, 1, 7, 12345, 987654321, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3, 2**62 + 5]
SALTS = [(), (0,), (1234, 7, 2, 0x5EED), (42, 3, 1, 0x55A), (2**40 + 1, 0, 0, 0xE1)]


def test_written_out_finaliser_is_murmurhash3s():
    # MurmurHash3_x86_32 of the empty input with seed s is fmix32(s): the published
    # vectors for seeds 0, 1 and 0xffffffff.
    assert fmix32(0) == 0
    assert fmix32(1) == 0x514E28B7
    assert fmix32(0xFFFFFFFF) == 0x81F16F39
    for h in (0, 1, 0x12345678, M32):
        assert unfmix32(fmix32(h)) == h


@pytest.mark.parametrize("salt", SALTS, ids=lambda s: "-".join(map(str, s)) or "none")
def test_keyed_uniform_is_the_written_out_hash_bit_for_bit(salt):
    keys = torch.tensor(KEYS)
    want = torch.tensor([uniform(k, *salt) for k in KEYS], dtype=torch.float32)
    assert torch.equal(routing.keyed_uniform(keys, *salt), want)
    # Salts given as int64 0-dim tensors (the routers' seed and step) draw the same.
    salt_t = [torch.tensor(s, dtype=torch.int64) for s in salt]
    assert torch.equal(routing.keyed_uniform(keys, *salt_t), want)
    # The host draw (selective Sinkhorn's step) gives the same value as a Python float.
    assert [routing.keyed_uniform_host(k, *salt) for k in KEYS] == want.tolist()


@pytest.mark.parametrize("salt", SALTS[1:4], ids=["0", "noisy", "ssr"])
def test_keyed_normal_is_box_muller_on_the_salted_uniforms(salt):
    keys = torch.tensor(KEYS)
    want = torch.tensor([normal(k, *salt) for k in KEYS], dtype=torch.float64)
    got = routing.keyed_normal(keys, *salt)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_pinned_values():
    """Literal draws (repr of the float32 values): any change of the hash, the salt
    folding or the mapping to (0, 1) changes them."""
    u = routing.keyed_uniform(torch.tensor([0, 1, 12345, 2**32 + 7, 2**40 + 3, 987654321]),
                              1234, 7, 2, 0x5EED)
    want_u = [0.3675897717475891, 0.25900304317474365, 0.6170406341552734,
              0.9823099374771118, 0.7042940855026245, 0.43034884333610535]
    assert torch.equal(u, torch.tensor(want_u, dtype=torch.float32))
    n = routing.keyed_normal(torch.tensor([0, 1, 2**33, 55555]), 42, 3, 1, 0x5EED)
    want_n = [-0.20085111260414124, 0.016134632751345634, -0.21374373137950897,
              -0.9815921187400818]
    torch.testing.assert_close(n, torch.tensor(want_n, dtype=torch.float32),
                               rtol=1e-6, atol=1e-6)


def test_shape_dtype_and_open_interval():
    keys_TE = torch.arange(12).view(3, 4) * 1_000_003
    for draw in (routing.keyed_uniform, routing.keyed_normal):
        out = draw(keys_TE, 5, 6)
        assert out.shape == (3, 4) and out.dtype == torch.float32
        assert out.device == keys_TE.device
        # Elementwise: a draw depends on its own key only, not on the batch around it.
        assert torch.equal(out[1:2, 2:], draw(keys_TE[1:2, 2:], 5, 6))
    # The extreme hashes (keys found by inverting the hash, no salt): h = 0 gives
    # 2^-33, h = 2^32 - 1 would round to 1.0 in float32 and is held at 1 - 2^-24.
    lowest, highest = (unfmix32((unfmix32(t) - HIGH_WORD) & M32) for t in (0, M32))
    assert hash32(lowest) == 0 and hash32(highest) == M32
    u = routing.keyed_uniform(torch.tensor([lowest, highest]))
    assert u.tolist() == [to_f32(0.5 / 2**32), 1.0 - 2.0**-24]
    assert 0.0 < u.min() and u.max() < 1.0
    assert torch.isfinite(-torch.log(-torch.log(u))).all()  # the Gumbel draw's use


def test_every_salt_and_both_key_words_matter():
    keys = torch.arange(64)
    base = routing.keyed_uniform(keys, 1, 2, 3)
    others = [
        routing.keyed_uniform(keys, 9, 2, 3),  # seed
        routing.keyed_uniform(keys, 1, 9, 3),  # step
        routing.keyed_uniform(keys, 1, 2, 9),  # layer
        routing.keyed_uniform(keys, 2, 1, 3),  # the order of the salts
        routing.keyed_uniform(keys, 1, 2, 3, 0),  # one more salt, even 0
        routing.keyed_uniform(keys, 1, 2),  # one salt fewer
        routing.keyed_uniform(keys + 2**32, 1, 2, 3),  # the key's high word
    ]
    for other in others:
        assert (other != base).all()  # 64 fresh draws: no value repeats by chance
    # keyed_normal's tag changes its noise; the normal's two uniforms use salts 1 and 2.
    assert (routing.keyed_normal(keys, 1, 2, 3, 0x5EED)
            != routing.keyed_normal(keys, 1, 2, 3, 0x6B1)).all()
    u1 = routing.keyed_uniform(keys, 1, 2, 3, 1)
    u2 = routing.keyed_uniform(keys, 1, 2, 3, 2)
    torch.testing.assert_close(routing.keyed_normal(keys, 1, 2, 3),
                               torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2))
