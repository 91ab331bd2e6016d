"""HellaSwag in and after training: log lines, DDP counting, torch.compile, and the hellaswag.py
command line."""

import json
import os
import re
import sys

import pytest
from conftest import ROOT, TINY, TORCHRUN, run, train, train_losses, write_hellaswag

N = 51  # odd, so that two ranks get unequal shares
HELLA = ["--vocab_size=50304"]  # GPT-2's tokens must fit the embedding


def hella_run(tmp, shards, *extra, launcher=(), env=None):
    log_dir = os.path.join(tmp, "log")
    data = write_hellaswag(os.path.join(tmp, "hellaswag.jsonl"), N, seed=3)
    args = [
        *TINY,
        *HELLA,
        f"--data_dir={shards}",
        f"--log_dir={log_dir}",
        f"--hella_data={data}",
        *extra,
    ]
    if launcher:
        proc = run([*launcher, os.path.join(ROOT, "train_gpt2.py"), *args], env=env)
    else:
        proc = train(args, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc, log_dir, data


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import write_shards

    tmp = str(tmp_path_factory.mktemp("hella"))
    shards = os.path.join(tmp, "data")
    write_shards(shards, [4000, 5000, 3000, 4100])
    return (shards, *hella_run(tmp, shards))


def test_training_logs_hella_at_each_eval(trained):
    _, proc, log_dir, _ = trained
    hella = train_losses(log_dir, "hella")
    assert sorted(hella) == [0, 4, 8]  # every eval_interval steps and the last
    assert all(
        0 <= v <= 1 and round(v * N) == pytest.approx(v * N, abs=1e-4) for v in hella.values()
    )
    assert proc.stdout.count(f"({N} examples)") == 3


def test_cli_scores_a_checkpoint_as_training_did(trained, tmp_path):
    _, _, log_dir, data = trained
    out = str(tmp_path / "out.json")
    proc = run(
        [
            sys.executable,
            "hellaswag.py",
            f"--model={os.path.join(log_dir, 'model_000008.pt')}",
            f"--hella_data={data}",
            "--device=cpu",
            "--dtype=float32",
            f"--json={out}",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    assert f"HellaSwag: {N} examples" in proc.stdout
    printed = dict(re.findall(r"^(acc\w*) +([0-9.]+) ", proc.stdout, re.M))
    assert set(printed) == {"acc", "acc_norm", "acc_norm_harness"}
    results = json.load(open(out))
    assert results["examples"] == N
    assert results["acc_norm"] == pytest.approx(train_losses(log_dir, "hella")[8], abs=1e-6)
    assert {k: float(v) for k, v in printed.items()} == {
        k: pytest.approx(results[k], abs=1e-4) for k in printed
    }
    split = results["split_type"]
    assert sorted(split) == ["indomain", "zeroshot"]
    assert split["indomain"]["examples"] + split["zeroshot"]["examples"] == N
    assert results["acc"] == pytest.approx(
        sum(s["acc"] * s["examples"] for s in split.values()) / N
    )


def test_cli_rejects_malformed_file(tmp_path, trained):
    _, _, log_dir, _ = trained
    bad = write_hellaswag(str(tmp_path / "bad.jsonl"), 3)
    with open(bad, "a") as f:
        f.write('{"ctx": "x", "endings": ["a", "b", "c", "d"], "split_type": "s"}\n')
    proc = run(
        [
            sys.executable,
            "hellaswag.py",
            f"--model={os.path.join(log_dir, 'model_000008.pt')}",
            f"--hella_data={bad}",
            "--device=cpu",
        ]
    )
    assert (
        proc.returncode == 1
        and proc.stderr.strip() == f"error: {bad}, line 4: field 'label' is missing"
    )


def test_ddp_counts_every_example_once(trained, tmp_path):
    shards, _, log_dir, _ = trained
    launcher = [*TORCHRUN, "--nproc_per_node=2"]
    proc, ddp_log_dir, _ = hella_run(str(tmp_path), shards, "--max_steps=1", launcher=launcher)
    # all-reduced: neither half counted twice nor dropped
    assert proc.stdout.count(f"({N} examples)") == 2
    # same model at step 0
    assert train_losses(ddp_log_dir, "hella")[0] == train_losses(log_dir, "hella")[0]


def test_missing_file_warns_once_and_trains_on(shards, tmp_path):
    missing = str(tmp_path / "nowhere.jsonl")
    proc = train(
        [
            *TINY,
            *HELLA,
            f"--data_dir={shards}",
            f"--log_dir={tmp_path / 'log'}",
            f"--hella_data={missing}",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(f"warning: no HellaSwag file at {missing}") == 1
    assert train_losses(str(tmp_path / "log"), "hella") == {}
    assert os.path.exists(tmp_path / "log" / "model_000008.pt")


def test_compiled_training_scores_hellaswag_without_recompiling(shards, tmp_path):
    proc, log_dir, _ = hella_run(
        str(tmp_path),
        shards,
        "--compile=True",
        "--max_steps=2",
        "--eval_interval=1",
        env={"TORCH_LOGS": "recompiles"},
    )
    assert sorted(train_losses(log_dir, "hella")) == [0, 1, 2]
    # The first training step's grad mode (HellaSwag compiles hidden_states, a function of its own,
    # once); no eval after the first adds one.
    assert (proc.stdout + proc.stderr).count("Recompiling function") == 1
