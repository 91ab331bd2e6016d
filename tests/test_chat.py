"""Make GPT-2 an assistant: the chat template (chat.py), conversations as shards with masks
(prepare_fineweb.py), the loss over the assistant's tokens only (exact, and weighted by trained
targets across micro-batches and ranks), --preset=sft runs that resume bit-identically and match on
2 ranks, and the template in the Hugging Face export."""

import glob
import json
import os
import shutil
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ROOT,
    TINY,
    TORCHRUN,
    read_log,
    run,
    train,
    train_losses,
    write_arithmetic_chats,
    write_shards,
)

import chat
import prepare_fineweb
import train_gpt2 as tg
from train_gpt2 import (
    CHAT_TOKENS,
    EOT,
    GPT,
    IGNORE,
    GPTConfig,
    LinearCrossEntropy,
    UserError,
    get_tokenizer,
)

SYSTEM, USER, ASSISTANT, END = CHAT_TOKENS.values()
CONVERSATION = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "What is 3+4?"},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "  And 2+2, in words?\n"},
    {"role": "assistant", "content": " Four.\n\nAnything else? <|end|> is text here"},
]
# TINY without the model's shape, which --init_from sets (GPT-2's padded vocabulary: the template's
# rows exist)
SFT = [
    a
    for a in TINY
    if a.split("=")[0] not in ("--n_layer", "--n_head", "--n_embd", "--vocab_size", "--block_size")
]


# ---------------------------------------------------------------------------------------------- the
# template
def test_the_tokenizer_knows_the_template_tokens_as_special():
    enc = get_tokenizer()
    assert enc.n_vocab == EOT + 1 + 4 and (SYSTEM, USER, ASSISTANT, END) == (
        50257,
        50258,
        50259,
        50260,
    )
    assert enc.decode([USER, 464, END]) == "<|user|>The<|end|>"
    assert enc.encode("<|assistant|>Hi<|end|>", allowed_special="all") == [ASSISTANT, 17250, END]
    assert END not in enc.encode_ordinary("<|end|>")  # text that spells it stays text


def test_render_marks_each_assistant_turn_and_its_end_and_nothing_else():
    enc = get_tokenizer()
    ids, trained = chat.render(CONVERSATION)
    expected = [EOT]
    for m in CONVERSATION:
        expected += [
            {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}[m["role"]],
            *enc.encode_ordinary(m["content"]),
            END,
        ]
    assert ids == expected and len(trained) == len(ids)
    assert enc.decode(ids).startswith(
        "<|endoftext|><|system|>You are brief.<|end|><|user|>What is 3+4?<|end|>"
        "<|assistant|>7<|end|><|user|>  And 2+2, in words?\n<|end|><|assistant|>"
    )
    assert ids.count(END) == 5  # the content's "<|end|>" is text, not the token
    # trained: exactly the two assistant contents and their <|end|>s
    want = [
        enc.encode_ordinary("7") + [END],
        enc.encode_ordinary(CONVERSATION[4]["content"]) + [END],
    ]
    assert [t for t, k in zip(ids, trained) if k] == want[0] + want[1]
    starts = [i + 1 for i, t in enumerate(ids) if t == ASSISTANT]
    assert all(trained[s : s + len(w)] == [True] * len(w) for s, w in zip(starts, want))
    assert not any(trained[: starts[0]]) and sum(trained) == sum(map(len, want))
    assert chat.prompt(CONVERSATION[:4]) == chat.render(CONVERSATION[:4])[0] + [ASSISTANT]
    assert chat.prompt(CONVERSATION[1:2])[:2] == [EOT, USER]  # no system message needed
    assert chat.reply_text(enc.encode_ordinary(" 7") + [END, 11, 12]) == " 7"


@pytest.mark.parametrize(
    "messages, reason",
    [
        (
            [{"role": "tool", "content": "x"}],
            "message 1 has role 'tool'; want system, user or assistant",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant"}],
            "message 2's content is None, not a string",
        ),
        ("hello", "messages is 'hello', not a non-empty list of {role, content} objects"),
        ([], "messages is [], not a non-empty list of {role, content} objects"),
        (["hi"], "message 1 is 'hi', not a {role, content} object"),
    ],
)
def test_a_malformed_conversation_says_why(messages, reason):
    assert chat.problem(messages) == reason
    with pytest.raises(ValueError, match=reason.replace("[", r"\[").replace("{", r"\{")):
        chat.render(messages)


