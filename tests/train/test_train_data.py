"""SFT data: format, validation messages with file:line, tokenization as inference does it, and
the converter from the reference dataset's pre-tokenized rows."""

import json

import pytest

from parathinker.spec.tokens import DEFAULT_SUMMARY_TEMPLATE, ControlTokens
from parathinker.train.cli import main
from parathinker.train.data import (Limits, Sample, SampleEncoder, SampleError, TextFormat,
                                    load_token_samples, read_samples, split_reference_row,
                                    token_sample_to_text)

GOOD = {"question": "What is 2+3?", "paths": ["We add 2 and 3.", "3 + 2 = 5."], "summary": " \\boxed{5}."}


def write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return SampleEncoder(tokenizer, TextFormat(), Limits(max_row_tokens=4096, max_paths=8,
                                                         max_positions=4096))


def test_read_samples_and_messages_name_file_and_line(tmp_path):
    path = write(tmp_path, [GOOD, "", "{not json", {"question": "q", "paths": [], "summary": "s"},
                            {"question": "q", "paths": ["a", 3], "summary": "s"}, ["a list"],
                            {"question": "q", "paths": ["a"]}])
    with pytest.raises(SampleError, match=rf"^{path}:3: invalid JSON"):
        read_samples(path)
    samples, skipped = read_samples(path, skip_invalid=True)
    assert samples == [Sample("What is 2+3?", tuple(GOOD["paths"]), GOOD["summary"])]
    assert len(skipped) == 5
    assert skipped[1].startswith(f"{path}:4: 'paths' must be a non-empty list")
    assert skipped[2].startswith(f"{path}:5: path 2 must be a non-empty string")
    assert skipped[3].startswith(f"{path}:6: expected a JSON object")
    assert skipped[4].startswith(f"{path}:7: 'summary'")


def test_encoding_matches_inference(encoder, tokenizer, llm):
    ts = encoder.encode(Sample("What is 2+3?", ("We add.", "Five."), " \\boxed{5}."), "f:1")
    assert list(ts.prompt_ids) == llm.encode_prompts(["What is 2+3?"], None)[0]  # BOS, template
    template = llm.summary_template_ids  # what inference forces, tokenized on its own
    assert list(ts.summary_ids[:len(template)]) == template
    rest = tokenizer.encode(" \\boxed{5}.", add_special_tokens=False)
    assert list(ts.summary_ids) == template + rest + [encoder.ctrl.summary_close]
    assert [list(p) for p in ts.path_ids] == [tokenizer.encode(t, add_special_tokens=False)
                                              for t in ("We add.", "Five.")]
    # a summary that already starts with the template text gets the same ids
    body = DEFAULT_SUMMARY_TEMPLATE.removeprefix("<summary>") + " \\boxed{5}."
    assert encoder.summary_ids(body) == ts.summary_ids
    plain = SampleEncoder(tokenizer, TextFormat(prepend_summary_template=False), encoder.limits)
    assert list(plain.summary_ids(" \\boxed{5}.")) == [encoder.ctrl.summary_open, *rest,
                                                       encoder.ctrl.summary_close]


def test_length_path_count_and_control_token_errors(tmp_path, tokenizer):
    long_path = "Let x be a number. " * 40
    path = write(tmp_path, [GOOD, {**GOOD, "paths": [long_path]}, {**GOOD, "paths": ["a", "b", "c"]},
                            {**GOOD, "paths": ["a <summary> b"]}, {**GOOD, "summary": "ok </think2>"}])
    enc = SampleEncoder(tokenizer, TextFormat(), Limits(max_row_tokens=400, max_paths=2,
                                                        max_positions=4096))
    with pytest.raises(SampleError, match=rf"^{path}:2: sample holds \d+ tokens, more than the "
                                          r"maximum row length 400"):
        load_token_samples(path, enc)
    got, skipped = load_token_samples(path, enc, skip_invalid=True)
    assert len(got) == 1 and got[0].where == f"{path}:1" and len(skipped) == 4
    assert skipped[1].startswith(f"{path}:3: sample has 3 paths but the model has only 2 path tokens")
    assert "--num-path-tokens" in skipped[1]
    assert skipped[2].startswith(f"{path}:4: path 1 contains control token(s) ['<summary>']")
    assert skipped[3].startswith(f"{path}:5: summary contains control token(s) ['</think2>']")
    bad = write(tmp_path, ["{oops"], "bad.jsonl")
    with pytest.raises(SampleError, match="no usable samples"):
        load_token_samples(bad, enc, skip_invalid=True)


def reference_row(tokenizer, encoder, sample, pad=3):
    """A row built to the reference dataset's description: prompt (1), path k (k+1) with its
    tags, summary (10) with <summary>..</summary> and EOS, then padding (0)."""
    ctrl = encoder.ctrl
    ts = encoder.encode(sample)
    ids, mask = list(ts.prompt_ids), [1] * len(ts.prompt_ids)
    for k, p in enumerate(ts.path_ids, start=1):
        ids += [ctrl.think_open[k - 1], *p, ctrl.think_close[k - 1]]
        mask += [k + 1] * (len(p) + 2)
    ids += [*ts.summary_ids, ctrl.eos]
    mask += [10] * (len(ts.summary_ids) + 1)
    ids += [0] * pad
    mask += [0] * pad
    labels = [-100] * len(ts.prompt_ids) + ids[len(ts.prompt_ids):]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, ts


