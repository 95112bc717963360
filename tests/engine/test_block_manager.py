"""BlockManager placement under serving churn: new extents stay in the pool's low end, so the
blocks ever written (on CPU: the pool's pages backed by memory) follow the peak use, not the
pool's size (issue 22: the server's RSS grew round after round with a 4 GiB pool)."""

import random

from parathinker.engine.block_manager import BlockManager
from parathinker.engine.request import Seq


def churn(bm: BlockManager, num_requests: int, concurrent: int, seed: int = 0) -> set[int]:
    """Requests of a 40-token prompt and 4 paths decoding in lockstep for 100-200 tokens, at most
    `concurrent` at once, each freed when it ends; -> every block ever handed out."""
    rng = random.Random(seed)
    touched: set[int] = set()
    live: list[tuple[list[Seq], list[int]]] = []
    started = 0
    while started < num_requests or live:
        while len(live) < concurrent and started < num_requests:
            prompt = Seq([1] * 40, 0, 0)
            prompt.place(bm)
            live.append(([prompt] + [Seq([], k + 1, 40) for k in range(4)],
                         [rng.randint(100, 200)]))
            started += 1
        for seqs, left in list(live):
            for s in seqs[1:]:
                s.tokens.append(2)
                s.place(bm)
                touched.update(s.blocks)  # each place: the blocks a path moved from count too
            left[0] -= 1
            if left[0] == 0:
                for s in seqs:
                    touched.update(s.blocks)
                    bm.free(s.blocks)
                live.remove((seqs, left))
    bm.take_copies()
    return touched


def test_blocks_written_follow_the_peak_use_not_the_pool_size():
    bm = BlockManager(65536, 16)  # the demo model's default 4 GiB CPU pool
    touched = churn(bm, num_requests=600, concurrent=32)
    assert bm.num_used == 0 and bm.peak_used > 500  # 32 requests of 3 + 4 * (7 to 13) blocks
    # independent bound: new extents start below the smallest power of two >= 2 * used + want,
    # (<= 4 * peak_used + 2 * want); the few that grow past it add at most one path each
    assert len(touched) <= 4 * bm.peak_used + 64, (len(touched), bm.peak_used)
    assert max(touched) < 8 * bm.peak_used, (max(touched), bm.peak_used)


def test_paths_growing_side_by_side_move_to_one_run_each_and_keep_their_tokens():
    """Eight paths decoding in lockstep after a prompt. Each path's first block lands next to the
    others', so it soon finds its next block taken; it then moves its blocks to one new extent
    (BlockManager.move). Checked from the outside: a slot -> token map playing the pool, where
    each step first makes the queued copies (as Engine.step does), then writes the step's
    tokens into their slots; every path's tokens must be where its runs say."""
    bm = BlockManager(4096, 16)
    pool: dict[int, tuple[int, int]] = {}  # slot -> (path, token index) written there
    prompt = Seq([1] * 100, 0, 0)
    prompt.place(bm)
    paths = [Seq([1], k + 1, 100) for k in range(8)]
    moves = 0
    for _ in range(2000):
        for s in paths:
            s.tokens.append(2)
            s.place(bm)
        copies = bm.take_copies()
        moves += len(copies)
        for a, b in copies:
            for i in range(bm.block_size):
                if a * bm.block_size + i in pool:
                    pool[b * bm.block_size + i] = pool.pop(a * bm.block_size + i)
        for k, s in enumerate(paths):
            for i in range(len(s.tokens) - (1 if len(s.tokens) > 2 else 2), len(s.tokens)):
                pool[s.slots[i]] = (k, i)
    assert moves > 0
    assert prompt.runs == [[0, 100]]
    assert [len(s.runs) for s in paths] == [1] * 8  # before moves: 4-6 runs each
    for k, s in enumerate(paths):
        assert [pool[slot] for slot in s.slots] == [(k, i) for i in range(len(s.tokens))]
        assert len(s.blocks) == len(set(s.blocks)) == -(-len(s.tokens) // 16)
    owned = [b for s in paths + [prompt] for b in s.blocks]
    assert len(owned) == len(set(owned)) == bm.num_used  # no block lost, none shared


def test_move_leaves_shared_blocks_and_full_pools_alone():
    bm = BlockManager(64, 4)
    a = bm.allocate(3)
    assert a == [0, 1, 2]
    assert bm.allocate_next(None, 1) == 5  # reach 8 (2 * 3 + 1 -> 8): centred in 3..7
    bm.fork(a)  # another sequence reads a: it stays where it is
    assert bm.move(a, 1) is None and bm.copies == [] and bm.num_used == 4
    bm.free(a)
    # room for 3 + 1 + 3 // 2 = 5 blocks; reach 16 (2 * 4 + 5 = 13 -> 16): the free run 6..15,
    # the 5 centred in it start at 6 + (10 - 5) // 2 = 8
    assert bm.move(a, 1) == [8, 9, 10]
    assert bm.take_copies() == [(0, 8), (1, 9), (2, 10)] and bm.copies == []
    assert bm.num_used == 4 and all(bm.ref_counts[x] == 0 for x in a)
    full = BlockManager(8, 4)
    c = full.allocate(2)
    full.allocate(5)  # one block left: no room for 2 + 1 + 1
    assert full.move(c, 1) is None and full.num_used == 7 and full.copies == []
