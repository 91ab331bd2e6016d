"""Decoding speed at batch 1: inference.generate (the decoder sample.py and serve.py use) against
transformers' cached generate on a model of the same shape, greedy, in one process, beside the
memory-bandwidth limit measured in the same run (each token reads every weight once: weight bytes /
copy bandwidth).

    flock /tmp/bench.lock python bench/generate_throughput.py  # GPT-2 124M shape, bf16
    flock /tmp/bench.lock python bench/generate_throughput.py --dtype=float32
    flock /tmp/bench.lock python bench/generate_throughput.py --model=log/model_019073.pt

The variants run in turn, --rounds times, and each reports its best round: the machine may be
shared, and the best round is the one least disturbed.
"""
import argparse
import contextlib
import os
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from inference import generate, hold_for_inference  # noqa: E402
from train_gpt2 import GPT, GPTConfig, load_model, pick_device  # noqa: E402


def copy_bandwidth(device, nbytes=256 << 20, reps=5):
    """Bytes per second one tensor copy moves (read + write, as STREAM's copy counts them), best of
    reps."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="",
                   help="checkpoint, run directory, HF directory or hub name "
                        "(default: random weights of GPT-2 124M's shape)")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--prompt_tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args()
    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.model:
        ours = load_model(args.model).to(device)  # float32: each variant below casts its own copy
        config = ours.config
    else:
        config = GPTConfig(vocab_size=50257)
        ours = GPT(config).to(device).eval()
    hf_logging.set_verbosity_error()
    hf_config = GPT2Config(n_positions=config.block_size, n_embd=config.n_embd,
                           n_layer=config.n_layer, n_head=config.n_head,
                           vocab_size=config.vocab_size)
    hf = GPT2LMHeadModel(hf_config).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 50257, (args.prompt_tokens,), generator=generator).tolist()
    ids = torch.tensor([prompt], device=device)

    def transformers_generate(model, n, context):
        with torch.no_grad(), context:
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)

    def ours_generate(model, n, context):
        with context:
            generate(model, prompt, n, temperature=0, stop=None)

    # as load_for_inference gives sample.py and serve.py
    held = hold_for_inference(GPT(config).to(device), dtype)
    held.load_state_dict(ours.state_dict())
    hf_held = GPT2LMHeadModel(hf.config).to(device, dtype).eval()
    hf_held.load_state_dict(hf.state_dict())
    plain = contextlib.nullcontext()
    # each variant: its line's name, and a call that makes n new tokens
    variants = {
        f"ours, {args.dtype} weights ({type(held.lm_head).__name__})":
            lambda n: ours_generate(held, n, plain),
        f"transformers generate, {args.dtype} weights":
            lambda n: transformers_generate(hf_held, n, plain),
    }
    if dtype != torch.float32:  # the mixed precision of training: fp32 weights under autocast
        autocast = torch.autocast(device.split(":")[0], dtype=dtype)
        variants = {
            f"transformers generate, {args.dtype} autocast":
                lambda n: transformers_generate(hf, n, autocast),
            f"ours, {args.dtype} autocast (a held copy per call)":
                lambda n: ours_generate(ours, n, autocast),
            **variants,
        }

    # the tied embedding counted once, as it is read once
    n_params = sum(p.numel() for p in held.parameters())
    weight_bytes = n_params * torch.finfo(dtype).bits // 8
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    print(f"{n_params / 1e6:.0f}M parameters, {device} ({cpu}), {torch.get_num_threads()} threads, "
          f"batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, greedy, "
          f"best of {args.rounds} rounds")
    best = dict.fromkeys(variants, 0.0)  # tokens/s, the best round of each
    bandwidth = 0.0
    for fn in variants.values():
        fn(4)  # warm up
    for _ in range(args.rounds):
        # like the rates, the least disturbed of the rounds
        bandwidth = max(bandwidth, copy_bandwidth(device))
        for name, fn in variants.items():
            sync(device)
            t0 = time.perf_counter()
            fn(args.new_tokens)
            sync(device)
            best[name] = max(best[name], args.new_tokens / (time.perf_counter() - t0))
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; {weight_bytes / 1e6:.0f} MB of {args.dtype} "
          f"weights a token: limit {bandwidth / weight_bytes:.0f} tokens/s")
    baseline = next(iter(best.values()))
    for name, rate in best.items():
        share = rate * weight_bytes / bandwidth
        print(f"{name:52s} {rate:7.1f} tokens/s {rate / baseline:5.2f}x {share:4.0%} of the limit")
    print("ratios against the first line")


if __name__ == "__main__":
    main()
