"""SFT data: the JSONL sample format, its validation, tokenization, and the reference-row converter.

One training sample per line:

    {"question": "What is 2+3?", "paths": ["First path ...", "Second path ..."], "summary": " \\boxed{5}."}

Path texts come without their `<think{k}>` tags (the index k is chosen when packing: paths are
shuffled); the summary comes without `<summary>`/`</summary>`. An optional `"cut"`, a list of
booleans parallel to `"paths"` (an extension of SPEC, docs/TRAINING.md), marks the paths that
did not end by themselves (closed by the engine: finish reason "cut", "pruned" or "budget"): such
a path keeps its text and its `</think{k}>` in the row, but that end tag is not a training target.
The prompt template (SPEC §3) is applied to the question; a summary that does not start with the
summary template's text gets it prepended (`TextFormat.prepend_summary_template`), so training
matches what inference forces.

A line may instead hold a row of the reference dataset (pre-tokenized): `input_ids`, an
`attention_mask` of segment indices (1 prompt, 2..P+1 path 1..P, 10 summary, 0 padding) and
`labels` (ignored: targets are rebuilt from the layout). Both kinds become a `TokenSample`.
Every error names the file and the line.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parathinker.spec.tokens import (DEFAULT_PROMPT_TEMPLATE, DEFAULT_SUMMARY_TEMPLATE, SUMMARY_OPEN,
                                ControlTokens)

REF_PROMPT, REF_SUMMARY = 1, 10  # segment indices in the reference rows' attention_mask


class SampleError(ValueError):
    """A bad training sample; the message starts with `file:line:`."""


@dataclass(frozen=True)
class Sample:
    question: str
    paths: tuple[str, ...]
    summary: str
    cut: tuple[bool, ...] = ()  # per path: closed by policy (empty: none)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"question": self.question, "paths": list(self.paths),
                               "summary": self.summary}
        if any(self.cut):
            out["cut"] = list(self.cut)
        return out


@dataclass(frozen=True)
class TokenSample:
    """A tokenized sample. Paths hold their content tokens only (no tags): the packer adds
    `<think{k}>`/`</think{k}>` for the index k it assigns. Token ids are stored as compact
    `array('i')` (a 6K-sample, 100M-token data set stays a few hundred MB per process)."""

    prompt_ids: Sequence[int]
    path_ids: tuple[Sequence[int], ...]
    summary_ids: Sequence[int]  # <summary> template ... </summary>
    where: str = ""  # "file:line", for messages
    path_cut: tuple[bool, ...] = ()  # per path: closed by policy, its end tag untrained (empty: none)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + sum(len(p) + 2 for p in self.path_ids) + len(self.summary_ids)

    @property
    def num_targets(self) -> int:
        """Trained positions: each path's tokens after <think{k}> (its </think{k}> included unless
        the path is cut) and the summary's tokens after <summary>."""
        return (sum(len(p) + 1 for p in self.path_ids) - sum(self.path_cut)
                + len(self.summary_ids) - 1)


def ids(tokens: Sequence[int]) -> array:
    return array("i", tokens)


@dataclass(frozen=True)
class TextFormat:
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    summary_template: str = DEFAULT_SUMMARY_TEMPLATE
    prepend_summary_template: bool = True

    def __post_init__(self) -> None:
        if "{question}" not in self.prompt_template:
            raise ValueError("prompt_template must contain '{question}'")

    def prompt(self, question: str) -> str:
        return self.prompt_template.replace("{question}", question)  # exactly as LLM does

    @property
    def summary_text_prefix(self) -> str:
        """The template as it appears in a sample's summary text (without `<summary>`)."""
        return self.summary_template.removeprefix(SUMMARY_OPEN)


@dataclass(frozen=True)
class Limits:
    max_row_tokens: int  # one sample must fit one row
    max_paths: int  # path tokens <think1>..<think{max_paths}> usable by the model
    max_positions: int  # the model's max_position_embeddings


