"""Shared fixtures: tiny random shards and a tiny, exact (fp32, uncompiled) training configuration;
subprocesses that can never outlive their test."""

import http.client
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# `torchrun --standalone`, run by the interpreter running the tests: what every multi-rank test
# launches, followed by its --nproc_per_node and the script
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]

# A model small enough that a step takes milliseconds on CPU, trained in float32 so runs are exact.
TINY = [
    "--B=4",
    "--T=32",
    "--total_batch_size=256",
    "--n_layer=2",
    "--n_head=2",
    "--n_embd=32",
    "--vocab_size=512",
    "--block_size=64",
    "--warmup_steps=2",
    "--max_steps=8",
    "--eval_interval=4",
    "--checkpoint_interval=4",
    "--eval_tokens=512",
    "--compile=False",
    "--dtype=float32",
    # hermetic: no HellaSwag file a user downloaded
    "--sample_count=0",
    "--device=cpu",
    "--hella_data=",
]


def write_shards(data_dir, sizes, vocab=500, seed=0, prefix="tiny"):
    """Shards of random uint16 tokens: sizes[0] is the val shard, the rest are train shards."""
    os.makedirs(data_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, n in enumerate(sizes):
        split = "val" if i == 0 else "train"
        path = os.path.join(data_dir, f"{prefix}_{split}_{i:06d}.npy")
        np.save(path, rng.integers(0, vocab, n).astype(np.uint16))
        paths.append(path)
    return paths


# Every process a test starts carries MARK in its environment, and so does everything it starts in
# turn. torchrun gives each worker a session of its own, and an orphaned worker leaves the tree, so
# neither a process group nor the process tree finds them all; the mark does.
MARK = "GPT2_TEST_PROCESS"
_marks = itertools.count()


def new_mark():
    return f"{os.getpid()}-{next(_marks)}"


def kill_marked(mark):
    """SIGKILLs every process whose environment carries MARK=mark (a prefix: one test's, or the
    whole session's)."""
    needle = f"{MARK}={mark}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                marked = any(v.startswith(needle) for v in f.read().split(b"\0"))
            if marked and int(pid) != os.getpid():
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):  # gone already, or not ours to read
            pass


def spawn(args, env=None, **kw):
    """subprocess.Popen with the project's thread count and a mark of its own: stop() it, or the
    session's end kills it and all it started."""
    mark = new_mark()
    proc = subprocess.Popen(
        args, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {}), MARK: mark}, **kw
    )
    proc.mark = mark
    return proc


def stop(proc):
    """Kills proc and every process it started; waits for proc."""
    kill_marked(proc.mark)
    proc.wait(timeout=60)


@pytest.fixture(autouse=True, scope="session")
def _no_process_outlives_the_tests():
    yield
    kill_marked(f"{os.getpid()}-")


