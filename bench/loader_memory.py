"""Resident memory of train_gpt2.DataLoaderLite reading a whole 100M-token shard, against a process
that only imports torch. Goal: growth under 64 MB (a whole-shard int64 load would cost 800 MB).

    python bench/loader_memory.py                    # 100M tokens, B=64, T=1024
    python bench/loader_memory.py --tokens=20000000 --B=8 --T=256

The shard is written to a temporary directory that is removed afterwards.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def memory_status():
    """Peak and current resident memory of this process, and the current anonymous and file-backed
    parts, in bytes."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}


def baseline():
    import torch  # noqa: F401
    return memory_status()


def read_shard(data_dir, B, T):
    """Walks the loader through every batch of the shard; returns its memory and what it read."""
    import torch  # noqa: F401
    sys.path.insert(0, ROOT)
    import train_gpt2
    loader = train_gpt2.DataLoaderLite(train_gpt2.Settings(B=B, T=T, data_dir=data_dir), "train")
    steps = loader.steps_per_epoch()
    t0 = time.perf_counter()
    checksum = 0
    for _ in range(steps):
        x, y = loader.next_batch()
        checksum += int(y[-1, -1])  # touch every batch so none can be skipped
    status = memory_status()
    status.update(batches=steps, seconds=time.perf_counter() - t0, checksum=checksum)
    return status


def in_child(*args):
    """Runs this file with args in a fresh interpreter and returns the dict it prints."""
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True,
                         text=True).stdout
    return eval(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=100_000_000)
    p.add_argument("--B", type=int, default=64)
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--child", choices=("baseline", "loader"), help=argparse.SUPPRESS)
    p.add_argument("--data_dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "baseline":
        return print(baseline())
    if args.child == "loader":
        return print(read_shard(args.data_dir, args.B, args.T))

    mib = 2 ** 20
    with tempfile.TemporaryDirectory() as data_dir:
        path = os.path.join(data_dir, "bench_train_000000.npy")
        shard = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(args.tokens,))
        rng = np.random.default_rng(0)
        for i in range(0, args.tokens, 1 << 24):
            n = min(1 << 24, args.tokens - i)
            shard[i:i + n] = rng.integers(0, 50257, n, dtype=np.uint16)
        shard.flush()
        del shard
        base = in_child("--child=baseline")
        used = in_child("--child=loader", f"--data_dir={data_dir}", f"--B={args.B}",
                        f"--T={args.T}")
    growth = used["VmHWM"] - base["VmHWM"]
    print(f"shard: {args.tokens:,} uint16 tokens ({2 * args.tokens / mib:,.0f} MiB); "
          f"read {used['batches']:,} batches of B={args.B} T={args.T} in {used['seconds']:.1f}s")
    for name, r in (("import torch only", base), ("loader over the whole shard", used)):
        print(f"peak RSS, {name}: {r['VmHWM'] / mib:,.1f} MiB (at the end: anonymous "
              f"{r['RssAnon'] / mib:,.1f} MiB, file-backed {r['RssFile'] / mib:,.1f} MiB)")
    verdict = "ok" if growth < 64 * mib else "OVER"
    print(f"growth: {growth / mib:,.1f} MiB (goal < 64 MiB): {verdict}")


if __name__ == "__main__":
    main()
