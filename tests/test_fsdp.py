"""--fsdp=True (FSDP2 over gloo ranks) and --recompute=True train the model one process trains: the
same per-step losses, val losses, HellaSwag and samples; and their checkpoints resume with or
without FSDP."""

import os
import re
import shutil
import sys

import pytest
import torch
from conftest import (
    ROOT,
    TINY,
    TORCHRUN,
    finished_run,
    run,
    train,
    train_losses,
    write_hellaswag,
    write_shards,
)

# GPT-2's vocabulary, for samples and HellaSwag; 2 micro-steps a step at 2 ranks; 5 val rows of 32,
# which 2 ranks of B=2 cannot share evenly, so one rank runs a forward with no rows of its own.
ARGS = TINY + [
    "--B=2",
    "--vocab_size=50304",
    "--eval_tokens=160",
    "--sample_count=2",
    "--max_new_tokens=4",
]


def torchrun(args, nproc=2):
    return run(
        [
            *TORCHRUN,
            f"--nproc_per_node={nproc}",
            os.path.join(ROOT, "train_gpt2.py"),
            *args,
        ]
    )


def assert_close(a, b, tol):
    assert sorted(a) == sorted(b) and all(abs(a[s] - b[s]) <= tol for s in a), (a, b)


def assert_same_run(log_dir, reference, tol=1e-5, kinds=("train", "val", "hella"), since=0):
    for kind in kinds:
        expected = {s: v for s, v in train_losses(reference, kind).items() if s >= since}
        assert_close(train_losses(log_dir, kind), expected, tol)


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_data")
    write_shards(str(root / "data"), [1500, 1000, 1100, 900, 1300, 1000])
    write_hellaswag(str(root / "hella.jsonl"), 7)  # 4 examples on rank 0, 3 on rank 1
    return ARGS + [f"--data_dir={root / 'data'}", f"--hella_data={root / 'hella.jsonl'}"]


@pytest.fixture(scope="module")
def single(args, tmp_path_factory):
    log_dir = str(tmp_path_factory.mktemp("single"))
    r = train(args + [f"--log_dir={log_dir}"])
    assert r.returncode == 0, r.stderr
    return log_dir, r.stdout


@pytest.fixture(scope="module")
def sharded(args, tmp_path_factory):
    log_dir = str(tmp_path_factory.mktemp("sharded"))
    r = torchrun(args + ["--fsdp=True", f"--log_dir={log_dir}"])
    assert r.returncode == 0, r.stderr[-3000:]
    return log_dir, r.stdout


def samples(stdout):
    return [line for line in stdout.splitlines() if line.startswith("sample ")]


def test_two_sharded_ranks_give_the_one_process_run(single, sharded):
    assert "world size 2, grad accum steps 2" in sharded[1]
    assert "gathered weights" in sharded[1]  # the estimate counts what FSDP gathers
    assert len(train_losses(single[0])) == 8 and len(train_losses(single[0], "hella")) == 3
    assert_same_run(sharded[0], single[0])
    assert len(samples(single[1])) == 4 and samples(sharded[1]) == samples(single[1])


