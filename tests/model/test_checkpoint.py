"""Checkpoint directories: load, save -> load exact, sharding, base models, pickle refusal."""

import logging

import pytest
import torch

from parathinker.model import load_model, resolve_model_dir, save_model
from parathinker.testing.checkpoints import make_checkpoint


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_save_load_roundtrip_exact(tmp_path, ckpt_dir, tokenizer):
    model = load_model(ckpt_dir)
    save_model(model, tmp_path / "a", tokenizer)
    assert_same_weights(model, load_model(tmp_path / "a"))
    save_model(model, tmp_path / "b", max_shard_bytes=20_000)  # sharded + index
    assert (tmp_path / "b" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "b").glob("model-*.safetensors"))) > 1
    assert_same_weights(model, load_model(tmp_path / "b"))


def test_tied_embeddings_roundtrip(tmp_path, tokenizer):
    d = make_checkpoint(tmp_path / "t", tokenizer=tokenizer, tie_word_embeddings=True)
    m = load_model(d)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    save_model(m, tmp_path / "t2")
    assert_same_weights(m, load_model(tmp_path / "t2"))


def test_base_model_loads_with_zero_tables_and_a_log_line(tmp_path, tokenizer, caplog):
    d = make_checkpoint(tmp_path, tokenizer=tokenizer, seg_tables=False)
    with caplog.at_level(logging.INFO):
        m = load_model(d)
    assert "no seg_embeddings" in caplog.text
    for layer in m.model.layers:
        assert layer.self_attn.seg_embeddings.weight.shape == (32, 16)
        assert not layer.self_attn.seg_embeddings.weight.any()


def test_stock_transformers_loads_our_checkpoint(ckpt_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt_dir)
    ours = load_model(ckpt_dir)
    assert torch.equal(hf.model.layers[0].self_attn.q_proj.weight, ours.model.layers[0].self_attn.q_proj.weight)


def test_pickle_refused_unless_allowed(tmp_path, ckpt_dir):
    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((ckpt_dir / "config.json").read_text())
    torch.save(load_file(ckpt_dir / "model.safetensors"), d / "pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_model(d)
    assert_same_weights(load_model(d, allow_pickle=True), load_model(ckpt_dir))


def test_missing_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not-a-user/not-a-model"):
        resolve_model_dir("not-a-user/not-a-model")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        (tmp_path / "config.json").write_text("{}")
        from parathinker.model.checkpoint import read_state_dict

        read_state_dict(tmp_path)


def test_mismatched_weights_are_refused(tmp_path, ckpt_dir):
    import json

    d = tmp_path / "bad"
    d.mkdir()
    raw = json.loads((ckpt_dir / "config.json").read_text())
    raw["num_hidden_layers"] = 3
    (d / "config.json").write_text(json.dumps(raw))
    (d / "model.safetensors").symlink_to(ckpt_dir / "model.safetensors")
    with pytest.raises(ValueError, match="missing"):
        load_model(d)


@pytest.mark.parametrize("tokenizer_class", [None, "LlamaTokenizerFast"])  # ours; DeepSeek-R1-Distill's
def test_tokenizer_loads_exactly_as_saved(tmp_path, tokenizer_class):
    """tokenizer.json is honoured verbatim: transformers 5's AutoTokenizer would rebuild it from
    Qwen2's (digits split) or Llama's (Metaspace: spaces dropped) defaults."""
    import json

    from parathinker.model import load_tokenizer
    from parathinker.testing.tiny import train_tokenizer

    text = "Codes: 59 q, 63 e. The answer is \\boxed{63} after 1234 tries."
    tok = train_tokenizer([text] * 20 + ["The sum of 12 and 30 is 42."] * 20, vocab_size=400)
    d = make_checkpoint(tmp_path / "c", tokenizer=tok)
    if tokenizer_class:
        cfg_file = d / "tokenizer_config.json"
        cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | {"tokenizer_class": tokenizer_class}))
    loaded = load_tokenizer(d)
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.convert_ids_to_tokens(tok(" 59 q")["input_ids"])[1] == "Ġ59"
    assert loaded.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert (loaded.bos_token, loaded.eos_token) == (tok.bos_token, tok.eos_token)
