"""Training rows: samples -> packed rows with per-position targets, and rows -> batch tensors.

One sample becomes prompt | path 1 | ... | path P | summary, laid out by `parathinker.train.request_row`
(the layout functions inference uses). Several samples may share a row (`concat_rows`: they
never see each other). The target of position i is the token the generator would produce next
*in the same sequence*: path token j+1 for path token j, summary token j+1 for summary token j.
The last token of every region, and every prompt token, predicts nothing that is trained
(target -100): in packed order the last token of path 1 is followed by path 2's `<think2>`,
which no path ever generates. A path the sample marks cut (closed early by an inference policy,
`TokenSample.path_cut`) keeps its `</think{k}>` in the row, but its last token's target is -100:
the summary reads the cut path as at inference, and no path learns to end mid-step.

Per row, paths are shuffled over their indices 1..P, and with probability `extend_prob` two
of them are relabelled to the two highest path indices the model has (the paper's
extensible-token augmentation: `<think7>`, `<think8>` get trained on data with up to 6 paths).
All randomness comes from an explicit `random.Random`, so an epoch's rows are reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from parathinker.spec.layout import PROMPT
from parathinker.train.request_row import PackedRow, concat_rows, pack_request
from parathinker.spec.tokens import ControlTokens
from parathinker.train.data import TokenSample

IGNORE = -100


@dataclass(frozen=True)
class PackOptions:
    max_row_tokens: int = 28672
    shuffle_paths: bool = True
    extend_prob: float = 0.0  # the reference trains with 0.3
    num_path_tokens: int = 8  # highest path index k with a <think{k}> token


@dataclass
class TrainRow:
    row: PackedRow
    targets: list[int]

    @property
    def num_targets(self) -> int:
        return sum(t != IGNORE for t in self.targets)


def row_targets(row: PackedRow) -> list[int]:
    """Next token of the same (document, region), -100 where there is none or in the prompt."""
    ids, regions, docs = row.input_ids, row.regions, row.doc_ids
    out = [IGNORE] * len(ids)
    for i in range(len(ids) - 1):
        if regions[i] != PROMPT and regions[i] == regions[i + 1] and docs[i] == docs[i + 1]:
            out[i] = ids[i + 1]
    return out


def path_indices(num_paths: int, opts: PackOptions, rng: random.Random) -> list[int]:
    """The path index k (1-based) given to each of a sample's paths, in data order."""
    ks = list(range(1, num_paths + 1))
    if opts.shuffle_paths:
        rng.shuffle(ks)
    top = opts.num_path_tokens
    if num_paths >= 2 and num_paths <= top - 2 and rng.random() < opts.extend_prob:
        a, b = rng.sample(range(num_paths), 2)
        ks[a], ks[b] = rng.sample([top - 1, top], 2)
    return ks


def pack_sample(ts: TokenSample, ctrl: ControlTokens, opts: PackOptions,
                rng: random.Random) -> PackedRow:
    """One sample as a packed request; path k sits at its index (unused indices are empty)."""
    return _pack(ts, path_indices(len(ts.path_ids), opts, rng), ctrl)


def _pack(ts: TokenSample, ks: Sequence[int], ctrl: ControlTokens) -> PackedRow:
    slots: list[list[int]] = [[] for _ in range(max(ks))]
    for k, content in zip(ks, ts.path_ids):
        slots[k - 1] = [ctrl.think_open[k - 1], *content, ctrl.think_close[k - 1]]
    return pack_request(ts.prompt_ids, slots, ts.summary_ids)


def plan_rows(lengths: Sequence[int], max_row_tokens: int, pack: bool = True) -> list[list[int]]:
    """Group sample indices, in the given order, into rows of at most `max_row_tokens`."""
    rows: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if n > max_row_tokens:
            raise ValueError(f"sample {i} holds {n} tokens > max_row_tokens={max_row_tokens}")
        if rows and pack and used + n <= max_row_tokens:
            rows[-1].append(i)
            used += n
        else:
            rows.append([i])
            used = n
    return rows


def build_row(samples: Sequence[TokenSample], ctrl: ControlTokens, opts: PackOptions,
              rng: random.Random) -> TrainRow:
    ks = [path_indices(len(ts.path_ids), opts, rng) for ts in samples]
    row = concat_rows([_pack(ts, k, ctrl) for ts, k in zip(samples, ks)])
    targets = row_targets(row)
    for doc, (ts, doc_ks) in enumerate(zip(samples, ks)):
        for k, content, cut in zip(doc_ks, ts.path_ids, ts.path_cut):
            if cut:  # the last path token's target is the policy's </think{k}>: not trained
                targets[row.starts[(doc, k)] + len(content)] = IGNORE
    return TrainRow(row, targets)


def collate(rows: Sequence[TrainRow], pad_id: int, multiple: int = 8) -> dict[str, torch.Tensor]:
    """[B, L] tensors, L padded up to a multiple of `multiple`. Pad tokens form their own
    document (-1): nothing real sees them, and they have no target."""
    length = max(len(r.row) for r in rows)
    length = -(-length // multiple) * multiple
    cols: dict[str, list[list[int]]] = {k: [] for k in ("input_ids", "positions", "segment_ids",
                                                        "regions", "doc_ids", "targets")}
    for r in rows:
        pad = length - len(r.row)
        cols["input_ids"].append(r.row.input_ids + [pad_id] * pad)
        cols["positions"].append(r.row.positions + [0] * pad)
        cols["segment_ids"].append(r.row.segment_ids + [0] * pad)
        cols["regions"].append(r.row.regions + [PROMPT] * pad)
        cols["doc_ids"].append(r.row.doc_ids + [-1] * pad)
        cols["targets"].append(r.targets + [IGNORE] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in cols.items()}


def epoch_plan(samples: Sequence[TokenSample], max_row_tokens: int, seed: int, epoch: int,
               shuffle: bool = True, pack: bool = True) -> list[list[int]]:
    """Sample indices of each row of one epoch: samples shuffled (seeded by seed and epoch),
    then grouped in that order. Only indices: rows are built when they are trained on."""
    order = list(range(len(samples)))
    if shuffle:
        random.Random(f"order-{seed}-{epoch}").shuffle(order)
    groups = plan_rows([samples[i].num_tokens for i in order], max_row_tokens, pack)
    return [[order[j] for j in group] for group in groups]


def make_row(samples: Sequence[TokenSample], group: Sequence[int], ctrl: ControlTokens,
             opts: PackOptions, seed: int, epoch: int, index: int) -> TrainRow:
    """Row `index` of an epoch's plan; its path shuffling and relabelling are seeded by
    (seed, epoch, index), so a resumed run rebuilds exactly the same row."""
    rng = random.Random(f"row-{seed}-{epoch}-{index}")
    return build_row([samples[i] for i in group], ctrl, opts, rng)
