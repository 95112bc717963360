"""Server load: N concurrent openai clients against `parathinker serve` (a separate process),
a fixed number of chat requests with fixed seeds; requests/s and p50/p99 latency, and the
server's resident memory (RSS, /proc) after each round of --rounds (a leak or fragmentation shows
as RSS that keeps growing from round to round instead of levelling off).

    python bench/serve_load.py                                  # tiny random model, 16 clients
    python bench/serve_load.py --shape small --clients 16 --requests 64 --stream
    python bench/serve_load.py --model ./checkpoint --device cuda --max-path-tokens 1024
    python bench/serve_load.py --model docs/demo/model --clients 64 --requests 128 \
        --half-streamed --max-path-tokens 200 --rounds 6          # issue 22's memory workload

Without --model a random checkpoint is written to a temporary directory (the tiny BPE tokenizer
of parathinker.testing.tiny; --shape tiny: hidden 64, 2 layers; small: hidden 512, 8 layers). Paths are
fixed in length (min_path_tokens = max_path_tokens) so every run does the same work. The machine,
commit and configuration are printed first, one JSON line last.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai

from common import machine, report
from parathinker.serve.metrics import parse

CORPUS = [
    "Let x be a number. Then 2x + 3 = 11, so x = 4. Check: 2*4+3 = 11. The answer is \\boxed{4}.",
    "We try n = 1, 2, 3, ... and check each; 7 * 3 mod 10 = 1, so n = 3 works.",
    "The sum of the first 10 positive integers is 55; the product of 6 and 7 is 42.",
    "By analyzing multiple reasoning processes above, I concluded that: The final answer is 5.",
] * 4
SHAPES = {"tiny": {}, "small": {"hidden_size": 512, "intermediate_size": 1536,
                                "num_hidden_layers": 8, "num_attention_heads": 8,
                                "num_key_value_heads": 2, "head_dim": 64}}


def write_random_checkpoint(out_dir: Path, shape: str) -> Path:
    from parathinker.testing.tiny import random_checkpoint, tiny_config, train_tokenizer

    tok = train_tokenizer(CORPUS, vocab_size=300)
    random_checkpoint(out_dir, tiny_config(len(tok) + 13, **SHAPES[shape]), tok, seed=0,
                      seg_std=0.5)
    return out_dir


def start_server(args: argparse.Namespace, model: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "parathinker.serve.cli", "--model", model, "--port", str(port),
           "--device", args.device, "--max-queued", "100000", "--log-level", "warning",
           "--served-model-name", "bench"]
    if args.num_kv_blocks:
        cmd += ["--num-kv-blocks", str(args.num_kv_blocks)]
    proc = subprocess.Popen(cmd)
    deadline = time.time() + 600
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"server did not start (exit code {proc.poll()})")
        time.sleep(0.2)


def template_length(model: str) -> int:
    from parathinker.model.checkpoint import load_tokenizer, resolve_model_dir
    from parathinker.spec.tokens import DEFAULT_SUMMARY_TEMPLATE

    tok = load_tokenizer(resolve_model_dir(model, None))
    return len(tok.encode(DEFAULT_SUMMARY_TEMPLATE, add_special_tokens=False))


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux /proc), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_load(base: str, args: argparse.Namespace, num_requests: int, seed0: int
             ) -> tuple[float, list[dict[str, float]]]:
    """num_requests chat requests from args.clients threads; -> (wall seconds, per request)."""
    parallel = {"num_paths": args.paths, "max_path_tokens": args.max_path_tokens,
                "min_path_tokens": args.max_path_tokens,
                "min_finished_paths": args.paths, "max_summary_tokens": args.max_summary_tokens}
    results: list[dict[str, float]] = []
    lock, next_index = threading.Lock(), iter(range(num_requests))

    def worker() -> None:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=3600)
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            kw = dict(model="bench", temperature=0.5, seed=seed0 + i,
                      messages=[{"role": "user", "content": f"What is {i} + {i % 7}?"}],
                      extra_body={"parallel": parallel})
            start = time.perf_counter()
            first = None
            if args.stream or (args.half_streamed and i % 2):
                usage = None
                for ch in c.chat.completions.create(stream=True,
                                                    stream_options={"include_usage": True}, **kw):
                    first = first or time.perf_counter()
                    usage = ch.usage or usage
            else:
                usage = c.chat.completions.create(**kw).usage
            end = time.perf_counter()
            with lock:
                results.append({"latency_s": end - start,
                                "first_chunk_s": (first - start) if first else float("nan"),
                                "tokens": usage.completion_tokens})

    threads = [threading.Thread(target=worker) for _ in range(args.clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, results


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]  # nearest rank


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--model", default=None, help="checkpoint (default: a random one, --shape)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--paths", type=int, default=4)
    ap.add_argument("--max-path-tokens", type=int, default=32)
    ap.add_argument("--max-summary-tokens", type=int, default=None,
                    help="template included (default: the template + 16 tokens)")
    ap.add_argument("--num-kv-blocks", type=int, default=4096)
    ap.add_argument("--stream", action="store_true", help="stream every answer (SSE)")
    ap.add_argument("--half-streamed", action="store_true",
                    help="stream every other request (the odd ones)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the --requests this many times (fresh seeds), RSS after each")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(write_random_checkpoint(Path(tmp), args.shape))
        if args.max_summary_tokens is None:
            args.max_summary_tokens = template_length(model) + 16
        config = vars(args) | {"model": args.model or f"random {args.shape}"}
        print("machine:", machine())
        print("config:", config)
        port = free_port()
        proc = start_server(args, model, port)
        base = f"http://127.0.0.1:{port}"
        rss_start = rss_mb(proc.pid)
        try:
            run_load(base, args, args.warmup, seed0=10**6)
            m0 = parse(httpx.get(f"{base}/metrics").text)
            rss_rounds, walls, results = [], [], []
            for r in range(args.rounds):
                wall, res = run_load(base, args, args.requests, seed0=args.seed + r * args.requests)
                walls.append(wall)
                results += res
                rss_rounds.append(rss_mb(proc.pid))
                print(f"round {r + 1}: {len(res)} requests in {wall:.2f} s, server RSS "
                      f"{rss_rounds[-1]:.0f} MB", flush=True)
            wall = sum(walls)
            m = parse(httpx.get(f"{base}/metrics").text)
            rss_end = rss_rounds[-1]
        finally:
            proc.terminate()
            proc.wait(30)
    lat = [r["latency_s"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    out = {"requests": len(results), "wall_s": wall, "requests_per_s": len(results) / wall,
           "p50_latency_s": percentile(lat, 50), "p99_latency_s": percentile(lat, 99),
           "mean_latency_s": statistics.mean(lat), "generated_tokens_per_s": tokens / wall,
           "engine_steps": m["parathinker_engine_steps_total"]
           - m0["parathinker_engine_steps_total"],
           "kv_blocks_used_after": m["parathinker_kv_cache_blocks_used"],
           "server_rss_start_MB": rss_start, "server_rss_end_MB": rss_end,
           "server_rss_per_round_MB": rss_rounds}
    if args.stream:
        out["p50_first_chunk_s"] = percentile([r["first_chunk_s"] for r in results], 50)
    print(f"{len(results)} requests from {args.clients} clients in {wall:.2f} s: "
          f"{out['requests_per_s']:.2f} requests/s, p50 {out['p50_latency_s']:.3f} s, "
          f"p99 {out['p99_latency_s']:.3f} s, "
          f"{out['generated_tokens_per_s']:.0f} generated tokens/s; server RSS {rss_start:.0f} MB "
          f"at start, {rss_end:.0f} MB at the end")
    report("serve_load", config, out)


if __name__ == "__main__":
    main()
