"""export_hf.py: a trained checkpoint becomes a directory that transformers loads offline, giving
our logits and our tokenization, and that train_gpt2 loads back unchanged."""

import errno
import json
import os
import sys

import pytest
import torch
from conftest import ROOT, run

from export_hf import export_hf
from train_gpt2 import GPT, GPTConfig, UserError, get_tokenizer, load_model

SENTENCE = (
    "Hello, I'm a language model: naïve café — 1,024 tokens cost $3.50!\n\n  <|endoftext|>Next."
)


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "hf")
    result = run(
        [sys.executable, f"{ROOT}/export_hf.py", f"--model={tiny_run.checkpoint}", f"--out={out}"],
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {out}\n"
    return out


def test_transformers_gives_our_logits(tiny_run, exported, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(exported).eval()
    assert hf.config.vocab_size == 50257 and hf.config.n_positions == 64
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied, as ours
    ours = load_model(tiny_run.checkpoint)
    ids = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    ids[0, :3] = torch.tensor([0, 50256, 50255])  # the vocabulary's ends
    with torch.no_grad():
        theirs, mine = hf(ids).logits, ours(ids)[0]
    assert mine.shape[-1] == 50304
    torch.testing.assert_close(theirs, mine[..., :50257], atol=1e-4, rtol=0)


def test_tokenizer_matches_ours(exported, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(exported)
    ids = get_tokenizer().encode(SENTENCE, allowed_special="all")
    assert tok.encode(SENTENCE) == ids
    assert tok.decode(ids) == SENTENCE
    assert tok.eos_token_id == 50256


def test_round_trips_through_from_pretrained(tiny_run, exported):
    ours = load_model(tiny_run.checkpoint)
    back = GPT.from_pretrained(exported, vocab_size=50304)
    for name, value in ours.state_dict().items():
        expected = value.clone()
        if name in ("lm_head.weight", "transformer.wte.weight"):
            expected[50257:] = 0  # the padding rows are dropped on export and come back as zeros
        assert torch.equal(back.state_dict()[name], expected), name
    assert sorted(os.listdir(exported)) == [
        "config.json",
        "merges.txt",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    with open(os.path.join(exported, "config.json")) as f:
        assert json.load(f)["activation_function"] == "gelu_new"


def test_refuses_to_overwrite_or_to_export_a_vocab_smaller_than_gpt2s(tiny_run, tmp_path):
    keep = tmp_path / "existing" / "notes.txt"
    keep.parent.mkdir()
    keep.write_text("mine")
    result = run(
        [
            sys.executable,
            f"{ROOT}/export_hf.py",
            f"--model={tiny_run.checkpoint}",
            f"--out={keep.parent}",
        ]
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == f"error: --out={keep.parent} exists and is not empty; name a new directory"
    )
    assert os.listdir(keep.parent) == ["notes.txt"] and keep.read_text() == "mine"

    small = GPT(GPTConfig(block_size=16, vocab_size=512, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(UserError, match="vocab_size 512 is below GPT-2's 50257"):
        export_hf(small, str(tmp_path / "small"))
    assert not (tmp_path / "small").exists()


def test_a_broken_model_directory_is_named(exported, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(exported):
        data = open(os.path.join(exported, name), "rb").read()
        (broken / name).write_bytes(data[:100] if name == "model.safetensors" else data)
    with pytest.raises(
        UserError,
        match=f"--model={broken}: not a readable Hugging Face model directory "
        r"\(SafetensorError: ",
    ):
        load_model(str(broken))
    (broken / "model.safetensors").write_bytes(
        open(os.path.join(exported, "model.safetensors"), "rb").read()
    )
    (broken / "config.json").write_text('{"n_layer": 4}')
    with pytest.raises(UserError) as e:
        load_model(str(broken))
    assert (
        str(e.value) == f"--model={broken}: not a readable Hugging Face model directory "
        "(KeyError: 'n_positions')"
    )
    (broken / "model.safetensors").unlink()  # from_pretrained's own message comes through as it is
    with pytest.raises(UserError) as e:
        load_model(str(broken))
    assert str(e.value) == f"{broken} holds neither model.safetensors nor pytorch_model.bin"


@pytest.mark.parametrize(
    "out, model, message",
    [
        ("{tmp}/afile", "gpt2", "--out={tmp}/afile is a file; name a new directory"),
        (
            "{tmp}/afile/sub",
            "gpt2",
            "--out={tmp}/afile/sub: {tmp}/afile is a file, so nothing can be created under "
            "it; name a new directory elsewhere",
        ),
        ("", "gpt2", "--out is empty; name a new directory to write"),
    ],
    ids=["out is a file", "out under a file", "out empty"],
)
def test_bad_arguments_are_refused_before_loading_the_model(
    tmp_path, monkeypatch, out, model, message
):
    import export_hf

    (tmp_path / "afile").write_text("mine")
    monkeypatch.setattr(
        export_hf, "load_model", lambda spec: pytest.fail("loaded before checking --out")
    )
    # sys.exit(message): the message on stderr, exit status 1
    with pytest.raises(SystemExit) as exit:
        export_hf.main(
            [f"--model={model.format(tmp=tmp_path)}", f"--out={out.format(tmp=tmp_path)}"]
        )
    assert exit.value.code == "error: " + message.format(tmp=tmp_path)
    assert (tmp_path / "afile").read_text() == "mine" and os.listdir(tmp_path) == ["afile"]


@pytest.mark.parametrize("existed", [False, True])
def test_a_disk_that_fills_mid_export_leaves_no_half_export(
    tiny_run, tmp_path, monkeypatch, existed
):
    import safetensors.torch

    import export_hf

    out = tmp_path / "export"
    if existed:
        out.mkdir()  # an empty directory the user made for it: kept, and empty again

    def full_disk(tensors, path, metadata=None):
        open(path, "wb").write(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(SystemExit) as exit:
        export_hf.main([f"--model={tiny_run.checkpoint}", f"--out={out}"])
    assert (
        exit.value.code
        == f"error: cannot write the export to --out={out} (No space left on device); name a "
        f"writable directory with room for it"
    )
    assert os.listdir(tmp_path) == (["export"] if existed else []) and (
        not existed or os.listdir(out) == []
    )
