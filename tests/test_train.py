"""End-to-end training runs: exact resume, DDP equivalence, and the default compiled bf16 path."""

import os
import shutil

import torch
from conftest import ROOT, TINY, TORCHRUN, read_log, run, train, train_losses, write_shards


def test_resume_continues_exactly(shards, tmp_path):
    straight = str(tmp_path / "straight")
    assert train(TINY + [f"--data_dir={shards}", f"--log_dir={straight}"]).returncode == 0
    full = train_losses(straight)
    assert sorted(full) == list(range(8))

    # stop at step 4: all that survives of the run is its checkpoint, and a note the user added to
    # the log
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copy(os.path.join(straight, "model_000004.pt"), resumed)
    record, steps = read_log(straight)
    first = open(os.path.join(straight, "log.txt")).readline()
    with open(os.path.join(resumed, "log.txt"), "w") as g:
        g.writelines(
            [first, "# run A: the tiny config\n", "\n"]
            + [line for line in steps if int(line.split()[0]) < 4]
        )
    out = train(TINY + [f"--data_dir={shards}", f"--log_dir={resumed}", "--resume=auto"])
    assert out.returncode == 0, out.stderr
    assert "resumed from" in out.stdout and "at step 4" in out.stdout
    assert train_losses(resumed) == full  # bit-identical in float32
    assert train_losses(resumed, "val") == train_losses(straight, "val")
    assert (
        open(os.path.join(resumed, "log.txt"))
        .read()
        .startswith(first + "# run A: the tiny config\n\n0 ")
    )
    assert read_log(resumed)[0] == record  # the record of the run as it started


def test_a_finished_run_is_neither_overwritten_nor_cut(shards, tmp_path):
    log_dir = str(tmp_path / "log")
    assert (
        train(TINY + [f"--data_dir={shards}", f"--log_dir={log_dir}", "--max_steps=2"]).returncode
        == 0
    )
    before = {n: open(os.path.join(log_dir, n), "rb").read() for n in os.listdir(log_dir)}
    assert sorted(before) == ["log.txt", "model_000002.pt"]
    write_shards(str(tmp_path / "small"), [600, 300])
    for args, message in [
        (
            [],
            f"error: log_dir '{log_dir}' already holds a run (model_000002.pt, log.txt); continue "
            "it with --resume=auto, or start afresh with another --log_dir",
        ),
        (
            ["--resume=auto", "--max_steps=1"],
            f"error: {log_dir}/model_000002.pt is at step 2, past --max_steps=1; "
            f"raise --max_steps to continue the run",
        ),
        (
            ["--resume=auto", f"--data_dir={tmp_path}/small"],
            f"error: {log_dir}/model_000002.pt was trained with 3 train shards of 12100 tokens, "
            "this run has 1 train shards of 300 tokens, which changes the tokens every later "
            "step reads; continue the run with --data_dir holding the run's shards, or change it "
            "on purpose with --allow_changes=shards",
        ),
        (
            [
                "--resume=auto",
                f"--data_dir={tmp_path}/small",
                "--allow_changes=shards",
                "--total_batch_size=128",
            ],
            f"error: {log_dir}/model_000002.pt was trained with total_batch_size=256, this run "
            "has total_batch_size=128, which changes the tokens every later step reads; continue "
            "the run with --total_batch_size=256, or change it on purpose with "
            "--allow_changes=total_batch_size",
        ),
        (
            ["--resume=auto", f"--data_dir={tmp_path}/small", "--allow_changes=shards"],
            "error: the checkpoint's loader stands at token 512 of shard 0 of an epoch, which "
            f"the 1 train shards in {tmp_path}/small do not have; resume with the data_dir the "
            "run was trained on",
        ),
    ]:
        r = train(TINY + [f"--data_dir={shards}", f"--log_dir={log_dir}", "--max_steps=2", *args])
        assert r.returncode == 1 and r.stderr.strip() == message, r.stderr
    assert {n: open(os.path.join(log_dir, n), "rb").read() for n in os.listdir(log_dir)} == before


def test_ddp_matches_one_process_with_twice_the_accumulation(shards, tmp_path):
    single = str(tmp_path / "single")
    assert train(TINY + [f"--data_dir={shards}", f"--log_dir={single}"]).returncode == 0
    ddp = str(tmp_path / "ddp")
    out = run(
        [
            *TORCHRUN,
            "--nproc_per_node=2",
            os.path.join(ROOT, "train_gpt2.py"),
            *TINY,
            f"--data_dir={shards}",
            f"--log_dir={ddp}",
        ]
    )
    assert out.returncode == 0, out.stderr
    assert "world size 2, grad accum steps 1" in out.stdout
    a, b = train_losses(single), train_losses(ddp)
    assert sorted(a) == sorted(b) == list(range(8))
    assert all(abs(a[s] - b[s]) <= 1e-5 for s in a), (a, b)
    va, vb = train_losses(single, "val"), train_losses(ddp, "val")
    assert va.keys() == vb.keys() and all(abs(va[s] - vb[s]) <= 1e-5 for s in va)


def test_default_path_compiles_in_bf16_and_still_evaluates_and_samples(shards, tmp_path):
    """The GPU path (compile on, bf16 autocast) with eval and sampling, on a tiny GPT-2-vocab
    model."""
    log_dir = str(tmp_path / "log")
    args = [
        a
        for a in TINY
        if not a.startswith(("--compile", "--dtype", "--sample_count", "--vocab_size"))
    ]
    out = train(
        args
        + [
            f"--data_dir={shards}",
            f"--log_dir={log_dir}",
            "--max_steps=4",
            "--sample_count=2",
            "--dtype=bfloat16",
        ]
    )  # named: auto is float32 on a CPU without native bf16
    assert out.returncode == 0, out.stderr
    assert "sample 1: \"Hello, I'm a language model," in out.stdout
    losses = train_losses(log_dir)
    assert len(losses) == 4 and losses[3] < losses[0]
    assert set(train_losses(log_dir, "val")) == {0, 4}
    state = torch.load(os.path.join(log_dir, "model_000004.pt"), weights_only=True)["model"]
    assert "lm_head.weight" in state and not any("_orig_mod" in k for k in state)
