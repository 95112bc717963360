"""Token choice from logits: per-row temperature (0 = greedy), top-k, top-p, and counter-based noise.

`sample_rows(logits, SamplingTensors.from_rows(...))` samples every row of a step in one batched
computation on the logits' device. The noise of a row is a pure function of its request's seed and
a counter (unique per token the request draws), so a seeded request draws the same tokens alone,
in any batch, after preemption, on CPU and on CUDA (given the same logits).

The noise, exactly (all integer ops in int64, every product kept inside int64, see `_fmix32`):
  fmix32(x)       murmur3's 32-bit finalizer: x ^= x>>16; x *= 0x85ebca6b; x ^= x>>13;
                  x *= 0xc2b2ae35; x ^= x>>16 (products mod 2^32)
  a[v]            fmix32(v ^ 0x9e3779b9), for vocabulary entry v (a bijection of v)
  k0[r], k1[r]    fmix32 chains absorbing the words (seed lo, seed hi, counter lo, counter hi),
                  started from 0x243f6a88 and 0x85a308d3: k = fmix32(k ^ word) per word
  bits[r, v]      fmix32(((a[v] * (k1[r] | 1)) mod 2^32) ^ k0[r])        (32 bits)
  u[r, v]         (float32(bits) + 0.5) * 2^-32, clamped to 1 - 2^-24     (float32, in (0, 1))
  E[r, v]         -log1p(-u), an Exp(1) variable
  token[r]        argmax over v of p[r, v] / E[r, v]     (the exponential race, = Gumbel-max:
                  argmax log p - log E; computed as argmin of exp(x) / log1p(-u), x = scaled logits)
Seeds and counters are taken mod 2^64 (both 32-bit halves are used; the row key is 64 bits, so
two (seed, counter) pairs share noise with probability ~2^-64). torch's Philox is not used: it is
keyed per generator (one seed and offset per call), with no documented per-row key.

Precision: u has all 32 bits where it decides the race (small u, small E: exact for u < 2^-8),
24 significant bits above. E lies in [1.2e-10, 16.6], so a token whose probability is below
7e-12 x the row's top probability can never be drawn (at most ~1e-6 of mass for V = 151936);
otherwise the draw follows the filtered softmax to float32 rounding. Bits are identical on every
device; log1p/exp/division may differ by an ulp between CPU and CUDA, which changes the token only
when the two best candidates are within ~1e-7 relative (rare, not never). Top-p's cumulative sum is
float32, so a top_p within rounding of a prefix's mass may cut one place differently per device.

Filtering (per row, after temperature): x = (logits - max) / T. top-k keeps every token whose x is
>= the k-th largest (ties at the boundary all survive; k = 0 or k >= V is off). top-p then keeps
the smallest prefix of the top-k survivors sorted by probability whose mass reaches top_p, as a
threshold too: every token tied with the last one kept survives; the top token always survives
(top_p <= 0, e.g. 5e-324 rounded to float32, keeps the top token and its ties). Temperature <= 0
(or NaN, or a positive value that rounds to 0 in float32) is greedy: torch.argmax of the raw logits
(ties -> lowest id). A temperature above float32's range is clamped to its largest value.
Robustness: rows never mix, nothing is data-dependent on the host, and a row whose logits are all
-inf or hold NaN still returns an id in [0, V) (which one is unspecified).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, replace

import torch

from parathinker.spec.tokens import ControlTokens

_MASK32 = 0xFFFFFFFF
# murmur3 fmix32 multipliers as the signed values congruent to them mod 2^32: a 32-bit x times one
# stays inside int64 (|x * c| < 2^63), so masking the product gives x * c mod 2^32 exactly.
_FMIX_C1 = 0x85EBCA6B - (1 << 32)
_FMIX_C2 = 0xC2B2AE35 - (1 << 32)
_VOCAB_SALT = 0x9E3779B9
_KEY_STARTS = (0x243F6A88, 0x85A308D3)
_FLOAT32_MAX = torch.finfo(torch.float32).max
SEED_BITS = 63


class LogitMasks:
    """Bans the tokens SPEC §5 forbids, on [R, V] float32 logits, in place."""

    def __init__(self, ctrl: ControlTokens, device: torch.device | str) -> None:
        self.path_banned = torch.tensor(ctrl.path_banned_ids(), device=device)
        self.path_end = torch.tensor(ctrl.path_end_ids(), device=device)
        self.summary_banned = torch.tensor(ctrl.summary_banned_ids(), device=device)

    def rows(self, logits: torch.Tensor, masks: list[str | None], can_end: list[bool]
             ) -> torch.Tensor:
        """Row r gets mask masks[r]: "path" (and every end token too where can_end[r] is
        False), "summary", or None (nothing banned)."""
        for banned, rows in ((self.path_banned, [r for r, m in enumerate(masks) if m == "path"]),
                             (self.path_end, [r for r, m in enumerate(masks)
                                              if m == "path" and not can_end[r]]),
                             (self.summary_banned, [r for r, m in enumerate(masks) if m == "summary"])):
            if rows:
                if len(rows) == logits.shape[0]:
                    logits[:, banned] = float("-inf")
                else:
                    where = torch.tensor(rows, device=logits.device)
                    logits[where[:, None], banned[None, :]] = float("-inf")
        return logits

    def paths(self, logits: torch.Tensor, can_end: list[bool]) -> torch.Tensor:
        """One row per path to sample; rows with can_end False also lose every end token."""
        return self.rows(logits, ["path"] * len(can_end), can_end)

    def summary(self, logits: torch.Tensor) -> torch.Tensor:
        return self.rows(logits, ["summary"] * logits.shape[0], [True] * logits.shape[0])


@dataclass
class SamplingTensors:
    """One row per sequence to sample, all on the logits' device.

    The flags are host-side hints set by `from_rows` so a step can skip work without reading the
    device; their defaults do every part, which is correct for any values."""

    temperature: torch.Tensor  # [R] float32, <= 0 = greedy
    top_p: torch.Tensor  # [R] float32, >= 1 = off
    top_k: torch.Tensor  # [R] int64, 0 (or >= V) = off
    seed: torch.Tensor  # [R] int64, the request's seed (its 64 bits)
    counter: torch.Tensor  # [R] int64, unique per token drawn within a request
    keys: torch.Tensor | None = None  # [2, R] int64, the rows' k0, k1; None: computed from seed
    is_all_greedy: bool = False
    has_greedy: bool = True
    has_top_k: bool = True
    has_top_p: bool = True

    @classmethod
    def from_rows(cls, temperature: list[float], top_p: list[float], top_k: list[int],
                  seed: list[int], counter: list[int],
                  device: torch.device | str) -> SamplingTensors:
        num_rows = len(temperature)
        if not num_rows == len(top_p) == len(top_k) == len(seed) == len(counter):
            raise ValueError("temperature, top_p, top_k, seed and counter need one value per row")
        # float64 first: a value past float32's range becomes its largest value, not an error.
        floats = torch.tensor([temperature, top_p], dtype=torch.float64).reshape(2, num_rows)
        floats = floats.clamp(max=_FLOAT32_MAX).to(torch.float32)
        seed, counter = [_wrap_int64(s) for s in seed], [_wrap_int64(c) for c in counter]
        keys = [_row_keys_host(s, c) for s, c in zip(seed, counter)]  # on the host: no device ops
        ints = torch.tensor([[max(0, min(int(k), 1 << 62)) for k in top_k], seed, counter,
                             [k[0] for k in keys], [k[1] for k in keys]],
                            dtype=torch.int64).reshape(5, num_rows)
        is_greedy = ~(floats[0] > 0)  # on the host still: a value that rounded to 0 is greedy
        flags = dict(is_all_greedy=bool(is_greedy.all()), has_greedy=bool(is_greedy.any()),
                     has_top_k=bool((ints[0] > 0).any()), has_top_p=bool((~(floats[1] >= 1)).any()))
        floats, ints = floats.to(device), ints.to(device)
        return cls(floats[0], floats[1], ints[0], ints[1], ints[2], ints[3:5], **flags)

    def select(self, rows: torch.Tensor) -> SamplingTensors:
        """These rows only ([R'] indices); the host flags stay the whole set's (still correct)."""
        return replace(self, temperature=self.temperature[rows], top_p=self.top_p[rows],
                       top_k=self.top_k[rows], seed=self.seed[rows], counter=self.counter[rows],
                       keys=None if self.keys is None else self.keys[:, rows])


def sample_rows(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """logits [R, V] float32 (banned tokens already -inf) -> token ids [R] int64 on the same
    device, in one batched computation (no per-row loop, nothing read back to the host)."""
    if st.is_all_greedy:
        return logits.argmax(-1)
    weights = filtered_logits(logits, st).exp_()  # p up to each row's normalization; 0 for
    # banned and filtered tokens. weights / log1p(-u) = -p / E: its argmin is the race's winner.
    noise = _log1p_neg_uniform(uniform_bits(st.seed, st.counter, logits.shape[-1], st.keys))
    token = weights.div_(noise).argmin(-1)
    if st.has_greedy:
        token = torch.where(~(st.temperature.float() > 0), logits.argmax(-1), token)
    return token


def filtered_logits(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """The one filter chain of sampling and logprobs: logits [R, V] -> x [R, V] float32, a new
    tensor: (logits - max) / T (T = 1 on a greedy row), then every token below the row's top-k /
    top-p threshold set to -inf. exp(x) is each row's distribution up to its normalization."""
    temperature = st.temperature.float()
    temperature = torch.where(~(temperature > 0), 1.0, temperature).clamp(max=_FLOAT32_MAX)
    # (logits - max) / T lies in [-inf, 0] with the top token at 0: a tiny T sends the others to
    # -inf instead of overflowing to +inf, a huge T flattens towards uniform; never inf - inf.
    logits = logits.float()
    x = logits - logits.amax(-1, keepdim=True)  # [R, V]
    x.div_(temperature[:, None])
    if st.has_top_k or st.has_top_p:
        x.masked_fill_(x < _filter_threshold(x, st), float("-inf"))
    return x


def _filter_threshold(x: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """[R, 1] value below which a row's scaled logits x [R, V] are dropped by top-k then top-p."""
    num_vocab = x.shape[-1]
    ordered = x.sort(dim=-1, descending=True).values  # [R, V]
    k = st.top_k.clamp(min=0)
    k = torch.where((k == 0) | (k >= num_vocab), num_vocab, k)
    threshold = ordered.gather(1, (k - 1)[:, None])  # the k-th largest; ties with it survive
    if not st.has_top_p:
        return threshold
    ordered.masked_fill_(ordered < threshold, float("-inf"))
    mass = ordered.softmax(-1).cumsum_(-1)  # [R, V], the top-k survivors renormalized
    top_p = st.top_p.float()[:, None]
    # The smallest prefix whose mass reaches top_p: every place whose mass before it is below
    # top_p. The first place is always kept (top_p <= 0 or NaN keeps only it).
    num_kept = 1 + (mass[:, :-1] < top_p).sum(-1, keepdim=True)  # [R, 1] in 1..V
    threshold_p = ordered.gather(1, num_kept - 1)
    threshold_p = torch.where(top_p >= 1, float("-inf"), threshold_p)
    # A top_p past the float32 mass of every survivor lands on a top-k-dropped place (-inf).
    return torch.maximum(threshold, threshold_p)


def uniform_bits(seed: torch.Tensor, counter: torch.Tensor, num_vocab: int,
                 keys: torch.Tensor | None = None) -> torch.Tensor:
    """bits [R, V] int64 in [0, 2^32): the noise words of the module docstring, for seed [R] and
    counter [R] (int64, read as their 64-bit patterns); `keys` [2, R]: their k0, k1 if known."""
    k0, k1 = _row_keys(seed, counter) if keys is None else keys
    # k1 | 1 as the signed value congruent to it mod 2^32, so a[v] * m stays inside int64.
    multiplier = ((k1 | 1) ^ 0x80000000) - 0x80000000
    bits = _vocab_words(num_vocab, seed.device)[None, :] * multiplier[:, None]  # [R, V]
    bits.bitwise_and_(_MASK32).bitwise_xor_(k0[:, None])
    return _fmix32_(bits)


def _log1p_neg_uniform(bits: torch.Tensor) -> torch.Tensor:
    """bits [R, V] -> log1p(-u) = -E [R, V] float32, in [-16.7, -1.1e-10]: never 0, never -inf."""
    u = bits.to(torch.float32)
    u.clamp_(max=2.0**32 - 256)  # float32 rounds the top 128 words up to 2^32, i.e. u = 1
    # -u = -(bits + 0.5) * 2^-32: the power-of-two scale is exact, so one rounding, on any device.
    torch.add(-(2.0**-33), u, alpha=-(2.0**-32), out=u)
    return u.log1p_()


def _row_keys(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """k0, k1 [2, R] int64 of rows given as tensors (from_rows ships them already), on the host:
    `_row_keys_host` is the one statement of the key hash."""
    keys = [_row_keys_host(s, c) for s, c in zip(seed.tolist(), counter.tolist())]
    return torch.tensor(keys, dtype=torch.int64).reshape(-1, 2).T.to(seed.device)


def _row_keys_host(seed: int, counter: int) -> tuple[int, int]:
    """k0, k1 of one row (the module docstring's fmix32 chains over seed lo, seed hi, counter lo,
    counter hi), in Python: from_rows ships them with the row's ints, no device op per step."""
    keys = list(_KEY_STARTS)
    for word in (seed & _MASK32, (seed >> 32) & _MASK32, counter & _MASK32, (counter >> 32) & _MASK32):
        for i, k in enumerate(keys):
            k ^= word
            k ^= k >> 16
            k = (k * 0x85EBCA6B) & _MASK32
            k ^= k >> 13
            k = (k * 0xC2B2AE35) & _MASK32
            keys[i] = k ^ (k >> 16)
    return keys[0], keys[1]


@functools.lru_cache(maxsize=8)
def _vocab_words(num_vocab: int, device: torch.device) -> torch.Tensor:
    """a[v] [V] int64: each vocabulary entry's own 32-bit word (a constant, so cached)."""
    return _fmix32_(torch.arange(num_vocab, dtype=torch.int64, device=device) ^ _VOCAB_SALT)


def _fmix32_(x: torch.Tensor) -> torch.Tensor:
    """murmur3's finalizer on int64 values in [0, 2^32), in place."""
    shifted = torch.empty_like(x)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=shifted))
    x.mul_(_FMIX_C1).bitwise_and_(_MASK32)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 13, out=shifted))
    x.mul_(_FMIX_C2).bitwise_and_(_MASK32)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=shifted))
    return x


def resolve_seed(seed: int | None) -> int:
    """A request's sampling seed: its own (mod 2^63), or a random one when it has none."""
    return random.getrandbits(SEED_BITS) if seed is None else seed % (1 << SEED_BITS)


def _wrap_int64(value: int) -> int:
    """An int's low 64 bits as a signed int64 (seeds and counters are taken mod 2^64)."""
    return ((int(value) + (1 << 63)) % (1 << 64)) - (1 << 63)


def logprobs_rows(logits: torch.Tensor, st: SamplingTensors, tokens: torch.Tensor,
                  num_top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under the distribution each row was sampled from (`filtered_logits`,
    the chain `sample_rows` draws from: banned tokens already -inf in `logits`, then
    temperature, top-k and top-p, renormalized).
    A greedy row reports temperature 1 (its filters still apply), whose top token is the one
    chosen. -> (logprob of `tokens` [R], top `num_top` ids [R, k] and logprobs [R, k]), on the
    logits' device; a token the filters dropped has -inf."""
    logprobs = filtered_logits(logits, st).log_softmax(-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    top = logprobs.topk(min(num_top, logprobs.shape[-1]), dim=-1)
    return chosen, top.indices, top.values