# ---------------------------------------------------------------------------------------------- the
# loss
def loss_and_grads(loss_fn, x, weight):
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = loss_fn(x, weight)
    loss.backward()
    return loss.detach(), x.grad, weight.grad


@pytest.mark.parametrize("rows", [300, 2 * tg.LOSS_CHUNK_ROWS + 77])
def test_the_masked_loss_is_cross_entropy_over_the_trained_targets_only(rows):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 48, generator=gen)
    weight = torch.randn(1024, 48, generator=gen) * 0.3
    targets = torch.randint(0, 1000, (rows,), generator=gen)
    trained = torch.rand(rows, generator=gen) < 0.3
    masked = torch.where(trained, targets, IGNORE)
    ours = loss_and_grads(
        lambda x, w: LinearCrossEntropy.apply(x, w, masked, torch.float32, 1000), x, weight
    )
    # independent: plain cross-entropy over the trained rows alone
    ref = loss_and_grads(
        lambda x, w: F.cross_entropy(x[trained] @ w[:1000].t(), targets[trained]), x, weight
    )
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # an untrained row: no gradient
    assert torch.equal(ours[1][~trained], torch.zeros_like(ours[1][~trained]))
    assert torch.equal(ours[2][1000:], torch.zeros_like(ours[2][1000:]))
    # the target of an untrained position (a user's token) may be anything: not one gradient bit
    # changes
    other = torch.where(trained, targets, IGNORE)
    other[~trained] = IGNORE - 5  # any negative id is skipped alike
    again = loss_and_grads(
        lambda x, w: LinearCrossEntropy.apply(x, w, other, torch.float32, 1000), x, weight
    )
    assert all(torch.equal(a, b) for a, b in zip(ours, again))


