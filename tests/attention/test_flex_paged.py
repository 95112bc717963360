"""The flex backend (FlexAttention over the paged pool, `parathinker.attention.flex_paged`) against
the gathered backend on the same pool and metadata.

CPU: the block mask evaluated in plain torch against the visibility rule (no compile; > 64
sequences, arbitrary runs), then compiled flex_attention vs the gathered backend, float32 (one compile:
every batch below pads to the same shapes). GPU (marked `gpu`, skipped without CUDA): the same
comparison in float32 and bfloat16, through both FlexAttention kernels (decoding and prefill).
"""

import random

import pytest
import torch

from parathinker.attention.paged import backend_for
from parathinker.attention.pool import PagedKVCache, runs_of

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def engine_batch(rng, num_slots, block_size=16, prompt_len=41, path_lens=(20, 7, 33, 18),
                 summary_len=19, chunk=(64, 32), lone=150):
    """Contexts laid out as the engine lays them: whole blocks taken from a shuffled pool, each
    sequence's last block partial. Returns query_lens, contexts (lists of slots).

    The prompt's last block is partial and shared by every path; the paths decode one token,
    the last one adds a chunk of 5; the summary prefills 19 tokens over prompt + every path (partial
    blocks in the middle of its context); a prompt prefills its second chunk; a lone request
    with a longer context decodes."""
    blocks = list(range(num_slots // block_size))
    rng.shuffle(blocks)

    def own(n):
        out = []
        for _ in range(-(-n // block_size)):
            b = blocks.pop()
            out += range(b * block_size, (b + 1) * block_size)
        return out[:n]

    prompt = own(prompt_len)
    paths = [own(n) for n in path_lens]
    summary = own(summary_len)
    first, second = chunk
    chunked = own(first + second)
    query_lens = [1] * (len(paths) - 1) + [5, summary_len, second, 1]
    contexts = [prompt + p for p in paths] + [prompt + sum(paths, []) + summary, chunked,
                                              own(lone)]
    return query_lens, contexts


def arbitrary_batch(rng, num_slots, num_seqs=7, max_q=32):
    """Runs of any length at any slot, pages shared in part by several sequences, contexts that
    read other sequences' new tokens; new tokens distinct across sequences (written once)."""
    slots = list(range(num_slots))
    rng.shuffle(slots)
    fresh = slots[: num_seqs * max_q]  # new-token slots, disjoint between sequences
    written = set(fresh)
    old = slots[num_seqs * max_q // 2:]  # the rest of a context: may hold others' new tokens
    query_lens, contexts = [], []
    for s in range(num_seqs):
        q = max_q if s == 0 else rng.choice([1, 1, 2, 7, max_q])
        a = rng.randrange(num_slots - 60)
        ctx = list(range(a, a + rng.randrange(1, 60)))  # one run starting mid-page
        ctx += rng.sample([x for x in old if x not in ctx], rng.randrange(0, 120))
        new = fresh[s * max_q: s * max_q + q]
        a = rng.randrange(7, num_slots - q - 1, 16)
        if s % 2 and not written & set(range(a, a + q)):  # one consecutive run from mid-page
            new = list(range(a, a + q))
            written |= set(new)
        query_lens.append(q)
        contexts.append([x for x in ctx if x not in new] + new)
    return query_lens, contexts


def random_pool(num_slots, hkv, d, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    cache = PagedKVCache.allocate(1, num_slots, hkv, d, torch.float32, "cpu")
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    return PagedKVCache(cache.k.to(device, dtype), cache.v.to(device, dtype))


def compare(query_lens, contexts, cache, hq, dtype, device, seed, atol):
    """Flex (in dtype) vs the reference (float32 on the same values): max abs difference."""
    torch.manual_seed(seed)
    n, hkv, d = sum(query_lens), cache.k.shape[1], cache.k.shape[3]
    q = torch.randn(1, n, hq, d).to(device, dtype)
    k, v = torch.randn(1, n, hkv, d).to(device, dtype), torch.randn(1, n, hkv, d).to(device, dtype)
    runs = [runs_of(c) for c in contexts]
    ref_cache = PagedKVCache(cache.k.float(), cache.v.float())
    meta = backend_for("gathered", device).build_metadata(query_lens, runs, device)
    expected = meta.attend(0, q.float(), k.float(), v.float(), ref_cache)
    meta = backend_for("flex", device).build_metadata(query_lens, runs, device)
    out = meta.attend(0, q, k, v, cache)
    assert out.shape == expected.shape and out.dtype == dtype
    assert torch.equal(cache.k.float(), ref_cache.k)  # both wrote the same new K/V
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=atol)


def dense_visibility(block_mask, num_slots):
    """[S_pad, Q*G, num_slots] bool: what the kernel lets each query row read."""
    s, _, num_q_blocks, _ = block_mask.kv_indices.shape
    q_block, kv_block = block_mask.BLOCK_SIZE
    rows = block_mask.seq_lengths[0]
    num_pages = -(-num_slots // kv_block)

    def pages(num, idx):  # [S, QB, num_pages] bool
        listed = torch.arange(idx.shape[-1]) < num[:, 0, :, None]
        out = torch.zeros(s, num_q_blocks, num_pages + 1, dtype=torch.bool)
        return out.scatter_(2, torch.where(listed, idx[:, 0].long(), num_pages), listed)[..., :-1]

    masked = pages(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = pages(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    assert not (masked & full).any()  # a page is read once
    row_block = torch.arange(rows) // q_block
    page = torch.arange(num_slots) // kv_block
    masked, full = masked[:, row_block][:, :, page], full[:, row_block][:, :, page]
    b = torch.arange(s)[:, None, None]
    mod = block_mask.mask_mod(b, torch.zeros_like(b), torch.arange(rows)[None, :, None],
                              torch.arange(num_slots)[None, None, :])
    return full | (masked & mod)


def test_block_mask_is_the_visibility_rule():
    """The block mask, as the kernel reads it (page lists + mask_mod), equals the rule: query t
    of sequence b sees its context except its own new tokens after t. 70 sequences (two words of
    member bits), arbitrary runs, decode rows and chunks, one engine-like batch among them."""
    rng = random.Random(1)
    num_slots, g = 2000, 3
    query_lens, contexts = arbitrary_batch(rng, num_slots, num_seqs=66, max_q=8)
    ql, ctx = engine_batch(rng, num_slots, chunk=(40, 8))
    # The engine batch's pool is the same range: keep its slots away from the others' new tokens.
    taken = {x for c, q in zip(contexts, query_lens) for x in c[-q:]}
    for q, c in zip(ql, ctx):
        if not taken & set(c[-q:]):
            query_lens.append(q)
            contexts.append(c)
            taken |= set(c[-q:])
    assert len(contexts) > 66  # some of the engine batch too
    meta = backend_for("flex", "cpu").build_metadata(query_lens, [runs_of(c) for c in contexts], "cpu")
    st = meta.state
    got = dense_visibility(st.block_mask(g, num_slots), num_slots)
    want = torch.zeros_like(got)
    for s, (q, c) in enumerate(zip(query_lens, contexts)):
        for t in range(q):
            seen = c[: len(c) - q + t + 1]
            want[s, t * g:(t + 1) * g, seen] = True
        # padded query rows of a live sequence are never read back
        got[s, q * g:] = False
    assert torch.equal(got, want)
    # every sequence's tokens land in its own rows, in order
    rows = st.out_index.tolist()
    assert rows == [s * st.num_q + t for s, q in enumerate(query_lens) for t in range(q)]


def test_pages_are_full_where_no_mask_is_needed():
    """A long decode context is almost all full blocks (read with no mask_mod): only its partial
    last page is masked; a chunk's pages holding its own new tokens are masked."""
    runs = [(0, 16 * 50), (16 * 60, 20)]  # 50 whole pages, then a partial two-page run
    chunk = [(16 * 70, 48)]  # three whole pages; its 20 new tokens are in the last two
    meta = backend_for("flex", "cpu").build_metadata([1, 20], [runs, chunk], "cpu")
    st = meta.state
    assert st.full_kv_num_blocks.tolist()[:2] == [51, 1]
    assert st.kv_num_blocks.tolist()[:2] == [1, 2]
    assert sorted(st.full_kv_indices[0, :51].tolist()) == list(range(50)) + [60]
    assert st.kv_indices[0, 0].item() == 61
    assert st.full_kv_indices[1, 0].item() == 70
    assert sorted(st.kv_indices[1, :2].tolist()) == [71, 72]


def test_flex_matches_reference_cpu():
    """Compiled flex vs the gathered backend, float32: the engine's layout and arbitrary runs, then a
    step with the same padded shapes reuses the compiled kernel."""
    from torch._dynamo.utils import counters

    rng = random.Random(0)
    num_slots, hq, hkv, d = 16 * 48 - 5, 6, 2, 16  # pool not a whole number of pages
    cache = random_pool(num_slots, hkv, d, torch.float32, "cpu", seed=0)
    query_lens, contexts = engine_batch(rng, num_slots)
    compare(query_lens, contexts, cache, hq, torch.float32, "cpu", seed=1, atol=2e-6)
    graphs = counters["stats"]["unique_graphs"]
    query_lens, contexts = arbitrary_batch(rng, num_slots)  # same buckets: S 8, Q 32, pages 64
    compare(query_lens, contexts, cache, hq, torch.float32, "cpu", seed=2, atol=2e-6)
    assert counters["stats"]["unique_graphs"] == graphs


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_matches_reference_cuda(dtype):
    """On CUDA, at the 1.5B shape (Hq 12, Hkv 2, D 128): a mixed batch whose longest chunk has
    64 tokens (384 folded rows: the prefill kernel), then a decode batch of 8 paths over a
    shared 1K prompt with 2-3K tokens each (the decoding kernel)."""
    rng = random.Random(0)
    num_slots, hq, hkv, d = 16 * 4096, 12, 2, 128
    atol = 1e-4 if dtype == torch.float32 else 2e-2
    cache = random_pool(num_slots, hkv, d, dtype, "cuda", seed=0)
    query_lens, contexts = engine_batch(rng, num_slots, chunk=(300, 64), lone=5000)
    compare(query_lens, contexts, cache, hq, dtype, "cuda", seed=1, atol=atol)
    path_lens = [rng.randrange(2000, 3000) for _ in range(8)]
    _, contexts = engine_batch(rng, num_slots, prompt_len=1000, path_lens=path_lens)
    compare([1] * 8, contexts[:8], cache, hq, dtype, "cuda", seed=2, atol=atol)
