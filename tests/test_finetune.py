"""Fine-tuning: init_from a Hugging Face directory or a checkpoint, the padded vocabulary taking no
probability, dropout, bias, and --max_steps=0 as an eval of the initial model."""

import os
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY, hf_gpt2, read_log, train, train_losses, write_hellaswag, write_shards

import hellaswag
import train_gpt2
from train_gpt2 import GPT, GPTConfig, UserError, parse_args

# TINY without the model's shape, which init_from sets
RUN = [
    a
    for a in TINY
    if a.split("=")[0] not in ("--n_layer", "--n_head", "--n_embd", "--vocab_size", "--block_size")
]


def strongly_negative_gpt2(path, n_positions=96):
    """A random GPT-2 of an odd shape (5 heads of 8) saved as a Hugging Face directory, its logits
    averaging about -10 as real GPT-2's sit far below 0: every embedding row shares a direction m,
    and ln_f's bias points against it. A padded id with logit 0 would then take most of the
    probability."""
    hf = hf_gpt2(path, n_positions=n_positions)
    with torch.no_grad():
        m = torch.randn(40)
        m /= m.norm()
        hf.transformer.wte.weight += 0.5 * m
        hf.transformer.ln_f.bias.copy_(-20 * m)
    hf.save_pretrained(path)
    return hf


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    hf = strongly_negative_gpt2(str(root / "hf"))
    # a small "language": fine-tuning learns it fast
    write_shards(str(root / "data"), [4000, 20000], vocab=500)
    return root, hf


def hf_val_loss(hf, data_dir, rows, T):
    """transformers' own loss (labels=) over the first `rows` rows of T tokens of the val shard, as
    evaluate_loss scores them: each row's T + 1 tokens give T targets."""
    val = torch.from_numpy(
        train_gpt2.load_shard(train_gpt2.list_shards(data_dir, "val")[0]).astype("int64")
    )
    with torch.no_grad():
        losses = [
            hf(
                input_ids=val[r * T : r * T + T + 1][None], labels=val[r * T : r * T + T + 1][None]
            ).loss
            for r in range(rows)
        ]
    return torch.stack(losses).double().mean().item()


