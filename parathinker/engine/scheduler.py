"""Continuous batching over whole requests, in pure Python (no torch).

Each step runs every running request (all its paths advance together: SPEC §5 is lock-step) and
admits waiting requests, first come first served, while KV blocks and the token budget allow.
When blocks run out, the most recently admitted running requests are preempted: their blocks are
freed and their tokens recomputed when they are admitted again, so results do not change. A
request that cannot fit even in an empty pool fails alone.
"""

from __future__ import annotations

from parathinker.engine.block_manager import BlockManager
from parathinker.engine.request import ABORTED, FAILED, RUNNING, WAITING, Request


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int) -> None:
        self.bm = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Request] = []  # ordered by arrival
        self.running: list[Request] = []  # ordered by arrival

    def add(self, req: Request) -> None:
        req.status = WAITING
        self._enqueue(req)

    def _enqueue(self, req: Request) -> None:
        i = len(self.waiting)
        while i > 0 and self.waiting[i - 1].arrival > req.arrival:
            i -= 1
        self.waiting.insert(i, req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _fail(self, req: Request, why: str) -> None:
        req.free(self.bm)
        req.status, req.error = FAILED, why

    def _too_big(self, req: Request) -> str:
        return (f"request {req.request_id} needs {req.num_blocks_needed(self.bm.block_size)} more KV "
                f"blocks of {self.bm.block_size} tokens but the pool has {self.bm.num_blocks} in all; "
                "raise num_kv_blocks (or the KV memory) or lower the budgets")

    def _preempt(self, req: Request) -> None:
        req.free(self.bm)
        req.num_preemptions += 1
        self.running.remove(req)
        self.add(req)

    def schedule(self) -> tuple[list[Request], list[Request]]:
        """-> (requests to run this step, with slots for all their pending tokens; failed ones)."""
        scheduled: list[Request] = []
        failed: list[Request] = []
        num_tokens = 0
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
            scheduled.append(req)
            num_tokens += req.num_pending_tokens()
        while self.waiting:
            req = self.waiting[0]
            pending = req.num_pending_tokens()
            if scheduled and num_tokens + pending > self.max_num_batched_tokens:
                break
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
            self.running.append(req)
            scheduled.append(req)
            num_tokens += pending
        return scheduled, failed

    def finish(self, req: Request) -> None:
        self.running.remove(req)
        req.free(self.bm)

    def abort(self, request_id: str) -> Request | None:
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    req.free(self.bm)
                    req.status = ABORTED
                    return req
        return None