def test_reference_rows_convert_to_tokens_and_text(tokenizer, encoder, tmp_path):
    s = Sample("Find x if 2x + 3 = 11.", ("Then 2x = 8, so x = 4.", "Check: 2*4+3 = 11.", "x = 4"),
               DEFAULT_SUMMARY_TEMPLATE.removeprefix("<summary>") + " \\boxed{4}.")
    row, ts = reference_row(tokenizer, encoder, s)
    got = split_reference_row(row["input_ids"], row["attention_mask"], encoder.ctrl, "r:1")
    assert list(got.prompt_ids) == list(ts.prompt_ids)
    assert [list(p) for p in got.path_ids] == [list(p) for p in ts.path_ids]
    assert list(got.summary_ids) == list(ts.summary_ids)  # EOS and padding dropped
    assert token_sample_to_text(got, tokenizer, TextFormat()) == s
    # rows and text samples mix in one file
    path = write(tmp_path, [row, GOOD])
    both, _ = load_token_samples(path, encoder)
    good = encoder.encode(Sample(GOOD["question"], tuple(GOOD["paths"]), GOOD["summary"]))
    assert [list(x.summary_ids) for x in both] == [list(ts.summary_ids), list(good.summary_ids)]
    assert [x.where for x in both] == [f"{path}:1", f"{path}:2"]
    # the CLI converter writes the text format
    rows = write(tmp_path, [row], "rows.jsonl")
    out = tmp_path / "conv.jsonl"
    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    assert main(["convert-reference", "--input", str(rows), "--output", str(out),
                 "--tokenizer", str(tok_dir)]) == 0
    assert json.loads(out.read_text()) == s.to_dict()


def test_bad_reference_rows(tokenizer, encoder):
    ctrl: ControlTokens = encoder.ctrl
    row, _ = reference_row(tokenizer, encoder, Sample("q", ("a", "b"), " \\boxed{1}."), pad=0)
    ids, mask = row["input_ids"], row["attention_mask"]
    swapped = [3 if m == 2 else 2 if m == 3 else m for m in mask]
    with pytest.raises(SampleError, match=r"^r:7: segment indices \[1, 3, 2, 10\]"):
        split_reference_row(ids, swapped, ctrl, "r:7")
    unclosed = list(ids)
    unclosed[mask.index(3) - 1] = ids[mask.index(3) - 2]  # path 1 loses its </think1>
    with pytest.raises(SampleError, match="path 1 does not end with </think1>"):
        split_reference_row(unclosed, mask, ctrl)
    with pytest.raises(SampleError, match="summary must open with <summary> and end with"):
        split_reference_row(ids[:-2], mask[:-2], ctrl)  # cut inside the summary
    with pytest.raises(SampleError, match="differ in length"):
        split_reference_row(ids, mask[:-1], ctrl)
    foreign = list(ids)
    foreign[mask.index(2) + 1] = 10**6  # made with a bigger tokenizer
    with pytest.raises(SampleError, match=r"^r:2: token id 1000000 is outside the tokenizer"):
        encoder.check(split_reference_row(foreign, mask, ctrl, "r:2"))


def test_cli_reports_bad_line_and_skips_with_count(tmp_path, ckpt_dir, capsys):
    data = write(tmp_path, [GOOD, {"question": "q", "paths": [], "summary": "s"}, GOOD])
    args = ["train", "--model", str(ckpt_dir), "--data", str(data), "--output", str(tmp_path / "o"),
            "--max-steps", "1", "--grad-accum", "1", "--cpu", "--no-gradient-checkpointing"]
    assert main(args) == 2
    assert f"error: {data}:2: 'paths' must be a non-empty list" in capsys.readouterr().err
    assert main(args + ["--skip-invalid"]) == 0
    assert "skipped 1 invalid line(s)" in capsys.readouterr().out


def test_cut_flags_are_read_checked_and_carried(tmp_path, encoder, tokenizer):
    cut = {**GOOD, "cut": [True, False]}
    bad = [{**GOOD, "cut": [True]}, {**GOOD, "cut": [1, 0]}, {**GOOD, "cut": "true"},
           {**GOOD, "cut": [True, False, None]}, {**GOOD, "cut": {"1": True}}]
    path = write(tmp_path, [cut, GOOD, *bad, {**GOOD, "cut": None}])
    samples, skipped = read_samples(path, skip_invalid=True)
    assert [s.cut for s in samples] == [(True, False), (), ()]
    assert [m.split(": ", 1)[0] for m in skipped] == [f"{path}:{n}" for n in range(3, 8)]
    assert all("'cut' must be a list of 2 booleans" in m for m in skipped)
    with pytest.raises(SampleError, match=rf"^{path}:3: 'cut'"):
        read_samples(path)
    assert samples[0].to_dict() == cut and samples[1].to_dict() == GOOD  # no "cut" when none is
    # tokenized: the flags travel with the paths; a cut path's end tag is not a target
    ts, whole = encoder.encode(samples[0], "f:1"), encoder.encode(samples[1], "f:2")
    assert ts.path_cut == (True, False) and ts.path_ids == whole.path_ids
    n_path_tokens = sum(len(tokenizer.encode(p, add_special_tokens=False)) for p in GOOD["paths"])
    assert whole.num_targets == n_path_tokens + 2 + len(whole.summary_ids) - 1
    assert ts.num_targets == whole.num_targets - 1
    assert token_sample_to_text(ts, tokenizer, TextFormat()).cut == (True, False)
    loaded, _ = load_token_samples(write(tmp_path, [cut], "one.jsonl"), encoder)
    assert loaded[0].path_cut == (True, False)
