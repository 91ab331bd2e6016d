"""HellaSwag scoring throughput: this project's batched scoring against one example per forward, the
reference's way, in the same run, on the same small random GPT, on the same HellaSwag-shaped
examples. Each is timed 3 times, in turns; the fastest run counts, since other load on the machine
only slows runs.

    # 4 layers x 256 wide, bf16, 128 examples, 2048 tokens a batch
    python bench/hellaswag_throughput.py
    python bench/hellaswag_throughput.py --hella_data=hellaswag/hellaswag_val.jsonl \
        --n_layer=12 --n_head=12 --n_embd=768
"""
import argparse
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from hellaswag import hellaswag_predictions, hellaswag_tokens, read_hellaswag  # noqa: E402
from tests.conftest import write_hellaswag  # noqa: E402
from train_gpt2 import GPT, GPTConfig, autocast_context, get_tokenizer  # noqa: E402


@torch.no_grad()
def one_per_forward(model, data, autocast):
    """As build-nanogpt's hellaswag.py scores: per example a forward of 4 right-padded rows, context
    + ending each, the logits of every position, the cross-entropy of every position, then the
    ending's share of it."""
    preds = []
    with autocast:
        for ctx, ends, chars in data:
            tokens = torch.zeros(4, len(ctx) + max(map(len, ends)), dtype=torch.long)
            mask = torch.zeros_like(tokens)
            for k, end in enumerate(ends):
                tokens[k, :len(ctx) + len(end)] = torch.tensor(ctx + end)
                mask[k, len(ctx):len(ctx) + len(end)] = 1
            logits, _ = model(tokens)
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(),
                                  reduction="none")
            mask = mask[:, 1:]
            total = (nll.view(4, -1) * mask).sum(1)
            per_char = total / torch.tensor(chars).clamp(min=1)
            preds.append([s.argmin().item() for s in (total, total / mask.sum(1), per_char)])
    return torch.tensor(preds)


def fastest(scorers, data, repeats):
    """Each scorer's predictions and its fastest of `repeats` timed runs, taken in turns, so that a
    burst of load from elsewhere on the machine slows one run of each rather than every run of
    one."""
    for score in scorers:
        score(data[:8])  # warm up the kernels and allocator
    preds = [None] * len(scorers)
    seconds = [math.inf] * len(scorers)
    for _ in range(repeats):
        for i, score in enumerate(scorers):
            t0 = time.perf_counter()
            preds[i] = score(data)
            seconds[i] = min(seconds[i], time.perf_counter() - t0)
    return preds, seconds


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hella_data", default="",
                   help="a HellaSwag jsonl; default: random examples of HellaSwag's lengths")
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--batch_tokens", type=int, default=2048, help="hellaswag.py's CPU default")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each; the fastest counts")
    args = p.parse_args()

    if args.hella_data:
        examples = read_hellaswag(args.hella_data, args.examples)
    else:  # HellaSwag val averages about 40 words of context and 20 per ending
        with tempfile.TemporaryDirectory() as tmp:
            path = write_hellaswag(os.path.join(tmp, "h.jsonl"), args.examples, seed=0,
                                   ctx_words=(20, 80), ending_words=(8, 32))
            examples = read_hellaswag(path)
    torch.manual_seed(0)
    config = GPTConfig(block_size=1024, vocab_size=50304, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config).eval()
    data = hellaswag_tokens(examples, config.block_size, get_tokenizer())
    autocast = autocast_context("cpu", args.dtype)
    row = sum(len(c) + len(e) for c, ends, _ in data for e in ends) / (4 * len(data))
    packed = sum(len(c) + sum(map(len, ends)) for c, ends, _ in data) / len(data)
    print(f"model: {args.n_layer} layers x {args.n_embd} wide, vocab 50304, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; cpu {args.dtype}, "
          f"{torch.get_num_threads()} threads; {len(data)} examples, 4 rows of {row:.0f} tokens "
          f"on average (packed into one: {packed:.0f})")
    scorers = [lambda d: one_per_forward(model, d, autocast),
               lambda d: hellaswag_predictions(model, d, args.batch_tokens, autocast)]
    (single, batched), (t_single, t_batched) = fastest(scorers, data, args.repeats)
    print(f"one example per forward: {len(data) / t_single:7.1f} examples/s "
          f"({t_single:.2f} s, the fastest of {args.repeats} runs)")
    print(f"batched, {args.batch_tokens} tokens per forward: "
          f"{len(data) / t_batched:7.1f} examples/s ({t_batched:.2f} s)")
    agree = (single == batched).all(dim=1).double().mean().item()
    print(f"ratio batched / one per forward: {t_single / t_batched:.2f}x "
          f"(same predictions for {100 * agree:.1f}% of examples)")


if __name__ == "__main__":
    main()
