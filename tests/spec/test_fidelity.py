"""What the released model was trained and evaluated with, pinned from outside the project: the
prompt texts typed from SPEC §3 (not produced by the project's functions), reference rows built
token by token to the row format of REFERENCE §7.1, and the README's grading call."""

import json

from parathinker.config import PlainParams
from parathinker.eval.backends import EngineBackend, Job
from parathinker.train.cli import main as train_main
from parathinker.train.data import TextFormat

QUESTION = "What is 7 * 8?"
# SPEC §3, typed: `\boxed{}` with single braces, <summary> </summary> inside the instruction.
SPEC_PROMPT = (
    "<｜User｜>What is 7 * 8? You FIRST think about the reasoning process as an internal monologue "
    "and then summarize the reasoning process to get the final answer. The summary process MUST BE "
    "enclosed within <summary> </summary> tags. The final answer MUST BE put in "
    "\\boxed{}.<｜Assistant｜><think>"
)
# The DeepSeek-R1-Distill chat format of the sequential baseline, typed.
SEQUENTIAL_PROMPT = (
    "<｜User｜>What is 7 * 8? Please reason step by step, and put your final answer within "
    "\\boxed{}.<｜Assistant｜><think>\n"
)
SUMMARY_TEMPLATE_TEXT = "By analyzing multiple reasoning processes above, I concluded that: The final answer is"


def test_prompt_is_the_spec_text(llm):
    assert "\\boxed{}" in SPEC_PROMPT and "{{" not in SPEC_PROMPT
    assert llm.format_prompt(QUESTION) == SPEC_PROMPT
    assert TextFormat().prompt(QUESTION) == SPEC_PROMPT  # what training and build-data write
    # the ids the engine runs: the tokenizer's BOS, then the SPEC text
    assert llm.encode_prompts([QUESTION], None)[0] == llm.tokenizer.encode(SPEC_PROMPT)


def test_sequential_prompt_is_the_chat_format(llm):
    ids = EngineBackend(llm).encode(Job(0, QUESTION, (PlainParams(max_tokens=4),)))
    assert ids == llm.tokenizer.encode(SEQUENTIAL_PROMPT)


def _reference_row(tokenizer, question, paths, summary_text, pad=3):
    """A pre-tokenized row as the reference dataset stores it (REFERENCE §7.1), made here piece by
    piece with the tokenizer alone: prompt (mask 1, BOS first), path k (mask k+1, `<think{k}>` …
    `</think{k}>`), summary (mask 10, `<summary>` … `</summary>` EOS), padding (mask 0)."""
    vocab = tokenizer.get_vocab()
    prompt_text = SPEC_PROMPT.replace("What is 7 * 8?", question)
    ids = tokenizer.encode(prompt_text)
    mask = [1] * len(ids)
    for k, text in enumerate(paths, start=1):
        body = [vocab[f"<think{k}>"], *tokenizer.encode(text, add_special_tokens=False), vocab[f"</think{k}>"]]
        ids += body
        mask += [k + 1] * len(body)
    body = [vocab["<summary>"], *tokenizer.encode(summary_text, add_special_tokens=False),
            vocab["</summary>"], tokenizer.eos_token_id]
    ids += body + [0] * pad
    mask += [10] * len(body) + [0] * pad
    return {"input_ids": ids, "attention_mask": mask, "labels": [-100] * mask.count(1) + ids[mask.count(1):]}


def test_convert_reference_accepts_rows_made_with_the_spec_prompt(tokenizer, tmp_path):
    question = "Find x if 2x + 3 = 11."
    paths = ["Then 2x = 8, so x = 4.", "Check: 2*4+3 = 11."]
    summary = SUMMARY_TEMPLATE_TEXT + " \\boxed{4}."
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(_reference_row(tokenizer, question, paths, summary)) + "\n")
    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    out = tmp_path / "samples.jsonl"
    assert train_main(["convert-reference", "--input", str(rows), "--output", str(out),
                       "--tokenizer", str(tok_dir)]) == 0
    assert json.loads(out.read_text()) == {"question": question, "paths": paths, "summary": summary}


def test_readme_grade_call():
    from parathinker.eval import grade

    assert grade("\\frac{1}{2}", "so the answer is $\\boxed{0.5}$") is True
    assert grade("56", "7 * 8 = \\boxed{54}") is False
