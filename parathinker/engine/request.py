"""One request's state in the engine, in pure Python: its sequences, their KV slots, SPEC §5.

A request owns 1 + P (+ 1) sequences: the prompt, P paths and, once thinking ends, the summary.
Each sequence keeps its tokens, how many of them are in the KV cache, its own blocks and slots,
and the blocks it reads from other sequences (forked by reference, never copied). Every step
forwards each sequence's pending tokens, so a preempted request (all blocks freed) is recomputed
by the same code path, and the summary's template is prefilled in one step over the reused KV.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from parathinker.config import PlainParams, SamplingParams
from parathinker.engine.block_manager import BlockManager
from parathinker.layout import path_segment, summary_start
from parathinker.rules import (BUDGET, CUT, END, can_end, is_at_budget, path_choice,
                               should_stop_thinking, summary_choice)
from parathinker.tokens import ControlTokens

WAITING, RUNNING, FINISHED, FAILED, ABORTED = "waiting", "running", "finished", "failed", "aborted"


@dataclass
class Seq:
    tokens: list[int]
    segment: int
    first_position: int
    num_computed: int = 0  # tokens whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)  # own blocks
    slots: list[int] = field(default_factory=list)  # one per token placed in the cache
    forked: list[int] = field(default_factory=list)  # blocks of other sequences it reads

    @property
    def num_pending(self) -> int:
        return len(self.tokens) - self.num_computed


@dataclass
class SeqWork:
    """What the runner needs for one sequence in one step (ints only)."""

    token_ids: list[int]
    positions: list[int]
    segment: int
    context_slots: list[int]  # prompt's, (paths'), own slots; the new tokens' slots are last
    needs_logits: bool


class Request:
    def __init__(self, request_id: str, arrival: int, prompt_ids: list[int],
                 params: SamplingParams, ctrl: ControlTokens, template_ids: list[int],
                 num_paths: int | None = None) -> None:
        self.request_id, self.arrival, self.params, self.ctrl = request_id, arrival, params, ctrl
        self.template_ids = list(template_ids)
        prompt_len = len(prompt_ids)
        self.prompt = Seq(list(prompt_ids), 0, 0)
        num_paths = params.num_paths if num_paths is None else num_paths
        self.paths = [Seq([ctrl.think_open[k]], path_segment(k + 1), prompt_len)
                      for k in range(num_paths)]
        self.path_finish: list[str | None] = [None] * num_paths
        self.summary: Seq | None = None
        self.summary_finish: str | None = None
        self.status = WAITING
        self.error: str | None = None
        self.num_preemptions = 0
        self.arrival_time = time.perf_counter()
        self.finish_time: float | None = None
        self.num_forward_tokens = 0

    # ----- sequences and their KV
    def seqs(self) -> list[Seq]:
        return [self.prompt, *self.paths] + ([self.summary] if self.summary else [])

    def num_pending_tokens(self) -> int:
        return sum(s.num_pending for s in self.seqs())

    def num_blocks_needed(self, block_size: int) -> int:
        """New blocks for placing every pending token (forks need none)."""
        return sum(-(-len(s.tokens) // block_size) - len(s.blocks) for s in self.seqs())

    def allocate(self, bm: BlockManager) -> None:
        """Give every pending token a slot; a sequence forks what it reads on its first slot."""
        bs = bm.block_size
        for seq in self.seqs():
            if len(seq.slots) == len(seq.tokens):
                continue
            if not seq.slots and seq is not self.prompt:
                seq.forked = self._readable_blocks(seq)
                bm.fork(seq.forked)
            while len(seq.slots) < len(seq.tokens):
                i = len(seq.slots)
                if i % bs == 0:
                    seq.blocks += bm.allocate(1)
                seq.slots.append(seq.blocks[-1] * bs + i % bs)

    def _readable_blocks(self, seq: Seq) -> list[int]:
        if seq is self.summary:
            return self.prompt.blocks + [b for p in self.paths for b in p.blocks]
        return list(self.prompt.blocks)

    def free(self, bm: BlockManager) -> None:
        """Drop every reference this request holds; tokens are kept for recomputation."""
        for seq in self.seqs():
            bm.free(seq.blocks)
            bm.free(seq.forked)
            seq.blocks, seq.slots, seq.forked, seq.num_computed = [], [], [], 0

    def context_slots(self, seq: Seq) -> list[int]:
        if seq is self.prompt:
            return seq.slots
        if seq is self.summary:
            return self.prompt.slots + [s for p in self.paths for s in p.slots] + seq.slots
        return self.prompt.slots + seq.slots

    # ----- one step
    def paths_to_sample(self) -> list[int]:
        """0-based indices of the paths whose next token is sampled after this step."""
        if self.summary is not None:
            return []
        return [k for k, p in enumerate(self.paths)
                if self.path_finish[k] is None and not is_at_budget(len(p.tokens), self.params)]

    def path_can_end(self, ks: list[int]) -> list[bool]:
        return [can_end(len(self.paths[k].tokens), self.params) for k in ks]

    def work(self) -> list[SeqWork]:
        """This step's pending tokens, sequence by sequence (prompt, paths, summary)."""
        sampled = set(self.paths_to_sample())
        out = []
        for i, seq in enumerate(self.seqs()):
            if not seq.num_pending:
                continue
            start = seq.first_position + seq.num_computed
            needs = seq is self.summary or (i - 1) in sampled
            out.append(SeqWork(seq.tokens[seq.num_computed:], list(range(start, start + seq.num_pending)),
                               seq.segment, self.context_slots(seq), needs))
        return out

    def mark_computed(self) -> None:
        for seq in self.seqs():
            self.num_forward_tokens += seq.num_pending
            seq.num_computed = len(seq.tokens)

    def apply_paths(self, sampled: list[int], chosen: list[int]) -> None:
        """After a thinking step: budget closes, sampled tokens, the termination policy."""
        for k, p in enumerate(self.paths):
            if self.path_finish[k] is None and k not in sampled:
                p.tokens.append(self.ctrl.think_close[k])
                self.path_finish[k] = BUDGET
        for k, c in zip(sampled, chosen):
            token, reason = path_choice(self.ctrl, k + 1, c)
            self.paths[k].tokens.append(token)
            self.path_finish[k] = reason
        if should_stop_thinking(sum(f is not None for f in self.path_finish), self.params):
            for k, p in enumerate(self.paths):
                if self.path_finish[k] is None:
                    p.tokens.append(self.ctrl.think_close[k])
                    self.path_finish[k] = CUT
            start = summary_start(len(self.prompt.tokens), [len(p.tokens) for p in self.paths])
            self.summary = Seq(list(self.template_ids), 0, start)

    def apply_summary(self, token: int) -> None:
        assert self.summary is not None
        self.summary.tokens.append(token)
        self.summary_finish = summary_choice(self.ctrl, token, len(self.summary.tokens), self.params)
        if self.summary_finish is not None:
            self.status = FINISHED


class PlainRequest(Request):
    """One ordinary trace (sequential and majority baselines): the prompt, then tokens until EOS
    or `max_tokens`, with nothing masked. It reuses Request's bookkeeping with no paths and the
    continuation in the summary's place (segment 0, positions right after the prompt)."""

    def __init__(self, request_id: str, arrival: int, prompt_ids: list[int],
                 params: PlainParams, ctrl: ControlTokens) -> None:
        dummy = SamplingParams(num_paths=1, max_summary_tokens=params.max_tokens)
        super().__init__(request_id, arrival, prompt_ids, dummy, ctrl, [], num_paths=0)
        self.params = params  # type: ignore[assignment]
        self.summary = Seq([], 0, len(prompt_ids))

    def work(self) -> list[SeqWork]:
        out = super().work()
        out[-1].needs_logits = True  # the prompt's last token on the first step
        return out

    def apply_token(self, token: int) -> None:
        assert self.summary is not None
        self.summary.tokens.append(token)
        if token == self.ctrl.eos:
            self.summary_finish = END
        elif len(self.summary.tokens) >= self.params.max_tokens:
            self.summary_finish = BUDGET
        if self.summary_finish is not None:
            self.status = FINISHED
