"""Kills, preemption signals, NaNs, rank deaths, a full disk and corrupt checkpoints: each must
leave the run resumable, and the resumed run must give the per-step losses of a run that was never
interrupted."""

import hashlib
import os
import resource
import signal
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, TORCHRUN, finished_run, run, train, train_losses, write_shards

FAULTY = os.path.join(ROOT, "tests", "faulty_run.py")
# Checkpoints every 2 steps, of which 2 are kept, so that a run has many writes, renames and
# deletions to kill.
ARGS = TINY + ["--checkpoint_interval=2", "--keep_checkpoints=2", "--peak_flops=1e12"]


def faulty(args, **env):
    return run([sys.executable, FAULTY, *args], env={k: str(v) for k, v in env.items()})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("faults") / "data")
    write_shards(data_dir, [4000, 5000, 3000, 4100])
    return data_dir


@pytest.fixture(scope="module")
def baseline(data, tmp_path_factory):
    """Per-step train losses of an uninterrupted run, and its log_dir."""
    log_dir = finished_run(tmp_path_factory, "baseline", ARGS + [f"--data_dir={data}"])
    losses = train_losses(log_dir)
    assert sorted(losses) == list(range(8))
    return losses, log_dir


def assert_same_losses(log_dir, baseline, tol=0.0):
    got, want = train_losses(log_dir), baseline[0]
    assert sorted(got) == sorted(want)
    assert all(abs(got[s] - want[s]) <= tol for s in want), (got, want)


def test_sigkill_at_five_points_then_resume_matches(data, baseline, tmp_path):
    args = ARGS + [f"--data_dir={data}", f"--log_dir={tmp_path}", "--resume=auto"]
    # a batch, a half-written checkpoint, both sides of a checkpoint's rename and log.txt's rewrite
    # at start-up, each reached by a run that resumes from the checkpoints the kills before it left
    for at in (
        "train-batch@3",
        "checkpoint-half-written@1",
        "checkpoint-rename@1",
        "log-rename@1",
        "checkpoint-renamed@2",
        "checkpoint-deleted@1",
    ):
        r = faulty(args, FAULT_AT=at)
        assert r.returncode == -signal.SIGKILL, (at, r.stderr)
        assert r.stderr.splitlines()[-1] == f"fault: SIGKILL at {at}"
        assert "warning: skipping" not in r.stdout  # no checkpoint was ever broken
    r = train(args)
    assert r.returncode == 0, r.stderr
    assert_same_losses(str(tmp_path), baseline)
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "model_000006.pt", "model_000008.pt"]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_preemption_signal_checkpoints_exits_and_resumes(data, baseline, tmp_path, sig):
    # The signal comes at step 2's first micro-batch (2 a step): step 2 is finished, then a
    # checkpoint off the every-4-steps schedule is written at step 3.
    args = ARGS + [f"--data_dir={data}", f"--log_dir={tmp_path}", "--checkpoint_interval=4"]
    r = faulty(args, FAULT_AT="train-batch@5", FAULT_SIGNAL=sig)
    assert r.returncode == 75, r.stderr
    ckpt = os.path.join(tmp_path, "model_000003.pt")
    assert (
        f"stopped by {sig} at step 3: {ckpt} holds the run; continue it with --resume=auto"
        in r.stdout
    )
    assert sorted(train_losses(str(tmp_path))) == [0, 1, 2]
    assert torch.load(ckpt, weights_only=True)["step"] == 3
    r = train(args + ["--resume=auto"])
    assert r.returncode == 0, r.stderr
    assert f"resumed from {ckpt} at step 3" in r.stdout
    assert_same_losses(str(tmp_path), baseline)


def test_nan_stops_without_touching_the_last_good_checkpoint(data, baseline, tmp_path):
    args = ARGS + [f"--data_dir={data}", f"--log_dir={tmp_path}", "--checkpoint_interval=4"]
    r = faulty(args, FAULT_NAN_STEPS=6)  # the 6th step is step 5, after the checkpoint at step 4
    ckpt = os.path.join(tmp_path, "model_000004.pt")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "error: step 5: loss nan or grad norm nan is not finite; the step was not applied and no "
        "checkpoint was written. Restart from the last good one with a lower learning rate: "
        f"--resume={ckpt} --max_lr=0.0003 --min_lr=3e-05 (or allow skipping with --max_bad_steps)"
    )
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "model_000004.pt"]
    # The checkpoint holds the good step-4 state: resuming from it reproduces the uninterrupted run.
    r = train(args + [f"--resume={ckpt}"])
    assert r.returncode == 0, r.stderr
    assert_same_losses(str(tmp_path), baseline)


