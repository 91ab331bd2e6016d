"""Training throughput of train_gpt2.py's real step against transformers' GPT2LMHeadModel, and MFU.

    # default: 6 layers, 384 wide, B=8, T=256, all cores
    python bench/train_throughput.py
    python bench/train_throughput.py --n_layer=12 --n_head=12 --n_embd=768 --steps=5
    python bench/train_throughput.py --only=ours --profile=True   # torch.profiler table of our step

Each measurement runs in its own child process, so that its peak resident memory is its own; the
training runs take turns for --rounds rounds and each one's fastest median step counts.
Ours: GPT + build_optimizer (fused AdamW) + torch.compile + bf16 autocast, stepped by
train_gpt2.train_step. HF: GPT2LMHeadModel with sdpa attention, bf16 autocast, torch.optim.AdamW,
eager, stepped by the usual loop (usual_step), twice: as transformers is normally run, in a process
that never imports train_gpt2, and again with train_gpt2 imported, which gives the process this
project's glibc allocator setting. Peak: a large bf16 matmul.
"""
import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# train_gpt2 is imported only inside the children that need it: importing it tunes the process's
# allocator.
RUNS = {"ours": "train_gpt2.py", "hf": "transformers GPT2LMHeadModel",
        "hf+malloc": "the same, with train_gpt2's allocator setting"}


class SyntheticLoader:
    """Random token batches held in memory, with DataLoaderLite's next_batch() interface."""

    def __init__(self, B, T, vocab, count=8, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.B, self.T = B, T
        self.batches = [torch.randint(0, vocab, (B * T + 1,), generator=gen)
                        for _ in range(count)]
        self.i = 0

    def next_batch(self):
        buf = self.batches[self.i % len(self.batches)]
        self.i += 1
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)


