"""Greedy against top-k 50, step by step, in the setting of the greedy report (bench/NOTES.md,
"Greedy at 19 tokens/s"): GPT-2 124M's shape with the padded 50304-row vocabulary, batch 1, a
16-token prompt of <|endoftext|>, under bf16 autocast over fp32 weights (gpu_check's generation row:
a held copy per call) and with bf16 weights held (sample.py, serve.py). Each line: the new tokens a
call makes with the default stop (<|endoftext|>), the first token's time (the held copy, the
prompt), the median time of the steps after it, and per step the ops (CPU) or kernel launches
(CUDA), the reads of a device value into Python (each a wait for a GPU) and the graphs torch._dynamo
compiled.

    python bench/greedy_check.py            # the first CUDA GPU, else the CPU
    python bench/greedy_check.py --tiny     # a 2-layer model: seconds on a CPU
"""
import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from inference import generate_stream, hold_for_inference  # noqa: E402
from train_gpt2 import EOT, GPT, GPTConfig, pick_device  # noqa: E402

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch")
MODES = {"greedy": dict(temperature=0), "top-k 50": dict(top_k=50, seed=0)}


def step_times(model, n, sampling):
    """Seconds to each new token of one call, read as stream_text reads it (.item(), a wait for the
    GPU)."""
    times = []
    t0 = time.perf_counter()
    for nxt in generate_stream(model, [EOT] * 16, n, stop=None, **sampling):
        nxt.item()
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
    return times


def per_step_counts(model, n, device, sampling):
    """(ops or kernel launches, reads of a device value) per step: two calls' counts, n and 2n
    tokens long, subtracted, so that the prompt and the held copy drop out."""
    def count(tokens):
        cuda = device.startswith("cuda")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in generate_stream(model, [EOT] * 16, tokens, stop=None, **sampling):
                pass
        names = [e.name for e in prof.events()]
        if cuda:
            work = sum(name in LAUNCHES for name in names)
        else:
            work = sum(name.startswith("aten::") for name in names)
        return work, names.count("aten::_local_scalar_dense")
    w1, r1 = count(n)
    w2, r2 = count(2 * n)
    return (w2 - w1) / n, (r2 - r1) / n


def main(argv=None):
    # the docstring's first paragraph
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true",
                   help="2 layers, 64 wide: checks the script, not the report")
    p.add_argument("--new_tokens", type=int, default=32)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    shape = dict(n_layer=2, n_head=2, n_embd=64) if args.tiny else {}
    config = GPTConfig(block_size=1024, vocab_size=50304, **shape)
    torch.manual_seed(0)
    fp32 = GPT(config).to(device).eval()
    held = hold_for_inference(GPT(config).to(device), torch.bfloat16)
    held.load_state_dict(fp32.state_dict())

    def autocast():
        return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)

    print(f"{device}, batch 1, 16 x <|endoftext|>, vocab {config.vocab_size}, "
          f"{args.new_tokens} new tokens")
    print("| weights | mode | tokens made (stop at EOT) | first token ms | median step ms "
          "| ops or launches a step | device reads a step | dynamo graphs |")
    print("|---|---|---|---|---|---|---|---|")
    runs = (("fp32 under bf16 autocast", fp32, autocast),
            ("bf16 held", held, contextlib.nullcontext))
    for label, model, context in runs:
        for mode, sampling in MODES.items():
            with context():
                step_times(model, 4, sampling)  # warm-up
                torch._dynamo.utils.counters.clear()
                made = len(list(generate_stream(model, [EOT] * 16, args.new_tokens, **sampling)))
                times = step_times(model, args.new_tokens, sampling)
                work, reads = per_step_counts(model, args.new_tokens, device, sampling)
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            median = statistics.median(times[1:])
            print(f"| {label} | {mode} | {made} | {1e3 * times[0]:.1f} | {1e3 * median:.1f} "
                  f"| {work:.0f} | {reads:.0f} | {graphs} |")


if __name__ == "__main__":
    main()