def parse_sample(record: Any, where: str) -> Sample:
    if not isinstance(record, dict):
        raise SampleError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "problem" in record and "question" not in record and "paths" not in record:
        file = where.rpartition(":")[0] or where
        raise SampleError(
            f"{where}: this is a problem ({{id, problem, answer}}: a problems or benchmark file), "
            "not a training sample ({question, paths, summary}); make samples from it first: "
            f"`parathinker build-data --teacher MODEL_OR_URL --problems {file} --output "
            "data.jsonl` (docs/TRAINING.md), then train on data.jsonl")
    question, paths, summary = record.get("question"), record.get("paths"), record.get("summary")
    if not isinstance(question, str) or not question.strip():
        raise SampleError(f"{where}: 'question' must be a non-empty string")
    if not isinstance(paths, list) or not paths:
        raise SampleError(f"{where}: 'paths' must be a non-empty list of strings (a sample "
                          "without paths cannot train parallel thinking)")
    for k, p in enumerate(paths, start=1):
        if not isinstance(p, str) or not p.strip():
            raise SampleError(f"{where}: path {k} must be a non-empty string")
    if not isinstance(summary, str) or not summary.strip():
        raise SampleError(f"{where}: 'summary' must be a non-empty string")
    return Sample(question, tuple(paths), summary, parse_cut(record.get("cut"), len(paths), where))


def parse_cut(cut: Any, num_paths: int, where: str) -> tuple[bool, ...]:
    """A sample's optional "cut" list: one boolean per path (absent or null: none cut)."""
    if cut is None:
        return ()
    if (not isinstance(cut, list) or len(cut) != num_paths
            or not all(isinstance(c, bool) for c in cut)):
        raise SampleError(f"{where}: 'cut' must be a list of {num_paths} booleans, one per path "
                          f"(true: the engine closed the path, it did not end by itself), got {json.dumps(cut)[:80]}")
    return tuple(cut)


def iter_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(file:line, parsed JSON) per non-blank line; a malformed line yields a SampleError object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, SampleError(f"{where}: invalid JSON ({e.msg} at column {e.colno})")


def read_samples(path: str | Path, skip_invalid: bool = False) -> tuple[list[Sample], list[str]]:
    """Text samples of a JSONL file, and the messages of the lines skipped (`skip_invalid`)."""
    samples, skipped = [], []
    for where, record in iter_jsonl(path):
        try:
            if isinstance(record, SampleError):
                raise record
            samples.append(parse_sample(record, where))
        except SampleError as e:
            if not skip_invalid:
                raise
            skipped.append(str(e))
    return samples, skipped


def write_samples(path: str | Path, samples: Sequence[Sample]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s.to_dict(), ensure_ascii=False) + "\n")
    tmp.replace(path)


