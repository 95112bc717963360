"""sampler.sample_rows against references computed here, in plain Python: the allowed set and the
probabilities of temperature / top-k / top-p, the documented noise hash and race, batch invariance,
greedy rows, and rows with poison values. Every draw is a pure function of (logits, parameters,
seed, counter), so the frequency tests are deterministic: fixed draws, fixed counts."""

from __future__ import annotations

import math
import struct
from collections import Counter

import pytest
import torch

from parathinker.engine.sampler import SamplingTensors, _log1p_neg_uniform, sample_rows, uniform_bits

INF = float("inf")
M32 = 0xFFFFFFFF
LOGITS8 = [2.0, 1.0, 1.0, 0.5, 0.0, -1.0, -INF, -3.0]  # a tie (1, 2) and a banned token (6)


# ---- references -------------------------------------------------------------------------------

def fmix32(x: int) -> int:
    x ^= x >> 16
    x = x * 0x85EBCA6B & M32
    x ^= x >> 13
    x = x * 0xC2B2AE35 & M32
    return x ^ (x >> 16)


def reference_bits(seed: int, counter: int, v: int) -> int:
    """The module docstring's construction, in Python ints."""
    seed, counter = seed % 2**64, counter % 2**64
    words = (seed & M32, seed >> 32, counter & M32, counter >> 32)
    keys = []
    for start in (0x243F6A88, 0x85A308D3):
        for word in words:
            start = fmix32(start ^ word)
        keys.append(start)
    a = fmix32(v ^ 0x9E3779B9)
    return fmix32(((a * (keys[1] | 1)) & M32) ^ keys[0])


def reference_exp(bits: int) -> float:
    """E = -log1p(-u), u from the bits as documented (float32 rounding of the bits, clamp)."""
    as_f32 = struct.unpack("f", struct.pack("f", float(bits)))[0]
    return -math.log1p(-(min(as_f32, 2.0**32 - 256) + 0.5) * 2.0**-32)


def reference_probs(logits: list[float], temperature: float, top_p: float = 1.0,
                    top_k: int = 0) -> dict[int, float]:
    """The filtered distribution by the documented rules: top-k keeps values >= the k-th largest,
    top-p the smallest prefix by probability reaching top_p, ties at either boundary kept."""
    keep = [v for v, x in enumerate(logits) if x > -INF]
    if 0 < top_k < len(logits):
        kth = sorted(logits, reverse=True)[top_k - 1]
        keep = [v for v in keep if logits[v] >= kth]
    probs = _softmax({v: logits[v] / temperature for v in keep})
    if top_p < 1:
        mass = 0.0
        for v in sorted(keep, key=lambda v: -logits[v]):
            mass += probs[v]
            assert abs(mass - top_p) > 1e-4, "top_p too close to a prefix's mass for float32"
            if mass >= top_p:
                probs = _softmax({u: logits[u] / temperature for u in keep if logits[u] >= logits[v]})
                break
    return probs


def _softmax(scores: dict[int, float]) -> dict[int, float]:
    top = max(scores.values())
    weights = {v: math.exp(s - top) for v, s in scores.items()}
    total = sum(weights.values())
    return {v: w / total for v, w in weights.items()}


