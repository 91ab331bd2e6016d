"""bench/gpu_check.py: its --dry-run (tiny shapes on CPU) runs the whole script, so that it never
rots."""

import os
import re
import sys

import torch
from conftest import ROOT, run

sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_check  # noqa: E402


def test_dry_run_prints_both_tables_with_every_measurement():
    r = run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--dry-run"], timeout=600)
    assert r.returncode == 0, r.stderr
    lines = [
        line for line in r.stdout.splitlines() if line.startswith("|") or line.endswith(" s in all")
    ]
    assert lines[0] == (
        "| measurement | dtype | B x T | throughput | unit | MFU | bandwidth | peak memory GiB | "
        "estimate GiB | note |"
    )
    table = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    second = table.index(["step (CPU time (each op's own))", "total ms", *gpu_check.KINDS])
    # the second table: its header, its --- line, its rows
    rows, kinds = table[:second], table[second + 2 : -1]
    decoding = [
        (who, f"B={b}, {mode}")
        for who in ("ours, eager step", "ours", "transformers generate")
        for b in (1, 8)
        for mode in ("greedy", "top-k 50")
    ]
    assert [(row[0], row[4]) for row in rows] == [
        ("train step", "tokens/s"),
        ("train step", "tokens/s"),
        ("train step, Muon", "tokens/s"),
        ("train step, transformers", "tokens/s"),
        ("HellaSwag", "examples/s"),
        ("generation, KV cache", "new tokens/s"),
    ] + [(f"decode, {who}", "new tokens/s") for who, _ in decoding] + [
        ("matmul (MFU's ceiling)", "GFLOP/s"),
        ("copy (bandwidth's ceiling)", "GB/s"),
    ]
    assert [row[2] for row in rows[6:18]] == [shape for _, shape in decoding]
    assert [row[1] for row in rows[:4]] == ["bfloat16", "float16", "bfloat16", "bfloat16"]
    assert [row[2] for row in rows[:3]] == ["4 x 32"] * 3  # ours, AdamW in bf16 and fp16, and Muon
    assert all(float(row[3].replace(",", "")) > 0 for row in rows)
    # MFU against the measured matmul for the training and decoding rows, the datasheet's in a
    # training note
    assert all(re.fullmatch(r"\d+\.\d%", row[5]) for row in rows[:4] + rows[6:18])
    # the share of the measured copy bandwidth
    assert all(re.fullmatch(r"\d+%", row[6]) for row in rows[6:18])
    assert all(re.fullmatch(r"datasheet MFU \d+\.\d%", row[9]) for row in rows[:3])
    assert all(float(row[8]) > 0 for row in rows[:3])  # the estimate, beside a GPU's measured peak
    assert all(
        float(row[8]) >= 0 and row[9].startswith("eager; 8 tokens a sample") for row in rows[6:14]
    )
    assert [row[0] for row in kinds] == [
        "train step, transformers (one step)",
        "decode, ours, eager step, batch 1 greedy, 8 tokens",
        "decode, ours, batch 1 greedy, 8 tokens",
    ]
    for row in kinds:  # each kind's ms (share), adding up to the total
        ms = [float(re.fullmatch(r"(\d+\.\d\d) \(\d+%\)", cell)[1]) for cell in row[2:]]
        assert abs(sum(ms) - float(row[1])) < 0.05
    # the AdamW step was seen
    assert float(kinds[0][2 + gpu_check.KINDS.index("optimizer")].split()[0]) > 0
    assert float(kinds[1][2 + gpu_check.KINDS.index("matmul")].split()[0]) > 0
    assert re.fullmatch(r"\d+ s in all", lines[-1])


def test_kinds_by_name():
    assert [
        gpu_check.kind_of(name)
        for name in (
            "sm90_xmma_gemm_bf16bf16_bf16f32",
            "nvjet_tst_128x64",
            "aten::addmm",
            "triton_tem_fused_mm_0",
            "pytorch_flash::flash_fwd_kernel",
            "fmha_cutlassB_bf16_aligned",
            "aten::_scaled_dot_product_flash_attention",
            "triton_poi_fused_add_gelu_3",
            "aten::layer_norm",
            "multi_tensor_apply_kernel<FusedAdamMathFunctor>",
            "aten::_fused_adamw_",
            "aten::_foreach_norm",
            "Memcpy DtoD (Device -> Device)",
        )
    ] == [
        "matmul",
        "matmul",
        "matmul",
        "matmul",
        "attention",
        "attention",
        "attention",
        "elementwise",
        "elementwise",
        "optimizer",
        "optimizer",
        "optimizer",
        "other",
    ]


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