class SampleEncoder:
    """Text sample -> TokenSample with the tokenizer, the templates and the model's limits."""

    def __init__(self, tokenizer: Any, fmt: TextFormat, limits: Limits) -> None:
        self.tokenizer, self.fmt, self.limits = tokenizer, fmt, limits
        self.num_ids = len(tokenizer)
        self.ctrl = ControlTokens.from_tokenizer(tokenizer)
        self.template_ids = tuple(self.encode_text(fmt.summary_template))
        # Tokens that end or are masked in a path or a summary at inference (SPEC §5): a sample
        # holding one inside would teach what generation can never follow.
        ctrl = self.ctrl
        self.banned = {ctrl.summary_open, ctrl.summary_close, ctrl.eos, *ctrl.think_open,
                       *ctrl.think_close}
        self.banned |= {t for t in (ctrl.base_think_open, ctrl.base_think_close, ctrl.pad)
                        if t is not None}

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def summary_ids(self, summary: str) -> array:
        prefix = self.fmt.summary_text_prefix
        if summary.startswith(prefix):  # tokenized apart, as inference forces the template
            body = self.template_ids + tuple(self.encode_text(summary[len(prefix):]))
        elif self.fmt.prepend_summary_template:
            body = self.template_ids + tuple(self.encode_text(summary))
        else:
            body = (self.ctrl.summary_open, *self.encode_text(summary))
        return ids((*body, self.ctrl.summary_close))

    def encode(self, sample: Sample, where: str = "") -> TokenSample:
        prompt = ids(self.tokenizer.encode(self.fmt.prompt(sample.question)))  # with BOS, as LLM
        paths = tuple(ids(self.encode_text(p)) for p in sample.paths)
        return self.check(TokenSample(prompt, paths, self.summary_ids(sample.summary), where,
                                      sample.cut))

    def check(self, ts: TokenSample) -> TokenSample:
        """Path count, lengths and stray control tokens; raises SampleError naming ts.where."""
        lim, where = self.limits, ts.where or "sample"
        parts = [ts.prompt_ids, ts.summary_ids, *ts.path_ids]
        lo, hi = min(min(p, default=0) for p in parts), max(max(p, default=0) for p in parts)
        if lo < 0 or hi >= self.num_ids:
            raise SampleError(f"{where}: token id {lo if lo < 0 else hi} is outside the "
                              f"tokenizer's {self.num_ids} ids (rows made with another tokenizer?)")
        if not ts.path_ids:
            raise SampleError(f"{where}: sample has no paths")
        if ts.path_cut and len(ts.path_cut) != len(ts.path_ids):
            raise SampleError(f"{where}: {len(ts.path_cut)} cut flags for {len(ts.path_ids)} paths")
        if len(ts.path_ids) > lim.max_paths:
            raise SampleError(
                f"{where}: sample has {len(ts.path_ids)} paths but the model has only "
                f"{lim.max_paths} path tokens (<think1>..<think{lim.max_paths}>); raise "
                "--num-path-tokens (new tokens are added and trained) or drop the sample")
        for k, p in enumerate(ts.path_ids, start=1):
            if not p:
                raise SampleError(f"{where}: path {k} is empty")
            bad = self.banned.intersection(p)
            if bad:
                raise SampleError(f"{where}: path {k} contains control token(s) "
                                  f"{self.tokenizer.convert_ids_to_tokens(sorted(bad))}")
        inner = ts.summary_ids[1:-1]
        bad = self.banned.intersection(inner)
        if bad:
            raise SampleError(f"{where}: summary contains control token(s) "
                              f"{self.tokenizer.convert_ids_to_tokens(sorted(bad))}")
        if ts.num_tokens > lim.max_row_tokens:
            raise SampleError(f"{where}: sample holds {ts.num_tokens} tokens, more than the maximum "
                              f"row length {lim.max_row_tokens} (--max-row-tokens)")
        last_pos = len(ts.prompt_ids) + max(len(p) + 2 for p in ts.path_ids) + len(ts.summary_ids)
        if last_pos > lim.max_positions:
            raise SampleError(f"{where}: sample needs {last_pos} positions, more than the model's "
                              f"{lim.max_positions} (max_position_embeddings)")
        return ts


# ----- the reference dataset's pre-tokenized rows

