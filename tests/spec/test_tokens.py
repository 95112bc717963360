"""Control tokens are looked up by name; missing ones are added and embeddings resized."""

import pytest

from parathinker.config import ModelConfig
from parathinker.model import ParaThinkerForCausalLM
from parathinker.spec.tokens import ControlTokens, add_parathinker_tokens, last_boxed
from parathinker.testing.checkpoints import make_tokenizer, tiny_config


def test_lookup_by_name(tokenizer):
    ctrl = ControlTokens.from_tokenizer(tokenizer)
    vocab = tokenizer.get_vocab()
    assert ctrl.max_paths == 8
    assert ctrl.think_open[2] == vocab["<think3>"] and ctrl.think_close[7] == vocab["</think8>"]
    assert ctrl.summary_open == vocab["<summary>"] and ctrl.pad == vocab["<vllm_pad>"]
    assert ctrl.eos == tokenizer.eos_token_id
    assert vocab["</think>"] in ctrl.path_end_ids() and vocab["<think>"] in ctrl.path_banned_ids()
    assert vocab["</think2>"] in ctrl.summary_banned_ids()


def test_missing_tokens_are_a_clear_error():
    with pytest.raises(ValueError, match="add_parathinker_tokens"):
        ControlTokens.from_tokenizer(make_tokenizer(with_paths=False))


def test_add_tokens_and_resize_only_when_outgrown():
    tok = make_tokenizer(with_paths=False)
    model = ParaThinkerForCausalLM(ModelConfig.from_dict(tiny_config(len(tok))))
    old_rows = model.model.embed_tokens.weight.detach().clone()
    added = add_parathinker_tokens(tok, model, num_paths=12)
    assert "<think12>" in added and "</think12>" in added and "<summary>" in added
    assert ControlTokens.from_tokenizer(tok).max_paths == 12
    assert model.vocab_size == len(tok) == model.lm_head.weight.shape[0]
    assert (model.model.embed_tokens.weight[: len(old_rows)] == old_rows).all()
    # A second call adds nothing and does not resize; a larger table is never shrunk.
    assert add_parathinker_tokens(tok, model, num_paths=12) == []
    big = ParaThinkerForCausalLM(ModelConfig.from_dict(tiny_config(len(tok) + 50)))
    add_parathinker_tokens(tok, big)
    assert big.vocab_size == len(tok) + 50


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{4}.", "4"),
    ("\\boxed{1} then \\boxed{\\frac{a}{b}}", "\\frac{a}{b}"),  # several boxes: the last wins
    ("\\boxed{1} then \\boxed{ {2} }", "{2}"),
    ("\\boxed{x^{2}+1}", "x^{2}+1"),  # nested braces
    ("x \\boxed{\\frac{1}{2}} y", "\\frac{1}{2}"),
    ("no answer here", None),
    ("broken \\boxed{unclosed", None),
    ("\\boxed{3} \\boxed{4", "3"),  # a truncated last box falls back to the one before
    ("\\fbox{7}", "7"),
    ("$\\boxed 5$.", "5"),  # without braces: the next word
    ("so \\boxed 12.", "12"),
    ("\\boxedx{3}", None),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}"),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected
