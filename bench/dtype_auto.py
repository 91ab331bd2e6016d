"""What --dtype=auto should pick for inference on this CPU: float32 against bf16 weights, held as
inference.hold_for_inference holds them (PackedLinear where oneDNN has bf16 kernels), in one
process, interleaved, best of --rounds, for the two jobs inference does:

- decode: inference.generate, batch 1, greedy, --new_tokens after a 16-token prompt (bound by
  memory: each token reads every weight once);
- score: inference.score on --windows windows of --window_tokens random tokens, every position's
  log-probability (bound by compute: a few wide matmuls).

    flock /tmp/bench.lock python bench/dtype_auto.py    # GPT-2 124M's shape, random weights
    python bench/dtype_auto.py --dry-run                # tiny shapes, seconds (the suite runs it)

Run it on the CPU in question: limiting this one to AVX2 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA)
does not reproduce a CPU without AVX-512, whose bf16 kernels differ (docs/precision.md).
"""
import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import inference  # noqa: E402
from train_gpt2 import GPT, GPTConfig, native_bf16  # noqa: E402

DTYPES = ("float32", "bfloat16")


def seconds(run):
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def measure(args):
    """({(job, dtype): tokens/s}, the class bf16 weights are held in), the dtypes interleaved in
    each round and each job's best round kept: the machine may be shared."""
    if args.dry_run:
        config = GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=32)
    else:
        config = GPTConfig(vocab_size=50304)  # GPT-2 124M, as train_gpt2.py trains it
    torch.manual_seed(0)
    model = GPT(config)
    models = {d: inference.hold_for_inference(copy.deepcopy(model), getattr(torch, d))
              for d in DTYPES}
    gen = torch.Generator().manual_seed(1)
    real = min(config.vocab_size, 50257)
    windows = [(torch.randint(0, real, (args.window_tokens,), generator=gen).tolist(), 1, None)
               for _ in range(args.windows)]
    prompt = list(range(16))

    def decode(m):
        inference.generate(m, prompt, args.new_tokens, temperature=0, stop=None)

    def score(m):
        inference.score(m, windows)

    jobs = {"decode": (decode, args.new_tokens),
            "score": (score, args.windows * args.window_tokens)}
    for m in models.values():  # warm up: allocation, oneDNN's first calls, the decoder's cache
        for run, _ in jobs.values():
            run(m)
    best = {}
    for _ in range(args.rounds):
        for job, (run, _) in jobs.items():
            for d, m in models.items():
                took = seconds(lambda: run(m))
                best[job, d] = min(best.get((job, d), float("inf")), took)
    rates = {(job, d): jobs[job][1] / took for (job, d), took in best.items()}
    return rates, type(models["bfloat16"].lm_head).__name__


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return names[0]
    except (OSError, IndexError):
        return "unknown CPU"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new_tokens", type=int, default=48)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--window_tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0,
                   help="torch's threads (0: its default); 1 holds up better on a shared machine")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="tiny shapes, one round")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dry_run:
        args.new_tokens = 4
        args.windows = 2
        args.window_tokens = 8
        args.rounds = 1
    rates, held = measure(args)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__} "
          f"(native bf16: {native_bf16('cpu')}); bf16 weights held as {held}")
    print(f"{'job':<8} {'float32 tok/s':>14} {'bfloat16 tok/s':>15} {'bf16/fp32':>10}")
    for job in ("decode", "score"):
        fp32 = rates[job, "float32"]
        bf16 = rates[job, "bfloat16"]
        print(f"{job:<8} {fp32:>14.1f} {bf16:>15.1f} {bf16 / fp32:>9.2f}x")


if __name__ == "__main__":
    main()
