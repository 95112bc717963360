"""One request's state in the engine, in pure Python: its sequences, their KV slots, SPEC §5.

A request is a group of sequences over one KV pool (`SeqGroup`): the prompt, then the sequences
that read it: P paths and, once thinking ends, the summary (`Request`), or one plain trace
(`PlainRequest`). Each sequence keeps its tokens, how many of them are in the KV cache, its own
blocks, its slots as runs of consecutive slots (extended as tokens are placed: O(1) per block,
never a list of every slot), and the blocks of other sequences it reads (forked by reference,
never copied). A step forwards pending tokens in order, a sequence only once everything it
reads is in the cache, chunked to the step's token budget: long prompts, the summary's template
and the recompute of a preempted request (all blocks freed, tokens kept) run through the same
code path in bounded chunks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from parathinker.config import PlainParams, SamplingParams
from parathinker.engine.block_manager import BlockManager
from parathinker.engine.confidence import PathConfidence, to_prune
from parathinker.spec.layout import path_segment, summary_start
from parathinker.spec.reference_layout import path_text_ids
from parathinker.spec.rules import (BUDGET, CUT, END, PRUNED, can_end, is_at_budget, path_choice,
                               should_stop_thinking, summary_choice)
from parathinker.spec.tokens import ControlTokens

WAITING, RUNNING, FINISHED, FAILED, ABORTED = "waiting", "running", "finished", "failed", "aborted"
SUMMARY_STREAM = 1 << 20  # sampling counter stream of the summary; path k uses k, a trace 0
LogprobEntry = tuple[float, list[int], list[float]]  # (logprob, top ids, top logprobs)


@dataclass
class Seq:
    tokens: list[int]
    segment: int
    first_position: int
    num_computed: int = 0  # tokens whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)  # own blocks
    runs: list[list[int]] = field(default_factory=list)  # own slots as [start, length], in order
    num_placed: int = 0  # tokens that have a slot
    forked: list[int] = field(default_factory=list)  # blocks of other sequences it reads
    # token index -> (logprob, top ids, top logprobs) of a sampled token, when the request asks
    logprobs: dict[int, LogprobEntry] = field(default_factory=dict)

    @property
    def num_pending(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def slots(self) -> list[int]:
        """Every slot, in token order (O(tokens): for tests and tools, not the step)."""
        return [s for a, n in self.runs for s in range(a, a + n)]

    def place(self, bm: BlockManager, after: int | None = None) -> None:
        """Give every token a slot: fill the last block, then new blocks, block by block; the
        first block right after block `after` if that one is free (the sequence it reads). A
        sequence whose next block is taken moves its blocks to one extent when it can
        (`BlockManager.move`: its slots become one run)."""
        bs = bm.block_size
        while self.num_placed < len(self.tokens):
            offset = self.num_placed % bs
            if offset == 0:
                want = -(-(len(self.tokens) - self.num_placed) // bs)
                if bm.moves and self.blocks and bm.is_taken(self.blocks[-1]):
                    moved = bm.move(self.blocks, want)
                    if moved is not None:  # every block full (offset 0): one run of num_placed
                        self.blocks, self.runs = moved, [[moved[0] * bs, self.num_placed]]
                self.blocks.append(bm.allocate_next(self.blocks[-1] if self.blocks else after, want))
            n = min(bs - offset, len(self.tokens) - self.num_placed)
            start = self.blocks[-1] * bs + offset
            if self.runs and self.runs[-1][0] + self.runs[-1][1] == start:
                self.runs[-1][1] += n
            else:
                self.runs.append([start, n])
            self.num_placed += n

    def runs_upto(self, n: int) -> list[tuple[int, int]]:
        """The runs holding this sequence's first n tokens."""
        out, left = [], n
        for a, m in self.runs:
            if left <= 0:
                break
            out.append((a, min(m, left)))
            left -= m
        return out

    def reset_cache(self) -> None:
        self.blocks, self.runs, self.forked, self.num_placed, self.num_computed = [], [], [], 0, 0


@dataclass
class SeqWork:
    """What the runner needs for one sequence in one step (ints only)."""

    token_ids: list[int]
    positions: list[int]
    segment: int
    context: list[tuple[int, int]]  # runs: what it reads, then its own slots up to the new ones
    needs_logits: bool
    seq: Seq = field(repr=False, compare=False)
    # offsets into token_ids whose logits are kept too: forced summary-template tokens of a
    # request that asked for logprobs (each predicts the next, forced, token), and that request
    forced: list[int] = field(default_factory=list)
    forced_owner: Any = field(default=None, repr=False, compare=False)


