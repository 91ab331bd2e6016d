"""Token efficiency of --optimizer=muon against AdamW: a small GPT trained by train_gpt2.train() on
a text corpus, each optimizer at its best learning rate from a small grid, for the same token budget
and 3 seeds.

    # ~3 min on 2 shared cores
    flock /tmp/bench.lock python bench/token_efficiency.py tinyshakespeare.txt

The corpus is tokenized with GPT-2's BPE and written as train_gpt2.py shards (the first 10% val, the
rest in 8 train shards that each seed orders differently), with the ids it uses renumbered 0..n-1:
the model's vocabulary is then those n rounded up to 128 (11,776 for tiny Shakespeare) rather than
50,304. Renumbering is a symmetry of the model, and the 38K rows no text uses would only be pushed
down; at this size they would also take most of each step's time. Every run is train_gpt2.train()
itself, in this process: the real optimizer construction, schedule (cosine, min_lr = max_lr / 10),
train_step and val loss.
1. Grid, seed 0: AdamW's max_lr; then Muon's muon_lr, with its AdamW part at AdamW's best max_lr.
2. Seeds 1 and 2 for each optimizer at its best learning rate.
3. Time per step of the two, taken in turns on one model shape (so the machine's drift hits both
   alike), at the runs' tokens per step and at 8x as many, since Muon's extra work is per step and
   not per token.
Prints the tables; writes the val-loss curves (mean of the seeds, min-max shaded) to --plot.
"""
import argparse
import contextlib
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt2 as tg  # noqa: E402
from plot import read_log  # noqa: E402
from prepare_fineweb import write_shard  # noqa: E402

STEP_DT = re.compile(r"step +\d+ \| loss .* \| dt ([\d.]+)ms")


