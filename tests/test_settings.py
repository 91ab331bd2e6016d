"""--name=value overrides and --help, the device-dependent choices, and the schedule."""

import math
import re
import sys

import pytest
import torch
from conftest import ROOT, run

import train_gpt2 as tg


def test_overrides_are_typed():
    cfg = tg.parse_args(
        ["--B=8", "--max_lr=1e-3", "--compile=false", "--data_dir=x", "--resume=auto"]
    )
    assert cfg.B == 8 and cfg.max_lr == 1e-3 and cfg.compile is False
    assert cfg.data_dir == "x" and cfg.resume == "auto"
    assert tg.dataclasses.asdict(tg.parse_args([])) == tg.SETTINGS
    assert tg.parse_args(["--compile=1"]).compile is True


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--compile=maybe", "--compile=maybe: expected true or false (default True)"),
        ("--max_lr=fast", "--max_lr=fast: expected a number (default 0.0006)"),
        ("--dtype=fp8", "--dtype=fp8: expected one of auto, bfloat16, float16, float32"),
        ("--B=0", "--B=0: must be positive"),
        ("--grad_clip=-1", "--grad_clip=-1.0: must be positive"),
        ("--eval_interval=0", "--eval_interval=0: must be positive"),
        ("--keep_checkpoints=-1", "--keep_checkpoints=-1: must be zero or more"),
        ("--seed=-1", "--seed=-1: must be zero or more"),
        (
            "--seed=18446744073709551616",
            "--seed=18446744073709551616: must be below 2**64 (a seed is 64 bits)",
        ),
        (
            "--n_head=5",
            "n_embd=768 is not a multiple of n_head=5, so heads would "
            "have unequal widths; change --n_embd or --n_head",
        ),
    ],
)
def test_bad_values_say_what_is_expected(arg, message):
    with pytest.raises(tg.UserError) as err:
        tg.parse_args([arg])
    assert str(err.value) == message


@pytest.mark.parametrize("arg", ["--nope=1", "B=8", "--B", "-B=8"])
def test_unknown_or_malformed_names_list_the_valid_ones(arg):
    with pytest.raises(
        tg.UserError, match="use --name=value with a name from: data_dir, log_dir, total_batch_size"
    ):
        tg.parse_args([arg])


@pytest.mark.parametrize(
    "old, new", [("val_tokens", "eval_tokens"), ("sample_tokens", "max_new_tokens")]
)
def test_a_renamed_setting_is_refused_naming_its_new_name(old, new):
    with pytest.raises(tg.UserError) as err:
        tg.parse_args([f"--{old}=64"])
    assert str(err.value).startswith(f"--{old} is now --{new}: ") and "\n" not in str(err.value)


def test_a_checkpoint_saved_with_val_tokens_resumes_with_it_as_eval_tokens(tmp_path):
    path = str(tmp_path / "model_000001.pt")
    old = {k: v for k, v in tg.SETTINGS.items() if k != "eval_tokens"}
    torch.save({"config": {**old, "val_tokens": 4096, "sample_tokens": 32}, "step": 1}, path)
    config = tg.load_checkpoint(path)["config"]
    assert (
        config["eval_tokens"] == 4096
        and "val_tokens" not in config
        and "sample_tokens" not in config
    )
    assert tg.Settings(**config).eval_tokens == 4096


def test_every_setting_is_in_the_docs_table():
    readme = open(f"{ROOT}/docs/settings.md").read()
    rows = dict(re.findall(r"^\| `(\w+)` \| `(.*?)` \|", readme, re.M))
    assert set(rows) == set(tg.SETTINGS)
    for name, default in rows.items():
        assert eval(default) == tg.SETTINGS[name], name


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    cfg = tg.Settings()
    assert tg.get_lr(0, cfg) == pytest.approx(6e-4 / 715)
    assert tg.get_lr(714, cfg) == pytest.approx(6e-4)
    mid = 715 + (19073 - 715) // 2
    assert tg.get_lr(mid, cfg) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-3)
    assert tg.get_lr(19072, cfg) == pytest.approx(6e-5, rel=1e-3)
    assert tg.get_lr(19073, cfg) == tg.get_lr(30000, cfg) == 6e-5
    assert all(tg.get_lr(i, cfg) >= tg.get_lr(i + 1, cfg) for i in range(715, 19073, 97))


def test_device_choice(monkeypatch):
    assert tg.pick_device("cpu") == "cpu"
    assert tg.pick_device("auto") == "cpu"  # this machine has neither CUDA nor MPS
    for name, message in [
        (
            "cuda:3",
            "--device=cuda:3: this machine's PyTorch sees no cuda device; use --device=auto",
        ),
        ("mps", "--device=mps: this machine's PyTorch sees no mps device; use --device=auto"),
        ("gpu", "--device=gpu: not a device; use auto, cpu, cuda, cuda:N or mps"),
    ]:
        with pytest.raises(tg.UserError) as e:
            tg.pick_device(name)
        assert str(e.value) == message
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert tg.pick_device("auto") == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert tg.pick_device("auto", local_rank=5) == "cuda:5" and tg.pick_device("cuda:3") == "cuda:3"