def chi2_sf(x: float, df: int) -> float:
    """P(chi-square with df degrees of freedom > x), closed forms for integer df."""
    half = x / 2
    if df % 2 == 0:
        return math.exp(-half) * sum(half**i / math.factorial(i) for i in range(df // 2))
    return math.erfc(math.sqrt(half)) + math.exp(-half) * sum(
        half ** (i - 0.5) / math.gamma(i + 0.5) for i in range(1, (df + 1) // 2))


def assert_follows(tokens: list[int], probs: dict[int, float], min_p_value: float = 1e-4) -> None:
    """Only allowed tokens, each one that should appear does, and a chi-square goodness of fit."""
    counts, n = Counter(tokens), len(tokens)
    assert set(counts) <= set(probs), f"drawn outside the allowed set: {set(counts) - set(probs)}"
    cells = [(counts[v], n * p) for v, p in probs.items() if n * p >= 5]
    rare = [(counts[v], n * p) for v, p in probs.items() if n * p < 5]
    if sum(e for _, e in rare) >= 5:
        cells.append((sum(o for o, _ in rare), sum(e for _, e in rare)))
    if len(cells) < 2:
        assert len(counts) == 1
        return
    stat = sum((o - e) ** 2 / e for o, e in cells)
    assert chi2_sf(stat, len(cells) - 1) > min_p_value, (stat, cells)


def draw(logits: list[float], temperature: float, top_p: float = 1.0, top_k: int = 0,
         n: int = 20000, seed: int = 0, counter_base: int = 0) -> list[int]:
    """n draws of one row: a batch of n copies with counters counter_base + 0..n-1."""
    rows = torch.tensor(logits, dtype=torch.float32).expand(n, len(logits)).contiguous()
    st = SamplingTensors.from_rows([temperature] * n, [top_p] * n, [top_k] * n, [seed] * n,
                                   [counter_base + i for i in range(n)], "cpu")
    return sample_rows(rows, st).tolist()


def sample_one(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, seed: int,
               counter: int) -> int:
    st = SamplingTensors.from_rows([temperature], [top_p], [top_k], [seed], [counter], "cpu")
    return sample_rows(logits[None].clone(), st).item()


# ---- the noise --------------------------------------------------------------------------------

def test_uniform_bits_are_the_documented_hash() -> None:
    seeds = [0, 1, 2**63 - 1, 2**62 + 5, -1, 123456789]
    counters = [0, (1 << 52) + 7, 1, 2**63 - 1, (3 << 32) + 2, 0]
    num_vocab = 97
    bits = uniform_bits(torch.tensor(seeds), torch.tensor(counters), num_vocab)
    assert bits.dtype == torch.int64 and bits.shape == (len(seeds), num_vocab)
    for r, (seed, counter) in enumerate(zip(seeds, counters)):
        assert bits[r].tolist() == [reference_bits(seed, counter, v) for v in range(num_vocab)]


def test_host_row_keys_give_the_documented_hash() -> None:
    """from_rows computes each row's keys on the host; the bits they give are the same hash."""
    seeds = [0, 1, 2**63 - 1, 2**62 + 5, -1, 123456789, 2**64 + 9]
    counters = [0, (1 << 52) + 7, 1, 2**63 - 1, (3 << 32) + 2, 0, -5]
    st = SamplingTensors.from_rows([1.0] * 7, [1.0] * 7, [0] * 7, seeds, counters, "cpu")
    assert st.keys is not None and st.keys.shape == (2, 7)
    bits = uniform_bits(st.seed, st.counter, 41, st.keys)
    for r, (seed, counter) in enumerate(zip(seeds, counters)):
        assert bits[r].tolist() == [reference_bits(seed, counter, v) for v in range(41)]
    rows = torch.tensor([5, 0])
    assert torch.equal(uniform_bits(st.seed[rows], st.counter[rows], 41, st.select(rows).keys),
                       bits[rows])


def test_seeds_and_counters_are_taken_mod_2_64() -> None:
    st = SamplingTensors.from_rows([1.0] * 4, [1.0] * 4, [0] * 4, [2**64 - 1, -1, 2**64 + 5, 5],
                                   [2**64 + 3, 3, 3, 3], "cpu")
    bits = uniform_bits(st.seed, st.counter, 50)
    assert torch.equal(bits[0], bits[1]) and torch.equal(bits[2], bits[3])
    assert not torch.equal(bits[1], bits[2])


def test_noise_extremes_stay_finite_and_nonzero() -> None:
    bits = torch.tensor([[0, 1, 2**24, 2**31, 2**32 - 385, 2**32 - 257, 2**32 - 129, 2**32 - 1]])
    noise = _log1p_neg_uniform(bits)  # -E
    assert noise.dtype == torch.float32
    assert bool(torch.isfinite(noise).all()) and bool((noise < 0).all())
    assert noise.min().item() >= -16.7 and noise[0, 0].item() == pytest.approx(-(2.0**-33), rel=1e-6)
    assert bool((noise[0, 1:] <= noise[0, :-1]).all())  # monotone in the bits


def test_the_draw_is_the_documented_race() -> None:
    """Each token is argmax over the allowed set of p / E, with E from the reference hash."""
    for temperature, top_p, top_k in [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.5, 1.0, 4)]:
        probs = reference_probs(LOGITS8, temperature, top_p, top_k)
        tokens = draw(LOGITS8, temperature, top_p, top_k, n=1500, seed=77, counter_base=1 << 32)
        for i, token in enumerate(tokens):
            race = {v: p / reference_exp(reference_bits(77, (1 << 32) + i, v)) for v, p in probs.items()}
            assert token == max(race, key=race.get), (temperature, top_p, top_k, i)


# ---- the distribution -------------------------------------------------------------------------

def test_allowed_sets_by_hand() -> None:
    assert set(reference_probs(LOGITS8, 1.0, top_k=2)) == {0, 1, 2}  # the tie at the k-th survives
    assert set(reference_probs(LOGITS8, 1.0, top_k=4)) == {0, 1, 2, 3}
    assert set(reference_probs(LOGITS8, 1.0, top_p=0.5)) == {0, 1, 2}  # 0.465 < 0.5, then a tie
    assert set(reference_probs(LOGITS8, 1.0, top_p=0.4)) == {0}
    # top-p on the top-k survivors renormalized (0.576 >= 0.5), not on the full softmax (0.465)
    assert set(reference_probs(LOGITS8, 1.0, top_p=0.5, top_k=3)) == {0}
    for top_k, top_p, allowed in [(2, 1.0, {0, 1, 2}), (4, 1.0, {0, 1, 2, 3}), (0, 0.5, {0, 1, 2}),
                                  (0, 0.4, {0}), (1, 1.0, {0}), (3, 0.5, {0}),
                                  (3, 0.7, {0, 1, 2})]:
        assert set(draw(LOGITS8, 1.0, top_p, top_k, n=3000)) == allowed, (top_k, top_p)


@pytest.mark.parametrize("temperature,top_p,top_k", [
    (1.0, 1.0, 0), (1.0, 1.0, 2), (1.0, 1.0, 3), (1.0, 1.0, 4), (1.0, 1.0, 8), (1.0, 1.0, 10**9),
    (1.0, 0.5, 0), (1.0, 0.5, 3), (1.0, 0.8, 0), (1.0, 0.95, 0), (0.7, 0.9, 0), (1.5, 0.8, 5), (2.0, 0.7, 3),
    (0.5, 0.99, 6),
])
def test_top_k_top_p_follow_the_renormalized_probabilities(temperature, top_p, top_k) -> None:
    assert_follows(draw(LOGITS8, temperature, top_p, top_k), reference_probs(LOGITS8, temperature,
                                                                             top_p, top_k))


@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0, 50.0])
def test_temperature_follows_softmax_of_logits_over_t(temperature) -> None:
    logits = [3.1, 2.0, 1.7, 0.4, 0.0, -0.5, -1.2, -2.0, 0.9, 1.3]
    assert_follows(draw(logits, temperature, seed=5), reference_probs(logits, temperature))


def test_huge_temperature_is_uniform_over_the_allowed_tokens() -> None:
    tokens = draw(LOGITS8, 3.5e38, seed=9)
    assert_follows(tokens, {v: 1 / 7 for v in range(8) if v != 6})


# ---- determinism and independence -------------------------------------------------------------

def _pairs_follow_product(first: list[int], second: list[int], probs: dict[int, float]) -> None:
    joint = [a * 100 + b for a, b in zip(first, second)]
    assert_follows(joint, {a * 100 + b: pa * pb for a, pa in probs.items() for b, pb in probs.items()})


def test_counters_and_seeds_give_independent_draws() -> None:
    logits = [0.5, 0.0, -0.3, 0.2]
    probs = reference_probs(logits, 1.0)
    n = 16000
    rows = torch.tensor(logits).expand(n, 4).contiguous()

    def tokens(seeds: list[int], counters: list[int]) -> list[int]:
        st = SamplingTensors.from_rows([1.0] * n, [1.0] * n, [0] * n, seeds, counters, "cpu")
        return sample_rows(rows, st).tolist()

    seeds = list(range(n))
    base = tokens(seeds, [0] * n)
    assert tokens(seeds, [0] * n) == base  # same (seed, counter), same token
    _pairs_follow_product(base, tokens(seeds, [1] * n), probs)  # the next counter
    _pairs_follow_product(base, tokens([s + n for s in seeds], [0] * n), probs)  # another seed
    # the engine's counters: (stream << 32) + index, path k as stream k
    path1 = tokens(seeds, [(1 << 32) + 5] * n)
    _pairs_follow_product(path1, tokens(seeds, [(2 << 32) + 5] * n), probs)
    _pairs_follow_product(path1, tokens(seeds, [(1 << 32) + 6] * n), probs)


ROWS8 = [  # (temperature, top_p, top_k, seed, counter): eight different kinds of row
    (0.0, 1.0, 0, 1, 0), (0.7, 1.0, 0, 2, 5), (1.0, 0.9, 0, 3, 7), (1.3, 1.0, 50, 4, 1 << 32),
    (0.5, 0.5, 5, 5, 9), (3.5e38, 1.0, 0, 6, 11), (1.0, 5e-324, 0, 7, 13), (1e-30, 0.95, 20, 8, 2),
]


def _batch(logits: torch.Tensor, rows: list[tuple], counter_shift: int = 0) -> list[int]:
    cols = list(zip(*rows))
    st = SamplingTensors.from_rows(list(cols[0]), list(cols[1]), list(cols[2]), list(cols[3]),
                                   [c + counter_shift for c in cols[4]], "cpu")
    return sample_rows(logits.clone(), st).tolist()


def test_a_row_alone_equals_the_row_in_any_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 151936, generator=gen) * 2  # [R, V]
    logits[:, :100] = -INF  # banned tokens
    logits[3, 200:260] = 10.0  # a tie far wider than top_k on row 3
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    for shift in (0, 1):
        in_batch = _batch(logits, ROWS8, shift)
        permuted = _batch(logits[order], [ROWS8[i] for i in order], shift)
        assert [permuted[order.index(i)] for i in range(8)] == in_batch
        for i, (t, p, k, s, c) in enumerate(ROWS8):
            assert sample_one(logits[i], t, p, k, s, c + shift) == in_batch[i], i
        assert all(token >= 100 for token in in_batch) and 200 <= in_batch[3] < 260
        for r in (0, 6, 7):  # greedy, top_p 0 in float32, T = 1e-30: the top token
            assert in_batch[r] == int(logits[r].argmax()), r


