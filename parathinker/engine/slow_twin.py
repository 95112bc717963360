"""The slow twin of the engine: one request at a time, SPEC §5 step by step, with KV reuse.

The prompt is prefilled once into a flat slot pool; the P paths decode together (one row per
path) and read the prompt's slots by reference; the summary's context is the prompt's slots plus
every path's slots, so nothing is copied or recomputed. This is the slow, obviously-correct twin
that the batched engine is tested against; the test oracle checks it with full recomputation.

Gating (engine/confidence.py states the rules) is written here again, plainly: every drawn path
token's confidence from `sampler.logprobs_rows`'s top log-probabilities, each path's full list of
them, every window's mean recomputed from a slice, pruning and agreement checked step by step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from parathinker.attention.paged import backend_for
from parathinker.attention.pool import PagedKVCache, runs_of
from parathinker.config import SamplingParams
from parathinker.engine.confidence import LOGPROB_FLOOR
from parathinker.engine.request import SUMMARY_STREAM
from parathinker.spec.layout import path_segment, summary_start
from parathinker.model.decoder import ParaThinkerForCausalLM
from parathinker.spec.reference_layout import path_text_ids
from parathinker.spec.rules import (BUDGET, CUT, END, PRUNED, can_end, is_at_budget, path_choice,
                               summary_choice)
from parathinker.engine import sampler as sampling
from parathinker.engine.sampler import LogitMasks
from parathinker.spec.tokens import ControlTokens


@dataclass
class RawRequestOutput:
    """Token ids and finish reasons; `logits` (when recorded) maps (region, index) of every
    forwarded token to the logits it produced: region 0 = prompt, k = path k, -1 = summary."""

    path_token_ids: list[list[int]]
    path_finish: list[str]
    summary_token_ids: list[int]
    summary_finish: str
    num_forward_tokens: int = 0
    logits: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    path_confidence: list[float | None] | None = None  # with confidence_window > 0


class _Runner:
    """Forwards tokens of several sequences into one slot pool and counts them."""

    def __init__(self, model: ParaThinkerForCausalLM, num_slots: int, record: bool) -> None:
        cfg = model.config
        p = next(model.parameters())
        self.model, self.device, self.record = model, p.device, record
        self.attention = backend_for("gathered", self.device)  # the slow twin of every backend
        self.cache = PagedKVCache.allocate(cfg.num_hidden_layers, num_slots, cfg.num_key_value_heads,
                                      cfg.head_dim, p.dtype, p.device)
        self.next_slot = 0
        self.num_forward_tokens = 0
        self.logits: dict[tuple[int, int], torch.Tensor] = {}

    def alloc(self, n: int) -> list[int]:
        slots = list(range(self.next_slot, self.next_slot + n))
        self.next_slot += n
        return slots

    @torch.inference_mode()
    def forward(self, seqs: list[tuple[list[int], list[int], int, list[int], tuple[int, int]]]
                ) -> list[torch.Tensor]:
        """seqs: (new token ids, their positions, segment id, full context slots (new ones last),
        (region, index of the first new token)). Returns the last-token logits of each."""
        ids, pos, seg = [], [], []
        for tokens, positions, segment, _, _ in seqs:
            ids += tokens
            pos += positions
            seg += [segment] * len(tokens)
        meta = self.attention.build_metadata([len(s[0]) for s in seqs],
                                             [runs_of(s[3]) for s in seqs], self.device)
        as_tensor = lambda x: torch.tensor([x], dtype=torch.long, device=self.device)  # noqa: E731
        hidden = self.model(as_tensor(ids), as_tensor(pos), as_tensor(seg), meta, self.cache)[0]
        self.num_forward_tokens += len(ids)
        ends = torch.tensor([len(s[0]) for s in seqs]).cumsum(0) - 1
        if not self.record:
            return list(self.model.compute_logits(hidden[ends.to(self.device)]))
        logits = self.model.compute_logits(hidden)
        start = 0
        for tokens, _, _, _, (region, first) in seqs:
            for j in range(len(tokens)):
                self.logits[(region, first + j)] = logits[start + j].cpu()
            start += len(tokens)
        return [logits[e] for e in ends.tolist()]


def generate_request(model: ParaThinkerForCausalLM, ctrl: ControlTokens, prompt_ids: list[int],
                     summary_template_ids: list[int], params: SamplingParams,
                     record_logits: bool = False,
                     answer_of: Callable[[list[int]], str | None] | None = None
                     ) -> RawRequestOutput:
    """One request, alone. answer_of (a path's text ids -> its answer key) is needed for
    stop_on_agreement."""
    if params.stop_on_agreement and answer_of is None:
        raise ValueError("stop_on_agreement needs answer_of")
    num_paths, prompt_len = params.num_paths, len(prompt_ids)
    num_slots = prompt_len + num_paths * params.max_path_tokens + params.max_summary_tokens
    run = _Runner(model, num_slots, record_logits)
    masks = LogitMasks(ctrl, run.device)
    seed = sampling.resolve_seed(params.seed)

    def sample(rows: torch.Tensor, counters: list[int], confidences: list[float] | None = None
               ) -> list[int]:
        """The engine's sampler, with the engine's counters: (stream << 32) + token index; with
        `confidences`, each drawn token's confidence is appended to it."""
        n = len(counters)
        st = sampling.SamplingTensors.from_rows([params.temperature] * n, [params.top_p] * n,
                                                [params.top_k] * n, [seed] * n, counters, rows.device)
        chosen = sampling.sample_rows(rows, st)
        if confidences is not None:
            _, _, top = sampling.logprobs_rows(rows, st, chosen, params.confidence_top_k)
            for values in top.tolist():
                confidences.append(-sum(max(v, LOGPROB_FLOOR) for v in values) / len(values))
        return chosen.tolist()

    # 1. Prefill the prompt once.
    prompt_slots = run.alloc(prompt_len)
    run.forward([(prompt_ids, list(range(prompt_len)), 0, prompt_slots, (0, 0))])

    # 2-4. Lock-step decoding of the paths; path k starts with <think{k}>.
    tokens = [[ctrl.think_open[k]] for k in range(num_paths)]
    slots: list[list[int]] = [[] for _ in range(num_paths)]
    finish: list[str | None] = [None] * num_paths
    window = params.confidence_window
    confs: list[list[float]] = [[] for _ in range(num_paths)]  # every drawn token's confidence
    answers: dict[int, str | None] = {}

    def group(k: int, end: int) -> float:
        """The mean of path k's window of token confidences ending before index `end`."""
        return math.fsum(confs[k][end - window:end]) / window

    def thinking_is_over() -> bool:
        if all(f is not None for f in finish):
            return True
        ended = [k for k in range(num_paths) if finish[k] in (END, BUDGET)]
        if len(ended) >= params.min_finished_paths:
            return True
        if not params.stop_on_agreement:
            return False
        for k in ended:
            if k not in answers:
                answers[k] = answer_of(path_text_ids(tokens[k], ctrl.think_close[k]))  # type: ignore[misc]
        keys = [a for a in answers.values() if a is not None]
        return any(keys.count(a) >= params.stop_on_agreement for a in keys)

    def pending(k: int) -> tuple[list[int], list[int], int, list[int], tuple[int, int]]:
        """Path k's tokens chosen but not yet forwarded, as one sequence."""
        done = len(slots[k])
        new = tokens[k][done:]
        slots[k] += run.alloc(len(new))
        positions = list(range(prompt_len + done, prompt_len + len(tokens[k])))
        return new, positions, path_segment(k + 1), prompt_slots + slots[k], (k + 1, done)

    while any(f is None for f in finish):
        running = [k for k in range(num_paths) if finish[k] is None]
        flushed = [k for k in range(num_paths) if len(slots[k]) < len(tokens[k])]
        logits = dict(zip(flushed, run.forward([pending(k) for k in flushed])))
        to_sample = [k for k in running if not is_at_budget(len(tokens[k]), params)]
        for k in running:
            if k not in to_sample:
                tokens[k].append(ctrl.think_close[k])
                finish[k] = BUDGET
        if to_sample:
            rows = torch.stack([logits[k] for k in to_sample])
            masks.paths(rows, [can_end(len(tokens[k]), params) for k in to_sample])
            drawn: list[float] | None = [] if window else None
            chosen = sample(rows, [((k + 1) << 32) + len(tokens[k]) for k in to_sample], drawn)
            below = {}
            for i, (k, c) in enumerate(zip(to_sample, chosen)):
                token, reason = path_choice(ctrl, k + 1, c)
                tokens[k].append(token)
                finish[k] = reason
                if drawn is not None:
                    confs[k].append(drawn[i])
                    n = len(confs[k])
                    threshold = params.prune_confidence
                    if (reason is None and threshold is not None and n >= window
                            and group(k, n) < threshold):
                        below[k] = group(k, n)
            unpruned = [k for k in range(num_paths) if finish[k] != PRUNED]
            keep = None
            if below and all(k in below for k in unpruned):  # the best one stays
                keep = max(below, key=lambda k: (below[k], -k))
            for k in below:
                if k != keep:
                    tokens[k][-1] = ctrl.think_close[k]
                    finish[k] = PRUNED
        if thinking_is_over():
            for k in range(num_paths):
                if finish[k] is None:
                    tokens[k].append(ctrl.think_close[k])
                    finish[k] = CUT
    flushed = [k for k in range(num_paths) if len(slots[k]) < len(tokens[k])]
    if flushed:
        run.forward([pending(k) for k in flushed])

    # 5. Summary over the reused KV: the template in one forward, then decoding.
    summary = list(summary_template_ids)
    path_slots = [s for k in range(num_paths) for s in slots[k]]
    first_pos = summary_start(prompt_len, [len(t) for t in tokens])
    summary_slots: list[int] = []
    summary_finish: str | None = None
    while summary_finish is None:
        done = len(summary_slots)
        summary_slots += run.alloc(len(summary) - done)
        positions = list(range(first_pos + done, first_pos + len(summary)))
        (last,) = run.forward([(summary[done:], positions, 0,
                                prompt_slots + path_slots + summary_slots, (-1, done))])
        row = masks.summary(last[None].clone())
        (token,) = sample(row, [(SUMMARY_STREAM << 32) + len(summary)])
        summary.append(token)
        summary_finish = summary_choice(ctrl, token, len(summary), params)
    path_confidence = None
    if window:
        path_confidence = [
            None if not c else
            math.fsum(c) / len(c) if len(c) < window else
            min(group(k, end) for end in range(window, len(c) + 1))
            for k, c in enumerate(confs)]
    return RawRequestOutput(tokens, [str(f) for f in finish], summary, summary_finish,
                            run.num_forward_tokens, run.logits, path_confidence)
