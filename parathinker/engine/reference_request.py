"""A request in the reference engine's own layout (SPEC §6): `Engine(layout="reference")`.

Same sequences, KV bookkeeping and work as `Request`; only the control flow differs, following
the released vLLM fork step by step (rules in `parathinker.spec.reference_layout`):

- the prompt arrives already padded (`LLM.engine_prompt`), so paths start at the padded length;
- every step samples every unfinished path, with no logit mask (`uses_logit_masks = False`);
  `apply_paths` then runs the stop checker on each path's current state (pass 1), ends thinking
  once #finished >= 0.1 * P, and otherwise appends one rewritten token per unfinished path
  (pass 2) -- the logits of the step in which thinking ends are discarded, as the reference does;
- the summary starts as `[<summary>]` at position 2 * Lp + L and gets its template one token per
  step (`apply_summary`), then samples freely until a stop id or min(max_summary_tokens, 128).

Gated params (confidence_window, prune_confidence, stop_on_agreement) are refused: the released
engine has none of them (`confidence.check_ungated`, also called by `LLM.validate`).
"""

from __future__ import annotations

from parathinker.config import SamplingParams
from parathinker.engine.confidence import check_ungated
from parathinker.engine.request import FINISHED, Request, Seq
from parathinker.spec.reference_layout import (CUT, ReferenceTokens, check_params, check_path,
                                          is_thinking_over, path_token, summary_cap, summary_end,
                                          summary_first_position, summary_token)
from parathinker.spec.tokens import ControlTokens


class ReferenceRequest(Request):
    uses_logit_masks = False  # the reference rewrites tokens after sampling instead

    def __init__(self, request_id: str, arrival: int, prompt_ids: list[int],
                 params: SamplingParams, ctrl: ControlTokens, template_ids: list[int],
                 num_paths: int | None = None) -> None:
        num = params.num_paths if num_paths is None else num_paths
        check_ungated(params)
        check_params(num, params.max_path_tokens, params.min_path_tokens,
                     params.min_finished_paths, params.max_summary_tokens, len(template_ids))
        self.ref_tokens = ReferenceTokens.from_ctrl(ctrl)
        self.ref_template = list(template_ids) or [self.ref_tokens.summary_open]
        self.ref_max_path_tokens = params.max_path_tokens
        self.ref_summary_cap = summary_cap(params.max_summary_tokens)
        super().__init__(request_id, arrival, prompt_ids, params, ctrl, template_ids, num_paths)
        self.is_padding = [False] * len(self.paths)

    def paths_to_sample(self) -> list[int]:
        if self.summary is not None:
            return []
        return [k for k, f in enumerate(self.path_finish) if f is None]

    def apply_paths(self, sampled: list[int], chosen: list[int],
                    confidence: list[float | None] | None = None) -> None:  # never gated
        tok = self.ref_tokens
        for k, p in enumerate(self.paths):  # pass 1: the stop checker, on every path
            if self.path_finish[k] is None:
                self.path_finish[k], self.is_padding[k] = check_path(
                    len(p.tokens), p.tokens[-1], self.is_padding[k], self.ref_max_path_tokens, tok)
        if is_thinking_over(sum(f is not None for f in self.path_finish), len(self.paths)):
            for k in range(len(self.paths)):
                if self.path_finish[k] is None:
                    self.path_finish[k] = CUT  # truncated where it is, no end tag
            path_len = max(len(p.tokens) for p in self.paths)
            start = summary_first_position(len(self.prompt.tokens), path_len)
            self.summary = Seq(self.ref_template[:1], 0, start)
            return
        for k, c in zip(sampled, chosen):  # pass 2: one rewritten token per unfinished path
            if self.path_finish[k] is None:
                self.paths[k].tokens.append(path_token(c, k + 1, self.is_padding[k], tok))

    def apply_summary(self, token: int) -> None:
        assert self.summary is not None
        held = self.summary.tokens
        kept, finish = summary_end(summary_token(self.ref_template, len(held), token),
                                   len(held) + 1, self.ref_summary_cap, self.ref_tokens)
        held.append(kept)
        self.summary_finish = finish
        if finish is not None:
            self.status = FINISHED