class HFAdapter(nn.Module):
    """GPT2LMHeadModel behind GPT's (idx, targets) -> (logits, loss) interface, loss computed the
    usual way: full fp32 logits and F.cross_entropy."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, idx, targets):
        logits = self.hf(input_ids=idx).logits
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def usual_step(model, optimizer, loader, grad_accum, grad_clip, autocast):
    """The optimizer step as PyTorch training loops usually write it."""
    optimizer.zero_grad(set_to_none=True)
    for _ in range(grad_accum):
        x, y = loader.next_batch()
        with autocast:
            _, loss = model(x, y)
        (loss / grad_accum).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


def build(args, which):
    torch.manual_seed(0)
    if which == "ours":
        import train_gpt2
        config = train_gpt2.GPTConfig(block_size=args.block_size, vocab_size=args.vocab_size,
                                      n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
        raw = train_gpt2.GPT(config)
        optimizer = train_gpt2.build_optimizer(raw, train_gpt2.Settings(), "cpu")
        return raw, (torch.compile(raw) if args.compile else raw), optimizer
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=args.vocab_size, n_positions=args.block_size,
                        n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
                        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, attn_implementation="sdpa")
    hf = GPT2LMHeadModel(config)
    assert hf.config._attn_implementation == "sdpa"
    assert hf.lm_head.weight is hf.transformer.wte.weight
    optimizer = torch.optim.AdamW(hf.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    return hf, HFAdapter(hf), optimizer


def time_training(args, which):
    """Seconds of the first step (compile and warm-up) and of each timed step, and the flops per
    token."""
    torch.set_num_threads(args.threads)
    if which == "hf":
        assert "train_gpt2" not in sys.modules, \
            "the usual-HF process must keep glibc's default allocator"
    else:
        import train_gpt2
        train_gpt2.tune_allocator()  # as train_gpt2.main() does
        train_gpt2.LOSS_CHUNK_ROWS = args.loss_chunk_rows or train_gpt2.LOSS_CHUNK_ROWS
    raw, model, optimizer = build(args, which)
    model.train()
    # GPT-2's ids; the rest is padding
    loader = SyntheticLoader(args.B, args.T, min(args.vocab_size, 50257))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    if which == "ours":
        run = train_gpt2.Run(train_gpt2.Settings(), trained=model, optimizer=optimizer,
                             train_loader=loader, grad_accum_steps=args.grad_accum,
                             autocast=autocast, scaler=train_gpt2.grad_scaler("cpu", "bfloat16"))

    def step():
        t0 = time.perf_counter()
        if which == "ours":
            train_gpt2.train_step(run, 6e-4)
        else:
            usual_step(model, optimizer, loader, args.grad_accum, 1.0, autocast)
        return time.perf_counter() - t0

    first = step()
    for _ in range(args.warmup):
        step()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(2):
                step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total",
                                          row_limit=args.profile_rows)
        print(table, flush=True)
    times = [step() for _ in range(args.steps)]
    # no position embedding
    n = sum(p.numel() for p in raw.parameters()) - args.block_size * args.n_embd
    flops = 6 * n + 6 * args.n_layer * args.n_embd * args.T
    if which == "ours":  # the formula must agree with the one train_gpt2.py logs MFU with
        assert flops == train_gpt2.flops_per_token(raw, args.T)
    return {"first": first, "times": times, "flops_per_token": flops}


def time_matmul(args, which):
    import train_gpt2
    torch.set_num_threads(args.threads)
    peaks = (train_gpt2.measure_matmul_flops(n=args.matmul_n, seconds=1.0)
             for _ in range(args.matmul_repeats))
    return {"peak": statistics.median(peaks)}


def with_peak_rss(fn, args, which):
    result = fn(args, which)
    # Linux reports KiB
    result["max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def in_child(fn, args, which):
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(with_peak_rss, fn, args, which).result()


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_layer", type=int, default=6)
    p.add_argument("--n_head", type=int, default=6)
    p.add_argument("--n_embd", type=int, default=384)
    p.add_argument("--vocab_size", type=int, default=50304)
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--grad_accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps after the first (compile) step")
    p.add_argument("--steps", type=int, default=8, help="timed steps; the median is reported")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--compile", type=lambda s: s.lower() in ("1", "true"), default=True)
    p.add_argument("--matmul_n", type=int, default=4096)
    p.add_argument("--matmul_repeats", type=int, default=3)
    p.add_argument("--loss_chunk_rows", type=int, default=0,
                   help="override train_gpt2.LOSS_CHUNK_ROWS")
    p.add_argument("--rounds", type=int, default=2,
                   help="runs of each, in turns; the fastest median counts")
    p.add_argument("--only", choices=tuple(RUNS), help="time only this run (no ratios)")
    p.add_argument("--profile", type=lambda s: s.lower() in ("1", "true"), default=False)
    p.add_argument("--profile_rows", type=int, default=25)
    args = p.parse_args()

    print(f"config: n_layer={args.n_layer} n_head={args.n_head} n_embd={args.n_embd} "
          f"vocab={args.vocab_size} B={args.B} T={args.T} grad_accum={args.grad_accum}, "
          f"{args.threads} threads, torch {torch.__version__}")
    peak = in_child(time_matmul, args, None)
    print(f"bf16 matmul peak ({args.matmul_n}^3): {peak['peak'] / 1e12:.3f} TFLOP/s")
    tokens = args.B * args.T * args.grad_accum
    runs = [which for which in RUNS if not args.only or which == args.only]
    best = {}  # each run's fastest round
    seen = {which: [] for which in runs}  # each run's tokens/s, round by round
    # in turns, so that a slow spell on a shared machine slows one run of each
    for _ in range(args.rounds):
        for which in runs:
            r = in_child(time_training, args, which)
            r["median"] = statistics.median(r["times"])
            seen[which].append(tokens / r["median"])
            if which not in best or r["median"] < best[which]["median"]:
                best[which] = r
    rows = []
    speed = {}
    for which, r in best.items():
        speed[which] = tokens / r["median"]
        mfu = 100 * r["flops_per_token"] * speed[which] / peak["peak"]
        rows.append(f"| {RUNS[which]} | {speed[which]:,.0f} | {1000 * r['median']:.0f} "
                    f"| {min(r['times']) * 1000:.0f}-{max(r['times']) * 1000:.0f} | {mfu:.1f}% "
                    f"| {r['first']:.1f} | {r['max_rss'] / 2**20:,.0f} |")
    rounds = (f"{w} " + " / ".join(f"{v:,.0f}" for v in seen[w]) for w in runs)
    print("tokens/s of each round: " + "; ".join(rounds))
    print("| run | tokens/s | median step ms | range ms | MFU | first step s (compile) "
          "| peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if len(speed) == len(RUNS):
        print(f"ours/HF: {speed['ours'] / speed['hf']:.2f}x against transformers as usually run, "
              f"{speed['ours'] / speed['hf+malloc']:.2f}x against it with train_gpt2's allocator "
              f"setting")


if __name__ == "__main__":
    main()
