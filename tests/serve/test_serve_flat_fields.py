"""The `parallel.*` fields also accepted flat at the top level, as vLLM users write its extra
sampling params (`extra_body={"num_paths": 8}`), through the official openai client; a field set
in both places with different values is a 400; other unknown fields are ignored and logged once."""

from __future__ import annotations

import logging

import openai
import pytest
from parathinker.testing.servers import MODEL, QUESTION, client

from parathinker.serve.requests import parse_chat

pytest.importorskip("uvicorn")
MESSAGES = [{"role": "user", "content": QUESTION}]


def ask(base, **extra):
    return client(base).chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0.0, extra_body=extra)


def test_flat_num_paths_is_honoured(served):
    base, _ = served
    # the server's default is 2 paths (running_server): 3 must come from the flat field
    out = ask(base, num_paths=3, max_path_tokens=8)
    paths = out.choices[0].message.model_extra["paths"]
    assert len(paths) == 3
    assert all(p["num_tokens"] <= 8 for p in paths)


def test_same_field_in_both_places(served):
    base, _ = served
    out = ask(base, num_paths=3, parallel={"num_paths": 3, "max_path_tokens": 8})
    assert len(out.choices[0].message.model_extra["paths"]) == 3
    with pytest.raises(openai.BadRequestError) as e:
        ask(base, num_paths=3, parallel={"num_paths": 2})
    err = e.value.body
    assert err["param"] == "num_paths"
    assert "(3)" in err["message"] and "(2)" in err["message"]


def test_flat_field_errors_name_the_flat_field(served):
    base, _ = served
    with pytest.raises(openai.BadRequestError) as e:
        ask(base, num_paths=0)
    assert e.value.body["param"] == "num_paths"
    with pytest.raises(openai.BadRequestError) as e:
        ask(base, max_path_tokens="8")
    assert e.value.body["param"] == "max_path_tokens"


def test_unknown_fields_are_ignored_and_logged_once(caplog):
    body = {"messages": MESSAGES, "user": "u1", "num_pathz": 8, "max_tokens": 5}
    with caplog.at_level(logging.WARNING, logger="parathinker.serve"):
        first = parse_chat(dict(body))
        parse_chat(dict(body))
    assert first.settings == {} and first.cap == 5
    logged = [r.getMessage() for r in caplog.records if "ignoring the request field" in
              r.getMessage()]
    assert sum("'num_pathz'" in m for m in logged) == 1
    assert sum("'user'" in m for m in logged) == 1
    assert not any("'max_tokens'" in m or "'messages'" in m for m in logged)
