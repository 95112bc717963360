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

from parathinker.cli_args import add_model_args, llm_kwargs, rope_for_args

API_KEY_ENV = "PARATHINKER_API_KEY"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--served-model-name", default=None,
                   help="the name clients send as 'model' (default: --model as given)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback only; 0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 (or set ${API_KEY_ENV})")
    p.add_argument("--max-queued", type=int, default=256,
                   help="requests in flight (running or waiting) before new ones get 429")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="larger request bodies get 413")
    p.add_argument("--chat-template", choices=("parathinker", "tokenizer"), default="parathinker",
                   help="parathinker: the model's prompt template (SPEC §3) around the last user "
                        "message; tokenizer: the tokenizer's own chat template")
    p.add_argument("--block-size", type=int, default=16, help="KV cache block size in tokens")
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV cache blocks (default: 90%% of free GPU memory, or 4 GiB on CPU)")
    p.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache bytes")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    g = p.add_argument_group("request defaults (a request's own fields override them)")
    g.add_argument("--num-paths", type=int, default=4)
    g.add_argument("--max-path-tokens", type=int, default=16384,
                   help="cap; a request that sets none gets what the context leaves, up to this; "
                        "--rope-scaling auto derives the YaRN factor from it")
    g.add_argument("--min-path-tokens", type=int, default=0)
    g.add_argument("--max-summary-tokens", type=int, default=1024, help="template included")
    g.add_argument("--min-finished-paths", type=int, default=1,
                   help="1 = first-finish (the paper's default)")
    g.add_argument("--temperature", type=float, default=0.5)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from parathinker import LLM, SamplingParams
    from parathinker.serve.app import create_app
    from parathinker.serve.protocol import ServeDefaults

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    defaults = ServeDefaults(args.num_paths, args.max_path_tokens, args.min_path_tokens,
                             args.max_summary_tokens, args.min_finished_paths, args.temperature,
                             args.top_p, args.top_k)
    SamplingParams(**vars(defaults))  # the defaults themselves must be valid
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not _is_loopback(args.host) and api_key is None:
        logging.warning("serving on %s without --api-key: anyone who can reach it can use it",
                        args.host)
    rope = rope_for_args(args, args.model, args.max_path_tokens)  # from the largest path budget
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
                     args.max_body_bytes, defaults, args.chat_template)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5)
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parathinker serve", description=__doc__.splitlines()[0])
    add_serve_args(parser)
    args = parser.parse_args(argv)
    try:
        return run_serve(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
