"""Continuous batching over whole requests, in pure Python (no torch).

Each step runs the running requests (all the paths of a request advance together: SPEC §5 is
lock-step) and admits waiting requests, first come first served, while KV blocks and the step's
token budget (`max_num_batched_tokens`) allow; a request gets what is left of the budget, and
forwards its pending tokens in chunks of at most that (long prompts, recomputes). When blocks
run out, the latest-arrived running requests are preempted: their blocks are freed and their
tokens recomputed when they are admitted again, in their arrival order, so results do not
change and a request once preempted is not the next victim again for that alone. A request that
cannot fit even in an empty pool fails alone.
"""

from __future__ import annotations

from parathinker.engine.block_manager import BlockManager
from parathinker.engine.request import ABORTED, FAILED, RUNNING, WAITING, SeqGroup


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int) -> None:
        self.bm = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[SeqGroup] = []  # ordered by arrival
        self.running: list[SeqGroup] = []  # ordered by arrival

    def add(self, req: SeqGroup) -> None:
        req.status = WAITING
        self._enqueue(req)

    def _enqueue(self, req: SeqGroup) -> None:
        _insert_by_arrival(self.waiting, req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _fail(self, req: SeqGroup, why: str) -> None:
        req.free(self.bm)
        req.status, req.error = FAILED, why

    def fail(self, req: SeqGroup, why: str) -> None:
        """A running request that broke a step: out of the batch, its blocks freed."""
        if req in self.running:
            self.running.remove(req)
        self._fail(req, why)

    def _too_big(self, req: SeqGroup) -> str:
        return (f"request {req.request_id} needs {req.num_blocks_needed(self.bm.block_size)} more KV "
                f"blocks of {self.bm.block_size} tokens but the pool has {self.bm.num_blocks} in all; "
                "raise num_kv_blocks (or the KV memory) or lower the budgets")

    def _preempt(self, req: SeqGroup) -> None:
        req.free(self.bm)
        req.num_preemptions += 1
        self.running.remove(req)
        self.add(req)

    def schedule(self) -> tuple[list[tuple[SeqGroup, int]], list[SeqGroup]]:
        """-> ((request, its token budget this step) to run, with slots for all their pending
        tokens; failed requests)."""
        scheduled: list[tuple[SeqGroup, int]] = []
        failed: list[SeqGroup] = []
        budget = self.max_num_batched_tokens
        for req in list(self.running):
            if req not in self.running:  # preempted earlier in this loop
                continue
            need = req.num_blocks_needed(self.bm.block_size)
            while not self.bm.can_allocate(need) and self.running[-1] is not req:
                self._preempt(self.running[-1])
            if not self.bm.can_allocate(need):
                if len(self.running) == 1 and not scheduled:  # alone and still too big
                    self.running.remove(req)
                    self._fail(req, self._too_big(req))
                    failed.append(req)
                else:
                    self._preempt(req)
                continue
            req.allocate(self.bm)
            if budget > 0:
                scheduled.append((req, budget))
                budget -= req.num_pending_tokens()
        while self.waiting and budget > 0:
            req = self.waiting[0]
            need = req.num_blocks_needed(self.bm.block_size)
            if not self.bm.can_allocate(need):
                if not self.running and need > self.bm.num_blocks:
                    self.waiting.pop(0)
                    self._fail(req, self._too_big(req))
                    failed.append(req)
                    continue
                break
            self.waiting.pop(0)
            req.allocate(self.bm)
            req.status = RUNNING
            _insert_by_arrival(self.running, req)
            scheduled.append((req, budget))
            budget -= req.num_pending_tokens()
        return scheduled, failed

    def finish(self, req: SeqGroup) -> None:
        self.running.remove(req)
        req.free(self.bm)

    def abort(self, request_id: str) -> SeqGroup | None:
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    req.free(self.bm)
                    req.status = ABORTED
                    return req
        return None


def _insert_by_arrival(queue: list[SeqGroup], req: SeqGroup) -> None:
    i = len(queue)
    while i > 0 and queue[i - 1].arrival > req.arrival:
        i -= 1
    queue.insert(i, req)
