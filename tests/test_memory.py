"""The memory estimate printed at start: its arithmetic, the advice it gives a GPU that cannot hold
the run, and its figures against the peak memory a CPU run measures (bench/memory.py)."""

import os
import sys

import pytest
from conftest import ROOT

import train_gpt2 as tg

sys.path.insert(0, os.path.join(ROOT, "bench"))
import memory  # noqa: E402

XL = 1_557_611_200  # GPT-2 XL's parameters at vocab 50304


def settings(*args):
    return tg.parse_args(["--preset=gpt2-xl", "--dtype=bfloat16", *args])


def test_fsdp_divides_weights_gradients_and_adam_by_the_ranks_and_recompute_keeps_block_inputs():
    ddp = tg.estimate_memory(settings("--B=4"), XL, 8)
    assert ddp["parameters"] == ddp["gradients"] == 4 * XL and ddp["optimizer state"] == 8 * XL
    fsdp = tg.estimate_memory(settings("--B=4", "--fsdp=True"), XL, 8)
    for part in ("parameters", "gradients", "optimizer state"):
        assert fsdp[part] == ddp[part] / 8
    assert fsdp["activations"] == ddp["activations"]
    # the root (embeddings) and two blocks are whole at once, when every micro-step reduce-scatters
    assert fsdp["gathered weights"] == pytest.approx(
        4 * (50304 + 1024) * 1600 + 8 * (XL - 51330 * 1600) / 48, rel=1e-3
    )
    recompute = tg.estimate_memory(settings("--B=4", "--recompute=True"), XL, 8)
    bt, C = 4 * 1024, 1600
    assert ddp["activations"] - recompute["activations"] == 48 * bt * C * (40 - 4) - 2 * bt * C * 40
    # lean=False: whole weights and gradients between micro-steps, which many micro-steps a step
    # make worth it
    assert (
        tg.estimate_memory(settings("--B=4", "--fsdp=True"), XL, 8, lean=False)["gathered weights"]
        == 8 * XL
    )


def test_a_gpu_that_cannot_hold_the_run_is_told_what_would_fit(monkeypatch):
    monkeypatch.setattr(tg, "device_memory", lambda device: 40 * 2**30)
    lines = []
    lean = tg.plan_memory(settings("--B=16"), XL, 8, "cuda:0", lines.append)
    assert lines[0].startswith("memory estimate per rank: ")
    assert lines[1] == (
        "warning: the estimate exceeds this GPU's 40.00 GiB; what would fit: --B=2, or "
        "--recompute=True"
    ), lines  # FSDP alone leaves B=16's 48 GB of activations
    assert not lean  # without FSDP there is nothing to keep lean
    lines.clear()
    assert tg.plan_memory(settings("--B=4", "--fsdp=True"), XL, 8, "cuda:0", lines.append) is False
    assert len(lines) == 1  # it fits, with whole weights between micro-steps
    monkeypatch.setattr(tg, "device_memory", lambda device: 24 * 2**30)
    lines.clear()
    assert tg.plan_memory(settings("--B=4", "--fsdp=True"), XL, 8, "cuda:0", lines.append) is True
    assert len(lines) == 1  # on 24 GB it fits only by reduce-scattering at every micro-step
    lines.clear()
    # 23 GB of weights, gradients and Adam
    tg.plan_memory(settings("--B=1"), XL, 1, "cuda:0", lines.append)
    assert lines[1].endswith("what would fit: 2 GPUs with --fsdp=True"), lines
    lines.clear()
    tg.plan_memory(settings("--B=8"), XL, 1, "cuda:0", lines.append)
    assert lines[1].endswith("what would fit: 2 GPUs with --fsdp=True --recompute=True"), lines


def test_the_estimate_is_within_20_percent_of_the_measured_peak_on_each_sharded_rank(tmp_path):
    # bench/memory.py measures the other cases (world 1, DDP, recompute); this one is the test's
    # share of time
    for rank in memory.measure(2, True, False, workdir=str(tmp_path)):
        assert 0.8 <= rank["measured"] / sum(rank["parts"].values()) <= 1.2, rank
