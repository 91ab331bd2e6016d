"""serve.py under K concurrent clients: continuous batching (--slots=8, the default) against the
same server serving one request at a time (--slots=1: one slot, the others wait in line, which is
serve.py before batching), both started in this run, the loads interleaved K by K.

    flock /tmp/bench.lock python bench/serve_concurrency.py   # GPT-2 124M's shape, random weights
    python bench/serve_concurrency.py --new_tokens=32         # shorter, on a busy machine
    python bench/serve_concurrency.py --dry-run               # a tiny model, K=1,2: the suite's

Each of K clients streams one greedy completion of --new_tokens tokens (openai client, stream=True)
of its own prompt, all sent at once. For each K and server: aggregate new tokens/s (all tokens over
the wall time from the first request sent to the last token), the mean time to first token, and the
mean per-request tokens/s (a request's tokens over its own time). The weights are random, in float32
unless --dtype says."""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

import openai
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from train_gpt2 import GPT, MODEL_KEYS, GPTConfig  # noqa: E402

PROMPTS = [
    "The history of the Roman Empire",
    "def fibonacci(n):",
    "Dear hiring manager, I am writing",
    "The recipe calls for two cups of",
    "In quantum mechanics, the",
    "Breaking news: the city council",
    "Once upon a time, in a land",
    "The best way to learn a language",
    "Q: Why is the sky blue?\nA:",
    "import numpy as np\n",
    "My favourite football team",
    "The train left the station at",
    "To install the package, run",
    "She opened the letter and",
    "The stock market fell sharply",
    "Photosynthesis is the process",
]


def checkpoint(out_dir, tiny):
    """A random GPT of GPT-2 124M's shape (or a tiny one) saved as a checkpoint in out_dir."""
    torch.manual_seed(0)
    if tiny:
        config = GPTConfig(block_size=256, vocab_size=50304, n_layer=2, n_head=2, n_embd=64)
    else:
        config = GPTConfig()
    model = GPT(config)
    path = os.path.join(out_dir, "model_000000.pt")
    torch.save(
        {"model": model.state_dict(), "config": {k: getattr(config, k) for k in MODEL_KEYS}}, path
    )
    return path


def start(model, slots, dtype, threads):
    """serve.py on a free port; (the process, its base URL)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "serve.py"),
            f"--model={model}",
            "--port=0",
            "--device=cpu",
            f"--dtype={dtype}",
            f"--slots={slots}",
            "--queue=64",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    line = proc.stdout.readline()
    if not line.startswith("serving "):
        proc.kill()
        sys.exit(f"error: serve.py did not start: {line!r}")
    return proc, re.search(r"http://127\.0\.0\.1:\d+", line)[0]


def one(url, prompt, new_tokens, out):
    """Streams one greedy completion; out gets (sent, first token, last token, tokens) times."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)
    sent = time.perf_counter()
    first = None
    tokens = 0
    for chunk in client.completions.create(
        model="bench", prompt=prompt, max_tokens=new_tokens, temperature=0, stream=True
    ):
        if first is None:
            first = time.perf_counter()
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    out.append((sent, first, time.perf_counter(), tokens))


def load(url, k, new_tokens):
    """(aggregate tokens/s, mean seconds to first token, mean per-request tokens/s) of k clients at
    once."""
    out = []
    threads = [
        threading.Thread(target=one, args=(url, PROMPTS[i % len(PROMPTS)], new_tokens, out))
        for i in range(k)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start, end = min(o[0] for o in out), max(o[2] for o in out)
    total = sum(o[3] for o in out)
    ttft = sum(o[1] - o[0] for o in out) / k
    each = sum(o[3] / (o[2] - o[0]) for o in out) / k
    return total / (end - start), ttft, each


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new_tokens", type=int, default=128, help="new tokens each request asks for")
    p.add_argument("--ks", default="1,2,4,8,16", help="the numbers of concurrent clients")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2, help="each server's OMP_NUM_THREADS")
    p.add_argument(
        "--dry-run", action="store_true", help="a tiny model, K=1,2 and 8 tokens: runs in seconds"
    )
    args = p.parse_args(argv)
    ks = [1, 2] if args.dry_run else [int(k) for k in args.ks.split(",")]
    new_tokens = 8 if args.dry_run else args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        model = checkpoint(tmp, args.dry_run)
        servers = {
            "batching (--slots=8)": start(model, 8, args.dtype, args.threads),
            "one at a time (--slots=1)": start(model, 1, args.dtype, args.threads),
        }
        try:
            for _, url in servers.values():  # warm up: the first forward allocates the cache
                load(url, 1, 2)
            rows = {}
            for k in ks:
                for name, (_, url) in servers.items():
                    rows[k, name] = load(url, k, new_tokens)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
    print(
        f"serve.py, {'tiny' if args.dry_run else 'GPT-2 124M shape'}, random weights, "
        f"{args.dtype}, greedy, {new_tokens} new tokens a request, CPU threads {args.threads}"
    )
    print(
        "| K | server | aggregate tokens/s | vs K=1 | vs one at a time | time to first token | "
        "per-request tokens/s |"
    )
    print("|---|---|---|---|---|---|---|")
    batching, serial = servers
    for k in ks:
        for name in servers:
            agg, ttft, each = rows[k, name]
            vs_one = agg / rows[1, name][0]
            vs_serial = agg / rows[k, serial][0]
            print(
                f"| {k} | {name} | {agg:.1f} | {vs_one:.2f}x | {vs_serial:.2f}x | {ttft:.3f} s | "
                f"{each:.1f} |"
            )


if __name__ == "__main__":
    main()
