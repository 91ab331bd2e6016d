"""--tracker: TensorBoard and W&B (offline) hold log.txt's values for every step after a SIGKILL and
a resume, each read back with the tracker's own reader; a tracker that is not installed is refused
before the run starts; a run without one imports neither package."""

import glob
import json
import os
import signal
import sys

import pytest
from conftest import ROOT, TINY, run, train, train_losses, write_shards

import trackers
import train_gpt2 as tg

FAULTY = os.path.join(ROOT, "tests", "faulty_run.py")
# 100 steps of 2 micro-batches: enough W&B records (~1 KB a step) to fill the 32 KiB blocks its
# service writes whole, so that the killed run's W&B file holds steps past the checkpoint it resumes
# from (step 50)
ARGS = TINY + [
    "--max_steps=100",
    "--eval_interval=20",
    "--checkpoint_interval=50",
    "--peak_flops=1e12",
]
KILL_AT = "train-batch@180"  # step 89's second micro-batch: steps 0-88 were logged
# W&B without an account or network, and none of its files outside the test's directory
WANDB_ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """The log_dir of a run with both trackers, SIGKILLed at step 89 and resumed from its step-50
    checkpoint, the resumed run's stdout and the environment both ran in."""
    root = tmp_path_factory.mktemp("trackers")
    write_shards(str(root / "data"), [4000, 5000, 3000, 4100])
    env = {
        **WANDB_ENV,
        **{
            f"WANDB_{d}": str(root / d.lower())
            for d in ("DIR", "CACHE_DIR", "CONFIG_DIR", "DATA_DIR")
        },
    }
    args = ARGS + [
        f"--data_dir={root / 'data'}",
        f"--log_dir={root / 'log'}",
        "--resume=auto",
        "--tracker=tensorboard,wandb",
    ]
    r = run([sys.executable, FAULTY, *args], env={**env, "FAULT_AT": KILL_AT}, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    r = train(args, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "at step 50" in r.stdout
    log_dir = str(root / "log")
    assert sorted(train_losses(log_dir)) == list(range(100))
    return log_dir, r.stdout, env


def assert_log_txt_values(log_dir, kind, values):
    """values ({step: value}) are log.txt's kind lines, every one, to the 6 decimals log.txt
    keeps."""
    want = train_losses(log_dir, kind)
    assert sorted(values) == sorted(want)
    assert all(abs(values[s] - want[s]) <= 5e-7 for s in want), (values, want)


def test_tensorboard_holds_each_step_once_with_the_resumed_runs_value(killed_and_resumed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir, _, _ = killed_and_resumed
    files = sorted(glob.glob(f"{log_dir}/tensorboard/events.out.tfevents.*"))
    assert len(files) == 2  # one per start of the run
    killed = EventAccumulator(files[0], size_guidance={"scalars": 0})
    # the killed run's file alone: it logged past step 50, which the resumed run replaces
    killed.Reload()
    assert [e.step for e in killed.Scalars("train/loss")] == list(range(89))
    board = EventAccumulator(f"{log_dir}/tensorboard", size_guidance={"scalars": 0, "tensors": 0})
    board.Reload()
    for name in ("train/loss", "val/loss"):
        steps = [e.step for e in board.Scalars(name)]
        assert len(steps) == len(set(steps)), name  # no step twice
        assert_log_txt_values(
            log_dir, name.split("/")[0], {e.step: e.value for e in board.Scalars(name)}
        )
    for name in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu"):
        assert [e.step for e in board.Scalars(name)] == list(range(100)), name
    records = [
        json.loads(t.tensor_proto.string_val[0].decode().strip("`\n"))
        for t in board.Tensors("run_record/text_summary")
    ]
    # each start's record
    assert [r["settings"]["tracker"] for r in records] == ["tensorboard,wandb"] * 2


def wandb_records(path, env):
    """The records of a W&B run file, read by W&B's own offline reader."""
    r = run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", path], env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_wandb_offline_continues_the_same_run_and_holds_each_step_once(killed_and_resumed):
    log_dir, stdout, env = killed_and_resumed
    with open(f"{log_dir}/wandb_run_id") as f:
        run_id = f.read().strip()
    files = trackers.wandb_files(log_dir, run_id)
    assert len(files) == 2 and all("/offline-run-" in p for p in files)  # one per start, offline
    assert sorted(glob.glob(f"{log_dir}/wandb/*run-*/*.wandb")) == files  # and no other W&B run
    rows = []
    for path in files:
        records = wandb_records(path, env)
        assert [r["run"]["run_id"] for r in records if r["type"] == "run"] == [run_id]
        history = [r["history"]["item"] for r in records if r["type"] == "history"]
        # what the resume reads agrees with W&B's reader
        assert history == trackers.wandb_history(path)
        rows.append(history)
    killed, resumed = ([row["_step"] for row in h] for h in rows)
    # W&B's service writes whole 32 KiB blocks, so the kill lost the killed run's last steps; what
    # it kept reaches past the checkpoint (step 50), and the resumed run logs from the step after
    # it: no step in both files
    assert killed == list(range(len(killed))) and 50 < len(killed) < 89
    assert resumed == list(range(len(killed), 101))
    assert (
        f"W&B run {run_id} already holds steps 50-{len(killed) - 1}: their values are the killed "
        "run's" in stdout
    )
    for name in ("train/loss", "val/loss"):
        values = {row["_step"]: row[name] for row in rows[0] + rows[1] if name in row}
        assert_log_txt_values(log_dir, name.split("/")[0], values)


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--tracker=mlflow", "--tracker=mlflow: expected tensorboard, wandb or tensorboard,wandb"),
        (
            "--tracker=wandb,wandb",
            "--tracker=wandb,wandb: expected tensorboard, wandb or tensorboard,wandb",
        ),
        (
            "--tracker=wandb",
            "--tracker=wandb needs the wandb package, which is not installed: pip install wandb",
        ),
        (
            "--tracker=tensorboard,wandb",
            "--tracker=wandb needs the wandb package, which is not installed: pip install wandb",
        ),
        ("--tracker=tensorboard", None),
    ],
)
def test_an_unknown_or_missing_tracker_is_refused_in_one_line(monkeypatch, arg, message):
    real = tg.importlib.util.find_spec
    monkeypatch.setattr(
        tg.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    if message is None:
        assert tg.parse_args([arg]).tracker == "tensorboard"
        return
    with pytest.raises(tg.UserError) as e:
        tg.parse_args([arg])
    assert str(e.value) == message


def test_a_run_without_a_tracker_imports_neither(tmp_path):
    write_shards(str(tmp_path / "data"), [4000, 5000])
    args = TINY + [
        "--max_steps=1",
        f"--data_dir={tmp_path / 'data'}",
        f"--log_dir={tmp_path / 'log'}",
    ]
    code = (
        f"import sys, train_gpt2; train_gpt2.main({args!r}); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'wandb', "
        "'trackers') or m == 'torch.utils.tensorboard'))"
    )
    r = run([sys.executable, "-c", code], timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "[]"
