"""A checkpoint is data, never code: every entry point loads .pt files with weights_only, so a file
whose unpickling would run a command is refused in one line and the command never runs; checkpoints
written before numpy's RNG state became a list still load, and resume bit-identically."""

import os
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, run, train, train_losses, write_hellaswag, write_shards


class Payload:
    """What an attacker pickles: unpickling it calls os.system, which appends a line to the marker
    file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo ran >> {self.marker}",)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    root = tmp_path_factory.mktemp("crafted")
    marker = root / "marker"
    path = root / "run" / "model_000004.pt"
    os.makedirs(path.parent)
    torch.save({"model": Payload(marker), "config": {}, "step": 4}, path)
    write_shards(str(root / "data"), [4000, 5000])
    write_hellaswag(root / "hellaswag.jsonl", 4)
    return root, path, marker


def entry_points(root, path):
    """Each way a user hands this project a .pt file, as argv after the interpreter."""
    data, out = [f"--data_dir={root / 'data'}"], root / "out"
    return {
        "serve.py": [f"{ROOT}/serve.py", f"--model={path}", "--port=0", "--device=cpu"],
        "sample.py": [f"{ROOT}/sample.py", f"--model={path}", "--device=cpu"],
        "export_hf.py": [f"{ROOT}/export_hf.py", f"--model={path}", f"--out={out}"],
        "hellaswag.py": [
            f"{ROOT}/hellaswag.py",
            f"--model={path}",
            "--device=cpu",
            f"--hella_data={root / 'hellaswag.jsonl'}",
        ],
        "--init_from": [
            f"{ROOT}/train_gpt2.py",
            *TINY,
            *data,
            f"--init_from={path}",
            f"--log_dir={root / 'a'}",
        ],
        "--resume": [
            f"{ROOT}/train_gpt2.py",
            *TINY,
            *data,
            f"--resume={path}",
            f"--log_dir={root / 'b'}",
        ],
        "--resume=auto": [
            f"{ROOT}/train_gpt2.py",
            *TINY,
            *data,
            "--resume=auto",
            f"--log_dir={path.parent}",
        ],
    }


@pytest.mark.parametrize(
    "entry",
    [
        "serve.py",
        "sample.py",
        "export_hf.py",
        "hellaswag.py",
        "--init_from",
        "--resume",
        "--resume=auto",
    ],
)
def test_a_pickled_command_is_refused_by_every_entry_point_and_never_runs(crafted, entry):
    root, path, marker = crafted
    r = run([sys.executable, *entry_points(root, path)[entry]], timeout=120)
    assert r.returncode != 0, r.stdout[-2000:]
    assert not marker.exists(), "the file's code ran"
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-2000:]
    # the refusal names what the file wanted; for --resume=auto it is the warning the error points
    # to
    refusal = errors[0] if entry != "--resume=auto" else r.stdout
    assert f"{path}: refused: it holds posix.system" in refusal, (r.stdout + r.stderr)[-2000:]
    assert not (root / "out").exists()


def test_plot_skips_the_file_without_running_it(crafted, tmp_path):
    root, path, marker = crafted
    shutil.copy(path, tmp_path)
    # no record: plot reads a checkpoint
    (tmp_path / "log.txt").write_text("0 train 10.5\n0 val 10.6\n1 train 9.8\n")
    r = run(
        [sys.executable, f"{ROOT}/plot.py", str(tmp_path), f"--out={tmp_path / 'curves.png'}"],
        timeout=120,
    )
    assert not marker.exists(), "the file's code ran"
    assert "skipping" in r.stderr and "model_000004.pt" in r.stderr, r.stderr


def test_no_unsafe_load_is_left_in_the_project():
    for top, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py") and ".git" not in top:
                text = open(os.path.join(top, name)).read()
                assert "weights_only=" + "False" not in text, os.path.join(top, name)
                assert "pickle." + "load(" not in text, os.path.join(top, name)


def as_written_before(path):
    """Rewrites a checkpoint as train_gpt2.py wrote it before checkpoints held only safe types:
    numpy's RNG state as np.random.get_state() gives it, with its key as an ndarray."""
    ckpt = torch.load(path, weights_only=True)
    name, keys, *rest = ckpt["rng"]["numpy"]
    ckpt["rng"]["numpy"] = (name, np.array(keys, dtype=np.uint32), *rest)
    torch.save(ckpt, path)
    # what made it unsafe: it no longer loads without the allow-list
    with pytest.raises(Exception, match="numpy"):
        torch.load(path, weights_only=True)


def test_a_checkpoint_from_before_resumes_bit_identically(tmp_path):
    write_shards(str(tmp_path / "data"), [4000, 5000, 3000])
    # dropout: the RNG state matters
    args = TINY + [f"--data_dir={tmp_path / 'data'}", "--dropout=0.1"]
    straight = tmp_path / "straight"
    assert train(args + [f"--log_dir={straight}"]).returncode == 0
    resumed = tmp_path / "resumed"
    os.makedirs(resumed)
    shutil.copy(straight / "model_000004.pt", resumed)
    as_written_before(resumed / "model_000004.pt")
    r = train(args + [f"--log_dir={resumed}", "--resume=auto"])
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "at step 4" in r.stdout
    full = train_losses(str(straight))
    # bit-identical in float32
    assert train_losses(str(resumed)) == {s: v for s, v in full.items() if s >= 4}
