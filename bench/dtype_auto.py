"""What --dtype=auto should pick for inference on this CPU: float32 against bf16 weights (held as
inference.hold_for_inference holds them: PackedLinear where oneDNN has bf16 kernels), in one process,
interleaved, best of --rounds, for the two jobs inference does:

- decode: inference.generate, batch 1, greedy, --new_tokens after a 16-token prompt (bound by memory: each
  token reads every weight once);
- score: inference.score on --windows windows of --window_tokens random tokens, every position's
  log-probability (bound by compute: a few wide matmuls).

    flock /tmp/bench.lock python bench/dtype_auto.py                     # GPT-2 124M shape, random weights
    flock /tmp/bench.lock python bench/dtype_auto.py --no_native_bf16    # as a CPU without native bf16 would
    python bench/dtype_auto.py --dry-run                                 # tiny shapes, seconds (the suite)

--no_native_bf16 runs the same measurement in a child process limited to AVX2 (ATEN_CPU_CAPABILITY=avx2,
MKL_ENABLE_INSTRUCTIONS=AVX2, ONEDNN_MAX_CPU_ISA=AVX2) with oneDNN's bf16 path off, so that bf16 weights are
plain Linears and bf16 matmuls take torch's emulated kernels, as on a CPU without AVX-512: an approximation of
such a CPU, not one.
"""
import argparse
import copy
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import inference  # noqa: E402
from train_gpt2 import GPT, GPTConfig, cpu_flags  # noqa: E402

AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def no_onednn_bf16():
    return False


def seconds(run):
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def measure(args):
    """{(job, dtype): tokens/s}, the dtypes interleaved within each round."""
    if args.dry_run:
        config = GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=32)
    else:
        config = GPTConfig(vocab_size=50304)  # GPT-2 124M, as train_gpt2.py trains it
    torch.manual_seed(0)
    model = GPT(config)
    models = {d: inference.hold_for_inference(copy.deepcopy(model), getattr(torch, d)) for d in args.dtypes}
    del model
    gen = torch.Generator().manual_seed(1)
    windows = [(torch.randint(0, 50257 if not args.dry_run else 512, (args.window_tokens,), generator=gen)
                .tolist(), 1, None) for _ in range(args.windows)]
    prompt = list(range(16))
    jobs = {
        "decode": (lambda m: inference.generate(m, prompt, args.new_tokens, temperature=0, stop=None),
                   args.new_tokens),
        "score": (lambda m: inference.score(m, windows), args.windows * args.window_tokens),
    }
    for m in models.values():  # warm up: allocation, oneDNN's first calls, the decoder's cache
        for run, _ in jobs.values():
            run(m)
    best = {}
    for _ in range(args.rounds):
        for job, (run, _) in jobs.items():
            for d, m in models.items():
                best[job, d] = min(best.get((job, d), float("inf")), seconds(lambda: run(m)))
    rates = {(job, d): jobs[job][1] / s for (job, d), s in best.items()}
    return rates, type(models["bfloat16"].lm_head).__name__


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new_tokens", type=int, default=48)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--window_tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no_native_bf16", action="store_true", help="measure as a CPU without AVX-512 would")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="tiny shapes, one round")
    args = p.parse_args(argv)
    args.dtypes = ("float32", "bfloat16")
    if args.dry_run:
        args.new_tokens, args.windows, args.window_tokens, args.rounds = 4, 2, 8, 1
    if args.no_native_bf16 and not args.child:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", *(argv or sys.argv[1:])]
        sys.exit(subprocess.run(cmd, env={**os.environ, **AVX2_ONLY}, timeout=600).returncode)
    if args.child:
        inference.onednn_bf16 = no_onednn_bf16
        torch.backends.mkldnn.enabled = False  # bf16 matmuls then take ATen's own kernels
    rates, held = measure(args)
    native = "avx512_bf16" in cpu_flags() or "amx_bf16" in cpu_flags()
    mode = "limited to AVX2, oneDNN bf16 off" if args.child else f"native bf16: {native}"
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__} ({mode}); "
          f"bf16 weights held as {held}")
    print(f"{'job':<8} {'float32 tok/s':>14} {'bfloat16 tok/s':>15} {'bf16/fp32':>10}")
    for job in ("decode", "score"):
        fp32, bf16 = rates[job, "float32"], rates[job, "bfloat16"]
        print(f"{job:<8} {fp32:>14.1f} {bf16:>15.1f} {bf16 / fp32:>9.2f}x")


if __name__ == "__main__":
    main()
