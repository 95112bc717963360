"""`parathinker serve`: an OpenAI-compatible HTTP server for parallel thinking.

    parathinker serve --model Leslie04/ParaThinker-1.5B          # http://127.0.0.1:8000/v1

    from parathinker.serve import create_app                    # needs fastapi (extra "serve")
    app = create_app(llm, "my-model")

Modules: app (routes, errors, auth, body limit, streaming), engine_loop (the thread that owns the
engine), protocol (request parsing, response shapes), choices (stop strings, echo, logprobs),
stream (streamed text), metrics (Prometheus text), cli (flags). docs/SERVE.md shows curl and openai-client calls.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:  # lazy: `import parathinker.serve.cli` must not need fastapi
    if name == "create_app":
        from parathinker.serve.app import create_app

        return create_app
    raise AttributeError(name)