def split_reference_row(input_ids: Sequence[int], attention_mask: Sequence[int],
                        ctrl: ControlTokens, where: str = "row") -> TokenSample:
    """A reference row -> TokenSample. Padding (mask 0) is dropped; the prompt (1), the paths
    (2..P+1, each opening with some <think{j}> and closing with its </think{j}>) and the summary
    (10, opening with <summary>; a trailing EOS after </summary> is dropped) must come in that
    order, each contiguous. A row does not say how a path ended: none is marked cut."""
    if len(input_ids) != len(attention_mask):
        raise SampleError(f"{where}: input_ids ({len(input_ids)}) and attention_mask "
                          f"({len(attention_mask)}) differ in length")
    runs: list[tuple[int, list[int]]] = []  # (segment index, tokens), in row order
    for tok, seg in zip(input_ids, attention_mask):
        if seg == 0:
            continue
        if runs and runs[-1][0] == seg:
            runs[-1][1].append(int(tok))
        else:
            runs.append((int(seg), [int(tok)]))
    segs = [s for s, _ in runs]
    num_paths = len(segs) - 2
    expected = [REF_PROMPT, *range(2, num_paths + 2), REF_SUMMARY]
    if num_paths < 1 or segs != expected:
        raise SampleError(f"{where}: segment indices {segs} are not 1, 2..P+1, 10 in order "
                          "(prompt, paths, summary)")
    paths = []
    for k, (_, toks) in enumerate(runs[1:-1], start=1):
        if toks[0] not in ctrl.think_open:
            raise SampleError(f"{where}: path {k} does not open with a <think{{j}}> token")
        j = ctrl.think_open.index(toks[0])
        if len(toks) < 2 or toks[-1] != ctrl.think_close[j]:
            raise SampleError(f"{where}: path {k} does not end with </think{j + 1}> (truncated?)")
        paths.append(ids(toks[1:-1]))
    summary = runs[-1][1]
    while summary and summary[-1] == ctrl.eos and summary[-1] != ctrl.summary_close:
        summary = summary[:-1]
    if not summary or summary[0] != ctrl.summary_open or summary[-1] != ctrl.summary_close:
        raise SampleError(f"{where}: the summary must open with <summary> and end with "
                          "</summary> (truncated?)")
    return TokenSample(ids(runs[0][1]), tuple(paths), ids(summary), where)


def token_sample_to_text(ts: TokenSample, tokenizer: Any, fmt: TextFormat) -> Sample:
    """Decode a TokenSample into the text format; the question is cut out of the prompt
    template (a prompt that does not match the template is an error)."""
    decode = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False)  # noqa: E731
    prompt = decode(ts.prompt_ids)
    if tokenizer.bos_token and prompt.startswith(tokenizer.bos_token):
        prompt = prompt[len(tokenizer.bos_token):]
    before, after = fmt.prompt_template.split("{question}", 1)
    if not (prompt.startswith(before) and prompt.endswith(after)
            and len(prompt) >= len(before) + len(after)):
        raise SampleError(f"{ts.where}: the prompt does not match the prompt template "
                          f"({prompt[:80]!r}...); pass the template the data was made with")
    question = prompt[len(before):len(prompt) - len(after)]
    summary = decode(ts.summary_ids[1:-1])
    return Sample(question, tuple(decode(p) for p in ts.path_ids), summary, ts.path_cut)


def load_token_samples(path: str | Path, encoder: SampleEncoder, skip_invalid: bool = False
                       ) -> tuple[list[TokenSample], list[str]]:
    """Every line of a JSONL file (text samples or reference rows, mixed freely) as a checked
    TokenSample; with `skip_invalid`, bad lines are dropped and their messages returned."""
    out, skipped = [], []
    for where, record in iter_jsonl(path):
        try:
            if isinstance(record, SampleError):
                raise record
            if isinstance(record, dict) and "input_ids" in record:
                ids, mask = record.get("input_ids"), record.get("attention_mask")
                if not isinstance(ids, list) or not isinstance(mask, list):
                    raise SampleError(f"{where}: a reference row needs lists input_ids and "
                                      "attention_mask")
                out.append(encoder.check(split_reference_row(ids, mask, encoder.ctrl, where)))
            else:
                out.append(encoder.encode(parse_sample(record, where), where))
        except SampleError as e:
            if not skip_invalid:
                raise
            skipped.append(str(e))
    if not out:
        first = f" ({len(skipped)} skipped; first: {skipped[0]})" if skipped else ""
        raise SampleError(f"{path}: no usable samples{first}")
    return out, skipped
