"""The README's "Fine-tune GPT-2 on your own text", every command as written, with a small random
GPT-2 saved by transformers standing in for the hub's gpt2 and settings appended that shrink the run
to seconds."""

import os
import shlex
import sys

import numpy as np
from conftest import ROOT, WORDS, hf_gpt2, run, train_losses

# added to each script's README arguments where the README gives no value: the stand-in, and a run
# of seconds
SHRINK = {
    "train_gpt2.py": [
        "--T=32",
        "--B=4",
        "--total_batch_size=128",
        "--max_steps=6",
        "--eval_interval=3",
        "--checkpoint_interval=6",
        "--eval_tokens=256",
        "--compile=False",
        "--dtype=float32",
        "--device=cpu",
        "--sample_count=1",
        "--max_new_tokens=4",
    ],
    "sample.py": ["--max_new_tokens=8", "--device=cpu", "--dtype=float32"],
}


def readme_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("## Fine-tune GPT-2 on your own text")[1].split("\n## ")[0]
    return [shlex.split(line) for line in section.splitlines() if line.startswith("    python ")]


def test_readme_finetune_commands_run(tmp_path):
    hf_gpt2(str(tmp_path / "gpt2"), n_positions=64)
    rng = np.random.default_rng(0)
    (tmp_path / "input.txt").write_text(
        "\n".join(" ".join(rng.choice(WORDS, 12)) + "." for _ in range(400))
    )
    commands = readme_commands()
    assert [argv[1] for argv in commands] == [
        "prepare_fineweb.py",
        "train_gpt2.py",
        "train_gpt2.py",
        "sample.py",
        "export_hf.py",
    ]
    for argv in commands:
        assert argv[0] == "python"
        extra = SHRINK.get(argv[1], [])
        if argv[1] == "train_gpt2.py":
            extra = [f"--init_from={tmp_path / 'gpt2'}", *extra]
        extra = [a for a in extra if a.split("=")[0] not in {b.split("=")[0] for b in argv}]
        r = run([sys.executable, os.path.join(ROOT, argv[1]), *argv[2:], *extra], cwd=str(tmp_path))
        assert r.returncode == 0, (argv, r.stderr[-2000:])
    baseline = train_losses(str(tmp_path / "log_gpt2_on_my_text"), "val")
    assert list(baseline) == [0] and not any(
        n.endswith(".pt") for n in os.listdir(tmp_path / "log_gpt2_on_my_text")
    )
    tuned = train_losses(str(tmp_path / "log_finetune"), "val")
    assert tuned[0] == baseline[0] and tuned[6] < tuned[0]
    assert sorted(os.listdir(tmp_path / "my_gpt2")) == [
        "config.json",
        "merges.txt",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
