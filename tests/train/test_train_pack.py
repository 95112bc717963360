"""Training rows: targets by hand, path shuffling and relabelling, collation, the step plan."""

import random
from array import array

import pytest
import torch

from parathinker.spec.layout import request_layout
from parathinker.train.request_row import pack_request
from parathinker.spec.tokens import ControlTokens
from parathinker.train.data import TokenSample
from parathinker.train.pack import (IGNORE, PackOptions, build_row, collate, epoch_plan, make_row,
                                    pack_sample, path_indices, plan_rows, row_targets)
from parathinker.train.plan import StepPlan

_ = IGNORE


@pytest.fixture(scope="module")
def ctrl(tokenizer):
    return ControlTokens.from_tokenizer(tokenizer)


def sample(ctrl, prompt, paths, body, where="t:1", cut=()):
    return TokenSample(array("i", prompt), tuple(array("i", p) for p in paths),
                       array("i", [ctrl.summary_open, *body, ctrl.summary_close]), where, cut)


def test_targets_by_hand(ctrl):
    t1, c1, t2, c2 = ctrl.think_open[0], ctrl.think_close[0], ctrl.think_open[1], ctrl.think_close[1]
    s, cs = ctrl.summary_open, ctrl.summary_close
    ts = sample(ctrl, [5, 6, 7], [[10, 11], [12]], [20])
    row = build_row([ts], ctrl, PackOptions(shuffle_paths=False), random.Random(0))
    assert row.row.input_ids == [5, 6, 7, t1, 10, 11, c1, t2, 12, c2, s, 20, cs]
    assert row.targets == [
        _, _, _,            # the prompt predicts nothing (the paths start with a forced tag)
        10, 11, c1, _,      # path 1: <think1> -> 10 -> 11 -> </think1>; </think1> predicts nothing
        12, c2, _,          # path 2, NOT predicted from path 1's last token
        20, cs, _,          # summary: <summary> -> 20 -> </summary>
    ]
    assert row.num_targets == ts.num_targets == 7


def test_a_cut_path_keeps_its_end_tag_in_the_row_but_not_as_a_target(ctrl):
    t1, c1, t2, c2 = ctrl.think_open[0], ctrl.think_close[0], ctrl.think_open[1], ctrl.think_close[1]
    s, cs = ctrl.summary_open, ctrl.summary_close
    ts = sample(ctrl, [5, 6, 7], [[10, 11], [12]], [20], cut=(True, False))
    row = build_row([ts], ctrl, PackOptions(shuffle_paths=False), random.Random(0))
    assert row.row.input_ids == [5, 6, 7, t1, 10, 11, c1, t2, 12, c2, s, 20, cs]  # as uncut
    assert row.targets == [
        _, _, _,
        10, 11, _, _,       # path 1 was cut: 11 -> </think1> is the policy's, not trained
        12, c2, _,          # path 2 ended by itself: its end is trained
        20, cs, _,
    ]
    assert row.num_targets == ts.num_targets == 6


def test_cut_paths_lose_exactly_their_end_targets_when_shuffled_and_packed(ctrl):
    """Packed with another sample and shuffled over indices: the untrained positions are those
    where the row holds a path's last token followed by its own </think{k}>, for the cut paths."""
    paths = [[10, 11, 12], [13], [14, 15], [16, 17]]
    a = sample(ctrl, [5, 6], paths, [20], cut=(False, True, True, False))
    b = sample(ctrl, [7], [[18, 19]], [21], cut=(True,))
    plain = [sample(ctrl, [5, 6], paths, [20]), sample(ctrl, [7], [[18, 19]], [21])]
    opts = PackOptions(shuffle_paths=True, extend_prob=0.5)
    for seed in range(8):
        got = build_row([a, b], ctrl, opts, random.Random(seed))
        whole = build_row(plain, ctrl, opts, random.Random(seed))
        assert got.row.input_ids == whole.row.input_ids
        ids = got.row.input_ids
        cut_last = {13, 15, 19}  # the last tokens of a's paths 2 and 3 and of b's path
        dropped = [i for i in range(len(ids) - 1) if ids[i] in cut_last and ids[i + 1] in ctrl.think_close]
        assert len(dropped) == 3
        assert [i for i, (x, y) in enumerate(zip(got.targets, whole.targets)) if x != y] == dropped
        assert all(got.targets[i] == IGNORE for i in dropped)
        assert got.num_targets == whole.num_targets - 3 == a.num_targets + b.num_targets


def test_targets_stop_at_document_boundaries(ctrl):
    a = sample(ctrl, [5], [[10]], [20])
    b = sample(ctrl, [6, 7], [[11, 12]], [21])
    row = build_row([a, b], ctrl, PackOptions(shuffle_paths=False), random.Random(0))
    n = len(pack_request([5], [[0, 10, 0]], [0, 20, 0]))
    assert row.targets[n - 1] == IGNORE  # a's </summary> does not predict b's first prompt token
    assert row.targets[:n] == [_, 10, ctrl.think_close[0], _, 20, ctrl.summary_close, _]
    assert row.row.doc_ids == [0] * n + [1] * (len(row.row) - n)
    assert row.num_targets == a.num_targets + b.num_targets


def test_row_targets_follow_regions_of_any_packed_request():
    row = pack_request([1, 2], [[3, 4, 5], [6, 7]], [8, 9, 10])
    assert row_targets(row) == [_, _, 4, 5, _, 7, _, 9, 10, _]