def test_through_the_model_a_user_tokens_target_changes_no_gradient():
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32, chat=True)
    )
    ids, trained = chat.render(CONVERSATION)
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    keep = torch.tensor([trained[1:]])

    def grads(targets):
        model.zero_grad()
        _, loss = model(x, targets)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, ours = grads(torch.where(keep, y, IGNORE))
    # independent: F.cross_entropy over the assistant's positions, all 50261 real tokens
    logits, _ = model(x)
    ref = F.cross_entropy(logits[0, keep[0], :50261], y[keep])
    model.zero_grad()
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    for a, p in zip(ours, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
    changed = torch.where(keep, y, IGNORE)
    # a user token's target, already untrained: and if its label were another token
    changed[0, 3] = IGNORE
    assert not keep[0, 3]
    assert all(torch.equal(a, b) for a, b in zip(ours, grads(changed)[1]))


def write_chat_shards(data_dir, sizes, seed=0, empty_stretch=None):
    """Random-token shards (GPT-2 ids and the template's) with random masks beside them: shard 0
    val, the rest train. empty_stretch=(shard, start, stop): no trained target there."""
    paths = write_shards(data_dir, sizes, vocab=50261, seed=seed, prefix="chat")
    rng = np.random.default_rng(seed + 1)
    for i, (path, n) in enumerate(zip(paths, sizes)):
        mask = (rng.random(n) < 0.4).astype(np.uint8)
        if empty_stretch and empty_stretch[0] == i:
            mask[empty_stretch[1] : empty_stretch[2]] = 0
        np.save(path.replace(".npy", ".mask.npy"), mask)
    return paths


def test_accumulation_weighs_micro_batches_by_their_trained_targets(tmp_path):
    """One step of 3 micro-batches with unequal trained counts (one has none): the gradient and loss
    of the mean over all the step's trained targets, not the mean of the 3 means."""
    B, T = 2, 16
    write_chat_shards(
        str(tmp_path), [200, 3 * B * T + 1], empty_stretch=(1, B * T + 1, 2 * B * T + 1)
    )
    cfg = tg.Settings(
        data_dir=str(tmp_path),
        B=B,
        T=T,
        total_batch_size=3 * B * T,
        chat=True,
        grad_clip=1e9,
        vocab_size=50304,
        block_size=T,
        n_layer=1,
        n_head=2,
        n_embd=16,
    )
    torch.manual_seed(0)
    model = GPT(tg.model_config(tg.dataclasses.asdict(cfg)))
    loader = tg.DataLoaderLite(cfg, "train")
    run = tg.Run(
        cfg,
        model=model,
        trained=model,
        optimizer=tg.build_optimizer(model, cfg, "cpu"),
        train_loader=loader,
        grad_accum_steps=3,
    )
    # lr 0: the gradients stay for us to read, the weights do not move
    loss, _ = tg.train_step(run, 0.0)
    ours = [p.grad.clone() for p in model.parameters()]

    batches = [tg.DataLoaderLite(cfg, "train").read(i * B * T, B) for i in range(3)]
    counts = [int((y >= 0).sum()) for _, y in batches]
    assert counts[1] == 0 and counts[0] != counts[2]
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    model.zero_grad()
    logits, _ = model(x)
    ref = F.cross_entropy(logits[..., :50261].flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-6)
    for a, p in zip(ours, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-7)


def test_the_loader_gives_ignore_where_the_mask_is_0_and_refuses_mixed_data(tmp_path):
    paths = write_chat_shards(str(tmp_path / "data"), [500, 700])
    cfg = tg.Settings(data_dir=str(tmp_path / "data"), B=2, T=16, chat=True, vocab_size=50304)
    x, y = tg.DataLoaderLite(cfg, "train").next_batch()
    tokens, mask = np.load(paths[1]), np.load(paths[1].replace(".npy", ".mask.npy"))
    np.testing.assert_array_equal(x.flatten(), tokens[:32])
    np.testing.assert_array_equal(
        y.flatten(), np.where(mask[1:33] == 1, tokens[1:33].astype(np.int64), IGNORE)
    )
    loader = tg.DataLoaderLite(cfg, "train")
    assert loader.trained_ahead(64) == int(mask[1:65].sum())

    with pytest.raises(UserError) as e:
        tg.DataLoaderLite(tg.dataclasses.replace(cfg, chat=False), "train")
    assert (
        str(e.value)
        == f"{str(tmp_path / 'data')!r} holds conversations: train on them with --preset=sft"
    )
    os.remove(paths[1].replace(".npy", ".mask.npy"))
    with pytest.raises(UserError) as e:
        tg.DataLoaderLite(cfg, "train")
    assert str(e.value) == (
        f"no {paths[1].replace('.npy', '.mask.npy')}: --chat=True trains on conversations "
        f"(prepare_fineweb.py, messages rows)"
    )
    np.save(paths[1].replace(".npy", ".mask.npy"), np.ones(699, np.uint8))
    with pytest.raises(
        UserError, match="a mask in .* is not as long as its shard; re-run prepare_fineweb.py"
    ):
        tg.DataLoaderLite(cfg, "train")
    with pytest.raises(
        UserError, match=r"--chat=True needs vocab_size > 50260 for the chat template's tokens"
    ):
        tg.parse_args(["--chat=True", "--vocab_size=512"])


def test_a_base_model_starts_the_template_tokens_at_its_mean_token(tiny_run):
    model = GPT(
        GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32, chat=True)
    )
    tg.load_pretrained(model, tiny_run.checkpoint, lambda line: None)
    base = tg.load_model(tiny_run.checkpoint)
    w = model.lm_head.weight.detach()
    assert torch.equal(w[: EOT + 1], base.lm_head.weight[: EOT + 1])
    assert torch.allclose(
        w[EOT + 1 : EOT + 5], base.lm_head.weight[: EOT + 1].mean(0).expand(4, -1)
    )
    assert torch.equal(w[EOT + 5 :], base.lm_head.weight[EOT + 5 :])  # padding: as it was


# ----------------------------------------------------------------------------------------------
# preparing
def prepare(data_files, out, *extra):
    return prepare_fineweb.prepare(
        prepare_fineweb.parse_args(
            [
                f"--data_files={data_files}",
                f"--out={out}",
                "--shard_size=300",
                "--num_proc=1",
                *extra,
            ]
        )
    )


def shards_of(out):
    """(tokens, masks) of out's shards in order, as one array each."""
    names = [
        os.path.basename(p)
        for p in glob.glob(os.path.join(out, "*.npy"))
        if not p.endswith(".mask.npy")
    ]
    names.sort(key=lambda n: n[-10:])
    return (
        np.concatenate([np.load(os.path.join(out, n)) for n in names]),
        np.concatenate([np.load(os.path.join(out, n.replace(".npy", ".mask.npy"))) for n in names]),
    )


