"""EleutherAI's lm-evaluation-harness through serve.py: the real `lm_eval` CLI, `--model
local-completions`, scores a multiple-choice task written here as `--model hf` scores the model's
Hugging Face export, and its generate_until text is inference.generate's; serve.py's scoring packs
many texts into few forwards and matches a plain forward.

Offline: the tasks are local jsonl files under a task YAML (--include_path), the model a tiny random
checkpoint."""

import glob
import json
import os
import random
import sys

import pytest
import torch
from conftest import ROOT, run, start_server

import inference
from hellaswag import pack_windows, row_length
from inference import generate, score
from train_gpt2 import EOT, get_tokenizer, load_model

torch.set_num_threads(1)
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
WORDS = (
    "the a man woman dog ball kitchen knife water slowly quickly then runs jumps holds shows "
    "camera guitar"
).split()
CHOICE_TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/choice.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: query
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""
GEN_TASK = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: query
doc_to_target: answer
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A directory of two tasks: tiny_choice, 10 four-way questions, one with a context longer than
    the model's block_size (64), and tiny_gen, 4 prompts to continue greedily."""
    d = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)

    def words(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    with open(d / "choice.jsonl", "w") as f:
        for i in range(10):
            doc = {
                "query": words(90, 90) if i == 3 else words(4, 20),
                "choices": [words(1, 6) for _ in range(4)],
                "label": rng.randrange(4),
            }
            f.write(json.dumps(doc) + "\n")
    with open(d / "gen.jsonl", "w") as f:
        for _ in range(4):
            f.write(json.dumps({"query": words(3, 12), "answer": "x"}) + "\n")
    (d / "tiny_choice.yaml").write_text(CHOICE_TASK.format(dir=d))
    (d / "tiny_gen.yaml").write_text(GEN_TASK.format(dir=d))
    return d


def lm_eval(tasks, out, *args):
    """Runs the lm_eval CLI on the tasks directory's tasks, offline, logging each sample; its
    per-task samples {name: {doc_id: sample}} and its stderr."""
    result = run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            *args,
            "--include_path",
            str(tasks),
            "--log_samples",
            "--output_path",
            str(out),
        ],
        env=OFFLINE,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    samples = {}
    for path in glob.glob(f"{out}/**/samples_*.jsonl", recursive=True):
        name = os.path.basename(path).split("_20")[0].removeprefix("samples_")
        samples[name] = {s["doc_id"]: s for s in map(json.loads, open(path))}
    return samples, result.stderr


@pytest.fixture(scope="module")
def served(serve_run, tasks, tmp_path_factory):
    """lm-eval's local-completions against serve.py serving the checkpoint file (no Hugging Face
    directory), by the bare command: base_url and nothing else, so lm-eval finds the tokenizer on
    the server; batch_size 8 from the CLI, so that a request carries several prompts."""
    tmp = tmp_path_factory.mktemp("served")
    proc, url = start_server(serve_run.checkpoint, tmp / "log")
    try:
        yield lm_eval(
            tasks,
            tmp / "out",
            "--model",
            "local-completions",
            "--model_args",
            f"base_url={url}/v1/completions",
            "--tasks",
            "tiny_choice,tiny_gen",
            "--batch_size",
            "8",
        )
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_bare_command_finds_the_tokenizer_on_the_server(served):
    assert "Auto-detected remote tokenizer support" in served[1]


def test_choice_loglikelihoods_equal_the_hf_backends_on_the_export(
    served, serve_run, tasks, tmp_path
):
    export = tmp_path / "export"
    result = run(
        [
            sys.executable,
            f"{ROOT}/export_hf.py",
            f"--model={serve_run.checkpoint}",
            f"--out={export}",
        ]
    )
    assert result.returncode == 0, result.stderr
    hf, _ = lm_eval(
        tasks,
        tmp_path / "out",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={export},dtype=float32",
        "--device",
        "cpu",
        "--tasks",
        "tiny_choice",
    )
    ours, theirs = served[0]["tiny_choice"], hf["tiny_choice"]
    assert sorted(ours) == sorted(theirs) == list(range(10))
    for doc_id, sample in ours.items():
        mine = [(float(lp), greedy) for ((lp, greedy),) in sample["resps"]]
        ref = [(float(lp), greedy) for ((lp, greedy),) in theirs[doc_id]["resps"]]
        assert [g for _, g in mine] == [g for _, g in ref]
        assert max(abs(a - b) for (a, _), (b, _) in zip(mine, ref)) < 1e-4, (doc_id, mine, ref)
        assert (sample["acc"], sample["acc_norm"]) == (
            theirs[doc_id]["acc"],
            theirs[doc_id]["acc_norm"],
        )
    assert len(get_tokenizer().encode(ours[3]["doc"]["query"])) > 64  # the crop matched too


