"""A request that leaves max_path_tokens out gets what the context leaves in the server's layout:
in the reference layout (SPEC §6) that is context - 2 x padded prompt - summary cap, in 16s."""

from __future__ import annotations

import httpx
import pytest

from parathinker import LLM, SamplingParams
from parathinker.serve.params import sampling_params
from parathinker.serve.requests import ParsedRequest
from parathinker.testing.checkpoints import make_checkpoint
from parathinker.testing.servers import JSON, MODEL, running_server

pytest.importorskip("uvicorn")

PROMPT = "<｜User｜>{question}<｜Assistant｜><think>"  # short: a padded prompt of 16 or 32
CONTEXT = 320


def test_left_out_path_budget_is_fitted_to_the_reference_layout():
    defaults = SamplingParams(num_paths=2, max_path_tokens=16384, max_summary_tokens=100)
    # a 40-token prompt + a second BOS = 41, padded to 48; the summary (100 < 128) starts at
    # 2 x 48 + L: 320 - 96 - 100 = 124 -> 112. (The native rule would give 320 - 40 - 100 = 180.)
    p = sampling_params(ParsedRequest(None, False), defaults, 40, CONTEXT, 5, "reference", True)
    assert p.max_path_tokens == 112
    assert sampling_params(ParsedRequest(None, False), defaults, 40, CONTEXT, 5).max_path_tokens == 180


def test_a_reference_server_runs_a_request_without_budgets(tokenizer, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer=tokenizer, end_boost=1.0, seed=2,
                           max_position_embeddings=CONTEXT)
    llm = LLM(str(ckpt), device="cpu", dtype="float32", layout="reference", prompt_template=PROMPT)
    defaults = SamplingParams(num_paths=2, max_path_tokens=16384, max_summary_tokens=100,
                              temperature=0.0)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is 2+3?"}]}
    with running_server(llm, defaults=defaults) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=JSON, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    padded = out["usage"]["prompt_tokens"]  # the prompt the engine ran: BOS + prompt + pads
    assert padded % 16 == 0
    room = (CONTEXT - 2 * padded - 100) // 16 * 16
    paths = out["choices"][0]["message"]["paths"]
    assert len(paths) == 2 and all(0 < p["num_tokens"] <= room for p in paths)