def write_corpus(corpus, out, train_shards=8):
    """The corpus as train_gpt2.py shards with its token ids renumbered densely; returns the vocab
    size to train."""
    with open(corpus, encoding="utf-8") as f:
        tokens = np.array([tg.EOT, *tg.get_tokenizer().encode_ordinary(f.read())])
    used, dense = np.unique(tokens, return_inverse=True)
    dense = dense.astype(np.uint16)
    val = len(dense) // 10
    os.makedirs(out)
    write_shard(os.path.join(out, "corpus_val_000000.npy"), dense[:val])
    for i, part in enumerate(np.array_split(dense[val:], train_shards), 1):
        write_shard(os.path.join(out, f"corpus_train_{i:06d}.npy"), part)
    print(f"{corpus}: {len(tokens):,} tokens ({val:,} val), {len(used):,} distinct ids")
    return -(-len(used) // 128) * 128


def settings(args, data_dir, vocab, log_dir, optimizer, lr, seed, max_lr=None,
             total_batch_size=None):
    if optimizer == "adamw":
        lrs = [f"--max_lr={lr}", f"--min_lr={lr / 10}"]
    else:
        lrs = [f"--max_lr={max_lr}", f"--min_lr={max_lr / 10}", f"--muon_lr={lr}"]
    return tg.parse_args([
        f"--data_dir={data_dir}", f"--log_dir={log_dir}", f"--vocab_size={vocab}",
        f"--optimizer={optimizer}", *lrs, f"--seed={seed}", f"--max_steps={args.steps}",
        f"--warmup_steps={args.warmup}",
        f"--total_batch_size={total_batch_size or args.B * args.T}", f"--B={args.B}",
        f"--T={args.T}", f"--block_size={args.T}", "--n_layer=4", "--n_head=4",
        f"--n_embd={args.n_embd}", f"--eval_interval={args.eval_interval}",
        f"--eval_tokens={args.eval_tokens}", f"--checkpoint_interval={10**9}",
        "--keep_checkpoints=1", "--sample_count=0", "--hella_data=", "--compile=False",
        f"--dtype={args.dtype}", "--device=cpu",
        "--peak_flops=1e12"])  # a peak given: no matmul measured at every start


def train_run(cfg):
    """(val steps, val losses, median ms of a training step) of a run of train_gpt2.train()."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        tg.train(cfg)
    steps, losses = read_log(cfg.log_dir)["val"]
    return steps, losses, statistics.median(float(m[1]) for m in STEP_DT.finditer(out.getvalue()))


def step_times(args, data_dir, vocab, total_batch_size, best, rounds=3, steps=2):
    """Median seconds of train_gpt2.train_step with each optimizer (the model and optimizer made by
    build_model), taken in turns: a round times `steps` steps of each."""
    runs = {}
    for optimizer, lr, max_lr in (("adamw", best["adamw"], None),
                                  ("muon", best["muon"], best["adamw"])):
        log_dir = os.path.join(os.path.dirname(data_dir), f"timing_{optimizer}_{total_batch_size}")
        cfg = settings(args, data_dir, vocab, log_dir, optimizer, lr, 0, max_lr, total_batch_size)
        with contextlib.redirect_stdout(io.StringIO()):
            run = tg.start_run(cfg, 0, 1, "cpu")
            tg.build_model(run)
        run.trained = run.model
        runs[optimizer] = (run, tg.get_lr(50, cfg), [])
    for r in range(rounds + 1):  # round 0 warms up
        for run, lr, times in runs.values():
            for _ in range(steps):
                t0 = time.perf_counter()
                tg.train_step(run, lr)
                if r:
                    times.append(time.perf_counter() - t0)
    return {name: statistics.median(run[-1]) for name, run in runs.items()}


def reach(tokens, curve, target):
    """Tokens at which the curve first reaches target, linearly interpolated between evals; None if
    it never does."""
    for i in range(1, len(curve)):
        if curve[i] <= target:
            share = (curve[i - 1] - target) / (curve[i - 1] - curve[i])
            return tokens[i - 1] + share * (tokens[i] - tokens[i - 1])
    return None


def plot(path, tokens, curves, labels, target):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for name, color in (("adamw", "tab:blue"), ("muon", "tab:red")):
        runs = np.array(curves[name])
        ax.plot(tokens, runs.mean(0), color=color, label=labels[name])
        ax.fill_between(tokens, runs.min(0), runs.max(0), color=color, alpha=0.2)
    ax.axhline(target, color="gray", linestyle=":", label=f"AdamW's final val loss, {target:.3f}")
    ax.set(xlabel="training tokens", ylabel="val loss", ylim=(target - 0.6, target + 1.5))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def spread(values):
    mean, sd = statistics.mean(values), statistics.stdev(values)
    return f"{mean:.4f} ± {sd:.4f} (min {min(values):.4f}, max {max(values):.4f})"


def main():
    tg.tune_allocator()  # as train_gpt2.main() does
    # the docstring's first paragraph
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("corpus", help="a UTF-8 text file, e.g. tiny Shakespeare")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--B", type=int, default=16)
    p.add_argument("--T", type=int, default=64)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--eval_interval", type=int, default=10)
    p.add_argument("--eval_tokens", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--adamw_lrs", default="1e-3,2e-3,4e-3", help="AdamW's max_lr grid")
    p.add_argument("--muon_lrs", default="4e-3,8e-3,1.6e-2,3.2e-2", help="Muon's muon_lr grid")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--plot", default="docs/token_efficiency.png")
    args = p.parse_args()
    if not os.path.isfile(args.corpus):
        sys.exit(f"error: {args.corpus}: no such file; pass a text corpus, e.g. tiny Shakespeare")
    if problem := tg.missing_parent(args.plot):
        sys.exit(f"error: --plot={args.plot}: {problem}")
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = re.search(r"Model name:\s*(.*)", cpu)[1] if "Model name" in cpu else "unknown CPU"
    print(f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    t_start, cpu_start = time.time(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="token_efficiency_") as work:
        report(args, work)
    print(f"\nwrote {args.plot}; wall {(time.time() - t_start) / 60:.1f} min, this process's CPU "
          f"{(time.process_time() - cpu_start) / 60:.1f} min, "
          f"load average now {os.getloadavg()[0]:.1f}")


def report(args, work):
    """Prepares the data in work, trains the runs, prints the tables and writes the plot."""
    data_dir = os.path.join(work, "data")
    vocab = write_corpus(args.corpus, data_dir)
    runs = {}  # (optimizer, lr, seed) -> (val steps, val losses, ms per step)

    def run(optimizer, lr, seed, max_lr=None):
        log_dir = os.path.join(work, f"{optimizer}_{lr}_{seed}")
        cfg = settings(args, data_dir, vocab, log_dir, optimizer, lr, seed, max_lr)
        t0 = time.time()
        runs[optimizer, lr, seed] = train_run(cfg)
        steps, losses, ms = runs[optimizer, lr, seed]
        print(f"{optimizer:5s} lr {lr:g} seed {seed}: val {losses[0]:.4f} -> {losses[-1]:.4f}, "
              f"{ms:.0f} ms a step, {time.time() - t0:.0f} s", flush=True)
        return losses[-1]

    best = {"adamw": min(map(float, args.adamw_lrs.split(",")),
                         key=lambda lr: run("adamw", lr, 0))}
    best["muon"] = min(map(float, args.muon_lrs.split(",")),
                       key=lambda lr: run("muon", lr, 0, best["adamw"]))
    for seed in range(1, args.seeds):
        run("adamw", best["adamw"], seed)
        run("muon", best["muon"], seed, best["adamw"])
    tokens_per_step = args.B * args.T
    tokens = [s * tokens_per_step for s in runs["adamw", best["adamw"], 0][0]]
    curves = {name: [runs[name, best[name], seed][1] for seed in range(args.seeds)]
              for name in best}
    final = {name: [c[-1] for c in curves[name]] for name in best}
    target = statistics.mean(final["adamw"])
    needed = reach(tokens, np.mean(curves["muon"], axis=0), target)

    print(f"\n{args.steps} steps of {tokens_per_step} tokens ({tokens[-1]:,} tokens), n_layer=4 "
          f"n_embd={args.n_embd} T={args.T} vocab {vocab}, {args.dtype}, cosine schedule, "
          f"warmup {args.warmup}\n")
    print("| optimizer | lr | final val loss, seed 0 |\n|---|---|---|")
    for (name, lr, seed), (_, losses, _) in runs.items():
        if seed == 0:
            extra = f" (AdamW part at max_lr {best['adamw']:g})" if name == "muon" else ""
            mark = " (best)" if lr == best[name] else ""
            print(f"| {name} | {lr:g}{extra} | {losses[-1]:.4f}{mark} |")
    times = {name: statistics.median(runs[name, best[name], s][2] for s in range(args.seeds))
             for name in best}
    print(f"\n| optimizer (best lr) | final val loss, {args.seeds} seeds: mean ± sd "
          f"| ms a step, median of the runs |\n|---|---|---|")
    for name in best:
        print(f"| {name} ({best[name]:g}) | {spread(final[name])} | {times[name]:.0f} |")
    ratio = f"{tokens[-1] / needed:.2f}x fewer" if needed else "not reached"
    print(f"\nMuon reaches AdamW's final val loss ({target:.4f}) at "
          f"{needed or float('nan'):,.0f} tokens of {tokens[-1]:,}: {ratio} (goal: 1.5x or more)")
    print("\n| tokens a step | AdamW ms | Muon ms | Muon / AdamW |\n|---|---|---|---|")
    for total in (tokens_per_step, 8 * tokens_per_step):
        t = step_times(args, data_dir, vocab, total, best)
        print(f"| {total} | {1000 * t['adamw']:.0f} | {1000 * t['muon']:.0f} "
              f"| {t['muon'] / t['adamw']:.3f} |")
    labels = {name: f"{name} (lr {best[name]:g}), {args.seeds} seeds" for name in best}
    plot(args.plot, tokens, curves, labels, target)


if __name__ == "__main__":
    main()