def test_path_indices_shuffle_and_extension():
    opts = PackOptions(shuffle_paths=True, extend_prob=0.0, num_path_tokens=8)
    seen = {tuple(path_indices(4, opts, random.Random(i))) for i in range(40)}
    assert all(sorted(ks) == [1, 2, 3, 4] for ks in seen) and len(seen) > 5
    assert path_indices(4, PackOptions(shuffle_paths=False), random.Random(0)) == [1, 2, 3, 4]
    ext = PackOptions(shuffle_paths=False, extend_prob=1.0, num_path_tokens=8)
    for i in range(20):
        ks = path_indices(3, ext, random.Random(i))
        assert sorted(ks)[1:] == [7, 8] and sorted(ks)[0] in (1, 2, 3)
    assert path_indices(7, ext, random.Random(0)) == list(range(1, 8))  # no room: unchanged
    assert path_indices(1, ext, random.Random(0)) == [1]  # one path: nothing to relabel


def test_relabelled_paths_use_their_tokens_segments_and_restart_positions(ctrl):
    ts = sample(ctrl, [5, 6], [[10, 11], [12], [13, 14, 15]], [20])
    opts = PackOptions(shuffle_paths=False, extend_prob=1.0, num_path_tokens=8)
    rng = random.Random(3)
    ks = path_indices(3, opts, random.Random(3))
    row = pack_sample(ts, ctrl, opts, rng)
    lens = [0] * 8
    for k, p in zip(ks, ts.path_ids):
        lens[k - 1] = len(p) + 2
    lay = request_layout(2, lens, 3)
    assert (row.positions, row.segment_ids, row.regions) == (lay.positions, lay.segment_ids, lay.regions)
    for k, p in zip(ks, ts.path_ids):
        start = row.starts[(0, k)]
        tagged = [ctrl.think_open[k - 1], *p, ctrl.think_close[k - 1]]
        assert row.input_ids[start:start + len(p) + 2] == tagged
        assert row.segment_ids[start] == k and row.positions[start] == 2
    assert set(row.segment_ids) == {0, *ks}


def test_collate_pads_into_its_own_document(ctrl):
    rows = [build_row([sample(ctrl, [5], [[10]], [20])], ctrl, PackOptions(), random.Random(0)),
            build_row([sample(ctrl, [5, 6, 7], [[10, 11, 12]], [20, 21])], ctrl, PackOptions(),
                      random.Random(1))]
    b = collate(rows, pad_id=0, multiple=8)
    assert b["input_ids"].shape == (2, 16) and all(v.dtype == torch.long for v in b.values())
    n = len(rows[0].row)
    assert (b["doc_ids"][0, n:] == -1).all() and (b["targets"][0, n:] == IGNORE).all()
    assert b["targets"][0, :n].tolist() == rows[0].targets


def test_plan_rows_and_epoch_plan():
    assert plan_rows([5, 5, 5, 9, 1], 10) == [[0, 1], [2], [3, 4]]
    assert plan_rows([5, 5], 10, pack=False) == [[0], [1]]
    with pytest.raises(ValueError, match="max_row_tokens"):
        plan_rows([11], 10)


def test_step_plan_covers_each_epoch_and_is_deterministic(ctrl):
    samples = [sample(ctrl, [5] * (1 + i % 3), [[10] * (1 + i % 4)], [20]) for i in range(11)]
    plan = StepPlan.build(samples, 12, seed=1, num_epochs=2, max_steps=None, rows_per_step=4)
    again = StepPlan.build(samples, 12, seed=1, num_epochs=2, max_steps=None, rows_per_step=4)
    assert plan == again
    for e, rows in enumerate(plan.epochs):
        assert sorted(i for r in rows for i in r) == list(range(11))
        assert rows == tuple(tuple(r) for r in epoch_plan(samples, 12, 1, e))
    assert plan.total_steps == sum(plan.steps_in_epoch(e) for e in range(2))
    # the processes and accumulation steps of a step partition its rows
    world, accum, bs = 2, 2, 1
    for step in range(plan.total_steps):
        got = [plan.micro_batch(step, a, r, world, bs) for a in range(accum) for r in range(world)]
        assert [x for m in got for x in m] == plan.step_rows(step)
    longer = StepPlan.build(samples, 12, seed=1, num_epochs=1, max_steps=50, rows_per_step=4)
    assert longer.total_steps == 50 and len(longer.epochs) > 1
    # rows are rebuilt identically (a resumed run trains on the same rows)
    e, r = plan.step_rows(3)[0]
    opts = PackOptions(max_row_tokens=12, extend_prob=0.5)
    a = make_row(samples, plan.epochs[e][r], ctrl, opts, 1, e, r)
    b = make_row(samples, plan.epochs[e][r], ctrl, opts, 1, e, r)
    assert (a.row.input_ids, a.targets) == (b.row.input_ids, b.targets)


def test_epoch_is_the_fraction_of_the_data_seen(ctrl):
    """10 rows (no packing: one sample each), 4 rows per optimizer step: 3 steps an epoch, the
    last one wrapping around to 2 rows already seen. After k steps of an epoch, min(4k, 10) of
    its 10 rows have been trained on."""
    samples = [sample(ctrl, [5], [[10]], [20]) for _ in range(10)]
    plan = StepPlan.build(samples, 12, seed=0, num_epochs=2, max_steps=None, rows_per_step=4, pack=False)
    assert [len(rows) for rows in plan.epochs] == [10, 10] and plan.total_steps == 6
    expected = [e + min(4 * k, 10) / 10 for e in range(2) for k in (1, 2, 3)]
    assert [plan.epoch_progress(s) for s in range(6)] == pytest.approx(expected)
    assert expected == pytest.approx([0.4, 0.8, 1.0, 1.4, 1.8, 2.0])
