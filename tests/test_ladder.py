"""bench/ladder.py: its --dry-run climbs every rung, a step the device cannot take is a row saying
why, and the ladder's own hand-written attention and unfused loss give the numbers of what replaces
them, so that each rung times the same model."""

import copy
import os
import re
import sys

import pytest
import torch
from conftest import ROOT, run

sys.path.insert(0, os.path.join(ROOT, "bench"))
import ladder  # noqa: E402

import train_gpt2 as tg  # noqa: E402

SMALL = tg.GPTConfig(block_size=16, vocab_size=tg.EOT + 1, n_layer=2, n_head=4, n_embd=32)


def table_rows(stdout):
    """The table's rows, each a list of its cells, under its header and its --- line."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert lines[0] == "| rung | tokens/s | x previous | x float32 | loss | note |"
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_dry_run_climbs_every_rung_and_names_the_skipped_ones():
    r = run(
        [sys.executable, os.path.join(ROOT, "bench", "ladder.py"), "--dry-run", "--device=cpu"],
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    rows = table_rows(r.stdout)
    assert [row[0] for row in rows] == [name for name, _ in ladder.RUNGS]
    by_name = {row[0]: row for row in rows}
    tf32 = by_name["TF32 matmuls"]
    assert tf32[1] == "skipped" and tf32[5] == ladder.why_not({"tf32": True}, "cpu")
    assert "TF32" in tf32[5] and "cpu" in tf32[5]
    ran = [row for row in rows if row[1] != "skipped"]
    assert len(ran) == len(ladder.RUNGS) - 1  # on a CPU, only TF32 is out of reach
    rates = [float(row[1].replace(",", "")) for row in ran]
    assert all(rate > 0 for rate in rates)
    assert ran[0][2] == "" and ran[0][3] == "1.00x"
    for row, rate, previous in zip(ran[1:], rates[1:], rates):  # against the last rung that ran
        assert abs(float(row[2].rstrip("x")) - rate / previous) <= 0.006 * rate / previous + 0.005
        assert abs(float(row[3].rstrip("x")) - rate / rates[0]) <= 0.006 * rate / rates[0] + 0.005
    if tg.native_bf16("cpu"):  # per hardware: what the bf16 row says follows the CPU's flags
        assert by_name["bf16 autocast"][5] == "native bf16"
    else:
        assert by_name["bf16 autocast"][5].startswith("emulated")
    assert by_name["torch.compile"][5].startswith("aot_eager; its warm-up, compiling, took ")
    losses = [float(row[4]) for row in ran]  # one model at every rung: one loss, to bf16's rounding
    assert all(abs(loss - losses[0]) < 0.01 for loss in losses)
    last = r.stdout.rstrip().splitlines()[-1]
    assert re.fullmatch(
        r"\d+ s in all; load average (\d+\.\d|n/a) at the start, (\d+\.\d|n/a) "
        r"at the end, on \d+ cores",
        last,
    ), last


def test_hand_written_attention_gives_flash_attentions_numbers():
    torch.manual_seed(0)
    flash = tg.CausalSelfAttention(SMALL)
    hand = ladder.HandAttention(SMALL)
    hand.load_state_dict(flash.state_dict())
    x = torch.randn(3, 16, 32, requires_grad=True)
    x_hand = x.detach().clone().requires_grad_(True)
    y, y_hand = flash(x), hand(x_hand)
    torch.testing.assert_close(y_hand, y, atol=1e-6, rtol=1e-5)
    y.square().sum().backward()
    y_hand.square().sum().backward()
    torch.testing.assert_close(x_hand.grad, x.grad, atol=1e-6, rtol=1e-5)
    later = x_hand.detach().clone()
    later[:, 8:] = torch.randn(3, 8, 32)  # causal: a later token changes nothing before it
    torch.testing.assert_close(hand(later)[:, :8], y_hand[:, :8], atol=0, rtol=0)


def test_a_model_with_hand_written_attention_is_the_same_model():
    torch.manual_seed(0)
    model = tg.GPT(SMALL)
    hand = ladder.hand_written_attention(copy.deepcopy(model))
    assert all(isinstance(block.attn, ladder.HandAttention) for block in hand.transformer.h)
    idx = torch.randint(0, tg.EOT + 1, (2, 16))
    torch.testing.assert_close(hand(idx)[0], model(idx)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_the_unfused_loss_is_the_fused_one(padded):
    """Logits and F.cross_entropy give train_gpt2's fused loss and gradients; padded, with random
    (not zero) padding rows, which only leaving the padding's columns out keeps out of the loss."""
    torch.manual_seed(0)
    config = copy.copy(SMALL)
    config.vocab_size = ladder.PADDED_VOCAB if padded else tg.EOT + 1
    model = tg.GPT(config)
    unfused = ladder.UnfusedLoss(copy.deepcopy(model))
    idx, targets = torch.randint(0, tg.EOT + 1, (2, 2, 16))
    _, fused_loss = model(idx, targets)
    logits, loss = unfused(idx, targets)
    assert logits.size(-1) == tg.EOT + 1
    torch.testing.assert_close(loss, fused_loss, atol=1e-5, rtol=1e-6)
    fused_loss.backward()
    loss.backward()
    for (name, p), q in zip(model.named_parameters(), unfused.model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_the_padded_model_computes_the_unpadded_ones_loss():
    shape = {**ladder.SHAPES["dry-run"], "backend": "eager"}
    recipe = dict(ladder.BASELINE, flash=True, fused_loss=True)
    losses = []
    for vocab_size in (tg.EOT + 1, ladder.PADDED_VOCAB):
        rung = ladder.Rung({}, dict(recipe, vocab_size=vocab_size), shape, "cpu")
        assert rung.model.config.vocab_size == vocab_size
        rung.step()
        losses.append(rung.loss)
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_what_each_device_can_take(monkeypatch):
    assert "TF32" in ladder.why_not({"tf32": True}, "cpu")
    assert ladder.why_not({"tf32": True}, "mps").endswith("a mps has none")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert "Ampere" in ladder.why_not({"tf32": True}, "cuda:0")  # a V100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert ladder.why_not({"tf32": True}, "cuda:0") is None  # an H100
    assert "mps" in ladder.why_not({"compile": True}, "mps")
    assert ladder.why_not({"compile": True}, "cpu") is None
    assert ladder.why_not({"fused_adamw": True}, "cpu") is None
    monkeypatch.setattr(tg, "use_fused_adamw", lambda device_type: False)
    assert ladder.why_not({"fused_adamw": True}, "cpu") == "PyTorch has no fused AdamW on cpu"
    for rung in ({}, {"bf16": True}, {"flash": True}, {"vocab_size": 50304}, {"fused_loss": True}):
        assert ladder.why_not(rung, "cpu") is None


def test_the_bf16_note_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(tg, "native_bf16", lambda device_type: True)
    assert ladder.bf16_note("cpu") == "native bf16"
    monkeypatch.setattr(tg, "native_bf16", lambda device_type: False)
    assert ladder.bf16_note("cpu").startswith("emulated: no native bf16")


def test_a_compile_that_fails_is_a_skip_and_the_rungs_after_it_run_without_it(monkeypatch):
    def failing_compile(model, **kwargs):
        def fail(*args, **kw):
            raise RuntimeError("no C++ compiler (the test's)\nmore detail")

        return fail

    monkeypatch.setattr(torch, "compile", failing_compile)
    shape = {**ladder.SHAPES["dry-run"], "backend": "inductor"}
    climbed = dict(ladder.climb(shape, "cpu", log=lambda line: None))
    assert climbed["torch.compile"] == (
        "torch.compile failed (RuntimeError: no C++ compiler (the test's))"
    )
    after = [climbed[name] for name, _ in ladder.RUNGS[5:]]
    assert all(not rung.recipe["compile"] for rung in after)
    assert after[-1].recipe == dict(
        ladder.BASELINE, bf16=True, flash=True, vocab_size=50304, fused_adamw=True, fused_loss=True
    )
    assert "compile failed" in ladder.table(list(climbed.items()), shape, "cpu")


def test_bad_flags_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        ladder.parse_args(["--n_embd=65", "--n_head=2"])
    assert e.value.code == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith("--n_embd=65 is not a multiple of --n_head=2")
    )
    with pytest.raises(SystemExit) as e:
        ladder.parse_args(["--B=0"])
    assert e.value.code == 2 and "0 is not a positive whole number" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        ladder.main(["--device=tpu", "--dry-run"])
    assert str(e.value.code).startswith("error: --device=tpu: not a device")
