"""The dtype a run trains in: the auto choice per device, float16 with its gradient scaler (exact
gradients at GPT-2's row counts, finite runs, exact resume), and a torch.compile that fails falling
back to eager."""

import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, run, train, train_losses, write_shards

import train_gpt2 as tg

FP32 = [a for a in TINY if not a.startswith("--dtype")] + ["--dtype=float32"]
FP16 = [a for a in TINY if not a.startswith("--dtype")] + ["--dtype=float16"]


@pytest.mark.parametrize(
    "device_type, capability, flags, macos14, want",
    [
        ("cuda", (7, 0), set(), False, "float16"),  # V100
        ("cuda", (7, 5), set(), False, "float16"),  # T4
        ("cuda", (8, 0), set(), False, "bfloat16"),  # A100
        ("cuda", (9, 0), set(), False, "bfloat16"),  # H100
        ("cpu", None, {"avx2", "avx512f", "avx512_bf16"}, False, "bfloat16"),  # Zen 4, Cooper Lake
        ("cpu", None, {"avx2", "amx_tile", "amx_bf16"}, False, "bfloat16"),  # Sapphire Rapids
        (
            "cpu",
            None,
            {"fp", "asimd", "bf16"},
            False,
            "bfloat16",
        ),  # Graviton 3 (Arm's Features line)
        ("cpu", None, {"avx2", "avx512f"}, False, "float32"),  # Skylake: bf16 only emulated
        ("mps", None, set(), True, "bfloat16"),
        ("mps", None, set(), False, "float16"),  # macOS 13: no bf16 in Metal
    ],
)
def test_auto_dtype_per_device_and_capability(
    monkeypatch, device_type, capability, flags, macos14, want
):
    # a T4 is where torch.cuda.is_bf16_supported() says yes, counting emulation: the choice must not
    # ask it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(tg, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos14)
    said = []
    assert tg.resolve_dtype("auto", device_type, said.append) == want
    assert said == [
        f"dtype {want} (auto: {'native' if want == 'bfloat16' else 'no native'} bf16 on this "
        f"{device_type})"
    ]
    for named in ("bfloat16", "float16", "float32"):  # a named dtype is taken as it is
        assert tg.resolve_dtype(named, device_type, said.append) == named
    assert said[-1] == "dtype float32 (as set)"


@pytest.mark.parametrize(
    "device_type, capability, flags, macos14, train, score, decode",
    [
        # native bf16
        (
            "cpu",
            None,
            {"avx2", "avx512f", "avx512_bf16"},
            False,
            "bfloat16",
            "bfloat16",
            "bfloat16",
        ),
        # emulated: decoding still reads half
        ("cpu", None, {"avx2"}, False, "float32", "float32", "bfloat16"),
        ("cuda", (8, 0), set(), False, "bfloat16", "bfloat16", "bfloat16"),  # A100
        ("cuda", (7, 5), set(), False, "float16", "float16", "float16"),  # T4: fp16 native
        ("mps", None, set(), True, "bfloat16", "bfloat16", "bfloat16"),
        ("mps", None, set(), False, "float16", "float16", "float16"),  # macOS 13: no bf16 in Metal
    ],
)
def test_auto_dtype_per_job(
    monkeypatch, device_type, capability, flags, macos14, train, score, decode
):
    """Training and scoring are bound by compute, so auto takes bf16 only where it is native;
    decoding is bound by memory, so on a CPU auto takes bf16 weights even where bf16 arithmetic is
    emulated."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(tg, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos14)
    said = []
    for job, want in (("train", train), ("score", score), ("decode", decode)):
        assert tg.resolve_dtype("auto", device_type, said.append, job=job) == want
        # as named, silently
        assert tg.resolve_dtype("float32", device_type, None, job=job) == "float32"
    # the job a caller names nothing for
    assert tg.resolve_dtype("auto", device_type, None) == train
    assert len(said) == 3


def test_cpu_flags_reads_this_machine():
    flags = tg.cpu_flags()
    if os.path.exists("/proc/cpuinfo"):
        assert "fpu" in flags or "fp" in flags


def test_float16_gradients_through_the_model_match_fp32_at_131072_rows():
    """The scaler and the fused loss together: at 131,072 rows a micro-batch, (softmax - onehot) /
    rows would sit below float16's range; the gradients must still be those of fp32 plain
    cross-entropy."""
    torch.manual_seed(0)
    # rows are what matter
    config = tg.GPTConfig(block_size=128, vocab_size=512, n_layer=1, n_head=2, n_embd=16)
    model, ref = tg.GPT(config), tg.GPT(config)
    ref.load_state_dict(model.state_dict())
    idx, targets = torch.randint(0, 512, (1024, 128)), torch.randint(0, 512, (1024, 128))
    logits, _ = ref(idx)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    scaler = tg.grad_scaler("cpu", "float16")
    with tg.autocast_context("cpu", "float16"):
        _, loss = model(idx, targets)
    scaler.scale(loss).backward()
    scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.0))
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    want = torch.cat([p.grad.flatten() for p in ref.parameters()])
    assert torch.isfinite(got).all()
    assert (got - want).norm() / want.norm() < 0.02


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny run in float32 and in float16, 8 steps each, on the same shards."""
    root = tmp_path_factory.mktemp("precision")
    write_shards(str(root / "data"), [4000, 5000, 3000, 4100])
    out = {"data": str(root / "data")}
    for name, args in (("fp32", FP32), ("fp16", FP16)):
        out[name] = str(root / name)
        r = train(args + [f"--data_dir={root / 'data'}", f"--log_dir={out[name]}"])
        assert r.returncode == 0, r.stderr
        out[name + "_stdout"] = r.stdout
    return out


