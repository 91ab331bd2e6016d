"""One run per log_dir: a second launch into a log_dir in use exits non-zero with one line naming
the holder, and touches nothing; temp files are removed only when their writer is gone."""

import fcntl
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import ROOT, TINY, TORCHRUN, finished_run, read_log, run, spawn, write_shards

import train_gpt2 as tg

# long enough (a few seconds of steps) that a launch 2 s later finds the first one still running
ARGS = TINY + [
    "--max_steps=400",
    "--eval_interval=200",
    "--checkpoint_interval=200",
    "--resume=auto",
    "--hella_data=",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("lock") / "data")
    write_shards(data_dir, [4000, 5000, 3000])
    return data_dir


@pytest.fixture(scope="module")
def baseline(data, tmp_path_factory):
    return finished_run(tmp_path_factory, "alone", ARGS + [f"--data_dir={data}"])


def launch(data, log_dir):
    return spawn(
        [
            sys.executable,
            os.path.join(ROOT, "train_gpt2.py"),
            *ARGS,
            f"--data_dir={data}",
            f"--log_dir={log_dir}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("apart", [0, 2])
def test_two_launches_into_one_log_dir_run_once(data, baseline, tmp_path, apart):
    first = launch(data, tmp_path)
    time.sleep(apart)
    second = launch(data, tmp_path)
    outcomes = {p.pid: (p.wait(timeout=300), *p.communicate()) for p in (first, second)}
    ran = [pid for pid, (rc, _, _) in outcomes.items() if rc == 0]
    assert len(ran) == 1, outcomes
    if apart:
        assert ran == [first.pid]
    loser = second.pid if ran == [first.pid] else first.pid
    rc, out, err = outcomes[loser]
    assert rc == 1 and err.count("\n") == 1, err
    assert err.startswith(
        f"error: log_dir '{tmp_path}' is in use by pid {ran[0]} on host {socket.gethostname()} "
        f"(since "
    ), err
    assert err.rstrip().endswith(
        "wait for that run to end or stop it, then continue it with --resume=auto"
    )
    assert "step " not in out
    # the run that ran is the uninterrupted one, byte for byte in its log and tensor for tensor in
    # its checkpoints
    assert (
        sorted(os.listdir(tmp_path))
        == sorted(os.listdir(baseline))
        == ["log.txt", "model_000200.pt", "model_000400.pt"]
    )
    (record, steps), (baseline_record, baseline_steps) = read_log(tmp_path), read_log(baseline)
    assert steps == baseline_steps
    assert (
        record["settings"].pop("log_dir") == str(tmp_path)
        and baseline_record["settings"].pop("log_dir") == baseline
    )
    assert record == baseline_record
    for name in ("model_000200.pt", "model_000400.pt"):
        a, b = (torch.load(os.path.join(d, name), weights_only=True) for d in (tmp_path, baseline))
        assert a["step"] == b["step"] and a.keys() == b.keys()
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_under_torchrun_rank_0_says_once_who_holds_the_log_dir(data, tmp_path):
    with open(tmp_path / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("pid 4242 on host elsewhere (since 2026-01-01 00:00:00)")
        f.flush()
        before = sorted(os.listdir(tmp_path))
        r = run(
            [
                *TORCHRUN,
                "--nproc_per_node=2",
                os.path.join(ROOT, "train_gpt2.py"),
                *ARGS,
                f"--data_dir={data}",
                f"--log_dir={tmp_path}",
            ]
        )
        assert r.returncode != 0
        message = (
            f"error: log_dir '{tmp_path}' is in use by pid 4242 on host elsewhere (since "
            "2026-01-01 00:00:00); wait for that run to end or stop it, then continue it with "
            "--resume=auto"
        )
        assert r.stderr.count(message) == 1, r.stderr[-3000:]
        assert sorted(os.listdir(tmp_path)) == before and "step " not in r.stdout


def test_only_temp_files_whose_writer_is_gone_are_removed(tmp_path):
    host = socket.gethostname()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    names = {
        f"model_000004.pt.{host}.{dead.stdout.strip()}.tmp": False,  # this host, process gone
        f"log.txt.{host}.{dead.stdout.strip()}.tmp": False,
        "model_000002.pt.tmp": False,  # written before temp files were named for their writer
        f"model_000006.pt.{host}.{os.getpid()}.tmp": True,  # a live writer's
        # another host's: nothing to tell it by
        f"model_000006.pt.otherhost.{os.getpid()}.tmp": True,
        "notes.tmp": True,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    tg.remove_stale_temp_files(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, kept in names.items() if kept)


def test_a_launch_that_finds_the_lock_just_taken_waits_for_its_holder_to_name_itself(tmp_path):
    """Two launches at once: the loser may read the lock file in the moment between the winner's
    flock and its write; it must still name the winner, not 'another process'."""
    path = str(tmp_path / tg.LOCK_NAME)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        namer = threading.Timer(
            0.3, lambda: (f.write("pid 4242 on host elsewhere (since now)"), f.flush())
        )
        namer.start()
        with pytest.raises(
            tg.UserError, match=r"in use by pid 4242 on host elsewhere \(since now\); wait"
        ):
            tg.take_lock(path)
        namer.join()
