"""Bad requests fail before anything runs, with a ValueError that says what to change."""

import pytest

from parathinker import LLM, SamplingParams


@pytest.mark.parametrize("kw,match", [
    (dict(num_paths=0), "num_paths must be >= 1"),
    (dict(num_paths=2, min_finished_paths=3), "min_finished_paths"),
    (dict(num_paths=2, min_finished_paths=0), "min_finished_paths"),
    (dict(max_path_tokens=1), "max_path_tokens"),
    (dict(max_path_tokens=8, min_path_tokens=9), "min_path_tokens"),
    (dict(max_summary_tokens=0), "max_summary_tokens"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
])
def test_sampling_params_validate(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_num_paths_beyond_the_tokenizer(llm):
    with pytest.raises(ValueError, match="num_paths=9 exceeds"):
        llm.generate(["q"], SamplingParams(num_paths=9, max_path_tokens=8, max_summary_tokens=80))


def test_summary_budget_must_hold_the_template(llm):
    n = len(llm.summary_template_ids)
    with pytest.raises(ValueError, match=f"at least {n + 1}"):
        llm.generate(["q"], SamplingParams(max_path_tokens=8, max_summary_tokens=n))


def test_prompt_longer_than_context(llm):
    limit = llm.config.max_position_embeddings
    with pytest.raises(ValueError, match="longer than the model's context"):
        llm.generate(prompt_token_ids=[[5] * limit], params=SamplingParams(max_summary_tokens=80))
    with pytest.raises(ValueError, match="exceed the model's context"):
        llm.generate(["q"], SamplingParams(max_path_tokens=limit, max_summary_tokens=80))


def test_bad_prompts(llm):
    with pytest.raises(ValueError, match="outside"):
        llm.generate(prompt_token_ids=[[1, 10**7]], params=SamplingParams(max_summary_tokens=80))
    with pytest.raises(ValueError, match="either"):
        llm.generate(["q"], SamplingParams(), prompt_token_ids=[[1]])
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate(prompt_token_ids=[[]], params=SamplingParams(max_summary_tokens=80))


def test_nothing_half_runs(llm):
    """One bad prompt in a batch rejects the batch before any generation."""
    calls = []
    hook = llm.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError):
            llm.generate(prompt_token_ids=[[1, 2, 3], []], params=SamplingParams(max_summary_tokens=80))
    finally:
        hook.remove()
    assert calls == []


@pytest.mark.parametrize("kw,match", [
    (dict(device="tpu"), "device"),
    (dict(device="cuda:0"), "CUDA is not available"),
    (dict(dtype="float64"), "unknown dtype"),
])
def test_bad_device_and_dtype(ckpt_dir, kw, match):
    import torch

    if kw.get("device", "").startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match=match):
        LLM(str(ckpt_dir), **{"device": "cpu", "dtype": "float32", **kw})
