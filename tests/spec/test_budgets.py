"""The context rule (spec/budgets, its one statement) against positions counted by hand from
SPEC §4 (native: prompt, then every path from the prompt's end, then the summary) and SPEC §6
(reference: the summary starts at 2·Lp + L, Lp the prompt with one more BOS padded to 16, the
summary capped at 128 tokens, paths in 16s)."""

import pytest

from parathinker.spec.budgets import check_context, path_room, round_paths, trace_room


def test_native_positions_are_prompt_plus_paths_plus_summary():
    # 30 prompt + 50 path + 20 summary = 100 positions
    check_context(30, 50, 20, 100)
    with pytest.raises(ValueError) as e:
        check_context(30, 51, 20, 100)
    assert str(e.value) == ("prompt (30) + max_path_tokens (51) + max_summary_tokens (20) = 101 "
                            "positions exceed the model's context (100); lower the budgets")
    assert path_room(100, 30, 20) == 50
    assert path_room(100, 90, 20) == -10  # nothing fits: callers leave it to check_context


def test_reference_positions_double_the_padded_prompt_and_cap_the_summary():
    # 20 tokens + a second BOS = 21, padded to 32: the summary starts at 2 x 32 + L;
    # max_summary_tokens 200 is capped at 128. 300 - 64 - 128 = 108 -> 96 in 16s.
    assert path_room(300, 20, 200, "reference") == 96
    check_context(20, 96, 200, 300, "reference")
    with pytest.raises(ValueError) as e:
        check_context(20, 112, 200, 300, "reference")
    assert str(e.value) == ("layout='reference' places the summary at 2 x padded prompt (32) + "
                            "max_path_tokens (112); with its 128 tokens that is 304 positions, "
                            "more than the model's context (300); lower the budgets")
    # without a BOS, 16 tokens need no pad: 300 - 32 - 128 = 140 -> 128
    assert path_room(300, 16, 200, "reference", has_bos=False) == 128
    # the same request fits the native layout: 20 + 112 + 200 = 332 > 300, but 20 + 80 + 200 fits
    check_context(20, 80, 200, 300)


def test_path_budgets_round_down_to_the_layouts_multiple():
    assert [round_paths(n, "reference") for n in (3, 16, 31, 32, 100)] == [16, 16, 16, 32, 96]
    assert [round_paths(n) for n in (3, 31, 100)] == [3, 31, 100]
    assert trace_room(320, 45) == 275  # a plain trace: prompt + max_tokens <= context
