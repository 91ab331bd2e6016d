"""HellaSwag scoring throughput: batched forwards against one example per forward (the reference's way),
in the same run, on the same small random GPT, on the same HellaSwag-shaped examples.

    python bench/hellaswag_throughput.py                      # 4 layers x 256 wide, bf16, 128 examples, 2048 tokens a batch
    python bench/hellaswag_throughput.py --data=hellaswag/hellaswag_val.jsonl --n_layer=12 --n_embd=768
"""
import argparse
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.conftest import write_hellaswag  # noqa: E402
from train_gpt2 import (GPT, GPTConfig, autocast_context, hellaswag_predictions, hellaswag_tokens,  # noqa: E402
                        read_hellaswag)


def timed(model, data, batch_tokens, autocast):
    hellaswag_predictions(model, data[:8], batch_tokens, autocast)  # warm up the kernels and allocator
    t0 = time.perf_counter()
    preds = hellaswag_predictions(model, data, batch_tokens, autocast)
    return preds, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="", help="a HellaSwag jsonl; default: random examples of HellaSwag's lengths")
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--batch_tokens", type=int, default=2048, help="hellaswag.py's CPU default")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = p.parse_args()

    if args.data:
        examples = read_hellaswag(args.data, args.examples)
    else:  # HellaSwag val averages about 40 words of context and 20 per ending
        with tempfile.TemporaryDirectory() as tmp:
            examples = read_hellaswag(write_hellaswag(os.path.join(tmp, "h.jsonl"), args.examples, seed=0,
                                                      ctx_words=(20, 80), ending_words=(8, 32)))
    torch.manual_seed(0)
    config = GPTConfig(block_size=1024, vocab_size=50304, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config).eval()
    data = hellaswag_tokens(examples, config.block_size)
    autocast = autocast_context("cpu", args.dtype)
    row = sum(len(c) + len(e) for c, ends, _ in data for e in ends) / (4 * len(data))
    print(f"model: {args.n_layer} layers x {args.n_embd} wide, vocab 50304, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; cpu {args.dtype}, "
          f"{torch.get_num_threads()} threads; {len(data)} examples, 4 rows of {row:.0f} tokens on average")
    single, t_single = timed(model, data, 1, autocast)
    print(f"one example per forward: {len(data) / t_single:7.1f} examples/s ({t_single:.1f} s)")
    batched, t_batched = timed(model, data, args.batch_tokens, autocast)
    print(f"batched, {args.batch_tokens} tokens per forward: {len(data) / t_batched:7.1f} examples/s "
          f"({t_batched:.1f} s)")
    agree = (single == batched).all(dim=1).double().mean().item()
    print(f"ratio batched / one per forward: {t_single / t_batched:.2f}x "
          f"(same predictions for {100 * agree:.1f}% of examples)")


if __name__ == "__main__":
    main()
