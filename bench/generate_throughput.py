"""Generation speed with the KV cache against recomputing the whole window for every token: same model,
same prompt, same process, greedy so that both produce the same tokens.

    python bench/generate_throughput.py                          # GPT-2 124M shape, random weights
    python bench/generate_throughput.py --model=log/model_019073.pt --dtype=bfloat16
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train_gpt2 import GPT, GPTConfig, autocast_context, load_model, pick_device  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="", help="checkpoint, HF directory or hub name (default: random GPT-2 124M)")
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--prompt_tokens", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    device = pick_device(args.device)
    if args.model:
        model = load_model(args.model, device)
    else:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=50304)).to(device).eval()
    prompt = torch.randint(0, 50257, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    autocast = autocast_context(device.split(":")[0], args.dtype)

    def timed(use_cache):
        with autocast:
            model.generate(prompt, 8, temperature=0, stop=None, use_cache=use_cache)  # warm up
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            tokens = model.generate(prompt, args.new_tokens, temperature=0, stop=None, use_cache=use_cache)[0]
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        return tokens, args.new_tokens / (time.perf_counter() - t0)

    n = sum(p.numel() for p in model.parameters())
    print(f"{n / 1e6:.0f}M parameters, {device}, {args.dtype}, {args.prompt_tokens}-token prompt, "
          f"{args.new_tokens} new tokens, torch threads: {torch.get_num_threads()}")
    slow_tokens, slow = timed(use_cache=False)
    print(f"recompute every token: {slow:8.1f} tok/s")
    fast_tokens, fast = timed(use_cache=True)
    print(f"KV cache:              {fast:8.1f} tok/s")
    print(f"speedup {fast / slow:.1f}x; same tokens: {fast_tokens == slow_tokens}")


if __name__ == "__main__":
    main()
