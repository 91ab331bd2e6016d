"""LoRA against full fine-tuning of the same base on the same text, in one run: peak memory and
time of a training step, trained parameters, and val loss after N steps at each one's best learning
rate.

    python bench/lora.py              # ~15 min on 2 shared cores
    python bench/lora.py --dry-run    # tiny shapes: that the bench runs (tests/test_lora.py)

1. A step at gpt2-medium's shape (24 layers, 1024 wide, vocab 50304; B=1, T=128, random weights:
   memory and time do not depend on their values), each configuration in a fresh process of its own
   so that peaks do not mix: train_gpt2's model, apply_lora and hold_base_in_bf16 (where the run's
   dtype is bf16, as build_model does), build_optimizer and train_step. Memory: the process's peak
   resident memory (VmHWM) over the steps after the first (which allocates AdamW's state), the peak
   reset after it and glibc's buffers unmapped when freed (bench/memory.py's map_large_buffers), so
   it is the peak of live memory in a step. On a GPU it would be torch.cuda.max_memory_allocated;
   this bench runs on CPU. Time: the median step.
2. Val loss, on a smaller model (4 layers, 256 wide; gpt2-medium cannot be pretrained here): a base
   pretrained by train_gpt2.train() on Python's pydoc topics, then fine-tuned on other text, the
   module docstrings of Python's standard library, for N steps at a constant learning rate, full and
   LoRA, each at the best of 3 learning rates. Token ids are renumbered densely over both texts (as
   bench/token_efficiency.py does), so the vocabulary is the ids they use, not 50,304.
"""
import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from memory import map_large_buffers  # noqa: E402

import train_gpt2 as tg  # noqa: E402
from prepare_fineweb import write_shard  # noqa: E402

# a module's docstring: the first string literal, after comments and blank lines
MODULE_DOCSTRING = re.compile(r'\s*(?:#[^\n]*\n\s*)*[rRuU]?("""|\'\'\')(.*?)\1', re.S)
CONFIGS = {"full": 0, "LoRA r=8": 8, "LoRA r=64": 64}  # name: lora_rank
LRS = {"full": (1e-4, 3e-4, 1e-3), "LoRA r=8": (3e-4, 1e-3, 3e-3), "LoRA r=64": (3e-4, 1e-3, 3e-3)}
MEDIUM = dict(n_layer=24, n_head=16, n_embd=1024, B=1, T=128, steps=2)
SMALL = dict(n_layer=4, n_head=4, n_embd=256, B=8, T=64, pretrain_steps=200, steps=40, lrs=3,
             docs=None)
DRY = (dict(n_layer=2, n_head=2, n_embd=64, B=1, T=32, steps=1),
       dict(n_layer=2, n_head=2, n_embd=64, B=2, T=32, pretrain_steps=2, steps=1, lrs=1, docs=50))


def peak_rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: VmHWM := VmRSS


def step_worker(shape, rank, data_dir):
    """One configuration's steps in this fresh process; prints its peak, seconds, trained, dtype."""
    map_large_buffers()
    torch.manual_seed(0)
    dtype = tg.resolve_dtype("auto", "cpu", log=lambda line: None)  # bfloat16 where it is native
    T = shape["T"]
    cfg = tg.Settings(data_dir=data_dir, n_layer=shape["n_layer"], n_head=shape["n_head"],
                      n_embd=shape["n_embd"], block_size=T, T=T, B=shape["B"],
                      total_batch_size=shape["B"] * T, lora_rank=rank, dtype=dtype, device="cpu",
                      compile=False, init_from="bench")
    model = tg.GPT(tg.model_config(dataclasses.asdict(cfg)))
    if rank:  # as build_model does
        tg.apply_lora(model, dataclasses.asdict(cfg))
        if dtype == "bfloat16":
            tg.hold_base_in_bf16(model)
    run = tg.Run(cfg, autocast=tg.autocast_context("cpu", dtype))
    run.model = run.trained = model
    run.optimizer = tg.build_optimizer(model, cfg, "cpu")
    run.train_loader = tg.DataLoaderLite(cfg, "train")
    tg.train_step(run, 1e-4)  # allocates AdamW's state
    reset_peak_rss()
    times = []
    for _ in range(shape["steps"]):
        t0 = time.perf_counter()
        tg.train_step(run, 1e-4)
        times.append(time.perf_counter() - t0)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"peak": peak_rss(), "seconds": statistics.median(times), "trained": trained,
                      "dtype": dtype}))


