"""The KV block pool's bookkeeping, in pure Python: allocate, fork (reference counts), free.

The pool itself (tensors) lives in the runner; here a block is an int. A block's reference count
is the number of sequences that read it: the prompt's blocks are referenced by the prompt, every
path and the summary; a path's blocks by the path and the summary.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self.free_blocks)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_blocks):
            raise RuntimeError(f"out of KV blocks: need {n}, {len(self.free_blocks)} free")
        blocks = [self.free_blocks.popleft() for _ in range(n)]
        for b in blocks:
            self.ref_counts[b] = 1
        self.peak_used = max(self.peak_used, self.num_used)
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
                self.free_blocks.append(b)
