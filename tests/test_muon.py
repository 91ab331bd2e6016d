"""--optimizer=muon: Muon takes exactly the blocks' 2-D weights and AdamW the rest, the schedule
scales both learning rates, and a Muon run learns, resumes bit-identically and gives the same losses
on 2 ranks."""

import dataclasses
import os
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, TORCHRUN, finished_run, run, train, train_losses

import train_gpt2 as tg

MUON = TINY + ["--optimizer=muon", "--muon_lr=1e-2", "--max_lr=1e-2"]


def write_cyclic_shards(data_dir):
    """Shards of the cycle 0, 1, ..., 96, 0, 1, ...: a next token a model can learn in a few
    steps."""
    os.makedirs(data_dir)
    for i, (split, n) in enumerate((("val", 3000), ("train", 5000), ("train", 4100))):
        np.save(
            os.path.join(data_dir, f"cyc_{split}_{i:06d}.npy"),
            ((np.arange(n) + 31 * i) % 97).astype(np.uint16),
        )
    return data_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cyclic_shards(str(tmp_path_factory.mktemp("muon") / "data"))


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    return finished_run(tmp_path_factory, "straight", MUON + [f"--data_dir={data}"])


def test_muon_takes_exactly_the_blocks_matrices_and_adamw_the_rest():
    model = tg.GPT(tg.GPTConfig(block_size=16, vocab_size=64, n_layer=3, n_head=2, n_embd=16))
    cfg = tg.parse_args(
        [
            "--optimizer=muon",
            "--weight_decay=0.1",
            "--max_lr=1e-3",
            "--muon_lr=2e-3",
            "--muon_momentum=0.9",
            "--muon_weight_decay=0.05",
        ]
    )
    optimizer = tg.build_optimizer(model, cfg, "cpu")
    # the tied weight is listed once, as wte's
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for p in optimizer.muon.param_groups[0]["params"]]
    adamw = [[names[id(p)] for p in group["params"]] for group in optimizer.adamw.param_groups]
    matrix = re.compile(
        r"transformer\.h\.\d\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight"
    )
    assert (
        sorted(muon) == sorted(n for n in names.values() if matrix.fullmatch(n)) and len(muon) == 12
    )
    # wte is lm_head's weight too
    assert adamw[0] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert model.lm_head.weight is model.transformer.wte.weight
    assert sorted(adamw[1]) == sorted(
        n for n in names.values() if n.endswith(".bias") or ".ln_" in n
    )
    assert sorted(muon + adamw[0] + adamw[1]) == sorted(names.values())
    assert [g["weight_decay"] for g in optimizer.adamw.param_groups] == [0.1, 0.0]
    group = optimizer.muon.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["adjust_lr_fn"]) == (
        2e-3,
        0.9,
        0.05,
        "match_rms_adamw",
    )
    adamw = tg.build_optimizer(model, dataclasses.replace(cfg, optimizer="adamw"), "cpu")
    assert isinstance(adamw, torch.optim.AdamW)  # adamw: as before


def test_the_schedule_scales_both_learning_rates(data):
    cfg = tg.parse_args(MUON + ["--muon_lr=2e-2", f"--data_dir={data}"])
    loader = tg.DataLoaderLite(dataclasses.replace(cfg, data_dir=data), "train")
    model = tg.GPT(tg.GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=32))
    optimizer = tg.build_optimizer(model, cfg, "cpu")
    before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    lr = tg.get_lr(5, cfg)
    tg.train_step(
        tg.Run(cfg, trained=model, optimizer=optimizer, train_loader=loader, grad_accum_steps=2), lr
    )
    assert [g["lr"] for g in optimizer.adamw.param_groups] == [lr, lr]
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(2e-2 * lr / 1e-2, rel=1e-12)
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, before)
    assert len(optimizer.muon.state) == 8 and all(
        "momentum_buffer" in s for s in optimizer.muon.state.values()
    )


def test_a_muon_run_learns_and_resumes_bit_identically(data, straight, tmp_path):
    losses = train_losses(straight)
    assert losses[7] < losses[0] - 1.0, losses  # the cycle is being learned
    # The run stopped after step 4's checkpoint (a kill would leave exactly this), then resumed.
    for name in ("log.txt", "model_000004.pt"):
        shutil.copy(os.path.join(straight, name), tmp_path / name)
    r = train(MUON + [f"--data_dir={data}", f"--log_dir={tmp_path}", "--resume=auto"])
    assert r.returncode == 0, r.stderr
    assert train_losses(str(tmp_path)) == losses and train_losses(
        str(tmp_path), "val"
    ) == train_losses(straight, "val")
    resumed, whole = (
        torch.load(os.path.join(d, "model_000008.pt"), weights_only=True)
        for d in (tmp_path, straight)
    )
    assert set(whole["optimizer"]) == {"adamw", "muon"}
    assert_identical(resumed["model"], whole["model"])
    assert_identical(resumed["optimizer"], whole["optimizer"])


def assert_identical(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_identical(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b) and all(assert_identical(x, y) is None for x, y in zip(a, b))
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_a_two_rank_muon_run_gives_the_one_process_losses(data, straight, tmp_path):
    r = run(
        [
            *TORCHRUN,
            "--nproc_per_node=2",
            os.path.join(ROOT, "train_gpt2.py"),
            *MUON,
            f"--data_dir={data}",
            f"--log_dir={tmp_path}",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size 2, grad accum steps 1" in r.stdout
    for kind in ("train", "val"):
        one, two = train_losses(straight, kind), train_losses(str(tmp_path), kind)
        assert sorted(one) == sorted(two) and all(abs(one[s] - two[s]) <= 1e-5 for s in one), (
            one,
            two,
        )


def test_resuming_with_the_other_optimizer_is_refused_in_one_line(data, straight, tmp_path):
    for name in ("log.txt", "model_000008.pt"):
        shutil.copy(os.path.join(straight, name), tmp_path / name)
    r = train(
        TINY + [f"--data_dir={data}", f"--log_dir={tmp_path}", "--resume=auto", "--max_steps=10"]
    )
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"error: {tmp_path}/model_000008.pt was trained with --optimizer=muon, this run has "
        f"--optimizer=adamw, whose state it does not hold; continue with --optimizer=muon, "
        f"or start afresh with another --log_dir"
    )
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "model_000008.pt"]


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--optimizer=sgd", "--optimizer=sgd: expected one of adamw, muon"),
        ("--muon_lr=0", "--muon_lr=0.0: must be positive"),
        ("--muon_momentum=1", "--muon_momentum=1.0: must be below 1"),
    ],
)
def test_bad_muon_settings_are_refused(arg, message):
    with pytest.raises(tg.UserError, match=f"^{re.escape(message)}$"):
        tg.parse_args([arg])