def measure_steps(shape, workdir):
    data_dir = os.path.join(workdir, "random")
    os.makedirs(data_dir)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        tokens = rng.integers(0, tg.EOT, 100_000).astype(np.uint16)
        write_shard(os.path.join(data_dir, f"random_{split}_000000.npy"), tokens)
    results = {}
    for name, rank in CONFIGS.items():
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(shape), str(rank),
               data_dir]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        if out.returncode:
            raise SystemExit(f"{name}'s step failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def texts(limit=None):
    """(pydoc topics, the standard library's module docstrings of over 200 characters, about 200 KB;
    the first `limit` of each): the base's text and the other text."""
    from pydoc_data.topics import topics
    pretrain = [topics[k] for k in sorted(topics)][:limit]
    stdlib = sysconfig.get_paths()["stdlib"]
    skipped = ("test", "tests", "idlelib", "site-packages", "pydoc_data")
    docs = []
    for root, dirs, files in os.walk(stdlib):  # top-down, dirs sorted in place: the order is fixed
        dirs[:] = sorted(d for d in dirs if d not in skipped)
        for name in sorted(f for f in files if f.endswith(".py")):
            with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
                doc = MODULE_DOCSTRING.match(f.read())
            if doc and len(doc[2]) > 200:
                docs.append(doc[2])
            if len(docs) == limit:
                return pretrain, docs
    return pretrain, docs


def write_texts(workdir, limit=None):
    """Both texts as shards (the first 10% of each is its val split), ids renumbered densely;
    returns their directories and the vocab."""
    enc = tg.get_tokenizer()
    streams = [np.array([t for doc in docs for t in (tg.EOT, *enc.encode_ordinary(doc))])
               for docs in texts(limit)]
    used, dense = np.unique(np.concatenate(streams), return_inverse=True)
    dirs = []
    parts = np.split(dense.astype(np.uint16), [len(streams[0])])
    for name, part in zip(("pretrain", "finetune"), parts):
        out = os.path.join(workdir, name)
        os.makedirs(out)
        val = len(part) // 10
        write_shard(os.path.join(out, f"{name}_val_000000.npy"), part[:val])
        write_shard(os.path.join(out, f"{name}_train_000001.npy"), part[val:])
        dirs.append(out)
    print(f"pretrain: pydoc topics, {len(streams[0]):,} tokens; fine-tune: {len(streams[1]):,} "
          f"tokens of the standard library's docstrings; {len(used):,} distinct ids")
    return dirs, -(-len(used) // 128) * 128


def train(args):
    """train_gpt2.train() in this process, quietly; its val losses {step: loss}."""
    cfg = tg.parse_args(args)
    with contextlib.redirect_stdout(io.StringIO()):
        tg.train(cfg)
    with open(os.path.join(cfg.log_dir, "log.txt")) as f:
        rows = [line.split() for line in f if line[:1].isdigit()]
    return {int(r[0]): float(r[2]) for r in rows if r[1] == "val"}


def compare_val_loss(shape, workdir):
    (pretrain_dir, finetune_dir), vocab = write_texts(workdir, shape["docs"])
    T, B = shape["T"], shape["B"]
    common = [f"--n_layer={shape['n_layer']}", f"--n_head={shape['n_head']}",
              f"--n_embd={shape['n_embd']}", f"--block_size={T}", f"--T={T}", f"--B={B}",
              f"--total_batch_size={B * T}", f"--vocab_size={vocab}", "--compile=False",
              "--sample_count=0", "--hella_data=", "--device=cpu", f"--eval_tokens={32 * T}",
              "--peak_flops=1e12"]  # no MFU: no half-second matmul timing at each start
    steps = shape["pretrain_steps"]
    base_dir = os.path.join(workdir, "base")
    warmup = max(1, steps // 15)
    train(common + [f"--data_dir={pretrain_dir}", f"--log_dir={base_dir}", "--max_lr=3e-3",
                    "--min_lr=3e-4", f"--warmup_steps={warmup}", f"--max_steps={steps}",
                    f"--eval_interval={steps}", f"--checkpoint_interval={steps}"])
    base = tg.checkpoint_path(base_dir, steps)
    n = shape["steps"]
    results = {}
    for name, rank in CONFIGS.items():
        losses = {}
        for lr in LRS[name][:shape["lrs"]]:
            log_dir = os.path.join(workdir, f"{name.replace(' ', '_')}_{lr}")
            val = train(common + [f"--data_dir={finetune_dir}", f"--log_dir={log_dir}",
                                  f"--init_from={base}", f"--lora_rank={rank}", f"--max_lr={lr}",
                                  f"--min_lr={lr}", "--warmup_steps=0", f"--max_steps={n}",
                                  f"--eval_interval={n}", f"--checkpoint_interval={n}"])
            losses[lr] = val[n]
            results["before"] = val[0]
        results[name] = min((loss, lr) for lr, loss in losses.items())
        by_lr = ", ".join(f"{lr:g}: {v:.4f}" for lr, v in losses.items())
        print(f"{name}: val loss after {n} steps by lr: {by_lr}")
    return results


def main():
    if sys.argv[1:2] == ["--worker"]:
        return step_worker(json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes and steps: that it runs")
    args = p.parse_args()
    medium, small = DRY if args.dry_run else (MEDIUM, SMALL)
    workdir = tempfile.mkdtemp(prefix="lora_bench_")
    steps = measure_steps(medium, workdir)
    val = compare_val_loss(small, workdir)
    full = steps["full"]
    held = "the frozen blocks in bf16" if full["dtype"] == "bfloat16" else "fp32"
    print(f"\nstep: {medium['n_layer']} layers, {medium['n_embd']} wide, vocab 50304, "
          f"B={medium['B']}, T={medium['T']}, {full['dtype']} (LoRA: {held}), eager, "
          f"{torch.get_num_threads()} threads; val loss: {small['n_layer']} layers, "
          f"{small['n_embd']} wide, {small['steps']} steps of {small['B'] * small['T']} tokens "
          f"from a base at val loss {val['before']:.4f} on the fine-tuning text")
    print("| | trained parameters | peak RSS of a step | vs full | time per step | vs full | "
          "best lr | val loss | vs full |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in CONFIGS:
        s, (loss, lr) = steps[name], val[name]
        print(f"| {name} | {s['trained'] / 1e6:.2f}M ({s['trained'] / full['trained']:.2%}) | "
              f"{s['peak'] / 2**20:,.0f} MiB | {s['peak'] / full['peak']:.2f}x | "
              f"{s['seconds']:.2f} s | {s['seconds'] / full['seconds']:.2f}x | {lr:g} | "
              f"{loss:.4f} | {loss / val['full'][0] - 1:+.1%} |")


if __name__ == "__main__":
    main()
