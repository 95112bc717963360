"""A dense forward over a packed generated request reproduces the generator's logits (SPEC §4)."""

import pytest
import torch

from parathinker import SamplingParams
from parathinker.attention.dense import DenseAttention
from parathinker.train.request_row import pack_request, row_tensors
from parathinker.engine.slow_twin import generate_request


@pytest.mark.parametrize("num_paths", [1, 2, 4])
@pytest.mark.parametrize("all_finish", [False, True])
def test_dense_forward_reproduces_generator_logits(llm, num_paths, all_finish):
    params = SamplingParams(num_paths=num_paths, max_path_tokens=14, max_summary_tokens=80,
                            temperature=0.0, min_finished_paths=num_paths if all_finish else 1)
    prompt = llm.encode_prompts(["Find x if 2x + 3 = 11."], None)[0]
    raw = generate_request(llm.model, llm.ctrl, prompt, llm.summary_template_ids, params,
                           record_logits=True)
    row = pack_request(prompt, raw.path_token_ids, raw.summary_token_ids)
    t = row_tensors(row)
    with torch.no_grad():
        hidden = llm.model(t["input_ids"], t["positions"], t["segment_ids"], DenseAttention(t["mask"]))
        dense = llm.model.compute_logits(hidden)[0]
    # Every token the generator fed through the model has its logits compared.
    expected = len(row) - 1  # all but the summary's last token
    assert len(raw.logits) == expected
    worst = 0.0
    for (region, j), logits in raw.logits.items():
        worst = max(worst, (dense[row.starts[(0, region)] + j] - logits).abs().max().item())
    assert worst <= 1e-4