def test_a_sharded_checkpoint_is_whole_and_resumes_on_one_process(args, single, sharded, tmp_path):
    ours = torch.load(os.path.join(sharded[0], "model_000004.pt"), weights_only=True)
    theirs = torch.load(os.path.join(single[0], "model_000004.pt"), weights_only=True)
    assert ours["model"].keys() == theirs["model"].keys()
    for k, v in theirs["model"].items():
        torch.testing.assert_close(ours["model"][k], v, atol=1e-5, rtol=0)
    assert ours["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]
    for i, state in theirs["optimizer"]["state"].items():
        for k, v in state.items():
            torch.testing.assert_close(ours["optimizer"]["state"][i][k], v, atol=1e-5, rtol=1e-4)
    shutil.copy(os.path.join(sharded[0], "model_000004.pt"), tmp_path)
    r = train(args + [f"--log_dir={tmp_path}", "--resume=auto"])
    assert r.returncode == 0, r.stderr
    assert f"resumed from {tmp_path}/model_000004.pt at step 4" in r.stdout
    # steps 4-7; val and HellaSwag at 4 and 8
    assert_same_run(str(tmp_path), sharded[0], tol=1e-6, since=4)
    r = run(
        [
            sys.executable,
            os.path.join(ROOT, "sample.py"),
            f"--model={sharded[0]}",
            "--max_new_tokens=5",
            "--num_samples=1",
        ]
    )
    assert r.returncode == 0 and r.stdout.startswith("Hello, I'm a language model,"), r.stderr


def test_a_ddp_checkpoint_resumes_sharded(args, single, tmp_path):
    ddp = tmp_path / "ddp"
    r = torchrun(args + [f"--log_dir={ddp}", "--max_steps=8"])
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(ddp / "model_000004.pt", resumed)
    r = torchrun(args + ["--fsdp=True", f"--log_dir={resumed}", "--resume=auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    assert_same_run(str(resumed), single[0], since=4)


LEAN = """import sys
sys.path.insert(0, {root!r})
import dataclasses
import torch
import train_gpt2 as tg
cfg, world = tg.parse_args(sys.argv[1:]), 2
with torch.device("meta"):
    n = tg.GPT(tg.model_config(dataclasses.asdict(cfg))).num_params()
lean, whole = (sum(tg.estimate_memory(cfg, n, world, lean).values()) for lean in (True, False))
tg.device_memory = lambda device: (lean + whole) / 2 / 0.9  # room for the lean step only
step = tg.train_step


def lean_step(run, lr):
    print("lean step", run.reshard_each_micro_step, flush=True)
    return step(run, lr)


tg.train_step = lean_step
tg.main(sys.argv[1:])  # under torchrun, main ends the process
"""


def test_a_rank_short_of_memory_reduces_every_micro_step_to_the_same_losses(args, single, tmp_path):
    script = tmp_path / "lean.py"
    script.write_text(LEAN.format(root=ROOT))
    r = run(
        [
            *TORCHRUN,
            "--nproc_per_node=2",
            str(script),
            *args,
            "--fsdp=True",
            f"--log_dir={tmp_path / 'log'}",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # two ranks' prints may interleave
    assert set(re.findall(r"lean step (True|False)", r.stdout)) == {"True"}
    assert_same_run(str(tmp_path / "log"), single[0])


def test_recompute_gives_the_same_losses(args, tmp_path_factory):
    with_dropout = args + ["--dropout=0.1", "--max_steps=4", "--sample_count=0", "--hella_data="]
    plain = finished_run(tmp_path_factory, "plain", with_dropout)
    recomputed = finished_run(tmp_path_factory, "recompute", with_dropout + ["--recompute=True"])
    assert_same_run(recomputed, plain, tol=1e-6, kinds=("train", "val"))


def test_settings_fsdp_cannot_run_with_are_refused_in_one_line(args, tmp_path):
    for extra, message in (
        (["--dtype=float16"], "error: --fsdp=True has no float16 gradient scaler here"),
        (["--optimizer=muon"], "error: --optimizer=muon does not work with --fsdp=True"),
    ):
        r = train(args + ["--fsdp=True", f"--log_dir={tmp_path}", *extra])
        assert r.returncode == 1 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, (
            r.stderr
        )
        assert not os.path.exists(tmp_path / "log.txt")


def test_one_process_says_there_is_nothing_to_shard(args, tmp_path):
    r = train(
        args
        + [
            "--fsdp=True",
            f"--log_dir={tmp_path}",
            "--max_steps=1",
            "--hella_data=",
            "--sample_count=0",
        ]
    )
    assert r.returncode == 0, r.stderr
    assert (
        "note: --fsdp=True shards over torchrun's ranks; this one process holds everything"
        in r.stdout
    )
