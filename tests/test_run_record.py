"""log.txt's first line: the run's record, read back by plot.py and kept across a resume."""

import os
import subprocess

import torch
from conftest import ROOT, read_log

import plot
from plot import read_run_record


def test_the_record_says_what_ran(tiny_run):
    log_dir = os.path.dirname(tiny_run.checkpoint)
    record, steps = read_log(log_dir)
    assert record == read_run_record(os.path.join(log_dir, "log.txt"))
    assert record["settings"] == torch.load(tiny_run.checkpoint, weights_only=True)["config"]
    # the tiny run's shape
    C = 32  # n_embd
    L = 2  # n_layer
    V = 50304  # vocab_size
    P = 64  # block_size
    # GPT-2's count, lm_head tied
    assert record["params"] == V * C + P * C + L * (12 * C * C + 13 * C) + 2 * C
    assert (record["world"], record["device"], record["torch"]) == (1, "cpu", torch.__version__)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=60
    ).stdout.strip()
    assert record["git"].removesuffix("-dirty") == head
    assert (
        steps[0].startswith("0 val ")
        and f"number of parameters: {record['params'] / 1e6:.2f}M" in tiny_run.stdout
    )


def test_plot_reads_tokens_per_step_from_the_record(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text('# train_gpt2.py run {"settings": {"total_batch_size": 4096}}\n0 train 10.9\n')
    assert plot.tokens_per_step(str(tmp_path)) == plot.tokens_per_step(str(log)) == 4096
    # a log from before records, with no checkpoint beside it: the default
    log.write_text("0 train 10.9\n")
    assert plot.tokens_per_step(str(tmp_path)) == 524288
