"""`parathinker serve`: flags and the entry point.

    parathinker serve --model Leslie04/ParaThinker-1.5B [--host 127.0.0.1] [--port 8000] \
                      [--api-key KEY]
    python -m parathinker.serve.cli --model ./checkpoint --num-paths 4 --max-path-tokens 4096

The sampling flags are the defaults a request gets for what it leaves out; the key can also come
from the environment variable PARATHINKER_API_KEY (keeps it out of the process list).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from dataclasses import fields
from typing import Any

from parathinker.cli_args import (add_gating_args, add_model_args, add_path_budget_args,
                                  add_sampling_args, llm_kwargs, rope_for_args)
from parathinker.config import SamplingParams
from parathinker.engine.confidence import check_ungated
from parathinker.extras import exits_for_missing_extra

API_KEY_ENV = "PARATHINKER_API_KEY"
LOOPBACK_HOSTS = "localhost,127.0.0.1,::1"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--served-model-name", default=None,
                   help="the name clients send as 'model' (default: --model as given)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback only; 0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 (or set ${API_KEY_ENV})")
    p.add_argument("--max-queued", type=int, default=256,
                   help="requests in flight (running or waiting) before new ones get 429")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="larger request bodies get 413")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a client gets to send a request's headers, and again its body; "
                        "then the connection is closed (a body: after a 408)")
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host header names accepted, '*' for any (behind a proxy "
                        f"that checks it); default {LOOPBACK_HOSTS} and --host (DNS rebinding)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT: seconds in-flight requests get to finish (new ones "
                        "get 503), then they end with an error; a second signal exits at once")
    p.add_argument("--chat-template", choices=("parathinker", "tokenizer"), default="parathinker",
                   help="parathinker: the model's prompt template (SPEC §3) around the last user "
                        "message; tokenizer: the tokenizer's own chat template")
    p.add_argument("--block-size", type=int, default=16, help="KV cache block size in tokens")
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV cache blocks (default: 90%% of free GPU memory, or 4 GiB on CPU)")
    p.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache bytes")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192,
                   help="most tokens one engine step runs (longer prefills go in chunks)")
    g = p.add_argument_group("request defaults (a request's own fields override them)")
    d = SamplingParams()  # the flags' defaults are SamplingParams' own
    g.add_argument("--num-paths", type=int, default=d.num_paths, help="parallel paths P of a request")
    add_path_budget_args(g, max_path_tokens=d.max_path_tokens, min_path_tokens=d.min_path_tokens,
                         max_summary_tokens=d.max_summary_tokens,
                         min_finished_paths=d.min_finished_paths,
                         note=" (at startup after an empty prompt; then after a request's "
                              "prompt, for a request that sets none); --rope-scaling auto derives "
                              "the YaRN factor from the startup value")
    add_sampling_args(g, temperature=d.temperature, top_p=d.top_p, top_k=d.top_k, seed_help="")
    # gated thinking (docs/SERVE.md "Gated thinking"): off unless a flag or the request says so
    add_gating_args(g, agreement_note="a default above a request's paths becomes its number of paths")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="server log verbosity")


def run_serve(args: argparse.Namespace) -> int:
    from parathinker import LLM
    from parathinker.serve.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    serve_defaults(args)  # a bad flag fails now, before the checkpoint is read
    rope = serve_rope(args)
    defaults = serve_defaults(args)  # with --max-path-tokens fitted; before the model loads
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not _is_loopback(args.host) and api_key is None:
        logging.warning("serving on %s without --api-key: anyone who can reach it can use it",
                        args.host)
    llm = LLM(args.model, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
              kv_cache_memory=args.kv_cache_memory,
              max_num_batched_tokens=args.max_num_batched_tokens, **llm_kwargs(args, rope))
    logging.info("rope scaling %s, layout %s", llm.config.rope_scaling, llm.layout)
    if defaults.num_paths > llm.max_paths:
        raise ValueError(f"--num-paths {defaults.num_paths} exceeds this checkpoint's "
                         f"{llm.max_paths} paths")
    if defaults.max_summary_tokens <= len(llm.summary_template_ids):
        raise ValueError(f"--max-summary-tokens must exceed the summary template "
                         f"({len(llm.summary_template_ids)} tokens)")
    app = create_app(llm, args.served_model_name or str(args.model), api_key, args.max_queued,
                     args.max_body_bytes, defaults, args.chat_template, allowed_hosts(args),
                     args.read_timeout)
    _run_draining(app, args)
    return 0


def serve_defaults(args: argparse.Namespace) -> SamplingParams:
    """The request defaults from the flags: SamplingParams' checks, and a --layout reference
    server refuses gating flags at startup (`check_ungated`) rather than every request."""
    defaults = SamplingParams(**{f.name: getattr(args, f.name) for f in fields(SamplingParams)
                                 if f.name != "seed"})
    if args.layout == "reference":
        check_ungated(defaults)
    return defaults


def serve_rope(args: argparse.Namespace) -> dict[str, Any] | None:
    """--max-path-tokens fitted to the model's context (an empty prompt, --max-summary-tokens), as
    generate and eval fit theirs; then the rope scaling resolved from it, by the same rule."""
    from parathinker.spec.budgets import fit_path_args

    fit_path_args(args, None)
    return rope_for_args(args, args.model, args.max_path_tokens)


def allowed_hosts(args: argparse.Namespace) -> list[str] | None:
    if args.allowed_hosts is not None:
        names = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
        return None if "*" in names else names
    names = LOOPBACK_HOSTS.split(",")
    host = args.host.strip("[]")
    if host not in ("0.0.0.0", "::", "", *names):
        names.append(host)
    return names


def _run_draining(app: object, args: argparse.Namespace) -> None:
    """uvicorn, but the first SIGTERM/SIGINT drains (app.state.server.drain) before uvicorn's
    own shutdown; a second one is uvicorn's (immediate) exit."""
    import asyncio

    import uvicorn

    from parathinker.serve.http import uvicorn_config

    class DrainingServer(uvicorn.Server):
        is_draining = False
        drain: asyncio.Task[None] | None = None  # held: a task nobody references may vanish

        async def startup(self, sockets: list | None = None) -> None:
            self.event_loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig: int, frame: object) -> None:
            if self.is_draining or not hasattr(self, "event_loop"):
                return super().handle_exit(sig, frame)
            self.is_draining = True
            logging.info("draining: new requests get 503; in-flight ones have %g s",
                         args.shutdown_timeout)
            self.event_loop.call_soon_threadsafe(self._start_drain)

        def _start_drain(self) -> None:
            async def drain() -> None:
                await app.state.server.drain(args.shutdown_timeout)  # type: ignore[attr-defined]
                self.should_exit = True

            self.drain = asyncio.ensure_future(drain())

    config = uvicorn_config(app, host=args.host, port=args.port,  # type: ignore[arg-type]
                            log_level=args.log_level, timeout_graceful_shutdown=5)
    DrainingServer(config).run()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parathinker serve", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    add_serve_args(parser)
    args = parser.parse_args(argv)
    if exits_for_missing_extra("serve", args):
        return 2
    try:
        return run_serve(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
