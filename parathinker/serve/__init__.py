"""`parathinker serve`: an OpenAI-compatible HTTP server for parallel thinking.

    parathinker serve --model Leslie04/ParaThinker-1.5B          # http://127.0.0.1:8000/v1

    from parathinker.serve import create_app                    # needs fastapi (extra "serve")
    app = create_app(llm, "my-model")

Modules: app (create_app: the wiring), server (what the handlers share, prompt encoding),
routes (the endpoints, auth), admission (limits, KV arithmetic, tickets), answers (JSON answers
and SSE streams), requests (OpenAI bodies -> ParsedRequest), fields (typed fields, APIError),
params (SamplingParams and budget fitting), responses (response and chunk bodies), http (body
limit, Content-Type, Host, errors, SSE framing), engine_loop (the thread that owns the engine:
typed commands in, per-step deltas out), choices (stop strings, echo, logprobs), stream
(streamed text), metrics (Prometheus text), cli (flags). docs/SERVE.md shows curl and
openai-client calls.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:  # lazy: `import parathinker.serve.cli` must not need fastapi
    if name == "create_app":
        from parathinker.serve.app import create_app

        return create_app
    raise AttributeError(name)
