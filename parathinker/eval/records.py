"""Record building: a finished sample graded into its samples.jsonl line (fields in docs/EVAL.md).

A response's answer is the last `\\boxed{}` of the summary / trace (`parathinker.spec.tokens.last_boxed`,
the extractor `RequestOutput.answer` uses); one without a box is wrong. A ParaThinker record with
path confidences (--confidence-window > 0) stores them (`path_confidences`) and the
confidence-weighted vote over its paths (DeepConf: each path's answer votes with its confidence).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from parathinker.eval.backends import ParallelResult, Trace
from parathinker.eval.config import EvalConfig
from parathinker.eval.grade import grade, majority_vote
from parathinker.eval.plan import Unit
from parathinker.spec.tokens import last_boxed

TAIL_CHARS = 400  # how much of a plain trace a record keeps without --save-text


def is_correct(gold: str, answer: str | None) -> bool:
    return answer is not None and grade(gold, f"\\boxed{{{answer}}}")


def _vote(gold: str, answers: list[str | None],
          confidences: list[float | None] | None = None) -> dict[str, Any]:
    """Each answer's correctness, the any-answer oracle and the majority vote; with confidences
    (any not None), the confidence-weighted vote too."""
    path_correct = [is_correct(gold, a) for a in answers]
    voted = majority_vote(answers)
    out = {"path_answers": answers, "path_correct": path_correct, "any_path_correct": any(path_correct),
           "majority_answer": voted, "majority_over_paths_correct": is_correct(gold, voted)}
    if confidences is not None and any(c is not None for c in confidences):
        weighted = majority_vote(answers, weights=confidences)
        out.update(path_confidences=confidences, confidence_majority_answer=weighted,
                   confidence_majority_correct=is_correct(gold, weighted))
    return out


def build_record(cfg: EvalConfig, unit: Unit, outputs: Sequence[Any],
                 server: str | None = None) -> dict[str, Any]:
    """The samples.jsonl line of a finished sample (field list in docs/EVAL.md); `server`: the
    endpoint URL that produced it (None: the project's engine, and no `server` field)."""
    gold = str(unit.problem["answer"])
    rec: dict[str, Any] = {"benchmark": unit.benchmark, "id": str(unit.problem["id"]), "mode": unit.mode,
                           "num_paths": unit.num_paths, "sample": unit.sample, "layout": unit.key[5],
                           "seed": unit.seed(cfg.seed), "gold": gold}
    if unit.mode == "parathinker":
        rec.update(stop_on_agreement=unit.gate.stop_on_agreement,
                   prune_confidence=unit.gate.prune_confidence)
        (out,) = outputs
        if not isinstance(out, ParallelResult):
            out = ParallelResult.of(out)  # the engine's RequestOutput
        answer = last_boxed(out.summary_text)
        rec.update(answer=answer, correct=is_correct(gold, answer), summary=out.summary_text,
                   summary_finish=out.summary_finish)
        rec.update(_vote(gold, [last_boxed(p.text) for p in out.paths],
                         [p.confidence for p in out.paths]))
        path_tokens = [p.num_tokens for p in out.paths]
        rec.update(path_tokens=path_tokens, path_finish=[p.finish_reason for p in out.paths],
                   prompt_tokens=out.num_prompt_tokens, summary_tokens=out.num_summary_tokens,
                   total_tokens=sum(path_tokens) + out.num_summary_tokens,
                   latency_s=out.latency_s, error=out.error)
        if cfg.save_text:
            rec["path_texts"] = [p.text for p in out.paths]
    else:
        traces: list[Trace] = list(outputs)
        counts = [t.num_tokens for t in traces]
        total = None if any(c is None for c in counts) else sum(c for c in counts if c is not None)
        common = {"prompt_tokens": traces[0].num_prompt_tokens, "total_tokens": total,
                  "latency_s": max(t.latency_s for t in traces),
                  "error": "; ".join(t.error for t in traces if t.error) or None}
        if unit.mode == "sequential":
            (t,) = traces
            rec.update(answer=t.answer, correct=is_correct(gold, t.answer), finish_reason=t.finish_reason,
                       **common)
            rec["response" if cfg.save_text else "response_tail"] = t.text if cfg.save_text \
                else t.text[-TAIL_CHARS:]
        else:  # majority: the N traces play the part of paths, the vote is the answer
            vote = _vote(gold, [t.answer for t in traces])
            rec.update(answer=vote["majority_answer"], correct=vote["majority_over_paths_correct"])
            rec.update({k: v for k, v in vote.items() if k not in ("majority_answer",
                                                                     "majority_over_paths_correct")})
            rec.update(path_tokens=counts, path_finish=[t.finish_reason for t in traces], **common)
            if cfg.save_text:
                rec["responses"] = [t.text for t in traces]
    if server is not None:
        rec["server"] = server
    rec["settings"] = cfg.settings(unit.mode, unit.num_paths, unit.gate)
    return rec
