"""An SFT step against a pretraining step of the same model, in one process, taking turns step by
step.

    python bench/sft_step.py --trained=0.16 --steps=20

SFT's targets are mostly IGNORE (the user's words, the template): the eager loss drops those rows
before any logit, so its step costs what its trained rows need. The pretraining step, every target
trained, is the baseline: it is what an SFT step cost before, and still costs under torch.compile,
where the row count must not depend on the data. Defaults: the end-to-end SFT test's model (2
layers, 64 wide, vocab 50304, B=8, T=64, fp32, eager), where the vocabulary's logits are nearly all
of the step. Prints each step's median and the ratio."""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train_gpt2 import GPT, IGNORE, GPTConfig  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trained", type=float, default=0.16,
                        help="the fraction of targets SFT trains")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    parser.add_argument("--n_layer", type=int, default=2)
    parser.add_argument("--n_embd", type=int, default=64)
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--T", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=args.n_layer, n_head=4, n_embd=args.n_embd, vocab_size=50304,
                          block_size=args.T, chat=True))
    x = torch.randint(0, 50257, (args.B, args.T))
    y = x.roll(-1, 1)
    sft = y.masked_fill(torch.rand(x.shape) >= args.trained, IGNORE)
    times = {"pretraining": [], "sft": []}
    for i in range(args.steps + 2):  # the first two of each warm up
        for kind, targets in (("pretraining", y), ("sft", sft)):
            t0 = time.perf_counter()
            _, loss = model(x, targets)
            loss.backward()
            model.zero_grad(set_to_none=True)
            if i >= 2:
                times[kind].append(time.perf_counter() - t0)
    base, step = (statistics.median(times[k]) for k in ("pretraining", "sft"))
    trained = (sft != IGNORE).float().mean()
    print(f"{args.n_layer} layers, {args.n_embd} wide, B={args.B} T={args.T}, {trained:.0%} "
          f"targets trained, {torch.get_num_threads()} threads")
    print(f"pretraining step {base * 1e3:.1f} ms | SFT step {step * 1e3:.1f} ms | "
          f"{base / step:.2f}x faster")


if __name__ == "__main__":
    main()
