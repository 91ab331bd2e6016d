"""Decoding speed on a CPU: llama.cpp on export_gguf.py's GGUFs against inference.generate, on the
same weights, in one process.

    flock /tmp/bench.lock python bench/llamacpp_decode.py            # GPT-2 124M's shape
    python bench/llamacpp_decode.py --dry-run                         # tiny shapes, seconds

A GPT of 124M's shape with random weights (seed 0) is exported as f32, f16 and q8_0 GGUFs. Each
decoder continues a 16-token prompt greedily for 128 new tokens, at batch 1 and at batch 8: 8 copies
of the prompt decoded together, one llama_batch of 8 sequences a step through llama.cpp's C API (as
llama-cpp-python exposes it), and generate(num_samples=8) for ours. Ours runs in float32, and with
bf16 weights where the CPU has native bf16 (serve.py's default there). A run's time covers the
prompt and every new token: tokens/s = batch x 128 / time. Both sides use torch.get_num_threads()
threads; llama.cpp keeps its defaults otherwise (f16 KV cache, flash attention where it chooses).
The decoders run in turn, --rounds times, and each reports its best round: the machine may be
shared, and the best round is the one least disturbed. A last column says for how many of the
batch-1 tokens a decoder agreed with ours in float32.
"""
import argparse
import copy
import ctypes
import functools
import logging
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from export_gguf import export_gguf  # noqa: E402
from inference import generate, hold_for_inference  # noqa: E402
from train_gpt2 import GPT, GPTConfig, get_tokenizer, native_bf16  # noqa: E402

PROMPT = ("The quick brown fox jumps over the lazy dog, and then it runs far away into the forest "
          "where nobody")


class LlamaCpp:
    """One GGUF loaded by llama.cpp, with a context for `batch` sequences; greedy(prompt, new) gives
    each sequence's new tokens, decoded one llama_batch a step."""

    def __init__(self, path, batch, threads, n_ctx):
        import llama_cpp as lc
        self.lc, self.batch = lc, batch
        self.model = lc.llama_model_load_from_file(path.encode(), lc.llama_model_default_params())
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx * batch
        params.n_batch = n_ctx * batch
        params.n_seq_max = batch
        params.n_threads = params.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, params)
        assert self.model and self.ctx, f"llama.cpp could not load {path}"
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.lb = lc.llama_batch_init(n_ctx * batch, 0, batch)

    def decode(self, rows):
        """rows: (token, position, sequence, wants logits), one llama_decode call."""
        lb = self.lb
        lb.n_tokens = len(rows)
        for i, (token, pos, seq, wants) in enumerate(rows):
            lb.token[i] = token
            lb.pos[i] = pos
            lb.n_seq_id[i] = 1
            lb.logits[i] = wants
            lb.seq_id[i][0] = seq
        assert self.lc.llama_decode(self.ctx, lb) == 0, "llama_decode failed"

    def argmax(self, row):
        logits = self.lc.llama_get_logits_ith(self.ctx, row)
        return int(np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)),
                                         shape=(self.n_vocab,)).argmax())

    def greedy(self, prompt, new):
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        n, seqs = len(prompt), range(self.batch)
        self.decode([(t, p, s, p == n - 1) for s in seqs for p, t in enumerate(prompt)])
        out = [[self.argmax(s * n + n - 1)] for s in seqs]  # the output rows: each prompt's last
        for step in range(1, new):
            self.decode([(out[s][-1], n + step - 1, s, True) for s in seqs])
            for s in seqs:
                out[s].append(self.argmax(s))
        return out

    def close(self):
        self.lc.llama_batch_free(self.lb)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def ours(model, batch, prompt, new):
    return generate(model, prompt, new, num_samples=batch, stop=None, temperature=0)


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines()
                 if line.startswith("Model name")), "unknown CPU")


def agreed(tokens, reference):
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(reference))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes and one round: seconds")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    import llama_cpp
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # what llama.cpp logs
    llama_cpp.llama_backend_init()

    shape = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)
    new = 128
    rounds = args.rounds
    batches = (1, 8)
    if args.dry_run:
        shape = dict(n_layer=2, n_head=2, n_embd=64, block_size=64)
        new = 16
        rounds = 1
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50304, **shape)).eval()
    prompt = get_tokenizer().encode(PROMPT)[:16]
    threads = torch.get_num_threads()
    print(f"# {cpu_name()}, {threads} threads, load average {os.getloadavg()[0]:.1f} at the start")

    dtypes = {"float32": torch.float32}
    if native_bf16("cpu"):  # else bf16 is emulated, slower than float32
        dtypes["bf16 weights"] = torch.bfloat16
    decoders = {}  # name -> {batch: a function of (prompt, new) giving each sequence's new tokens}
    for label, dtype in dtypes.items():
        held = hold_for_inference(copy.deepcopy(model), dtype)
        decoders[f"ours, {label}"] = {b: functools.partial(ours, held, b) for b in batches}
    llamas = []
    tmp = tempfile.TemporaryDirectory()
    for outtype in ("f32", "f16", "q8_0"):
        path = os.path.join(tmp.name, f"model-{outtype}.gguf")
        export_gguf(model, path, outtype)
        loaded = {b: LlamaCpp(path, b, threads, len(prompt) + new) for b in batches}
        decoders[f"llama.cpp, {outtype}"] = {b: llama.greedy for b, llama in loaded.items()}
        llamas += loaded.values()

    best, tokens = {}, {}
    with torch.no_grad():
        for _ in range(rounds):
            for name, decoder in decoders.items():
                for b in batches:
                    t0 = time.perf_counter()
                    out = decoder[b](prompt, new)
                    seconds = time.perf_counter() - t0
                    assert all(len(row) == new for row in out)
                    best[name, b] = min(best.get((name, b), seconds), seconds)
                    tokens[name] = out[0]
    reference = tokens["ours, float32"]
    base = "ours, bf16 weights" if "ours, bf16 weights" in decoders else "ours, float32"
    print(f"# {new} new tokens after {len(prompt)}, greedy, best of {rounds}; load average "
          f"{os.getloadavg()[0]:.1f} at the end\n")
    print(f"| decoder | batch 1, tokens/s | vs {base} | batch 8, tokens/s | vs {base} "
          f"| batch-1 tokens equal to ours, float32 |")
    print("|---|---|---|---|---|---|")
    for name in decoders:
        cells = []
        for b in batches:
            speed = b * new / best[name, b]
            cells += [f"{speed:.1f}", f"{best[base, b] / best[name, b]:.2f}x"]
        print(f"| {name} | {' | '.join(cells)} | {agreed(tokens[name], reference)}/{new} |")
    for llama in llamas:
        llama.close()
    tmp.cleanup()


if __name__ == "__main__":
    main()
