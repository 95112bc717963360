"""Pack one request (prompt, paths, summary) into one row for a dense (training) forward.

Positions, segment ids and visibility come from `parathinker.spec.layout`, the same functions the
generator and the engine follow, so a training forward over a generated request reproduces the
engine's logits. Several requests can share a row (`doc_ids` keep them apart).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from parathinker.spec.layout import can_see, request_layout


@dataclass
class PackedRow:
    input_ids: list[int]
    positions: list[int]
    segment_ids: list[int]
    regions: list[int]
    doc_ids: list[int]
    # Where each region of each request starts in the row: (doc, region) -> start index.
    starts: dict[tuple[int, int], int]

    def __len__(self) -> int:
        return len(self.input_ids)


def pack_request(prompt_ids: Sequence[int], path_ids: Sequence[Sequence[int]],
                 summary_ids: Sequence[int], doc: int = 0) -> PackedRow:
    layout = request_layout(len(prompt_ids), [len(p) for p in path_ids], len(summary_ids))
    input_ids = list(prompt_ids) + [t for p in path_ids for t in p] + list(summary_ids)
    starts, i = {(doc, 0): 0}, len(prompt_ids)
    for k, p in enumerate(path_ids, start=1):
        starts[(doc, k)] = i
        i += len(p)
    starts[(doc, -1)] = i
    return PackedRow(input_ids, layout.positions, layout.segment_ids, layout.regions,
                     [doc] * len(input_ids), starts)


def concat_rows(rows: Sequence[PackedRow]) -> PackedRow:
    """Several packed requests in one row; each keeps its own document id."""
    out = PackedRow([], [], [], [], [], {})
    for doc, row in enumerate(rows):
        offset = len(out)
        out.input_ids += row.input_ids
        out.positions += row.positions
        out.segment_ids += row.segment_ids
        out.regions += row.regions
        out.doc_ids += [doc] * len(row)
        out.starts.update({(doc, region): s + offset for (_, region), s in row.starts.items()})
    return out


def dense_mask(regions: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """[..., L] region and document ids -> [..., L, L] bool visibility (small rows, CPU)."""
    idx = torch.arange(regions.shape[-1], device=regions.device)
    return can_see(idx[:, None], idx[None, :], regions[..., :, None], regions[..., None, :],
                   doc_ids[..., :, None], doc_ids[..., None, :])


def row_tensors(row: PackedRow, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """[1, L] tensors of a packed row, plus its dense [1, L, L] mask."""
    t = lambda x: torch.tensor([x], dtype=torch.long, device=device)  # noqa: E731
    regions, docs = t(row.regions), t(row.doc_ids)
    return {"input_ids": t(row.input_ids), "positions": t(row.positions),
            "segment_ids": t(row.segment_ids), "mask": dense_mask(regions, docs)}
