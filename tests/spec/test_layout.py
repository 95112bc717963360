"""Layout functions against small hand-written matrices (SPEC §4)."""

import torch

from parathinker.spec.layout import PROMPT, SUMMARY, request_layout, summary_start, visibility
from parathinker.train.request_row import concat_rows, dense_mask, pack_request


def test_positions_segments_regions_by_hand():
    # prompt 3 tokens, path 1 holds 2, path 2 holds 3, summary 2
    lay = request_layout(3, [2, 3], 2)
    assert lay.positions == [0, 1, 2, 3, 4, 3, 4, 5, 6, 7]
    assert lay.segment_ids == [0, 0, 0, 1, 1, 2, 2, 2, 0, 0]
    assert lay.regions == [PROMPT] * 3 + [1, 1, 2, 2, 2] + [SUMMARY] * 2
    assert summary_start(3, [2, 3]) == 6


def test_visibility_by_hand():
    x, _ = 1, 0
    expected = [
        # p0 p1 a0 a1 b0 b1 b2 s0 s1
        [x, _, _, _, _, _, _, _, _],  # prompt 0
        [x, x, _, _, _, _, _, _, _],  # prompt 1
        [x, x, x, _, _, _, _, _, _],  # path 1, token 0
        [x, x, x, x, _, _, _, _, _],  # path 1, token 1
        [x, x, _, _, x, _, _, _, _],  # path 2 sees the prompt and itself only
        [x, x, _, _, x, x, _, _, _],
        [x, x, _, _, x, x, x, _, _],
        [x, x, x, x, x, x, x, x, _],  # summary sees everything before it
        [x, x, x, x, x, x, x, x, x],
    ]
    assert visibility(2, [2, 3], 2) == [[bool(v) for v in row] for row in expected]


def test_dense_mask_equals_visibility_and_separates_documents():
    row = pack_request([5, 6], [[7, 8], [9, 10, 11]], [12, 13])
    regions, docs = torch.tensor(row.regions), torch.tensor(row.doc_ids)
    assert dense_mask(regions, docs).tolist() == visibility(2, [2, 3], 2)
    both = concat_rows([row, pack_request([1], [[2, 3]], [4])])
    mask = dense_mask(torch.tensor(both.regions), torch.tensor(both.doc_ids))
    n = len(row)
    assert not mask[n:, :n].any() and not mask[:n, n:].any()
    assert mask[n:, n:].tolist() == visibility(1, [2], 1)
    assert both.positions[n:] == [0, 1, 2, 3] and both.starts[(1, -1)] == n + 3
