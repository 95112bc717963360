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
            left[0] -= 1
            if left[0] == 0:
                for s in seqs:
                    touched.update(s.blocks)
                    bm.free(s.blocks)
                live.remove((seqs, left))
    return touched


def test_blocks_written_follow_the_peak_use_not_the_pool_size():
    bm = BlockManager(65536, 16)  # the demo model's default 4 GiB CPU pool
    touched = churn(bm, num_requests=600, concurrent=32)
    assert bm.num_used == 0 and bm.peak_used > 500  # 32 requests of 3 + 4 * (7 to 13) blocks
    # independent bound: new extents start below the smallest power of two >= 2 * used + want,
    # (<= 4 * peak_used + 2 * want); the few that grow past it add at most one path each
    assert len(touched) <= 4 * bm.peak_used + 64, (len(touched), bm.peak_used)
    assert max(touched) < 8 * bm.peak_used, (max(touched), bm.peak_used)
