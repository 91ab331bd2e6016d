"""Peak memory per rank of a train_gpt2.py run on CPU (gloo), against the estimate it prints at
start: world 1 and 2, with and without --fsdp and --recompute, at a small shape.

    python bench/memory.py                      # the table (~2 min on 2 cores)
    python bench/memory.py --dtype=bfloat16

Measured: each rank's peak resident memory (getrusage's ru_maxrss) up to the end of its last
training step, minus its resident memory before train() runs (torch imported, nothing built), with
glibc's default allocator settings fixed (see map_large_buffers). The checkpoint written at the end
is left out: rank 0 gathers the whole weights and AdamW state into host memory to write it, which on
a GPU is not the GPU's memory the estimate is about. The estimate: train_gpt2.estimate_memory for
the same settings.
"""
import argparse
import contextlib
import ctypes
import dataclasses
import io
import json
import os
import resource
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt2 as tg  # noqa: E402
from prepare_fineweb import write_shard  # noqa: E402

VOCAB = 512
# world, fsdp, recompute
RUNS = [(1, False, False), (1, False, True), (2, False, False), (2, True, False), (2, True, True)]


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def shape_args(data_dir, log_dir, dtype, n_layer=6, n_embd=384, B=8, T=256):
    """Settings of a run of 2 optimizer steps with one small val eval; 2 micro-steps each at world
    1. The vocabulary is small, so that the blocks, which sharding and recomputation act on, hold
    the memory."""
    return [f"--data_dir={data_dir}", f"--log_dir={log_dir}", f"--n_layer={n_layer}", "--n_head=6",
            f"--n_embd={n_embd}", f"--B={B}", f"--T={T}", f"--block_size={T}",
            f"--total_batch_size={2 * B * T}", f"--vocab_size={VOCAB}",
            "--max_steps=2", "--warmup_steps=1", "--eval_interval=2", f"--eval_tokens={B * T}",
            "--checkpoint_interval=1000000", "--compile=False", f"--dtype={dtype}", "--device=cpu",
            "--sample_count=0", "--hella_data=", "--peak_flops=1e12"]


def map_large_buffers():
    """glibc's default thresholds, fixed (set, they no longer grow as large buffers are freed):
    every large buffer is then a mapping of its own, unmapped when freed, so the peak RSS is the
    peak of live memory and not of a heap that freed buffers fragment (with
    train_gpt2.tune_allocator, or glibc's growing threshold, a run's RSS grew 25-30% from its first
    step to its second at the same live memory)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    libc.mallopt(-2, 0)  # M_TOP_PAD


def worker(argv):
    """Runs train_gpt2 with argv in this process; writes this rank's estimate and measurement as
    JSON."""
    map_large_buffers()
    base = rss()
    cfg = tg.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    with torch_device_meta():
        n_params = tg.GPT(tg.model_config(dataclasses.asdict(cfg))).num_params()
    parts = tg.estimate_memory(cfg, n_params, world, lean=False)
    peaks = []
    step = tg.train_step
    rank = int(os.environ.get("RANK", 0))

    # the peak so far, after each step: the last checkpoint's gathering is left out
    def train_step(*args):
        result = step(*args)
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        # a file, as ranks share stdout; written each step, as train() may not return
        with open(os.path.join(os.environ["MEMORY_RESULTS"], f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "parts": parts, "measured": max(peaks) - base}, f)
        return result
    tg.train_step = train_step
    with contextlib.redirect_stdout(io.StringIO()):
        tg.train(tg.parse_args(argv))  # not main(), which tunes the allocator


def torch_device_meta():
    import torch
    return torch.device("meta")


def write_data(data_dir, tokens=200_000):
    rng = np.random.default_rng(0)
    os.makedirs(data_dir)
    for split, n in (("train", tokens), ("val", tokens // 10)):
        tokens = rng.integers(0, VOCAB, n).astype(np.uint16)
        write_shard(os.path.join(data_dir, f"mem_{split}_000000.npy"), tokens)


def measure(world, fsdp, recompute, dtype="float32", workdir=None, **shape):
    """[per rank: {"parts": the estimate's bytes by part, "measured": peak bytes}] of one run."""
    workdir = workdir or tempfile.mkdtemp(prefix="memory_")
    data_dir = os.path.join(workdir, "data")
    if not os.path.isdir(data_dir):
        write_data(data_dir)
    log_dir = tempfile.mkdtemp(dir=workdir)
    args = shape_args(data_dir, log_dir, dtype, **shape)
    args += [f"--fsdp={fsdp}", f"--recompute={recompute}"]
    me = os.path.abspath(__file__)
    if world == 1:
        cmd = [sys.executable, me, "--worker"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world}", me, "--worker"]
    out = subprocess.run(cmd + args, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "MEMORY_RESULTS": log_dir})
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    results = []
    for rank in range(world):
        with open(os.path.join(log_dir, f"rank{rank}.json")) as f:
            results.append(json.load(f))
    return results


def mib(nbytes):
    """A table cell: bytes in whole MiB."""
    return f"{nbytes / 2**20:.0f}"


def main():
    if sys.argv[1:2] == ["--worker"]:
        return worker(sys.argv[2:])
    # the docstring's first paragraph
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    print(f"6 layers, 384 wide, vocab {VOCAB} (10.9M parameters), B=8, T=256, 2 micro-steps at "
          f"world 1, {args.dtype}; MiB per rank (rank 0)")
    print("| world | fsdp | recompute | parameters | gradients | optimizer state | gathered "
          "| activations | weight casts | estimate | measured | measured / estimate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    workdir = tempfile.mkdtemp(prefix="memory_")
    for world, fsdp, recompute in RUNS:
        r = measure(world, fsdp, recompute, args.dtype, workdir)[0]
        parts = r["parts"]
        total = sum(parts.values())
        cells = [mib(parts.get(k, 0)) for k in ("parameters", "gradients", "optimizer state",
                                                 "gathered weights", "activations", "weight casts")]
        print(f"| {world} | {fsdp} | {recompute} | " + " | ".join(cells) +
              f" | {mib(total)} | {mib(r['measured'])} | {r['measured'] / total:.2f} |")


if __name__ == "__main__":
    main()