def test_fast_paths_equal_the_full_computation() -> None:
    """from_rows's flags skip work (argmax only, no sort); the defaults do it all: same tokens."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5000, generator=gen)
    for temperature, top_p, top_k in [([0.0] * 6, [1.0] * 6, [0] * 6), ([0.8] * 6, [1.0] * 6, [0] * 6),
                                      ([0.8, 0.0] * 3, [1.0, 0.9] * 3, [0, 7] * 3),
                                      ([0.8] * 6, [1.0] * 6, [9] * 6)]:
        st = SamplingTensors.from_rows(temperature, top_p, top_k, list(range(6)), [3] * 6, "cpu")
        full = SamplingTensors(st.temperature, st.top_p, st.top_k, st.seed, st.counter)
        assert sample_rows(logits, st).tolist() == sample_rows(logits, full).tolist()


# ---- greedy -----------------------------------------------------------------------------------

def test_greedy_rows_are_argmax_among_sampled_rows() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 300, generator=gen)
    logits[0, [10, 20, 30]] = 9.0  # ties: the lowest id
    logits[2, [40, 50]] = 9.0
    temperature = [0.0, 1.0, 1e-300, 0.9, 0.0, 1.2]  # 1e-300 is 0 in float32: greedy
    st = SamplingTensors.from_rows(temperature, [0.3, 1.0, 1.0, 0.8, 1.0, 1.0], [5, 0, 0, 0, 2, 0],
                                   list(range(6)), [4] * 6, "cpu")
    tokens = sample_rows(logits.clone(), st).tolist()
    for r in (0, 2, 4):
        assert tokens[r] == int(logits[r].argmax())
    assert tokens[0] == 10 and tokens[2] == 40
    for r in (1, 3, 5):
        assert tokens[r] == sample_one(logits[r], temperature[r], float(st.top_p[r]), 0, r, 4)
    assert sample_rows(logits, SamplingTensors.from_rows([0.0] * 6, [1.0] * 6, [0] * 6, [0] * 6,
                                                         [0] * 6, "cpu")).tolist() == \
        logits.argmax(-1).tolist()


# ---- poison -----------------------------------------------------------------------------------

def test_poison_rows_return_valid_ids_and_leave_the_others_alone() -> None:
    num_vocab = 1000
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(13, num_vocab, generator=gen) * 3
    logits[:, :10] = -INF
    logits[6, [11, 500, 900]] = float("nan")
    logits[7] = -INF
    logits[8] = float("nan")
    logits[9, [300, 301]] = INF
    logits[10] = -INF
    logits[10, 777] = 0.0
    logits[11, ::2] = 3e38
    logits[11, 1::2] = -3e38
    rows = [  # (temperature, top_p, top_k)
        (0.8, 0.9, 0), (3.5e38, 1.0, 0), (1.4e-45, 1.0, 0), (1e-300, 1.0, 0), (1.0, 5e-324, 0),
        (1.0, 1.0, 10**30), (1.0, 0.9, 0), (1.0, 0.9, 3), (0.7, 1.0, 0), (1.0, 1.0, 0),
        (1.0, 0.3, 1), (1e-5, 1.0, 0), (3.5e38, 5e-324, 10**30),
    ]
    num_rows = len(rows)
    for counter in range(20):
        cols = list(zip(*rows))
        st = SamplingTensors.from_rows(list(cols[0]), list(cols[1]), list(cols[2]),
                                       list(range(num_rows)), [counter] * num_rows, "cpu")
        tokens = sample_rows(logits.clone(), st).tolist()
        assert all(0 <= t < num_vocab for t in tokens)
        assert tokens[0] == sample_one(logits[0], 0.8, 0.9, 0, 0, counter)  # untouched by the rest
        assert 10 <= tokens[1] and 10 <= tokens[5]
        for r in (2, 3, 4, 12):  # tiny T, T = 0 in float32, top_p = 0 in float32: the top token
            assert tokens[r] == int(logits[r].argmax()), r
        assert tokens[9] in (300, 301) and tokens[10] == 777
        assert tokens[11] % 2 == 0


def test_nothing_is_read_back_to_the_host() -> None:
    """The meta device holds no data: a step that ran a per-row loop over values, or read a
    tensor back to decide what to do, would fail here."""
    st = SamplingTensors.from_rows([0.7, 0.0, 1.0], [0.9, 1.0, 0.5], [0, 3, 7], [1, 2, 3], [4, 5, 6],
                                   "meta")
    tokens = sample_rows(torch.empty(3, 1000, device="meta"), st)
    assert tokens.shape == (3,) and tokens.dtype == torch.int64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_the_cpu_tokens() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(64, 151936, generator=gen) * 2
    rows = [ROWS8[i % 8] for i in range(64)]
    cols = list(zip(*rows))
    args = (list(cols[0]), list(cols[1]), list(cols[2]), list(range(64)), list(cols[4]))
    cpu = sample_rows(logits.clone(), SamplingTensors.from_rows(*args, "cpu"))
    cuda = sample_rows(logits.cuda(), SamplingTensors.from_rows(*args, "cuda"))
    st = SamplingTensors.from_rows(*args, "cuda")
    assert torch.equal(uniform_bits(st.seed, st.counter, 1000).cpu(),
                       uniform_bits(st.seed.cpu(), st.counter.cpu(), 1000))
    assert cuda.device.type == "cuda" and cuda.cpu().tolist() == cpu.tolist()
