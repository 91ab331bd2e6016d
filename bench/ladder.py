"""The speed-up ladder: build-nanogpt's speed-ups one by one, each timed against the one before it.

    python bench/ladder.py                # a small GPT on this machine (minutes on 2 cores)
    python bench/ladder.py --preset=gpt2  # GPT-2 124M at B=16, T=1024: for a GPU
    python bench/ladder.py --dry-run      # tiny shapes, one timed step: checks the script itself

Each rung keeps the ones before it and adds one thing:
  1. float32, the baseline: hand-written attention, the loss from full logits, AdamW unfused;
  2. TF32 matmuls (CUDA only: fp32 inputs on tensor cores, 10 bits of mantissa in the multiply);
  3. bf16 autocast (matmuls in bfloat16; weights, gradients and AdamW in fp32);
  4. flash attention: F.scaled_dot_product_attention for the (T, T) scores written out;
  5. torch.compile (the elementwise work between the matmuls fused into fewer kernels);
  6. the padded vocabulary, 50257 -> 50304 (a multiple of 128, which matmul kernels tile evenly);
  7. fused AdamW (one kernel updates every parameter);
  8. this project's fused loss (train_gpt2.LinearCrossEntropy: never all B*T x vocab logits).

A step the device cannot take is a row that says why (TF32 on a CPU, a compile that fails); the
rungs after it go on without it, and "x previous" compares with the last rung that ran. Every rung
is train_gpt2.GPT of one seed, stepped by train_gpt2.train_step (clip 1.0; AdamW's groups from
train_gpt2.AdamW) on the same random batches. Only two pieces are the ladder's own: the
hand-written attention (HandAttention) and the unfused loss (UnfusedLoss); tests/test_ladder.py
checks that they give the numbers of what replaces them. The padded model is the unpadded one with
zero rows added (GPT.resize_vocab), so every rung computes the same loss: the table's "loss" is each
rung's first step's. The rungs take turns, one step each, until each has --steps timed steps, and
each counts its median, so that a machine busy with other work slows all rungs alike; the load
average before and after is printed under the table (above the core count, other work shared the
cores: trust the ratios more than the rates). build-nanogpt compiles before it swaps in flash
attention; here flash attention comes first, so the compile rung shows what compiling adds to a
model that has it. --dry-run compiles with the aot_eager backend (the graph is captured and split
into forward and backward as for inductor, but no kernel is generated): a cold inductor compile
takes minutes on 2 cores.
"""
import argparse
import functools
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
from train_throughput import SyntheticLoader  # noqa: E402

import train_gpt2 as tg  # noqa: E402

# The shapes: the default takes a few minutes on a 2-core CPU; --preset=gpt2 is GPT-2 124M.
SHAPES = {"": dict(n_layer=4, n_head=4, n_embd=256, B=4, T=256, warmup=1, steps=5),
          "gpt2": dict(n_layer=12, n_head=12, n_embd=768, B=16, T=1024, warmup=3, steps=10),
          "dry-run": dict(n_layer=2, n_head=2, n_embd=64, B=2, T=32, warmup=1, steps=1)}
PADDED_VOCAB = 50304  # train_gpt2's vocab_size: GPT-2's 50257 rounded up to a multiple of 128
SETTINGS = tg.Settings()  # what train_step and AdamW read: grad_clip 1.0, max_lr, weight_decay

# The baseline's recipe, and each rung: its name in the table and what it changes in the last one's.
BASELINE = dict(tf32=False, bf16=False, flash=False, compile=False, vocab_size=tg.EOT + 1,
                fused_adamw=False, fused_loss=False)
RUNGS = [("float32", {}),
         ("TF32 matmuls", dict(tf32=True)),
         ("bf16 autocast", dict(bf16=True)),
         ("flash attention (SDPA)", dict(flash=True)),
         ("torch.compile", dict(compile=True)),
         (f"padded vocab {PADDED_VOCAB}", dict(vocab_size=PADDED_VOCAB)),
         ("fused AdamW", dict(fused_adamw=True)),
         ("fused loss", dict(fused_loss=True))]


