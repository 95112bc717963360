"""The KV block pool's bookkeeping, in pure Python: allocate, fork (reference counts), free.

The pool itself (tensors) lives in the runner; here a block is an int. A block's reference count
is the number of sequences that read it: the prompt's blocks are referenced by the prompt, every
path and the summary; a path's blocks by the path and the summary.

Allocation keeps each sequence's blocks consecutive where it can: a growing sequence takes the
block right after its last one when that is free, and a sequence that cannot starts a new
extent centred in the largest free run (or at its start, at the pool's start), so that it and
whatever ends before the run both have room to grow.

New extents start only below `reach`, the largest value ever taken by the smallest power of two
>= 2 * (blocks in use) + want. On CPU the pool's pages are backed by memory only once written;
extents free to start anywhere in a 4 GiB pool wander over all of it as requests come and go
(the server's RSS grew round after round, issue 22). Below `reach`, the blocks ever written stay
within ~4x the peak use. Consecutive blocks are consecutive slots, so attention reads a context
as a few long runs of the pool (`attention.paged`); correctness never depends on it, only speed.

Sequences that grow side by side (paths, separate requests decoding) still collide: each starts
next to the others, below a reach that is about twice the use, and jumps to a new extent about
once per doubling of the blocks in use (4-7 runs of a 4K context). A growing sequence whose next
block is taken may instead `move`: its own blocks, if no other sequence reads them, go to one new
extent with room to grow by half its length again, and the copies (old block -> new block) wait
in `copies` until the runner makes them, before the step's forward writes anything
(`Engine.step`). Its new extent starts below `reach`, as any other, so the bound above holds.
Only a backend that reads runs faster moves (`PagedBackend.wants_one_run`: the runs backend);
one that reads through a page table (flex, on CUDA) would pay the copies for nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_FREE_RUN = re.compile(rb"\x01+")


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, moves: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_counts = [0] * num_blocks
        self._is_free = bytearray(b"\x01") * num_blocks
        self._num_free = num_blocks
        self.peak_used = 0
        self.reach = 0  # new extents start below it (never shrinks)
        self.moves = moves  # whether growing sequences move (the attention backend's wants_one_run)
        self.copies: list[tuple[int, int]] = []  # (from block, to block), moves not yet copied

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.num_blocks - self._num_free

    def can_allocate(self, n: int) -> bool:
        return n <= self._num_free

    def allocate_next(self, after: int | None = None, want: int = 1) -> int:
        """One block for a sequence whose last block is `after` (None: a new sequence), which
        is about to need `want` blocks in a row."""
        if not self._num_free:
            raise RuntimeError("out of KV blocks: need 1, 0 free")
        if after is not None and after + 1 < self.num_blocks and self._is_free[after + 1]:
            b = after + 1
        else:
            need = 2 * self.num_used + want  # new extents start below reach (module doc)
            if need > self.reach:
                self.reach = min(self.num_blocks, 1 << (need - 1).bit_length())
            run = max(_FREE_RUN.finditer(self._is_free, 0, self.reach),
                      key=lambda m: m.end() - m.start())
            room = max(0, run.end() - run.start() - want)
            b = run.start() if run.start() == 0 else run.start() + room // 2
        self._is_free[b] = 0
        self._num_free -= 1
        self.ref_counts[b] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return b

    def is_taken(self, b: int) -> bool:
        """Block b + 1 cannot extend an extent ending at b (in use, or past the pool)."""
        return b + 1 >= self.num_blocks or not self._is_free[b + 1]

    def move(self, blocks: list[int], want: int) -> list[int] | None:
        """The own blocks of a growing sequence, about to need `want` more, to one new extent
        with room for them, `want` and half their count again (centred in the largest free run
        below reach that has it); the old blocks freed, the copies queued (`copies`). None, and
        nothing changed, when another sequence reads one of them or no free run has the room."""
        if any(self.ref_counts[b] != 1 for b in blocks):
            return None
        n, room = len(blocks), len(blocks) + want + len(blocks) // 2
        need = 2 * self.num_used + room  # new extents start below reach (module doc)
        reach = self.reach if need <= self.reach else min(self.num_blocks, 1 << (need - 1).bit_length())
        runs = [m for m in _FREE_RUN.finditer(self._is_free, 0, reach) if m.end() - m.start() >= room]
        if not runs:
            return None
        self.reach = reach
        run = max(runs, key=lambda m: m.end() - m.start())
        start = run.start() if run.start() == 0 else run.start() + (run.end() - run.start() - room) // 2
        moved = list(range(start, start + n))
        for b in moved:
            self._is_free[b] = 0
            self.ref_counts[b] = 1
        self._num_free -= n
        self.free(blocks)
        self.copies += zip(blocks, moved)
        return moved

    def take_copies(self) -> list[tuple[int, int]]:
        """The queued copies (from block, to block), in order; the queue is emptied."""
        copies, self.copies = self.copies, []
        return copies

    def allocate(self, n: int) -> list[int]:
        """n blocks for one new sequence, consecutive where possible."""
        if n > self._num_free:
            raise RuntimeError(f"out of KV blocks: need {n}, {self._num_free} free")
        blocks: list[int] = []
        for i in range(n):
            blocks.append(self.allocate_next(blocks[-1] if blocks else None, n - i))
        return blocks

    def fork(self, blocks: Iterable[int]) -> None:
        """Another sequence now reads these blocks (no copy)."""
        for b in blocks:
            if self.ref_counts[b] < 1:
                raise RuntimeError(f"fork of free block {b}")
            self.ref_counts[b] += 1

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block; a block with no reference left is free again."""
        for b in blocks:
            if self.ref_counts[b] < 1:
                raise RuntimeError(f"double free of block {b}")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._is_free[b] = 1
                self._num_free += 1