@dataclass
class SampleRow:
    """One row of a step's sampling, as a request hands it to the engine: the sequence whose
    last logits it samples, which SPEC §5 mask applies, and the noise counter. `owner` is the
    request (a group's member) whose params, seed and logprobs settings the row uses."""

    owner: SeqGroup
    seq: Seq
    kind: str  # "path" | "summary" | "trace"
    mask: str | None  # "path" | "summary" (LogitMasks.rows), or None: nothing masked
    can_end: bool  # a masked path row may draw an end token
    counter: int  # (stream << 32) + index of the token drawn: unique within the owner
    path: int | None = None  # 0-based path index of a path row
    # the drawn token's confidence (engine/confidence.py), set by the engine after sampling on
    # the rows of a request with confidence_window > 0
    confidence: float | None = None

    @property
    def wants_logprobs(self) -> bool:
        o = self.owner
        return o.num_logprobs is not None and (self.kind == "summary" or o.path_logprobs)


class SeqGroup:
    """Sequences of one request and their KV; subclasses say which sequences read which, and
    which are sampled after a step (`sample_rows`), and apply the sampled tokens (`take`)."""

    num_logprobs: int | None = None  # record the logprobs of sampled summary tokens (top k)
    path_logprobs = False  # ... and of the paths' tokens too
    seed = 0  # the sampling seed, set by the engine (sampler.resolve_seed)

    def __init__(self, request_id: str, arrival: int, prompt_ids: list[int],
                 ctrl: ControlTokens) -> None:
        self.request_id, self.arrival, self.ctrl = request_id, arrival, ctrl
        self.prompt = Seq(list(prompt_ids), 0, 0)
        self.status = WAITING
        self.error: str | None = None
        self.num_preemptions = 0
        self.arrival_time = time.perf_counter()
        self.finish_time: float | None = None
        self.num_forward_tokens = 0

    # ----- what subclasses define
    def seqs(self) -> list[Seq]:
        raise NotImplementedError

    def readable(self, seq: Seq) -> list[Seq]:
        """The sequences `seq` reads before its own tokens, in context order."""
        return [] if seq is self.prompt else [self.prompt]

    def sample_rows(self) -> list[SampleRow]:
        """The rows sampled after this step (one per sequence whose last logits are drawn
        from), in seqs() order."""
        raise NotImplementedError

    def apply(self, rows: list[SampleRow], tokens: list[int]) -> None:
        """The request's transition on the tokens sampled for `rows` (SPEC §5)."""
        raise NotImplementedError

    def logprob_owner(self, seq: Seq) -> Any:
        """The request whose forced summary template `seq` is, when it asked for logprobs
        (their entries are computed in the forward that computes the template); else None."""
        return None

    def sample_seqs(self) -> list[Seq]:
        return [r.seq for r in self.sample_rows()]

    def take(self, rows: list[SampleRow], tokens: list[int],
             entries: list[LogprobEntry | None]) -> None:
        """After a step: apply the tokens sampled for `rows` (this step's `sample_rows()`, or
        none when the step drew nothing but computed every pending token), then keep each
        row's logprob entry where the sampled token is the one appended (not a forced or
        rewritten one)."""
        at = [len(r.seq.tokens) for r in rows]
        self.apply(rows, tokens)
        for r, i, token, entry in zip(rows, at, tokens, entries):
            if entry is not None and len(r.seq.tokens) > i and r.seq.tokens[i] == token:
                r.seq.logprobs[i] = entry

    # ----- KV bookkeeping
    def num_pending_tokens(self) -> int:
        return sum(s.num_pending for s in self.seqs())

    def is_computed(self) -> bool:
        return all(not s.num_pending for s in self.seqs())

    def num_blocks_needed(self, block_size: int) -> int:
        """New blocks for placing every pending token (forks need none)."""
        return sum(-(-len(s.tokens) // block_size) - len(s.blocks) for s in self.seqs())

    def allocate(self, bm: BlockManager) -> None:
        """Give every pending token a slot; a sequence forks what it reads on its first slot."""
        for seq in self.seqs():
            if seq.num_placed == len(seq.tokens):
                continue
            after = None
            if not seq.num_placed and seq is not self.prompt:
                reads = self.readable(seq)
                seq.forked = [b for r in reads for b in r.blocks]
                bm.fork(seq.forked)
                after = seq.forked[-1] if seq.forked and reads[-1].blocks else None
            seq.place(bm, after)  # first block next to what it reads: one extent with it if free

    def release_ended(self, bm: BlockManager) -> None:
        """Give back the blocks of parts that ended before the request (a SampleGroup's
        finished members); a single request has none."""

    def free(self, bm: BlockManager) -> None:
        """Drop every reference this request holds; tokens are kept for recomputation."""
        for seq in self.seqs():
            bm.free(seq.blocks)
            bm.free(seq.forked)
            seq.reset_cache()

    def context(self, seq: Seq, upto: int) -> list[tuple[int, int]]:
        """Its context's slots as runs, in order; runs that continue each other joined (a path
        placed right after a prompt that fills its last block reads one run)."""
        out: list[tuple[int, int]] = []
        for a, n in [(a, n) for r in self.readable(seq) for a, n in r.runs] + seq.runs_upto(upto):
            if out and out[-1][0] + out[-1][1] == a:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((a, n))
        return out

    # ----- one step
    def work(self, budget: int | None = None) -> list[SeqWork]:
        """This step's pending tokens, sequence by sequence, at most `budget` of them; a
        sequence waits until what it reads is computed (or fully forwarded in this step)."""
        left = self.num_pending_tokens() if budget is None else budget
        complete = left >= self.num_pending_tokens()  # every pending token goes this step
        sampled = {id(s) for s in self.sample_seqs()} if complete else set()
        out: list[SeqWork] = []
        blocked = False
        for seq in self.seqs():
            if blocked or left <= 0:
                break
            if not seq.num_pending:
                continue
            if any(r.num_pending and not any(w.seq is r and r.num_computed + len(w.token_ids)
                                             == len(r.tokens) for w in out)
                   for r in self.readable(seq)):
                break
            take = min(seq.num_pending, left)
            start = seq.first_position + seq.num_computed
            upto = seq.num_computed + take
            owner = self.logprob_owner(seq)
            forced = [] if owner is None else [  # positions predicting a forced template token
                i - seq.num_computed
                for i in range(seq.num_computed, min(upto, len(owner.template_ids) - 1))]
            out.append(SeqWork(seq.tokens[seq.num_computed:upto], list(range(start, start + take)),
                               seq.segment, self.context(seq, upto),
                               take == seq.num_pending and id(seq) in sampled, seq, forced,
                               owner))
            left -= take
            blocked = take < seq.num_pending
        return out

    def mark_computed(self, work: list[SeqWork]) -> None:
        for w in work:
            w.seq.num_computed += len(w.token_ids)
            self.num_forward_tokens += len(w.token_ids)


class Request(SeqGroup):
    """A ParaThinker request: prompt, P paths (reading the prompt), then the summary (reading
    the prompt and every path), with the control flow of SPEC §5."""

    uses_logit_masks = True

    def __init__(self, request_id: str, arrival: int, prompt_ids: list[int],
                 params: SamplingParams, ctrl: ControlTokens, template_ids: list[int],
                 num_paths: int | None = None) -> None:
        super().__init__(request_id, arrival, prompt_ids, ctrl)
        self.params = params
        self.template_ids = list(template_ids)
        prompt_len = len(prompt_ids)
        num_paths = params.num_paths if num_paths is None else num_paths
        self.paths = [Seq([ctrl.think_open[k]], path_segment(k + 1), prompt_len)
                      for k in range(num_paths)]
        self.path_finish: list[str | None] = [None] * num_paths
        self.summary: Seq | None = None
        self.summary_finish: str | None = None
        # gating (engine/confidence.py): each path's window, and answer keys for agreement
        window = params.confidence_window
        self.confidence = [PathConfidence(window) for _ in range(num_paths)] if window else None
        self.answers: list[str | None] = [None] * num_paths
        # path text ids -> answer key, set by the engine for requests with stop_on_agreement
        self.answer_of: Callable[[list[int]], str | None] | None = None

    @property
    def path_confidence(self) -> list[float | None] | None:
        """Each path's confidence, or None when confidence_window is 0."""
        return None if self.confidence is None else [c.value for c in self.confidence]

    def seqs(self) -> list[Seq]:
        return [self.prompt, *self.paths] + ([self.summary] if self.summary else [])

    def logprob_owner(self, seq: Seq) -> Any:
        return self if seq is self.summary and self.num_logprobs is not None else None

    def readable(self, seq: Seq) -> list[Seq]:
        if seq is self.prompt:
            return []
        if seq is self.summary:
            return [self.prompt, *self.paths]
        return [self.prompt]

    def sample_rows(self) -> list[SampleRow]:
        masked = self.uses_logit_masks
        if self.summary is not None:
            return [SampleRow(self, self.summary, "summary", "summary" if masked else None, True,
                              (SUMMARY_STREAM << 32) + len(self.summary.tokens))]
        return [SampleRow(self, p, "path", "path" if masked else None,
                          not masked or can_end(len(p.tokens), self.params),
                          ((k + 1) << 32) + len(p.tokens), k)
                for k in self.paths_to_sample() for p in [self.paths[k]]]

    def apply(self, rows: list[SampleRow], tokens: list[int]) -> None:
        if self.summary is None:
            self.apply_paths([r.path for r in rows], tokens,  # type: ignore[misc]
                             [r.confidence for r in rows])
        else:
            self.apply_summary(tokens[0])

    # ----- one step
    def paths_to_sample(self) -> list[int]:
        """0-based indices of the paths whose next token is sampled after this step."""
        if self.summary is not None:
            return []
        return [k for k, p in enumerate(self.paths)
                if self.path_finish[k] is None and not is_at_budget(len(p.tokens), self.params)]

    def apply_paths(self, sampled: list[int], chosen: list[int],
                    confidence: list[float | None] | None = None) -> None:
        """After a thinking step: budget closes, sampled tokens, pruning, the termination
        policy (`confidence`: the drawn tokens' confidences, for a gated request)."""
        was_open = [f is None for f in self.path_finish]
        for k, p in enumerate(self.paths):
            if self.path_finish[k] is None and k not in sampled:
                p.tokens.append(self.ctrl.think_close[k])
                self.path_finish[k] = BUDGET
        below: dict[int, float] = {}  # path -> group confidence under prune_confidence
        for k, c, conf in zip(sampled, chosen, confidence or [None] * len(sampled)):
            token, reason = path_choice(self.ctrl, k + 1, c)
            group = None if self.confidence is None else self.confidence[k].add(conf)  # type: ignore[arg-type]
            threshold = self.params.prune_confidence
            if reason is None and group is not None and threshold is not None and group < threshold:
                below[k] = group
            self.paths[k].tokens.append(token)
            self.path_finish[k] = reason
        if below:
            for k in to_prune(below, sum(f != PRUNED for f in self.path_finish)):
                self.paths[k].tokens[-1] = self.ctrl.think_close[k]
                self.path_finish[k] = PRUNED
        if self.thinking_is_over(was_open):
            for k, p in enumerate(self.paths):
                if self.path_finish[k] is None:
                    p.tokens.append(self.ctrl.think_close[k])
                    self.path_finish[k] = CUT
            start = summary_start(len(self.prompt.tokens), [len(p.tokens) for p in self.paths])
            self.summary = Seq(list(self.template_ids), 0, start)

    def thinking_is_over(self, was_open: list[bool]) -> bool:
        """After a step's paths are applied (`was_open`: which were open before it): enough paths
        ended (min_finished_paths; pruned ones do not count), none is open, or, with
        stop_on_agreement, that many ended paths share an answer (`engine/confidence.py`)."""
        finish = self.path_finish
        if all(f is not None for f in finish):
            return True
        if should_stop_thinking(sum(f in (END, BUDGET) for f in finish), self.params):
            return True
        agree = self.params.stop_on_agreement
        if not agree:
            return False
        assert self.answer_of is not None, "the engine sets answer_of for stop_on_agreement"
        for k, p in enumerate(self.paths):
            if was_open[k] and finish[k] in (END, BUDGET):
                self.answers[k] = self.answer_of(path_text_ids(p.tokens, self.ctrl.think_close[k]))
        keys = [a for a in self.answers if a is not None]
        return any(keys.count(a) >= agree for a in set(keys))

    def apply_summary(self, token: int) -> None:
        assert self.summary is not None
        self.summary.tokens.append(token)
        self.summary_finish = summary_choice(self.ctrl, token, len(self.summary.tokens), self.params)
        if self.summary_finish is not None:
            self.status = FINISHED


class PlainRequest(SeqGroup):
    """One ordinary trace (sequential and majority baselines): the prompt, then tokens until EOS
    or `max_tokens`, with nothing masked; the trace continues right after the prompt (segment 0).
    Its first token is sampled from the prompt's last logits."""

    uses_logit_masks = False

    def __init__(self, request_id: str, arrival: int, prompt_ids: list[int],
                 params: PlainParams, ctrl: ControlTokens) -> None:
        super().__init__(request_id, arrival, prompt_ids, ctrl)
        self.params = params
        self.trace = Seq([], 0, len(prompt_ids))
        self.trace_finish: str | None = None

    def seqs(self) -> list[Seq]:
        return [self.prompt, self.trace]

    def sample_rows(self) -> list[SampleRow]:
        seq = self.trace if self.trace.tokens else self.prompt
        return [SampleRow(self, seq, "trace", None, True, len(self.trace.tokens))]

    def apply(self, rows: list[SampleRow], tokens: list[int]) -> None:
        self.apply_token(tokens[0])

    def apply_token(self, token: int) -> None:
        self.trace.tokens.append(token)
        if token == self.ctrl.eos:
            self.trace_finish = END
        elif len(self.trace.tokens) >= self.params.max_tokens:
            self.trace_finish = BUDGET
        if self.trace_finish is not None:
            self.status = FINISHED