@pytest.mark.filterwarnings("ignore:CUDA is not available", "ignore:.*MPS.*")
def test_autocast_and_fused_adamw_follow_the_device():
    for device_type in ("cpu", "cuda", "mps"):
        for dtype in ("bfloat16", "float16"):
            ctx = tg.autocast_context(device_type, dtype)
            assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == getattr(torch, dtype)
            assert ctx.device == device_type
        assert not isinstance(tg.autocast_context(device_type, "float32"), torch.autocast)
    assert all(tg.use_fused_adamw(d) for d in ("cuda", "cpu", "mps")) and not tg.use_fused_adamw(
        "xpu"
    )
    with tg.autocast_context("cpu", "bfloat16"):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "name, dtype, peak",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
        ("NVIDIA H100 PCIe", "float16", 756e12),
        ("NVIDIA H100 NVL", "bfloat16", 835e12),
        ("NVIDIA H200", "float32", 495e12),
        ("NVIDIA A100-SXM4-40GB", "bfloat16", 312e12),
        ("NVIDIA A100-SXM4-40GB", "float32", 156e12),
        ("NVIDIA A10G", "float16", 125e12),
        ("NVIDIA A10", "bfloat16", 125e12),
        ("NVIDIA L4", "bfloat16", 121e12),
        ("NVIDIA L40S", "bfloat16", None),  # not an L4: names match as whole words
        ("NVIDIA GeForce RTX 4090", "float16", 165.2e12),
        ("NVIDIA GeForce RTX 3090", "bfloat16", 71e12),
        ("Tesla V100-SXM2-16GB", "float16", 125e12),
        ("Tesla V100-PCIE-32GB", "float16", 112e12),
        ("Tesla T4", "float16", 65e12),
        ("Tesla T4", "float32", 8.1e12),
        ("Tesla T4", "bfloat16", None),
        ("NVIDIA GeForce GTX 1080", "float16", None),
    ],
)
def test_peak_flops_for_mfu_by_gpu_and_dtype(monkeypatch, name, dtype, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: name)
    assert tg.device_peak_flops("cuda", 0.0, dtype) == peak
    assert tg.device_peak_flops("cuda", 123e12, dtype) == 123e12


def test_peak_flops_elsewhere(monkeypatch):
    assert tg.device_peak_flops("mps") is None
    monkeypatch.setattr(tg, "measure_matmul_flops", lambda dtype: {torch.float16: 1.5e12}[dtype])
    assert tg.device_peak_flops("cpu", 0.0, "float16") == 1.5e12


def test_flops_per_token_counts_weights_once_and_attention():
    model = tg.GPT(tg.GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=100, block_size=16))
    n = sum(p.numel() for p in model.parameters()) - 16 * 32  # tied wte counted once, wpe excluded
    assert tg.flops_per_token(model, T=16) == 6 * n + 6 * 2 * 32 * 16
    assert math.isclose(tg.flops_per_token(model, T=8), 6 * n + 6 * 2 * 32 * 8)


def test_help_lists_every_setting_with_its_default():
    out = run([sys.executable, f"{ROOT}/train_gpt2.py", "--help"])
    assert out.returncode == 0 and out.stderr == ""
    assert "torchrun --standalone --nproc_per_node=8 train_gpt2.py" in out.stdout
    assert all(f"  --{k}={v}\n" in out.stdout + "\n" for k, v in tg.SETTINGS.items())


def settings_block_comments():
    """Each comment of the settings block (the lines from the first "# fmt: off" to its "# fmt:
    on"), read from the file as text: (the setting it follows or "" for a group line, its text)."""
    lines = open(f"{ROOT}/train_gpt2.py", encoding="utf-8").read().splitlines()
    first = lines.index("# fmt: off")
    last = lines.index("# fmt: on", first)
    found, setting = [], ""
    for line in lines[first + 1 : last]:
        name = re.match(r"(\w+) = ", line)
        if name:
            setting = name[1]
        elif line.startswith("#"):
            setting = ""
        if "#" in line:
            found.append(
                (setting, line[line.index("#", line.index("=") + 1 if name else 0) :][1:].strip())
            )
    return found


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_explains_every_setting_in_its_group_and_the_presets(flag):
    out = run([sys.executable, f"{ROOT}/train_gpt2.py", flag], timeout=60)
    assert out.returncode == 0 and out.stderr == ""
    comments = settings_block_comments()
    assert {s for s, _ in comments} - {""} == set(tg.SETTINGS)  # every setting has its comment
    assert len(comments) > len(tg.SETTINGS) + 5  # and the groups theirs
    printed = out.stdout
    for setting, text in comments:
        assert text in printed, text
        if setting:  # under its setting's line, not elsewhere
            assert printed.index(text) > printed.index(f"  --{setting}={tg.SETTINGS[setting]}\n")
    groups = [text for setting, text in comments if not setting]
    assert [printed.index(f"\n{g}:\n") for g in groups] == sorted(
        printed.index(f"\n{g}:\n") for g in groups
    )
    for name, changes in tg.SETTING_PRESETS.items():
        if name:
            assert f"  {name}: --" in printed
            assert all(f"--{k}={v}" in " ".join(printed.split()) for k, v in changes.items()), name