class HandAttention(tg.CausalSelfAttention):
    """Causal self-attention written out, as GPT-2's code and nanoGPT's slow path have it: the
    (T, T) scores, the causal mask, softmax, then the weighted sum of the values. Flash attention
    gives the same numbers in tiles, never holding the scores. Training only: no KV cache, no mask,
    no dropout (the ladder's models have none)."""

    def forward(self, x, cache=None, mask=None):
        if cache is not None or mask is not None:
            raise ValueError("HandAttention trains only: no KV cache, no mask")
        Bsz, Tlen, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(Bsz, Tlen, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in (q, k, v))  # each (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
        causal = torch.ones(Tlen, Tlen, dtype=torch.bool, device=x.device).tril()
        att = F.softmax(att.masked_fill(~causal, float("-inf")), dim=-1)  # never a later position
        y = (att @ v).transpose(1, 2).contiguous().view(Bsz, Tlen, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


def hand_written_attention(model):
    """model with each block's attention replaced by a HandAttention holding the same weights."""
    for block in model.transformer.h:
        hand = HandAttention(model.config).to(next(block.parameters()).device)
        hand.load_state_dict(block.attn.state_dict())
        block.attn = hand
    return model


class UnfusedLoss(nn.Module):
    """The loss as build-nanogpt computes it: the model's (B, T, vocab) logits, then
    F.cross_entropy over the real tokens' columns (train_gpt2's gives padding no probability)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        logits, _ = self.model(idx)
        logits = logits[..., :self.model.config.real_tokens]
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class UnfusedAdamW(tg.ScheduledLR, torch.optim.AdamW):
    """torch's AdamW with train_gpt2's set_lr, which train_step calls."""


def adamw(model, fused, device_type):
    """train_gpt2.AdamW (weight decay on the matrices only; its betas, eps and lr), with PyTorch's
    fused kernel, or with its default: a loop over the parameters (foreach on CUDA)."""
    built = tg.AdamW(model, SETTINGS, device_type)
    if fused:
        return built
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
              for g in built.param_groups]
    return UnfusedAdamW(groups, lr=SETTINGS.max_lr, betas=built.defaults["betas"],
                        eps=built.defaults["eps"], fused=False)


def why_not(change, device):
    """Why this device cannot take the rung that makes change, or None if it can."""
    device_type = device.split(":")[0]
    if change.get("tf32") and device_type != "cuda":
        return f"TF32 is a mode of NVIDIA's tensor cores (Ampere on); a {device_type} has none"
    if change.get("tf32") and torch.cuda.get_device_capability(device) < (8, 0):
        return "TF32 needs an Ampere or later GPU (compute capability 8.0)"
    if change.get("compile") and device_type == "mps":
        return "no torch.compile on mps (train_gpt2 runs eagerly there too)"
    if change.get("fused_adamw") and not tg.use_fused_adamw(device_type):
        return f"PyTorch has no fused AdamW on {device_type}"
    return None


def bf16_note(device_type):
    """The bf16 rung's note: whether this device multiplies bf16 in hardware or emulates it."""
    if tg.native_bf16(device_type):
        return "native bf16"
    return "emulated: no native bf16 on this device, so expect it slower"


class Rung:
    """One rung, built: train_gpt2's model and step as recipe asks, on shape's random batches.
    change: what this rung added to the one before it."""

    def __init__(self, change, recipe, shape, device):
        self.change = change  # what this rung added to the one before it
        self.recipe = recipe  # what it is: BASELINE's keys
        self.device = device
        device_type = device.split(":")[0]
        torch.manual_seed(0)
        config = tg.GPTConfig(block_size=shape["T"], vocab_size=tg.EOT + 1,
                              n_layer=shape["n_layer"], n_head=shape["n_head"],
                              n_embd=shape["n_embd"])
        model = tg.GPT(config).to(device)
        if recipe["vocab_size"] != config.vocab_size:  # zero rows: the same model, the same loss
            model.resize_vocab(recipe["vocab_size"])
        if not recipe["flash"]:
            hand_written_attention(model)
        self.model = model
        trained = model if recipe["fused_loss"] else UnfusedLoss(model)
        if recipe["compile"]:  # static shapes: the padded vocabulary must not become symbolic
            trained = torch.compile(trained, dynamic=False, backend=shape["backend"])
        dtype = "bfloat16" if recipe["bf16"] else "float32"
        loader = SyntheticLoader(shape["B"], shape["T"], tg.EOT + 1)  # GPT-2's ids; the rest pad
        loader.batches = [b.to(device) for b in loader.batches]
        self.run = tg.Run(SETTINGS, device=device, trained=trained, train_loader=loader,
                          optimizer=adamw(model, recipe["fused_adamw"], device_type),
                          autocast=tg.autocast_context(device_type, dtype),
                          scaler=tg.grad_scaler(device_type, dtype))
        self.tokens = shape["B"] * shape["T"]
        self.times = []  # seconds of each timed step
        self.loss = None  # its first step's
        self.warmup = None  # seconds of its warm-up steps, compiling included

    def step(self):
        """Seconds of one train_step, TF32 as this rung has it (a global the rungs share)."""
        if self.device.startswith("cuda"):
            torch.set_float32_matmul_precision("high" if self.recipe["tf32"] else "highest")
        t0 = time.perf_counter()
        loss, _ = tg.train_step(self.run, SETTINGS.max_lr)
        took = time.perf_counter() - t0
        if self.loss is None:
            self.loss = loss
        return took

    def rate(self):
        """Tokens per second at the median timed step."""
        return self.tokens / statistics.median(self.times)


def climb(shape, device, log=print):
    """Builds and warms up each rung in turn (a compile that fails is a skip: the rungs after it go
    on without it); then the rungs take turns, a timed step each, shape's steps times over.
    Returns [(name, Rung or why it was skipped)]."""
    recipe, ladder = dict(BASELINE), []
    for name, change in RUNGS:
        reason = why_not(change, device)
        if reason is None:
            try:
                rung = Rung(change, {**recipe, **change}, shape, device)
                t0 = time.perf_counter()
                for _ in range(shape["warmup"]):
                    rung.step()
                rung.warmup = time.perf_counter() - t0
            except Exception as e:  # no C++ compiler, no Triton, an op inductor cannot lower
                if not change.get("compile"):
                    raise
                line = next((s for s in str(e).splitlines() if s.strip()), "")
                reason = f"torch.compile failed ({type(e).__name__}: {line[:120]})"
        if reason is not None:
            log(f"{name}: skipped, {reason}")
            ladder.append((name, reason))
            continue
        log(f"{name}: built and warmed up in {rung.warmup:.1f} s")
        recipe = rung.recipe
        ladder.append((name, rung))
    ran = [rung for _, rung in ladder if isinstance(rung, Rung)]
    for i in range(shape["steps"]):
        for rung in ran:
            rung.times.append(rung.step())
        log(f"timed step {i + 1} of {shape['steps']} of every rung")
    return ladder


def table(ladder, shape, device):
    """The ladder as a markdown table: tokens/s, x the last rung that ran, x float32, a note."""
    lines = ["| rung | tokens/s | x previous | x float32 | loss | note |",
             "|---|---|---|---|---|---|"]
    previous, first = None, None
    for name, rung in ladder:
        if not isinstance(rung, Rung):
            lines.append(f"| {name} | skipped | | | | {rung} |")
            continue
        rate = rung.rate()
        first = first or rate
        step_up = f"{rate / previous:.2f}x" if previous else ""
        note = ""
        if "bf16" in rung.change:
            note = bf16_note(device.split(":")[0])
        if "compile" in rung.change:
            note = f"{shape['backend']}; its warm-up, compiling, took {rung.warmup:.0f} s"
        lines.append(f"| {name} | {rate:,.0f} | {step_up} | {rate / first:.2f}x | "
                     f"{rung.loss:.4f} | {note} |")
        previous = rate
    return "\n".join(lines)


def cpu_name():
    """The CPU's model name as lscpu prints it (from /proc/cpuinfo), or the machine's kind."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else os.uname().machine


def load_average():
    """The last minute's load average (os.getloadavg), or "n/a" where the system has none."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


def parse_args(argv):
    """(shape, device asked for): the preset's shape (or the default's), with the flags given."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=["gpt2"], help="gpt2: GPT-2 124M at B=16, T=1024 (a GPU's)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, one timed step: a check")
    p.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    for key, value in SHAPES[""].items():
        p.add_argument(f"--{key}", type=positive_int, help=f"default {value}")
    args = p.parse_args(argv)
    preset = "dry-run" if args.dry_run else args.preset or ""
    given = {k: getattr(args, k) for k in SHAPES[""] if getattr(args, k) is not None}
    shape = {**SHAPES[""], **SHAPES[preset], **given}
    shape["backend"] = "aot_eager" if args.dry_run else "inductor"
    if shape["n_embd"] % shape["n_head"]:
        p.error(f"--n_embd={shape['n_embd']} is not a multiple of --n_head={shape['n_head']}")
    return shape, args.device


def main(argv=None):
    shape, requested = parse_args(sys.argv[1:] if argv is None else argv)
    tg.tune_allocator()  # as train_gpt2.main() does
    try:
        device = tg.pick_device(requested)
    except tg.UserError as e:
        raise e.exit() from None
    t0 = time.perf_counter()
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"{device}: {name}, torch {torch.__version__}", flush=True)
    print(f"{shape['n_layer']} layers, {shape['n_embd']} wide, {shape['n_head']} heads, "
          f"B={shape['B']}, T={shape['T']}; each rung's median of {shape['steps']} steps after "
          f"{shape['warmup']} warm-up, the rungs taking turns", flush=True)
    load = load_average()
    ladder = climb(shape, device, log=functools.partial(print, flush=True))
    print(table(ladder, shape, device))
    print(f"{time.perf_counter() - t0:.0f} s in all; load average {load} at the start, "
          f"{load_average()} at the end, on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