def test_max_steps_0_gives_transformers_loss_of_a_cropped_odd_model(setup, tmp_path):
    root, hf = setup
    hella = write_hellaswag(str(tmp_path / "hella.jsonl"), 4)
    log_dir = str(tmp_path / "log")
    r = train(
        [
            *RUN,
            f"--init_from={root / 'hf'}",
            "--block_size=64",
            "--max_steps=0",
            f"--hella_data={hella}",
            # vocab_size stays 50304: padded
            f"--data_dir={root / 'data'}",
            f"--log_dir={log_dir}",
        ]
    )
    assert r.returncode == 0, r.stderr
    record, steps = read_log(log_dir)
    s = record["settings"]
    assert (s["n_layer"], s["n_head"], s["n_embd"], s["block_size"], s["vocab_size"]) == (
        2,
        5,
        40,
        64,
        50304,
    )
    assert [line.split()[:2] for line in steps] == [["0", "val"], ["0", "hella"]]
    assert sorted(os.listdir(log_dir)) == ["log.txt"]  # an eval, no checkpoint
    ours = train_losses(log_dir, "val")[0]
    theirs = hf_val_loss(hf, str(root / "data"), 512 // 32, 32)
    assert ours == pytest.approx(theirs, rel=1e-4)
    # the logits are strongly negative: padding given logit 0 would have lowered this a lot
    assert theirs > 10


def test_padding_changes_no_loss(setup):
    root, _ = setup
    plain = GPT.from_pretrained(str(root / "hf"))
    padded = GPT.from_pretrained(str(root / "hf"), vocab_size=50304)
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(padded(idx, idx)[1], plain(idx, idx)[1], rtol=1e-6, atol=0)
        data = hellaswag.hellaswag_tokens(
            [{"ctx": "a man", "endings": ["runs", "a b", "c", "dog"]}],
            64,
            train_gpt2.get_tokenizer(),
        )
        torch.testing.assert_close(
            hellaswag.hellaswag_losses(padded, data, 256, torch.autocast("cpu", enabled=False)),
            hellaswag.hellaswag_losses(plain, data, 256, torch.autocast("cpu", enabled=False)),
        )


def test_finetuning_lowers_val_loss_and_resumes_exactly(setup, tmp_path):
    root, _ = setup
    args = [
        *RUN,
        f"--init_from={root / 'hf'}",
        "--block_size=64",
        "--max_steps=30",
        "--eval_interval=30",
        "--checkpoint_interval=15",
        "--max_lr=3e-3",
        "--min_lr=3e-3",
        "--warmup_steps=0",
        "--dropout=0.1",
        f"--data_dir={root / 'data'}",
    ]
    straight = str(tmp_path / "straight")
    r = train([*args, f"--log_dir={straight}"])
    assert r.returncode == 0, r.stderr
    val = train_losses(straight, "val")
    assert val[30] < val[0] - 1, val
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copy(os.path.join(straight, "model_000015.pt"), resumed)
    r = train([*args, f"--log_dir={resumed}", "--resume=auto"])
    assert r.returncode == 0, r.stderr
    assert f"--init_from={root / 'hf'} was not used" in r.stdout
    full = train_losses(straight)
    # bit-identical, dropout included
    assert {k: v for k, v in full.items() if k >= 15} == train_losses(resumed)
    assert train_losses(resumed, "val")[30] == val[30]
    # a checkpoint is an init_from too: its weights, a fresh step 0 (the val loss it was saved with)
    again = str(tmp_path / "again")
    r = train(
        [
            *RUN,
            f"--init_from={straight}/model_000030.pt",
            "--max_steps=0",
            f"--data_dir={root / 'data'}",
            f"--log_dir={again}",
        ]
    )
    assert r.returncode == 0, r.stderr
    assert train_losses(again, "val") == {0: val[30]}


def one_line_refusal(args, message):
    with pytest.raises(UserError) as e:
        parse_args(args)
    assert str(e.value) == message and "\n" not in message


def test_refusals(setup, tmp_path):
    hf = str(setup[0] / "hf")
    one_line_refusal(
        [f"--init_from={hf}", "--n_head=4", "--T=32"],
        f"--init_from={hf} has n_head=5, which --n_head=4 contradicts; the pretrained model sets "
        "these, drop them",
    )
    one_line_refusal(
        [f"--init_from={hf}", "--block_size=128", "--T=32"],
        f"--block_size=128 is longer than {hf}'s 96, which has no positions past it; crop it with "
        "a smaller --block_size, never grow it",
    )
    one_line_refusal(
        [f"--init_from={hf}", "--bias=False", "--T=32"],
        f"--init_from={hf} has bias=True, which --bias=False contradicts; the pretrained model "
        "sets these, drop them",
    )
    one_line_refusal(["--dropout=1"], "--dropout=1.0: must be in [0, 1)")
    # agreeing is fine; block_size is the model's
    cfg = parse_args([f"--init_from={hf}", "--T=32", "--n_head=5"])
    assert (cfg.n_head, cfg.block_size, cfg.vocab_size) == (5, 96, 50304)


def test_bias_false_trains_and_is_refused_by_export(shards, tmp_path):
    log_dir = str(tmp_path / "log")
    r = train(
        [
            *TINY,
            "--bias=False",
            "--vocab_size=50304",
            "--max_steps=2",
            f"--data_dir={shards}",
            f"--log_dir={log_dir}",
        ]
    )
    assert r.returncode == 0, r.stderr
    model = train_gpt2.load_model(log_dir)  # a run directory: its newest checkpoint
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    from conftest import run

    r = run(["python", "export_hf.py", f"--model={log_dir}", f"--out={tmp_path / 'hf'}"])
    assert r.returncode == 1 and r.stderr.strip() == (
        "error: the model was trained with --bias=False, and GPT-2's Hugging Face format has "
        "biases in every Linear and LayerNorm layer; only a --bias=True model can be exported"
    )
    one_line_refusal(
        [f"--init_from={log_dir}/model_000002.pt", "--bias=True", "--T=32"],
        f"--init_from={log_dir}/model_000002.pt has bias=False, which --bias=True contradicts; the "
        f"pretrained model sets these, drop them",
    )


def tiny_gpt(dropout):
    torch.manual_seed(0)
    return GPT(
        GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=16, dropout=dropout)
    )


def test_dropout():
    idx = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    model = tiny_gpt(0.0)
    model.train()
    loss = model(idx, idx)[1]
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.eval()  # with nothing dropped, training mode computes exactly what eval mode does
    eval_loss = model(idx, idx)[1]
    eval_loss.backward()
    assert torch.equal(loss, eval_loss) and all(
        torch.equal(g, p.grad) for g, p in zip(grads, model.parameters())
    )

    model = tiny_gpt(0.1)
    model.train()
    assert model(idx, idx)[1] != model(idx, idx)[1]  # dropped at random each forward
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(idx, idx)[1], model(idx, idx)[1])
        assert torch.equal(model(idx, idx)[1], tiny_gpt(0.0)(idx, idx)[1])


def test_a_padded_id_in_a_shard_is_refused(tmp_path):
    paths = write_shards(str(tmp_path / "data"), [4000, 5000], vocab=500)
    tokens = np.load(paths[1])
    tokens[7] = 50300  # below vocab_size 50304, but padding, not a token
    np.save(paths[1], tokens)
    r = train(
        [
            *TINY,
            "--vocab_size=50304",
            f"--data_dir={tmp_path / 'data'}",
            f"--log_dir={tmp_path / 'log'}",
        ]
    )
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: {paths[1]}: token 50300 at position 7 is >= vocab_size 50257; the shard is "
        "corrupt or from another tokenizer"
    )
