"""Resume is honest: settings that change which tokens a step reads are refused unless allowed by
name, a new world size or B is accepted as changing nothing, and a new schedule says what it does to
the learning rate."""

import math
import os

import pytest
import torch
from conftest import TINY, train, train_losses, write_shards


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 8-step run's data and log_dir, which the tests copy."""
    root = tmp_path_factory.mktemp("finished")
    write_shards(str(root / "data"), [4000, 5000, 3000, 4100])
    r = train(TINY + [f"--data_dir={root / 'data'}", f"--log_dir={root / 'log'}", "--hella_data="])
    assert r.returncode == 0, r.stderr
    return root


def resume(finished, tmp_path, *args):
    log_dir = tmp_path / "log"
    if not log_dir.exists():
        os.makedirs(log_dir)
        for name in ("log.txt", "model_000008.pt"):
            (log_dir / name).write_bytes((finished / "log" / name).read_bytes())
    return train(
        TINY
        + [
            f"--data_dir={finished / 'data'}",
            f"--log_dir={log_dir}",
            "--hella_data=",
            "--resume=auto",
            *args,
        ]
    )


def cosine(it, max_lr, min_lr, warmup, max_steps):
    ratio = (it - warmup) / (max_steps - warmup)
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


def test_a_longer_schedule_says_how_the_learning_rate_jumps(finished, tmp_path):
    r = resume(finished, tmp_path, "--max_steps=12")
    assert r.returncode == 0, r.stderr
    # the old schedule had reached min_lr at its last step
    old, new = 6e-5, cosine(8, 6e-4, 6e-5, 2, 12)
    assert (
        "note: schedule changed (max_steps 8 -> 12): the learning rate at step 8 goes from "
        f"{old:.4e} to {new:.4e}"
    ) in r.stdout
    assert "step     8 | loss" in r.stdout and f"lr {new:.4e}" in r.stdout
    assert sorted(train_losses(str(tmp_path / "log"))) == list(range(12))


@pytest.mark.parametrize(
    "arg, was, now",
    [
        ("--seed=7", "seed=1337", "seed=7"),
        ("--total_batch_size=512", "total_batch_size=256", "total_batch_size=512"),
    ],
)
def test_a_data_order_change_is_refused_unless_allowed(finished, tmp_path, arg, was, now):
    before = {n: (finished / "log" / n).read_bytes() for n in ("log.txt", "model_000008.pt")}
    r = resume(finished, tmp_path, arg, "--max_steps=10")
    name = arg[2:].split("=")[0]
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"error: {tmp_path}/log/model_000008.pt was trained with {was}, this run has {now}, "
        f"which changes the tokens every later step reads; continue the run with --{was}, "
        f"or change it on purpose with --allow_changes={name}"
    )
    assert {n: (tmp_path / "log" / n).read_bytes() for n in before} == before
    r = resume(finished, tmp_path, arg, "--max_steps=10", f"--allow_changes={name}")
    assert r.returncode == 0, r.stderr
    assert (
        f"note: {was} -> {now}, as --allow_changes={name} lets it: the data order differs from "
        "step 8 on" in r.stdout
    )
    assert sorted(train_losses(str(tmp_path / "log"))) == list(range(10))


def test_world_size_and_b_changes_are_accepted_and_named(finished, tmp_path):
    r = resume(finished, tmp_path, "--B=2", "--max_steps=9", "--warmup_steps=2")
    assert r.returncode == 0, r.stderr
    assert "note: B 4 -> 2: every step still reads the same tokens in the same order" in r.stdout


def test_a_checkpoint_from_before_the_recorded_data_order_resumes_with_a_note(finished, tmp_path):
    os.makedirs(tmp_path / "log")
    ckpt = torch.load(finished / "log" / "model_000008.pt", weights_only=True)
    del ckpt["shards"], ckpt["world"], ckpt["config"]["allow_changes"]
    torch.save(ckpt, tmp_path / "log" / "model_000008.pt")
    r = resume(finished, tmp_path, "--max_steps=9")
    assert r.returncode == 0, r.stderr
    assert (
        f"note: {tmp_path}/log/model_000008.pt predates the recorded data order; from its loader "
        "position on, every step reads the same tokens on any world size and B"
    ) in r.stdout