def run(args, cwd=None, timeout=600, env=None, **popen):
    """Runs a command with the project's interpreter; returns the CompletedProcess (text output).
    Whatever happens, no process it started is left when it returns; past timeout they are all
    killed and TimeoutExpired is raised, so a hang is a failure, never a stuck suite."""
    proc = spawn(
        args,
        env=env,
        cwd=cwd or ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **popen,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_marked(proc.mark)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(args, timeout, out, err) from None
    finally:
        kill_marked(proc.mark)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def train(args, **kw):
    return run([sys.executable, os.path.join(ROOT, "train_gpt2.py"), *args], **kw)


def finished_run(tmp_path_factory, name, args):
    """The log_dir of a train_gpt2.py run with args, made in a fresh temp directory, that must
    finish."""
    log_dir = str(tmp_path_factory.mktemp(name))
    r = train([*args, f"--log_dir={log_dir}"])
    assert r.returncode == 0, r.stderr
    return log_dir


def read_log(log_dir):
    """(the run record as a dict, the step lines) of log_dir/log.txt: the one place tests parse a
    log."""
    with open(os.path.join(log_dir, "log.txt")) as f:
        lines = f.readlines()
    assert lines[0].startswith("# train_gpt2.py run {"), lines[0]
    return json.loads(lines[0].split(" run ", 1)[1]), [line for line in lines if line[:1].isdigit()]


def train_losses(log_dir, kind="train"):
    """{step: loss} of one kind of line in log_dir/log.txt."""
    rows = [line.split() for line in read_log(log_dir)[1]]
    return {int(r[0]): float(r[2]) for r in rows if r[1] == kind}


@pytest.fixture
def shards(tmp_path):
    data_dir = tmp_path / "data"
    write_shards(str(data_dir), [4000, 5000, 3000, 4100])
    return str(data_dir)


WORDS = (
    "the a man woman dog ball kitchen knife water slowly quickly then runs jumps holds shows "
    "camera guitar plays into over under bowl paint wall car wheel rope climbs rock snow ski board "
    "hair brush lemon cuts table smiles talks begins continues finally picks puts down up out café "
    "naïve"
).split()


def write_hellaswag(path, n, seed=0, ctx_words=(5, 40), ending_words=(1, 15)):
    """n random examples in HellaSwag's real jsonl format (the val file's fields), endings of varied
    lengths."""
    rng = np.random.default_rng(seed)

    def words(lo, hi):
        return " ".join(rng.choice(WORDS, rng.integers(lo, hi + 1)))

    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            ctx_a, ctx_b = words(ctx_words[0], ctx_words[1] // 2), words(1, ctx_words[1] // 2)
            f.write(
                json.dumps(
                    {
                        "ind": 24 + i,
                        "activity_label": words(1, 3),
                        "ctx_a": ctx_a,
                        "ctx_b": ctx_b,
                        "ctx": f"{ctx_a} {ctx_b}",
                        "split": "val",
                        "split_type": ("indomain", "zeroshot")[i % 2],
                        "label": int(rng.integers(4)),
                        "endings": [words(*ending_words) for _ in range(4)],
                        "source_id": f"activitynet~v_{i:05d}",
                    }
                )
                + "\n"
            )
    return path


ARITHMETIC_QUESTIONS = (
    "What is {a}+{b}?",
    "What is {a} plus {b}?",
    "Compute {a} + {b}.",
    "{a}+{b}=?",
)


def arithmetic_chats(n, seed=0, phrasings=ARITHMETIC_QUESTIONS):
    """n conversations in the hub's chat format teaching single-digit addition ("What is 3+4?" ->
    "7"): each asks one to three sums (later ones are follow-up turns) in one of `phrasings`, a
    third of them after a system message."""
    rng = np.random.default_rng(seed)
    chats = []
    for i in range(n):
        messages = [{"role": "system", "content": "You are a calculator."}] if i % 3 == 0 else []
        for _ in range(int(rng.integers(1, 4))):
            a, b = (int(v) for v in rng.integers(0, 10, 2))
            messages += [
                {"role": "user", "content": str(rng.choice(phrasings)).format(a=a, b=b)},
                {"role": "assistant", "content": str(a + b)},
            ]
        chats.append({"messages": messages})
    return chats


def write_arithmetic_chats(path, n, seed=0, phrasings=ARITHMETIC_QUESTIONS):
    """arithmetic_chats as a chats.jsonl file, one {"messages": [...]} row a line, for
    prepare_fineweb.py --data_files; returns path."""
    with open(path, "w") as f:
        f.writelines(json.dumps(chat) + "\n" for chat in arithmetic_chats(n, seed, phrasings))
    return str(path)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny model trained 8 steps with GPT-2's padded vocabulary, so that every real token id
    exists; .checkpoint is its final checkpoint, .stdout the run's output (with 2 in-training
    samples)."""
    root = tmp_path_factory.mktemp("tiny_run")
    write_shards(str(root / "data"), [4000, 5000])
    log_dir = root / "log"
    result = train(
        [
            *TINY,
            "--vocab_size=50304",
            "--sample_count=2",
            "--max_new_tokens=8",
            "--hella_data=",
            f"--data_dir={root / 'data'}",
            f"--log_dir={log_dir}",
        ]
    )
    assert result.returncode == 0, result.stderr
    return types.SimpleNamespace(checkpoint=str(log_dir / "model_000008.pt"), stdout=result.stdout)


def tiny_model(block_size=16, vocab_size=64, seed=0, chat=False):
    """A 2-layer, 32-wide GPT in eval mode with its weights scaled 4x: a random init gives
    near-uniform logits, and sharper ones make greedy paths vary, so that decoders that differ give
    different tokens."""
    import torch

    from train_gpt2 import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(
        GPTConfig(
            block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32, chat=chat
        )
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    return model


def hf_gpt2(path, n_positions=96, n_embd=40, n_layer=2, n_head=5, seed=0):
    """A random transformers GPT2LMHeadModel of GPT-2's vocabulary saved with save_pretrained at
    path, standing in for the hub's gpt2, which this machine cannot download; returned in eval
    mode."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=50257, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head
        )
    )
    hf.save_pretrained(path)
    return hf.eval()  # built in training mode, with GPT-2's dropout


@pytest.fixture(scope="session")
def serve_run(tmp_path_factory):
    """A run directory as serve.py takes it: a tiny random GPT (GPT-2's padded vocabulary,
    block_size 64, weights sharpened so that greedy text varies) saved as its checkpoint
    model_000001.pt, and a newer model_000002.pt cut short, which loading skips with a warning."""
    import torch

    from train_gpt2 import MODEL_KEYS

    model = tiny_model(block_size=64, vocab_size=50304)
    run_dir = tmp_path_factory.mktemp("serve_run")
    torch.save(
        {"model": model.state_dict(), "config": {k: getattr(model.config, k) for k in MODEL_KEYS}},
        run_dir / "model_000001.pt",
    )
    (run_dir / "model_000002.pt").write_bytes((run_dir / "model_000001.pt").read_bytes()[:1000])
    return types.SimpleNamespace(dir=str(run_dir), checkpoint=str(run_dir / "model_000001.pt"))


def start_server(model, log_path, *args):
    """serve.py on a free port of 127.0.0.1, started as a user would; (the process, its base
    URL)."""
    log = open(log_path, "w")
    proc = spawn(
        [
            sys.executable,
            f"{ROOT}/serve.py",
            f"--model={model}",
            "--port=0",
            "--device=cpu",
            "--dtype=float32",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("serving "), open(log_path).read()
    return proc, re.search(r"http://127\.0\.0\.1:\d+", line)[0]


def request(url, method, path, body=None, headers=None):
    """(status, parsed JSON body) of one raw HTTP request to serve.py, for what the openai client
    would never send; headers may replace Host."""
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    status, data = response.status, json.loads(response.read())
    conn.close()
    return status, data


def health(server):
    return request(server.url, "GET", "/health")[1]


def wait_for(condition, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