def test_prepare_writes_render_s_tokens_and_a_mask_beside_each_shard(tmp_path):
    data = write_arithmetic_chats(tmp_path / "chats.jsonl", 60)
    chats = [json.loads(line)["messages"] for line in open(data)]
    out = str(tmp_path / "out")
    prepare(data, out)
    rendered = [chat.render(c) for c in chats]
    tokens, masks = shards_of(out)
    assert tokens.dtype == np.uint16 and masks.dtype == np.uint8 and len(tokens) == len(masks)
    np.testing.assert_array_equal(tokens, [t for ids, _ in rendered for t in ids])
    np.testing.assert_array_equal(masks, [int(k) for _, trained in rendered for k in trained])
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert (
        manifest["complete"]
        and manifest["chat_tokens"] == CHAT_TOKENS
        and len(manifest["shards"]) > 3
    )
    assert all(s["mask"] == s["file"].replace(".npy", ".mask.npy") for s in manifest["shards"])
    # a conversation is a document: it starts with EOT
    assert sum(s["docs"] for s in manifest["shards"]) == 60
    # a pool and --streaming give the same bytes
    prepare(data, str(tmp_path / "pool"), "--num_proc=2", "--streaming")
    assert all(
        np.array_equal(a, b) for a, b in zip(shards_of(out), shards_of(str(tmp_path / "pool")))
    )


def test_an_interrupted_prepare_of_conversations_resumes_to_the_same_files(tmp_path, monkeypatch):
    data = write_arithmetic_chats(tmp_path / "chats.jsonl", 60)
    prepare(data, str(tmp_path / "whole"))
    real, written = prepare_fineweb.write_shard, []

    def interrupt(path, tokens):  # after shard 1's mask, before shard 1
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(path)
        real(path, tokens)

    monkeypatch.setattr(prepare_fineweb, "write_shard", interrupt)
    with pytest.raises(SystemExit):
        prepare_fineweb.main(
            [
                f"--data_files={data}",
                f"--out={tmp_path / 'resumed'}",
                "--shard_size=300",
                "--num_proc=1",
            ]
        )
    assert written[-1].endswith("local_train_000001.mask.npy")
    monkeypatch.setattr(prepare_fineweb, "write_shard", real)
    prepare(data, str(tmp_path / "resumed"))
    for name in os.listdir(tmp_path / "whole"):
        assert (tmp_path / "whole" / name).read_bytes() == (
            tmp_path / "resumed" / name
        ).read_bytes(), name