def test_float16_run_is_finite_and_ends_near_float32(runs):
    assert "dtype float16 (as set)" in runs["fp16_stdout"]
    fp16, fp32 = train_losses(runs["fp16"]), train_losses(runs["fp32"])
    assert sorted(fp16) == list(range(8)) and "skipped" not in runs["fp16_stdout"]
    assert all(map(torch.isfinite, torch.tensor(list(fp16.values()))))
    assert fp16 != fp32  # it did run in float16
    assert abs(fp16[7] - fp32[7]) < 0.05, (fp16, fp32)
    ckpt = torch.load(os.path.join(runs["fp16"], "model_000008.pt"), weights_only=True)
    assert ckpt["scaler"]["scale"] == 2.0**16 and ckpt["scaler"]["_growth_tracker"] == 8
    assert ckpt["config"]["dtype"] == "float16"
    assert (
        torch.load(os.path.join(runs["fp32"], "model_000008.pt"), weights_only=True)["scaler"] == {}
    )


def test_float16_resume_is_bit_identical_scaler_included(runs, tmp_path):
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copy(os.path.join(runs["fp16"], "model_000004.pt"), resumed)
    r = train(FP16 + [f"--data_dir={runs['data']}", f"--log_dir={resumed}", "--resume=auto"])
    assert r.returncode == 0, r.stderr
    straight = train_losses(runs["fp16"])
    assert {s: v for s, v in straight.items() if s >= 4} == train_losses(resumed)
    a, b = (
        torch.load(os.path.join(d, "model_000008.pt"), weights_only=True)
        for d in (runs["fp16"], resumed)
    )
    # the growth tracker counts on from the checkpoint's 4 clean steps
    assert a["scaler"] == b["scaler"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_scaler_skips_are_not_bad_steps_but_a_non_finite_loss_is():
    cfg = tg.parse_args(["--max_bad_steps=0"])

    def run(scaled):
        return tg.Run(cfg, scaler=torch.amp.GradScaler("cpu", enabled=scaled))

    scaled = run(True)
    tg.count_bad_step(scaled, 3, 2.5, float("inf"))
    assert scaled.bad_steps == 0
    for loss, norm, with_scaler in ((float("nan"), float("inf"), True), (2.5, float("inf"), False)):
        with pytest.raises(tg.UserError, match="step 3: loss .* is not finite"):
            tg.count_bad_step(run(with_scaler), 3, loss, norm)


FAILING_COMPILE = """
import sys, torch, train_gpt2
def no_compiler(graph, example_inputs):
    raise RuntimeError("no C++ compiler found (the test's)")
real = torch.compile
torch.compile = lambda model, **kw: real(model, backend=no_compiler)
train_gpt2.main(sys.argv[1:])
"""


def test_a_failing_compile_warns_once_and_runs_the_same_maths_eagerly(runs, tmp_path):
    log_dir = str(tmp_path / "log")
    args = [a for a in FP32 if not a.startswith("--compile")] + ["--compile=True"]
    r = run(
        [
            sys.executable,
            "-c",
            FAILING_COMPILE,
            *args,
            f"--data_dir={runs['data']}",
            f"--log_dir={log_dir}",
        ]
    )
    assert r.returncode == 0, r.stderr
    warning = (
        "warning: torch.compile failed (RuntimeError: no C++ compiler found (the test's)); running "
        "without it, the same maths, slower. --compile=False skips the attempt\n"
    )
    assert r.stdout.count("warning: torch.compile failed") == 1 and warning in r.stdout
    assert train_losses(log_dir) == train_losses(runs["fp32"])
    assert train_losses(log_dir, "val") == train_losses(runs["fp32"], "val")
