"""--lr_schedule=wsd: warmup, max_lr held, then a linear decay to min_lr over the last decay_frac of
the steps; a run extended while it holds max_lr keeps its learning rate, and resume says whether the
learning rate jumps."""

import os
import re
import shutil

import pytest
from conftest import TINY, train, write_shards

import train_gpt2 as tg

# 8 steps: warmup 0-1, max_lr 2-6, a decay from step 6 that reaches min_lr at 8 (the last quarter);
# checkpoints at 4 (holding max_lr) and 8.
WSD = TINY + ["--lr_schedule=wsd", "--decay_frac=0.25", "--optimizer=muon", "--muon_lr=1.2e-3"]


def expected_lr(it, warmup, max_steps, decay_frac, max_lr, min_lr):
    # a decay never overlaps the warmup
    start = max(warmup, max_steps - round(decay_frac * max_steps))
    if it < warmup:
        return max_lr * (it + 1) / warmup
    if it < start:
        return max_lr
    if it < max_steps:
        return max_lr - (max_lr - min_lr) * (it - start) / (max_steps - start)
    return min_lr


@pytest.mark.parametrize("decay_frac", [0.2, 0.35, 1.0])
def test_wsd_gives_the_expected_lr_at_each_stage(decay_frac):
    cfg = tg.parse_args(
        [
            "--lr_schedule=wsd",
            "--max_lr=1e-3",
            "--min_lr=1e-4",
            "--warmup_steps=10",
            "--max_steps=100",
            f"--decay_frac={decay_frac}",
        ]
    )
    for it in range(110):
        assert tg.get_lr(it, cfg) == pytest.approx(
            expected_lr(it, 10, 100, decay_frac, 1e-3, 1e-4), rel=1e-12
        ), it
    assert tg.get_lr(50, cfg) == (
        1e-3 if decay_frac < 0.5 else pytest.approx(1e-3 - 9e-4 * 40 / 90)
    )


def test_decay_frac_above_one_is_refused():
    with pytest.raises(tg.UserError, match=r"^--decay_frac=1\.5: must be at most 1"):
        tg.parse_args(["--decay_frac=1.5"])


def printed_lrs(stdout):
    return {
        int(m[1]): float(m[2]) for m in re.finditer(r"step +(\d+) \| loss \S+ \| lr (\S+)", stdout)
    }


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """An 8-step wsd run: its data, log_dir and output."""
    root = tmp_path_factory.mktemp("wsd")
    write_shards(str(root / "data"), [4000, 5000, 3000, 4100])
    r = train(WSD + [f"--data_dir={root / 'data'}", f"--log_dir={root / 'log'}"])
    assert r.returncode == 0, r.stderr
    return root, r.stdout


def resume_from(first, step, tmp_path, *args):
    root, _ = first
    for name in ("log.txt", f"model_{step:06d}.pt"):
        shutil.copy(root / "log" / name, tmp_path / name)
    r = train(
        WSD + [f"--data_dir={root / 'data'}", f"--log_dir={tmp_path}", "--resume=auto", *args]
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_extending_a_wsd_run_while_it_holds_max_lr_keeps_the_lr(first, tmp_path):
    before = printed_lrs(first[1])
    assert before == {
        i: pytest.approx(expected_lr(i, 2, 8, 0.25, 6e-4, 6e-5), rel=1e-4) for i in range(8)
    }
    stdout = resume_from(first, 4, tmp_path, "--max_steps=12")
    assert (
        "note: schedule changed (max_steps 8 -> 12): the learning rate at step 4 stays at "
        "6.0000e-04 (Muon 1.2000e-03)"
    ) in stdout
    after = printed_lrs(stdout)
    assert after == {
        i: pytest.approx(expected_lr(i, 2, 12, 0.25, 6e-4, 6e-5), rel=1e-4) for i in range(4, 12)
    }
    # the decay starts later: at 9, not 6
    assert before[3] == after[4] == after[9] == 6e-4 > after[10]
    assert os.path.exists(tmp_path / "model_000012.pt")


def test_extending_a_finished_wsd_run_says_the_lr_jumps(first, tmp_path):
    stdout = resume_from(first, 8, tmp_path, "--max_steps=12")
    assert (
        "note: schedule changed (max_steps 8 -> 12): the learning rate at step 8 goes from "
        "6.0000e-05 (Muon 1.2000e-04) to 6.0000e-04 (Muon 1.2000e-03)"
    ) in stdout