GOOD = json.dumps(
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
)


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            [
                GOOD,
                "",
                json.dumps(
                    {
                        "messages": [
                            {"role": "tool", "content": "ls"},
                            {"role": "assistant", "content": "x"},
                        ]
                    }
                ),
            ],
            "{path}, line 3: message 1 has role 'tool'; want system, user or assistant",
        ),
        (
            [
                GOOD,
                GOOD,
                "  ",
                json.dumps(
                    {
                        "messages": [
                            {"role": "system", "content": "Be kind."},
                            {"role": "user", "content": "hi"},
                        ]
                    }
                ),
            ],
            "{path}, line 4: no assistant message, so nothing to train on",
        ),
        (
            [GOOD, "", json.dumps({"messages": "hello"}), GOOD],
            "{path}, line 3: messages is 'hello', not a non-empty list "
            "of {{role, content}} objects",
        ),
        (
            [GOOD, GOOD, '{"messages": [{"role": "user", "content": "hi"}', GOOD],
            "{path}, line 3: not valid JSON (Expecting ',' delimiter)",
        ),
        (
            [
                GOOD,
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": None},
                            {"role": "assistant", "content": "x"},
                        ]
                    }
                ),
            ],
            "{path}, line 2: message 1's content is None, not a string",
        ),
    ],
    ids=[
        "unknown role",
        "no assistant turn",
        "messages not a list",
        "not JSON",
        "content not a string",
    ],
)
def test_a_bad_conversation_is_refused_in_one_line_with_its_line_and_nothing_is_written(
    tmp_path, lines, message
):
    path = tmp_path / "chats.jsonl"
    # the bad row comes first, before a shard could fill
    path.write_text("\n".join(lines + [GOOD] * 50) + "\n")
    out = tmp_path / "out"
    r = run(
        [
            sys.executable,
            os.path.join(ROOT, "prepare_fineweb.py"),
            f"--data_files={path}",
            f"--out={out}",
            "--shard_size=100",
            "--num_proc=2",
        ]
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == "error: " + message.format(path=path)
    assert "Traceback" not in r.stderr
    assert not out.exists() or os.listdir(out) == []


def test_a_hub_conversation_dataset_goes_through_the_hub_call_into_shards_named_after_it(tmp_path):
    """The README's `--dataset=HuggingFaceTB/smol-smoltalk`, run beside a stand-in of that
    repository (its parquet layout and columns: messages as a list of {content, role}, and a
    source): datasets.load_dataset reads a local directory named like the repository as it reads the
    hub's, so this is the code path a node takes."""
    chats = [
        json.loads(line) for line in open(write_arithmetic_chats(tmp_path / "chats.jsonl", 40))
    ]
    repo = tmp_path / "HuggingFaceTB" / "smol-smoltalk" / "data"
    repo.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "messages": [
                    [{"content": m["content"], "role": m["role"]} for m in c["messages"]]
                    for c in chats
                ],
                "source": ["arithmetic"] * len(chats),
            }
        ),
        repo / "train-00000-of-00001.parquet",
    )
    r = run(
        [
            sys.executable,
            os.path.join(ROOT, "prepare_fineweb.py"),
            "--dataset=HuggingFaceTB/smol-smoltalk",
            "--val_tokens=300",
            "--shard_size=300",
            "--num_proc=2",
        ],
        cwd=tmp_path,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = str(tmp_path / "smol-smoltalk")
    assert sorted(glob.glob(os.path.join(out, "*_000000.npy"))) == [
        os.path.join(out, "smol-smoltalk_val_000000.npy")
    ]
    rendered = [chat.render(c["messages"]) for c in chats]
    tokens, masks = shards_of(out)
    np.testing.assert_array_equal(tokens, [t for ids, _ in rendered for t in ids])
    np.testing.assert_array_equal(masks, [int(k) for _, trained in rendered for k in trained])
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["complete"] and manifest["source"] == {
        "dataset": "HuggingFaceTB/smol-smoltalk",
        "name": None,
    }
    assert manifest["shards"][0]["tokens"] == 300
    # fineweb's default subset is unchanged
    assert prepare_fineweb.parse_args([]).name == "sample-10BT"
    with pytest.raises(
        UserError, match="--dataset=smoltalk: expected fineweb-edu, fineweb, pydoc or a hub dataset"
    ):
        prepare_fineweb.parse_args(["--dataset=smoltalk"])


# ----------------------------------------------------------------------------------------------
# training
@pytest.fixture(scope="module")
def sft(tiny_run, tmp_path_factory):
    """Arithmetic conversations prepared into shards, and an 8-step --preset=sft run on them from
    tiny_run's checkpoint: (root, the args that run takes, its log_dir, its output)."""
    root = tmp_path_factory.mktemp("sft")
    data = write_arithmetic_chats(root / "chats.jsonl", 300)
    prepare_fineweb.prepare(
        prepare_fineweb.parse_args(
            [f"--data_files={data}", f"--out={root / 'data'}", "--shard_size=1500", "--num_proc=1"]
        )
    )
    args = [
        *SFT,
        "--preset=sft",
        f"--init_from={tiny_run.checkpoint}",
        f"--data_dir={root / 'data'}",
        "--max_lr=1e-3",
        "--min_lr=1e-3",
        "--sample_count=1",
        "--max_new_tokens=16",
    ]
    straight = str(root / "straight")
    r = train([*args, f"--log_dir={straight}"])
    assert r.returncode == 0, r.stderr
    return root, args, straight, r.stdout


def test_an_sft_run_learns_and_samples_a_reply(sft):
    _, _, straight, stdout = sft
    record, _ = read_log(straight)
    assert record["settings"]["chat"] and record["settings"]["vocab_size"] == 50304
    losses, val = train_losses(straight), train_losses(straight, "val")
    assert sorted(losses) == list(range(8)) and losses[7] < losses[0] and val[8] < val[0]
    assert "sample 0: '<|endoftext|><|user|>Who are you?<|end|><|assistant|>" in stdout
    ckpt = torch.load(os.path.join(straight, "model_000008.pt"), weights_only=True)
    # what serve.py can tell a chat model by
    assert ckpt["config"]["chat"] and tg.load_model(straight).config.chat


def test_an_sft_run_resumes_bit_identically(sft, tmp_path):
    _, args, straight, _ = sft
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copy(os.path.join(straight, "model_000004.pt"), resumed)
    lines = open(os.path.join(straight, "log.txt")).readlines()
    with open(os.path.join(resumed, "log.txt"), "w") as f:
        f.writelines([lines[0]] + [line for line in lines[1:] if int(line.split()[0]) < 4])
    r = train([*args, f"--log_dir={resumed}", "--resume=auto"])
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    assert train_losses(resumed) == train_losses(straight)  # bit-identical in float32
    assert train_losses(resumed, "val") == train_losses(straight, "val")


def test_two_ranks_give_the_one_process_losses(sft, tmp_path):
    """Each rank's micro-batch has its own count of trained targets: weighted by them, 2 ranks of 1
    micro-batch are 1 process of 2."""
    _, args, straight, _ = sft
    ddp = str(tmp_path / "ddp")
    r = run(
        [
            *TORCHRUN,
            "--nproc_per_node=2",
            os.path.join(ROOT, "train_gpt2.py"),
            *args,
            f"--log_dir={ddp}",
        ]
    )
    assert r.returncode == 0, r.stderr
    assert "world size 2, grad accum steps 1" in r.stdout
    for kind in ("train", "val"):
        a, b = train_losses(straight, kind), train_losses(ddp, kind)
        assert a.keys() == b.keys() and all(abs(a[s] - b[s]) <= 1e-5 for s in a), (kind, a, b)


# ----------------------------------------------------------------------------------------------
# export
@pytest.fixture(scope="module")
def exported(sft, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "hf")
    r = run(
        [sys.executable, os.path.join(ROOT, "export_hf.py"), f"--model={sft[2]}", f"--out={out}"],
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert r.returncode == 0, r.stderr
    return out


def test_apply_chat_template_gives_render_s_ids(exported, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported)
    messages = CONVERSATION[:4] + [{"role": "assistant", "content": " Four.\n\nAnything else?"}]
    assert tok.apply_chat_template(messages, return_dict=False) == chat.render(messages)[0]
    assert tok.apply_chat_template(
        messages[:4], add_generation_prompt=True, return_dict=False
    ) == chat.prompt(messages[:4])
    assert tok.decode(chat.render(messages)[0], skip_special_tokens=True) == "".join(
        m["content"] for m in messages
    )
    with pytest.raises(Exception, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


@torch.no_grad()
def greedy(model, ids, max_new_tokens):
    """The ids greedy decoding adds to ids: up to max_new_tokens, or through the first of
    chat.STOP."""
    out = []
    while len(out) < max_new_tokens and not (out and out[-1] in chat.STOP):
        out.append(
            int(model(torch.tensor([ids + out]))[0][0, -1, : model.config.real_tokens].argmax())
        )
    return out


def test_transformers_chats_with_the_export_as_we_do(sft, exported, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    ours = tg.load_model(sft[2])
    back = GPT.from_pretrained(exported)
    assert back.config.chat and back.config.vocab_size == back.config.real_tokens == 50261
    ids = torch.tensor([chat.render(CONVERSATION)[0]])
    torch.testing.assert_close(back(ids)[0], ours(ids)[0][..., :50261], atol=1e-4, rtol=0)
    messages = [{"role": "user", "content": "What is 3+4?"}]
    prompt = chat.prompt(messages)
    hf = AutoModelForCausalLM.from_pretrained(exported)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[
        0, len(prompt) :
    ].tolist()
    assert theirs == greedy(ours, prompt, 6)  # both stop at <|end|> or <|endoftext|>
    pipe = pipeline("text-generation", model=exported)
    reply = pipe(messages, max_new_tokens=6, do_sample=False)[0]["generated_text"][-1]
    content = AutoTokenizer.from_pretrained(exported).decode(theirs, skip_special_tokens=True)
    assert reply == {"role": "assistant", "content": content}