def test_generate_until_text_is_greedy_generates(served, serve_run):
    model, enc = load_model(serve_run.checkpoint), get_tokenizer()
    samples = served[0]["tiny_gen"]
    assert len(samples) == 4
    for sample in samples.values():
        context = sample["arguments"]["gen_args_0"]["arg_0"]
        text = enc.decode(generate(model, enc.encode(context), 16, temperature=0)[0]).split("\n\n")[
            0
        ]
        assert sample["resps"] == [[text]]


def test_scoring_packs_texts_into_few_forwards_and_matches_a_plain_forward(serve_run, monkeypatch):
    model = load_model(serve_run.checkpoint).eval()
    rng = random.Random(1)
    contexts = [[rng.randrange(EOT + 1) for _ in range(rng.randint(1, 40))] for _ in range(10)]
    windows = [
        (c + [rng.randrange(EOT + 1) for _ in range(rng.randint(0, 20))])[:64]
        for c in contexts
        for _ in "1234"
    ]
    windows = [
        (w, rng.randint(1, len(w)), rng.choice([None, rng.randrange(EOT + 1)])) for w in windows
    ]
    windows.append((contexts[0][:3], 1, None))  # a start of other windows, read off them
    forwards = []
    hidden_states = model.hidden_states
    monkeypatch.setattr(
        model, "hidden_states", lambda *a: forwards.append(a[0].shape) or hidden_states(*a)
    )
    results = score(model, windows, top=2)
    assert len(forwards) == 1  # 41 texts, one forward
    # their shared starts computed once
    assert forwards[0].numel() < 0.8 * sum(len(w) for w, _, _ in windows)
    # at most 4 rows of 64 a forward: the same scores
    monkeypatch.setattr(inference, "SCORE_TOKENS", 64 * 4)
    again = score(model, windows)
    assert len(forwards) > 2 and all(
        a[0] == pytest.approx(b[0], abs=1e-5) for a, b in zip(again, results)
    )
    for (tokens, first, nxt), (lps, tops, last) in zip(windows, results):
        with torch.no_grad():
            logits = model(torch.tensor([tokens]))[0][0, :, : EOT + 1]
        ref = logits.log_softmax(dim=-1)
        targets = tokens[first:] + ([] if nxt is None else [nxt])
        want = [ref[first - 1 + k, t].item() for k, t in enumerate(targets)]
        assert (
            len(lps) == len(want) and max([abs(a - b) for a, b in zip(lps, want)], default=0) < 1e-5
        )
        for k, (ids, values) in enumerate(tops):
            best = ref[first - 1 + k].topk(2)
            assert ids == best.indices.tolist() and values == pytest.approx(
                best.values.tolist(), abs=1e-5
            )
        assert (last is None) == (nxt is not None)
        if last is not None:
            assert (last - logits[-1]).abs().max() < 1e-4


def test_unrelated_texts_take_no_more_positions_than_a_padded_row_each():
    """lm-eval sends a request's texts sorted by length, mostly unrelated: packing them into rows as
    long as the longest group filled those rows unevenly (30% more positions than plain padded rows
    on a HellaSwag-like batch)."""
    rng = random.Random(2)
    # as English does, many start with the same word ("The ..."): a start of one token, shared
    texts = sorted(
        (
            [rng.choice((464, 32))] + [rng.randrange(EOT + 1) for _ in range(rng.randint(40, 80))]
            for _ in range(16)
        ),
        key=len,
    )
    rows = pack_windows(texts, 256)
    assert len(rows) * max(row_length(texts, row) for row in rows) <= 16 * max(map(len, texts))
    shared = [texts[0][:30] + t[:20] for t in texts[:4]]  # a context and four endings: still shared
    rows = pack_windows(shared, 256)
    assert len(rows) * max(row_length(shared, row) for row in rows) <= 30 + 4 * 20  # not 4 x 50