def test_max_bad_steps_skips_the_update(data, baseline, tmp_path):
    args = ARGS + [f"--data_dir={data}", f"--log_dir={tmp_path}", "--max_bad_steps=1"]
    r = faulty(args, FAULT_NAN_STEPS=6)
    assert r.returncode == 0, r.stderr
    assert "step     5 | loss nan" in r.stdout and "not finite: step skipped" in r.stdout
    losses = train_losses(str(tmp_path))
    assert np.isnan(losses[5])
    assert all(losses[s] == baseline[0][s] for s in range(5))
    state = torch.load(os.path.join(tmp_path, "model_000008.pt"), weights_only=True)["optimizer"][
        "state"
    ]
    assert {float(s["step"]) for s in state.values()} == {7.0}  # 8 steps, one of them never applied


def test_full_disk_keeps_previous_checkpoint(data, tmp_path):
    args = ARGS + [f"--data_dir={data}", f"--log_dir={tmp_path}", "--checkpoint_interval=4"]
    assert train(args + ["--max_steps=4"]).returncode == 0
    previous = os.path.join(tmp_path, "model_000004.pt")
    digest = hashlib.sha256(open(previous, "rb").read()).hexdigest()

    # any write past 100 kB fails with EFBIG, as on a full disk it would with ENOSPC
    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    r = train([*args, "--resume=auto"], preexec_fn=small_files)
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"error: cannot write checkpoint {tmp_path}/model_000008.pt ([Errno 27] File too large); "
        f"free disk space or fix log_dir, then resume; {previous} is untouched"
    )
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "model_000004.pt"]
    assert hashlib.sha256(open(previous, "rb").read()).hexdigest() == digest


def test_corrupt_newest_checkpoint_is_skipped(data, baseline, tmp_path):
    args = ARGS + [f"--data_dir={data}", f"--log_dir={tmp_path}", "--keep_checkpoints=0"]
    assert train(args).returncode == 0
    newest = os.path.join(tmp_path, "model_000008.pt")
    raw = bytearray(open(newest, "rb").read())
    # one flipped bit inside a tensor, which torch.load alone would not notice
    raw[len(raw) // 2] ^= 1
    open(newest, "wb").write(raw)
    r = train(args + ["--resume=auto"])
    assert r.returncode == 0, r.stderr
    assert f"warning: skipping {newest}: not a readable train_gpt2.py checkpoint" in r.stdout
    assert f"resumed from {os.path.join(tmp_path, 'model_000006.pt')} at step 6" in r.stdout
    assert_same_losses(str(tmp_path), baseline)


def torchrun(args, **env):
    """A 2-process gloo torchrun of faulty_run.py that may restart once. torchrun shares its store
    with the workers, and without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 a restarted group can read
    the previous attempt's addresses (pytorch/pytorch#135712), as docs/training.md says."""
    return run(
        [
            *TORCHRUN,
            "--nproc_per_node=2",
            "--max-restarts=1",
            FAULTY,
            *args,
        ],
        env=dict(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **env),
    )


def test_torchrun_rank_death_restarts_and_matches(data, baseline, tmp_path):
    # Rank 1 reads one train batch a step: its 6th is inside step 5, after the checkpoint at step 4.
    # The restarted group resumes from it.
    r = torchrun(
        ARGS + [f"--data_dir={data}", f"--log_dir={tmp_path}", "--resume=auto"],
        FAULT_AT="train-batch@6",
        FAULT_RANK="1",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fault: SIGKILL at train-batch@6" in r.stderr
    assert f"resumed from {os.path.join(tmp_path, 'model_000004.pt')} at step 4" in r.stdout
    # 2 ranks vs 2 accumulation steps: summation order
    assert_same_losses(str(tmp_path), baseline, tol=1e-5)


def test_torchrun_preemption_of_one_rank_stops_all(data, baseline, tmp_path):
    # SIGTERM reaches rank 1 alone before its step-2 batch: both ranks finish step 2, rank 0 writes
    # the checkpoint of step 3 and both exit 75, which torchrun answers with a restart that resumes
    # from it.
    r = torchrun(
        ARGS + [f"--data_dir={data}", f"--log_dir={tmp_path}", "--resume=auto"],
        FAULT_AT="train-batch@3",
        FAULT_RANK="1",
        FAULT_SIGNAL="SIGTERM",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = os.path.join(tmp_path, "model_000003.pt")
    assert f"stopped by a signal to another rank at step 3: {ckpt} holds the run" in r.stdout
    assert f"resumed from {ckpt} at step 3" in r.stdout
    assert_same_losses(str(tmp_path), baseline, tol=1e-5)
