"""The engine's contract with a request (its sample rows, one mask call per step) and the output
rules stated once in engine/outputs.py, checked against values typed in from SPEC §5."""

import torch

from parathinker.config import SamplingParams
from parathinker.engine.outputs import first_stop, summary_text_ids, trace_text_ids
from parathinker.engine.request import Request
from parathinker.engine.sampler import LogitMasks
from parathinker.spec.tokens import ControlTokens

# <think1..2> 100-101, </think1..2> 110-111, <summary> 120, </summary> 121, EOS 2, pad 122,
# <think> 123, </think> 124
CTRL = ControlTokens(think_open=(100, 101), think_close=(110, 111), summary_open=120,
                     summary_close=121, eos=2, pad=122, base_think_open=123, base_think_close=124)


def test_rows_say_which_paths_sample_their_mask_and_counter():
    # max_path_tokens=4: a path holding 3 tokens is at budget (closed, not sampled);
    # min_path_tokens=3: a path holding 1 token may not end (1 + 1 < 3), holding 2 it may.
    p = SamplingParams(num_paths=2, max_path_tokens=4, min_path_tokens=3, max_summary_tokens=8)
    req = Request("r", 0, [7, 8], p, CTRL, [120, 50])
    rows = req.sample_rows()
    assert [(r.path, r.mask, r.can_end, r.counter) for r in rows] == [
        (0, "path", False, (1 << 32) + 1), (1, "path", False, (2 << 32) + 1)]
    req.paths[0].tokens += [9, 9]  # path 1 now holds 3 tokens: at budget
    req.paths[1].tokens += [9]  # path 2 holds 2: it may end
    rows = req.sample_rows()
    assert [(r.path, r.can_end, r.counter) for r in rows] == [(1, True, (2 << 32) + 2)]
    assert all(r.owner is req for r in rows)


def test_one_mask_call_bans_each_rows_own_tokens():
    masks = LogitMasks(CTRL, "cpu")
    logits = torch.zeros(4, 130)
    masks.rows(logits, ["path", "path", "summary", None], [True, False, True, True])
    banned = [set(torch.nonzero(row == float("-inf")).flatten().tolist()) for row in logits]
    path = {100, 101, 120, 121, 123, 122}  # SPEC §5: <think{j}>, <summary>, </summary>, <think>, pad
    ends = {110, 111, 2, 124}  # </think{j}>, EOS, </think>
    assert banned[0] == path
    assert banned[1] == path | ends
    assert banned[2] == {100, 101, 110, 111, 120, 123, 124, 122}
    assert banned[3] == set()


def test_text_rules():
    assert summary_text_ids([120, 50, 51, 121], "end") == [50, 51]
    assert summary_text_ids([120, 50, 51, 52], "budget") == [50, 51, 52]
    assert summary_text_ids([120, 50, 51, 2], "stop") == [50, 51, 2]
    assert trace_text_ids([5, 6, 2], "end") == [5, 6]
    assert trace_text_ids([5, 6, 7], "budget") == [5, 6, 7]
    assert first_stop("ab\n\ncd END", ("END", "\n\n")) == 2
    assert first_stop("ab\n\ncd END", ("END", "\n\n"), 3) == 7
    assert first_stop("abc", ("x",)) is None
