"""bench/gpu_check.py: its --dry-run (tiny shapes on CPU) runs the whole script, so that it never rots."""
import os
import re
import sys

import torch
from conftest import ROOT, run

sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_check  # noqa: E402


def test_dry_run_prints_one_table_with_every_measurement():
    r = run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--dry-run"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1] == ("| measurement | dtype | B x T | throughput | unit | MFU | peak memory GiB | estimate GiB | "
                        "note |")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[3:7]]
    assert [(row[0], row[4]) for row in rows] == [
        ("train step", "tokens/s"), ("train step", "tokens/s"), ("HellaSwag", "examples/s"),
        ("generation, KV cache", "new tokens/s")]
    assert [row[1] for row in rows[:2]] == ["bfloat16", "float16"] and rows[0][2] == "4 x 32"
    assert all(float(row[3].replace(",", "")) > 0 for row in rows)
    assert all(re.fullmatch(r"\d+\.\d%", row[5]) for row in rows[:2])
    assert all(float(row[7]) > 0 for row in rows[:2])  # the estimate, next to the peak a GPU measures
    assert re.fullmatch(r"\d+ s in all", lines[7])


def test_train_step_takes_the_largest_batch_that_fits(monkeypatch):
    real = gpu_check.tg.train_step

    def out_of_memory_above_2(run, lr):
        if run.train_loader.B > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (the test's)")
        return real(run, lr)
    monkeypatch.setattr(gpu_check.tg, "train_step", out_of_memory_above_2)
    row = gpu_check.train_row(gpu_check.DRY, "cpu", "float32")
    assert row["shape"] == "2 x 32" and row["rate"] > 0
    monkeypatch.setattr(gpu_check, "DRY", {**gpu_check.DRY, "batch_sizes": (4, 3)})
    assert gpu_check.train_row(gpu_check.DRY, "cpu", "float32")["note"] == "out of memory at B=3"
