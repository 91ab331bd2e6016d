"""HellaSwag scoring: batching changes nothing, the three metrics pick what they should, bad files
fail clearly."""

import contextlib
import copy
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import run, write_hellaswag

import hellaswag
from hellaswag import hellaswag_batches, hellaswag_losses, hellaswag_predictions, read_hellaswag
from train_gpt2 import GPT, GPTConfig, UserError, get_tokenizer


def hellaswag_tokens(examples, block_size):
    """hellaswag.hellaswag_tokens with GPT-2's tokenizer, as train_gpt2.py and hellaswag.py call
    it."""
    return hellaswag.hellaswag_tokens(examples, block_size, get_tokenizer())


EXACT = contextlib.nullcontext()  # fp32, no autocast


@pytest.fixture(scope="module")
def opinionated_model():
    """A small random GPT with large embeddings, so that its losses differ by whole nats between
    endings and no prediction hangs on rounding."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(25)
    return model


def reference_scores(model, examples):
    """(N, 4, 3): each ending's summed loss, loss per token and loss per character, each ending
    scored alone, one row per forward, from the full logits and plain cross-entropy."""
    enc = get_tokenizer()
    scores = []
    for example in examples:
        ctx = enc.encode(example["ctx"])
        scores.append([])
        for ending in example["endings"]:
            end = enc.encode(" " + ending)
            with torch.no_grad():
                logits, _ = model(torch.tensor([ctx + end]))
            # the positions that predict the ending
            loss = F.cross_entropy(
                logits[0, len(ctx) - 1 : -1].double(), torch.tensor(end), reduction="sum"
            ).item()
            scores[-1].append((loss, loss / len(end), loss / len(ending)))
    return torch.tensor(scores, dtype=torch.float64)


def reference_predictions(model, examples):
    return reference_scores(model, examples).argmin(dim=1)


def test_batched_equals_one_at_a_time_and_reference(tmp_path, opinionated_model):
    path = write_hellaswag(
        str(tmp_path / "h.jsonl"), 52, seed=1, ctx_words=(3, 16), ending_words=(1, 8)
    )
    examples = read_hellaswag(path)
    data = hellaswag_tokens(examples, opinionated_model.config.block_size)
    one = hellaswag_predictions(opinionated_model, data, 1, EXACT)
    batched = hellaswag_predictions(opinionated_model, data, 2048, EXACT)
    fixed = hellaswag_predictions(opinionated_model, data, 2048, EXACT, fixed_shape=True)
    assert torch.equal(one, batched) and torch.equal(one, fixed)
    assert torch.equal(batched, reference_predictions(opinionated_model, examples))
    # the metrics differ
    assert (batched[:, 0] != batched[:, 1]).any() and (batched[:, 1] != batched[:, 2]).any()


def test_packed_losses_equal_reference_losses(tmp_path):
    """The context computed once, the endings back to back in one row, padding: each ending's loss
    is still the one it has alone."""
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=96, vocab_size=50304, n_layer=2, n_head=4, n_embd=64)).eval()
    examples = read_hellaswag(
        write_hellaswag(
            str(tmp_path / "h.jsonl"), 12, seed=5, ctx_words=(2, 14), ending_words=(1, 10)
        )
    )
    data = hellaswag_tokens(examples, model.config.block_size)
    # endings of unequal lengths
    assert all(len(set(map(len, ends))) > 1 for _, ends, _ in data[:4])
    sizes = [len(ctx) + sum(map(len, ends)) for ctx, ends, _ in data]
    padded = [
        tokens.size(1) > min(sizes[i] for i in idx)
        for idx, (tokens, _, _), _ in hellaswag_batches(data, 160)
    ]
    assert len(padded) > 1 and any(padded)
    expected = reference_scores(model, examples)[:, :, 0]
    for batch_tokens, fixed_shape in ((1, False), (160, False), (160, True)):
        losses = hellaswag_losses(model, data, batch_tokens, EXACT, fixed_shape)
        torch.testing.assert_close(losses, expected, rtol=1e-4, atol=0)


class FixedLossModel(torch.nn.Module):
    """Predicts one next-token distribution everywhere, in which token t has probability
    exp(-losses[t]): every ending's loss is then known in advance. Its hidden state is a constant 1,
    which its lm_head projects to those log-probabilities. Its forward fails: scoring projects only
    the states it needs."""

    def __init__(self, losses, vocab_size=50304):
        super().__init__()
        p = torch.zeros(vocab_size, dtype=torch.float64)
        p[list(losses)] = torch.tensor(
            [math.exp(-loss) for loss in losses.values()], dtype=torch.float64
        )
        rest = p == 0
        p[rest] = (1 - p.sum()) / rest.sum()
        self.lm_head = torch.nn.Linear(1, vocab_size, bias=False).requires_grad_(False)
        self.lm_head.weight.copy_(p.log()[:, None])

    def forward(self, *args, **kwargs):
        raise AssertionError(
            "scoring asks only for the logits of the positions that predict an ending"
        )

    def hidden_states(self, idx, pos, mask):
        return torch.ones(*idx.shape, 1)


def test_each_metric_picks_its_ending():
    enc = get_tokenizer()
    # ending: (tokens it must be, loss of each) -> summed loss, loss per token, loss per character
    endings = {
        "dog": (1, 6.0),  # 6.0 (lowest), 6.0, 2.0
        "a b c d": (4, 1.7),  # 6.8, 1.7 (lowest), 0.97
        "international development": (2, 3.4),  # 6.8, 3.4, 0.27 (lowest)
        "zzzz qqqq": (None, 9.0),
    }  # worst by all three
    losses = {}
    for text, (count, loss) in endings.items():
        tokens = enc.encode(" " + text)
        assert count is None or len(tokens) == count
        losses.update({t: loss for t in tokens})
    order = list(endings)
    examples = []
    # the same endings, rotated, so indices are tested too
    for shift, label in ((0, 0), (1, 0), (2, 3), (3, 0)):
        rotated = order[shift:] + order[:shift]
        examples.append(
            {
                "ctx": "A man is sitting on a roof.",
                "endings": rotated,
                "label": label,
                "split_type": "x",
            }
        )
    data = hellaswag_tokens(examples, 64)
    for batch_tokens in (1, 4096):
        preds = hellaswag_predictions(FixedLossModel(losses), data, batch_tokens, EXACT)
        for shift, row in enumerate(preds.tolist()):
            # acc picks "dog", acc_norm "a b c d", acc_norm_harness "international development"
            assert row == [(i - shift) % 4 for i in range(3)]
    correct = preds == torch.tensor([e["label"] for e in examples])[:, None]
    assert hellaswag.accuracies(correct) == {"acc": 0.25, "acc_norm": 0.5, "acc_norm_harness": 0.0}


def test_long_context_loses_its_start():
    examples = [
        {
            "ctx": "one two three four five six seven eight",
            "endings": ["a", "b c", "d", "e"],
            "label": 0,
            "split_type": "x",
        }
    ]
    ((ctx, ends, chars),) = hellaswag_tokens(examples, block_size=5)
    assert ctx == get_tokenizer().encode(examples[0]["ctx"])[-3:] and chars == [1, 3, 1, 1]
    with pytest.raises(ValueError, match="longer than block_size"):
        hellaswag_tokens(examples, block_size=2)


def test_compiled_model_compiles_once(tmp_path, opinionated_model):
    """A fixed shape for every batch: one compile, then none for any later evaluation."""
    torch._dynamo.reset()
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    compiled = copy.deepcopy(opinionated_model)
    # as hellaswag.py does
    compiled.hidden_states = torch.compile(compiled.hidden_states, backend=counting_backend)
    examples = read_hellaswag(write_hellaswag(str(tmp_path / "h.jsonl"), 20, seed=2))
    data = hellaswag_tokens(examples, opinionated_model.config.block_size)
    first = hellaswag_predictions(compiled, data, 1024, EXACT, fixed_shape=True)
    assert len(compiles) == 1
    again = hellaswag_predictions(compiled, data, 1024, EXACT, fixed_shape=True)
    assert len(compiles) == 1
    assert torch.equal(first, again) and torch.equal(
        first, hellaswag_predictions(opinionated_model, data, 1, EXACT)
    )
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2: not valid JSON"),
        ('["a list"]', "line 2: expected a JSON object"),
        (
            '{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 1}',
            "line 2: field 'split_type' is missing",
        ),
        (
            '{"ctx": "x", "endings": ["a", "b", "c"], "label": 1, "split_type": "s"}',
            "line 2: field 'endings' should be",
        ),
        (
            '{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 4, "split_type": "s"}',
            "line 2: field 'label' should be",
        ),
        (
            '{"ctx": "", "endings": ["a", "b", "c", "d"], "label": 0, "split_type": "s"}',
            "line 2: field 'ctx' should be",
        ),
    ],
)
def test_malformed_line_names_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    write_hellaswag(str(path), 1)
    with open(path, "a") as f:
        f.write(line + "\n")
    with pytest.raises(ValueError, match=message):
        read_hellaswag(str(path))


def test_a_file_that_is_not_utf8_says_so(tmp_path):
    path = tmp_path / "latin1.jsonl"
    line = '{"ctx": "K\u00f6ln", "endings": ["a", "b", "c", "d"], "label": 0, "split_type": "s"}\n'
    path.write_bytes(line.encode("latin-1"))
    with pytest.raises(ValueError) as e:
        read_hellaswag(str(path))
    assert (
        str(e.value)
        == f"{path}: not UTF-8 text (invalid start byte); HellaSwag's jsonl is UTF-8, uncompressed"
    )


def test_reads_limit_and_string_labels(tmp_path):
    path = write_hellaswag(str(tmp_path / "h.jsonl"), 5)
    rows = [json.loads(line) for line in open(path)]
    rows[1]["label"] = "3"  # as Hugging Face's copy of the dataset stores it
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    examples = read_hellaswag(path, limit=3)
    assert len(examples) == 3 and examples[1]["label"] == 3 and examples[2] == rows[2]


def test_download_goes_through_a_temp_file(tmp_path):
    source = write_hellaswag(str(tmp_path / "source.jsonl"), 7)
    dest = str(tmp_path / "cache" / "hellaswag_val.jsonl")
    hellaswag.download("file://" + source, dest)
    assert open(dest, "rb").read() == open(source, "rb").read()
    missing = str(tmp_path / "elsewhere" / "hellaswag_val.jsonl")
    with pytest.raises(
        UserError, match=f"put hellaswag_val.jsonl at {missing} or pass --hella_data=path.jsonl"
    ):
        hellaswag.download("file://" + str(tmp_path / "no_such_file"), missing)
    assert os.listdir(tmp_path / "elsewhere") == []


def test_hf_directory_scores_as_transformers_does(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(
        GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3)
    ).eval()
    hf.save_pretrained(tmp_path / "hf")
    data = write_hellaswag(
        str(tmp_path / "h.jsonl"), 20, seed=4, ctx_words=(3, 12), ending_words=(1, 6)
    )
    out = tmp_path / "out.json"
    hellaswag.main(
        [
            f"--model={tmp_path / 'hf'}",
            f"--hella_data={data}",
            "--device=cpu",
            "--dtype=float32",
            f"--json={out}",
        ]
    )
    examples = read_hellaswag(data)
    expected = reference_predictions(lambda x: (hf(x).logits, None), examples)
    correct = expected == torch.tensor([e["label"] for e in examples])[:, None]
    results = json.load(open(out))
    assert {k: results[k] for k in ("acc", "acc_norm", "acc_norm_harness")} == hellaswag.accuracies(
        correct
    )


def test_unknown_model_is_one_line(tmp_path):
    data = write_hellaswag(str(tmp_path / "h.jsonl"), 2)
    proc = run(
        [
            sys.executable,
            "hellaswag.py",
            "--model=no/such-model",
            f"--hella_data={data}",
            "--device=cpu",
        ],
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 1 and proc.stderr.startswith(
        "error: --model=no/such-model: not a checkpoint file"
    )
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "arg, message",
    [
        (
            "--json={tmp}/afile/out.json",
            "--json={tmp}/afile/out.json: {tmp}/afile is not a directory; "
            "name a file in an existing directory",
        ),
        ("--json={tmp}", "--json={tmp}: is a directory; name a file in an existing directory"),
        (
            "--json={tmp}/nowhere/out.json",
            "--json={tmp}/nowhere/out.json: no directory {tmp}/nowhere; "
            "name a file in an existing directory",
        ),
        (
            "--hella_examples=-1",
            "--hella_examples=-1 is negative; pass 0 for the default or a positive number",
        ),
        (
            "--batch_tokens=-5",
            "--batch_tokens=-5 is negative; pass 0 for the default or a positive number",
        ),
        (
            "--model={tmp}/log/model_000099.pt",
            "--model={tmp}/log/model_000099.pt: no such file or directory; check the path",
        ),
        ("--data=x.jsonl", "--data is now --hella_data, as train_gpt2.py names it"),
        ("--limit=5", "--limit is now --hella_examples, as train_gpt2.py names it"),
    ],
    ids=[
        "json under a file",
        "json is a directory",
        "json in no directory",
        "limit",
        "batch_tokens",
        "model",
        "old --data",
        "old --limit",
    ],
)
def test_bad_arguments_are_refused_before_evaluating(tmp_path, monkeypatch, arg, message):
    (tmp_path / "afile").write_text("mine")
    monkeypatch.setattr(
        hellaswag, "evaluate", lambda args: pytest.fail("evaluated before checking the arguments")
    )
    # sys.exit(message): the message on stderr, exit status 1
    with pytest.raises(SystemExit) as exit:
        hellaswag.main(["--model=gpt2", "--hella_data=h.jsonl", arg.format(tmp=tmp_path)])
    assert exit.value.code == "error: " + message.format(tmp=tmp_path)
    assert (tmp_path / "afile").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["afile"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_failed_json_write_is_one_line_after_the_printed_results(tiny_run, tmp_path, capsys):
    data = write_hellaswag(str(tmp_path / "h.jsonl"), 4)
    with pytest.raises(SystemExit) as exit:
        hellaswag.main(
            [
                f"--model={tiny_run.checkpoint}",
                f"--hella_data={data}",
                "--device=cpu",
                "--json=/dev/full",
            ]
        )
    assert (
        exit.value.code
        == "error: cannot write --json=/dev/full ([Errno 28] No space left on device); "
        "the results are printed above"
    )
    assert capsys.readouterr().out.startswith(f"HellaSwag: 4 examples of {data}")
