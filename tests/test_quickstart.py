"""The README's offline quickstart, run exactly as written, and the --preset mechanism behind it."""

import os
import shlex
import sys

import pytest
from conftest import ROOT, hf_gpt2, run, train_losses

from train_gpt2 import SETTING_PRESETS, SETTINGS, UserError, parse_args


def readme_quickstart():
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("## Quickstart (offline, CPU)")[1].split("\n## ")[0]
    [command] = [line.strip() for line in section.splitlines() if line.startswith("    python ")]
    return [shlex.split(part) for part in command.split(" && ")]


def test_readme_quickstart_trains_on_pydoc_offline_and_ends_with_a_sample(tmp_path):
    for argv in readme_quickstart():
        assert argv[0] == "python"
        r = run(
            [sys.executable, os.path.join(ROOT, argv[1]), *argv[2:]],
            cwd=str(tmp_path),
            env={"OMP_NUM_THREADS": str(os.cpu_count()), "HF_DATASETS_CACHE": str(tmp_path / "hf")},
        )
        assert r.returncode == 0, r.stderr[-2000:]
    val = train_losses(str(tmp_path / "log_quickstart"), "val")
    losses = [val[s] for s in sorted(val)]
    assert len(losses) >= 3 and all(b < a for a, b in zip(losses, losses[1:])), losses
    # from uniform over 50K tokens to word statistics
    assert losses[0] > 10 and losses[-1] < 7.5, losses
    lines = r.stdout.splitlines()
    last_eval = max(i for i, line in enumerate(lines) if "val loss" in line)
    samples = [line for line in lines[last_eval:] if line.startswith("sample ")]
    assert len(samples) == 2 and all(
        len(s) > len("sample 0: 'Hello, I'm a language model,'") + 20 for s in samples
    )
    # nothing trains after it
    assert not any(line.startswith("step") for line in lines[last_eval + 1 :])


def test_preset_sets_defaults_that_name_value_arguments_still_override():
    for argv in (
        ["--preset=quickstart", "--max_steps=7"],
        ["--max_steps=7", "--preset=quickstart"],
    ):
        cfg = parse_args(argv)
        assert cfg.max_steps == 7 and cfg.n_layer == 4 and cfg.data_dir == "pydoc_topics"
    assert vars(parse_args([])) == SETTINGS
    xl = parse_args(["--preset=gpt2-xl", "--B=8"])
    assert (xl.n_layer, xl.n_head, xl.n_embd, xl.B, xl.max_lr) == (48, 25, 1600, 8, 6e-4)
    with pytest.raises(UserError, match="--preset=tiny: unknown preset"):
        parse_args(["--preset=tiny"])


def test_presets_name_only_real_settings_with_their_types(tmp_path):
    # for the hub's gpt2, which finetune starts from
    stand_in = hf_gpt2(str(tmp_path / "gpt2"), n_positions=1024)
    for preset in SETTING_PRESETS.values():
        for name, value in preset.items():
            assert type(value) is type(SETTINGS[name]), name
        init = [f"--init_from={tmp_path / 'gpt2'}"] if preset.get("init_from") == "gpt2" else []
        parse_args(
            [f"--preset={name}" for name, p in SETTING_PRESETS.items() if p is preset] + init
        )
    assert stand_in.config.n_positions == 1024
