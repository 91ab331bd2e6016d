"""What a GPU does with this project, in one command and two tables (meant to take under 5 minutes
on an H100 or H200).

    python bench/gpu_check.py             # GPT-2 124M on the first CUDA GPU
    # tiny shapes on CPU: what the test suite runs, so the script never rots
    python bench/gpu_check.py --dry-run

Rows: the training step (train_gpt2.train_step, compiled, T=1024, fused AdamW) in bf16 and in fp16
with its gradient scaler, and in bf16 with --optimizer=muon (train_gpt2.Muon: Muon for the blocks'
matrices, AdamW for the rest), at the largest B of 64, 32, 16 that fits, as tokens/s; beside it the
baseline, transformers' GPT2LMHeadModel compiled under bf16 autocast with fused AdamW
(hf_train_step, which a training row can also call at its own B); HellaSwag scoring
(hellaswag.hellaswag_losses on synthetic examples in the real format) in examples/s; generation
with the KV cache in new tokens/s (bf16 autocast over fp32 weights); decoding at batch 1 and 8,
greedy and top-k 50, 16-token prompt, 128 new tokens, bf16 weights: inference's decoder (its CUDA
graph, and its eager step) against transformers' generate; and the ceilings, a bf16 matmul's FLOP/s
and a copy's bandwidth, measured in the same run. MFU is against that matmul (a training row's
datasheet MFU goes to its note), the bandwidth share against that copy. Every row has the peak
memory that its measurement allocated (torch.cuda.max_memory_allocated); a training row also has
train_gpt2.estimate_memory's figure, a decoding row of ours its weights + cache + logits. A dtype
the GPU lacks (bf16 before Ampere) is a row that says so. The second table splits a step's time by
kind (matmul, attention, elementwise, optimizer, other) from torch.profiler: GPU kernel time, or on
CPU (--dry-run) each op's own CPU time.
"""
import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]
from conftest import write_hellaswag  # noqa: E402
from generate_throughput import copy_bandwidth  # noqa: E402
from train_throughput import HFAdapter, SyntheticLoader, usual_step  # noqa: E402

import hellaswag  # noqa: E402
import inference  # noqa: E402
import train_gpt2 as tg  # noqa: E402
from inference import generate  # noqa: E402

# The table's columns: (header, the row's key, how a value prints). A measurement fills the keys
# it has.
COLUMNS = [("measurement", "what", "{}"), ("dtype", "dtype", "{}"), ("B x T", "shape", "{}"),
           ("throughput", "rate", "{:,.0f}"), ("unit", "unit", "{}"), ("MFU", "mfu", "{:.1%}"),
           ("bandwidth", "bandwidth", "{:.0%}"), ("peak memory GiB", "memory", "{:.2f}"),
           ("estimate GiB", "estimate", "{:.2f}"), ("note", "note", "{}")]
KINDS = ("matmul", "attention", "elementwise", "optimizer", "other")  # the second table's columns

FULL = dict(model=tg.GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12,
                               n_embd=768),
            T=1024, batch_sizes=(64, 32, 16), warmup=3, steps=10, hella_examples=500,
            gen_samples=8, gen_tokens=256, compile=True, decode_batches=(1, 8), decode_tokens=128,
            matmul_n=8192, copy_bytes=1 << 30)
DRY = dict(model=tg.GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32),
           T=32, batch_sizes=(4, 2), warmup=1, steps=2, hella_examples=8,
           gen_samples=2, gen_tokens=8, compile=False, decode_batches=(1, 8), decode_tokens=8,
           matmul_n=256, copy_bytes=16 << 20)


def start(device):
    """Frees what the last measurement left (its compiled graphs hold its weights) and sets the
    peak-memory mark to what is allocated now."""
    torch._dynamo.reset()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# Our training rows' names, by optimizer (train_gpt2.OPTIMIZERS): against_ceilings finds them by it.
TRAIN_ROWS = {"adamw": "train step", "muon": "train step, Muon"}


def train_row(shape, device, dtype, optimizer="adamw"):
    """The training step at the largest B that fits, with optimizer (an OPTIMIZERS key)."""
    row = {"what": TRAIN_ROWS[optimizer], "dtype": dtype, "unit": "tokens/s"}
    settings = tg.Settings(optimizer=optimizer)
    device_type = device.split(":")[0]
    if device_type == "cuda" and dtype == "bfloat16" and not tg.native_bf16(device_type):
        return {**row, "note": "no native bf16 on this device"}
    for B in shape["batch_sizes"]:
        start(device)
        torch.manual_seed(0)
        raw = tg.GPT(shape["model"]).to(device)
        model = tg.CompiledOrEager(raw, print) if shape["compile"] else raw
        built = tg.build_optimizer(raw, settings, device_type)
        run = tg.Run(settings, device=device, trained=model, optimizer=built,
                     train_loader=SyntheticLoader(B, shape["T"], shape["model"].vocab_size),
                     autocast=tg.autocast_context(device_type, dtype),
                     scaler=tg.grad_scaler(device_type, dtype))
        try:
            times = []
            for i in range(shape["warmup"] + shape["steps"]):
                t0 = time.perf_counter()
                tg.train_step(run, 6e-4)
                times.append(time.perf_counter() - t0)
        except torch.OutOfMemoryError:
            del raw, model, built, run
            continue
        rate = B * shape["T"] / statistics.median(times[shape["warmup"]:])
        peak = tg.device_peak_flops(device_type, 0.0, dtype)
        return {**row, "shape": f"{B} x {shape['T']}", "rate": rate, "memory": peak_memory(device),
                "mfu": tg.flops_per_token(raw, shape["T"]) * rate / peak if peak else None,
                "estimate": estimate(shape, B, dtype, raw, optimizer)}
    return {**row, "note": f"out of memory at B={shape['batch_sizes'][-1]}"}


def estimate(shape, B, dtype, model, optimizer="adamw"):
    """train_gpt2.estimate_memory's total for this step, in GiB: what the peak memory column checks
    it against."""
    m = shape["model"]
    cfg = tg.parse_args([f"--B={B}", f"--T={shape['T']}", f"--total_batch_size={B * shape['T']}",
                         f"--dtype={dtype}", f"--optimizer={optimizer}", f"--n_layer={m.n_layer}",
                         f"--n_head={m.n_head}", f"--n_embd={m.n_embd}",
                         f"--block_size={m.block_size}", f"--vocab_size={m.vocab_size}"])
    n_params = sum(p.numel() for p in model.parameters())
    return sum(tg.estimate_memory(cfg, n_params, 1).values()) / 2**30


def hellaswag_row(shape, device, dtype):
    with tempfile.TemporaryDirectory() as tmp:
        path = write_hellaswag(os.path.join(tmp, "hella.jsonl"), shape["hella_examples"])
        examples = hellaswag.read_hellaswag(path)
    data = hellaswag.hellaswag_tokens(examples, shape["model"].block_size, tg.get_tokenizer())
    torch.manual_seed(0)
    model = tg.GPT(shape["model"]).to(device).eval()
    autocast = tg.autocast_context(device.split(":")[0], dtype)
    batch_tokens = 8 * shape["T"]
    start(device)
    hellaswag.hellaswag_losses(model, data[:8], batch_tokens, autocast)  # warm-up
    t0 = time.perf_counter()
    hellaswag.hellaswag_losses(model, data, batch_tokens, autocast)
    synchronize(device)
    rate = len(data) / (time.perf_counter() - t0)
    return {"what": "HellaSwag", "dtype": dtype, "shape": f"{batch_tokens} tokens",
            "unit": "examples/s", "rate": rate, "mfu": None, "memory": peak_memory(device)}


def generate_row(shape, device, dtype):
    torch.manual_seed(0)
    model = tg.GPT(shape["model"]).to(device).eval()
    autocast = tg.autocast_context(device.split(":")[0], dtype)
    prompt = [tg.EOT] * 16
    samples = shape["gen_samples"]
    start(device)
    with autocast:
        generate(model, prompt, 4, num_samples=samples, seed=0, stop=None)  # warm-up
        t0 = time.perf_counter()
        generate(model, prompt, shape["gen_tokens"], num_samples=samples, seed=0, stop=None)
        synchronize(device)
    rate = samples * shape["gen_tokens"] / (time.perf_counter() - t0)
    return {"what": "generation, KV cache", "dtype": dtype, "shape": f"{samples} samples",
            "unit": "new tokens/s", "rate": rate, "mfu": None, "memory": peak_memory(device)}


# ----------------------------------------------------------------------------------------------
# The ceilings the MFU and bandwidth columns divide by, measured in this run on this GPU


def matmul_rate(device, n, seconds=0.5):
    """FLOP/s of a bf16 n x n matmul on device: what a matmul really reaches here, the MFU column's
    ceiling."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))

    def run(count):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(count):
            a @ b
        synchronize(device)
        return time.perf_counter() - t0
    run(1)  # warm-up: cuBLAS picks its kernel
    count = 1
    while (took := run(count)) < seconds:  # queued back to back, timed once: no wait between them
        count *= 2
    return 2 * n ** 3 * count / took


def ceiling_rows(shape, device):
    """The two rows of ceilings, {"flops", "bytes"} for the others' MFU and bandwidth columns."""
    flops = matmul_rate(device, shape["matmul_n"])
    bandwidth = max(copy_bandwidth(device, shape["copy_bytes"]) for _ in range(3))
    rows = [{"what": "matmul (MFU's ceiling)", "dtype": "bfloat16",
             "shape": f"{shape['matmul_n']} square", "rate": flops / 1e9, "unit": "GFLOP/s"},
            {"what": "copy (bandwidth's ceiling)", "shape": f"{shape['copy_bytes'] >> 20} MiB",
             "rate": bandwidth / 1e9, "unit": "GB/s",
             "note": "read + write bytes, as STREAM's copy counts them"}]
    return rows, {"flops": flops, "bytes": bandwidth}


def against_ceilings(rows, ceilings, shape):
    """Each row's MFU and bandwidth share against this run's measured ceilings, from the FLOP/s and
    bytes/s it carries. The training rows come with MFU against the datasheet (train_row): it moves
    to their note, and their MFU is recomputed from their tokens/s, so that every MFU in the table
    has the same ceiling."""
    with torch.device("meta"):
        per_token = tg.flops_per_token(tg.GPT(shape["model"]), shape["T"])
    for row in rows:
        if row.get("what") in TRAIN_ROWS.values() and row.get("rate"):
            if row.get("mfu") is not None:
                row["note"] = (row.get("note", "") + f" datasheet MFU {row['mfu']:.1%}").strip()
            row["flops"] = row["rate"] * per_token
        if "flops" in row:
            row["mfu"] = row["flops"] / ceilings["flops"]
        if "bytes" in row:
            row["bandwidth"] = row["bytes"] / ceilings["bytes"]
    return rows


# ----------------------------------------------------------------------------------------------
# Where a step's time goes, by kind of kernel (GPU) or op (CPU), from torch.profiler


def kind_of(name):
    """matmul, attention, elementwise (which holds the norms, softmaxes and fused Triton kernels),
    optimizer (AdamW and the gradient clipping's norms) or other (copies, memsets), from a kernel's
    or an op's name."""
    name = name.lower()
    if any(s in name for s in ("adam", "multi_tensor", "foreach", "optimizer")):
        return "optimizer"
    if any(s in name for s in ("flash", "attention", "fmha", "sdpa")):
        return "attention"
    if any(s in name for s in ("gemm", "gemv", "cublas", "cutlass", "nvjet", "xmma", "triton_tem",
                               "aten::mm", "addmm", "bmm", "linear", "matmul")):
        return "matmul"
    if any(s in name for s in ("memcpy", "memset", "profilerstep")):
        return "other"
    return "elementwise"


def time_by_kind(step, device):
    """Seconds of one step() by kind (kind_of): on a GPU the kernels' time as the profiler records
    it, on a CPU each op's own CPU time (its children's excluded, so that nothing counts twice). The
    training rows may call it with their own step."""
    gpu = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    totals = dict.fromkeys(KINDS, 0.0)
    for e in prof.events():
        if gpu and e.device_type == DeviceType.CUDA:
            totals[kind_of(e.name)] += e.time_range.elapsed_us() / 1e6
        elif not gpu and e.device_type == DeviceType.CPU and not e.is_async:
            totals[kind_of(e.name)] += e.self_cpu_time_total / 1e6
    return totals


def kind_table(profiles, device):
    """profiles: {measurement: {kind: seconds}} as one table, each kind's ms and share of the
    step."""
    clock = "GPU kernel time" if device.startswith("cuda") else "CPU time (each op's own)"
    lines = [f"| step ({clock}) | total ms | " + " | ".join(KINDS) + " |",
             "|" + "---|" * (len(KINDS) + 2)]
    for what, kinds in profiles.items():
        total = sum(kinds.values())
        cells = [f"{1e3 * s:.2f} ({s / total:.0%})" if total else "n/a" for s in kinds.values()]
        lines.append(f"| {what} | {1e3 * total:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The baseline training step: transformers' GPT2LMHeadModel as it is usually trained


def hf_train_step(shape, B, device, dtype):
    """step() for one training step of transformers' GPT2LMHeadModel of shape's model: compiled
    (where shape compiles), under dtype autocast over fp32 weights, fused AdamW, the loss from full
    fp32 logits, gradients clipped at 1.0; and the model. A training row can time it at its own B
    beside train_gpt2's step."""
    m = shape["model"]
    device_type = device.split(":")[0]
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=m.vocab_size, n_positions=m.block_size, n_embd=m.n_embd,
                        n_layer=m.n_layer, n_head=m.n_head, activation_function="gelu_new",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        attn_implementation="sdpa")
    hf = GPT2LMHeadModel(config).to(device)
    model = HFAdapter(hf)
    model = torch.compile(model) if shape["compile"] else model
    optimizer = torch.optim.AdamW(hf.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=tg.use_fused_adamw(device_type))
    # GPT-2's ids; the rest pads
    loader = SyntheticLoader(B, shape["T"], min(m.vocab_size, tg.EOT + 1))
    loader.batches = [b.to(device) for b in loader.batches]
    autocast = tg.autocast_context(device_type, dtype)
    return lambda: usual_step(model, optimizer, loader, 1, 1.0, autocast), hf


def hf_train_row(shape, device, dtype):
    """hf_train_step at the largest B that fits, as tokens/s; and its step's time by kind."""
    row = {"what": "train step, transformers", "dtype": dtype, "unit": "tokens/s",
           "note": "GPT2LMHeadModel, compiled, fused AdamW"}
    for B in shape["batch_sizes"]:
        start(device)
        try:
            step, hf = hf_train_step(shape, B, device, dtype)
            times = []
            for _ in range(shape["warmup"] + shape["steps"]):
                t0 = time.perf_counter()
                step()
                synchronize(device)
                times.append(time.perf_counter() - t0)
            kinds = time_by_kind(step, device)
        except torch.OutOfMemoryError:
            continue
        rate = B * shape["T"] / statistics.median(times[shape["warmup"]:])
        return {**row, "shape": f"{B} x {shape['T']}", "rate": rate, "memory": peak_memory(device),
                "flops": tg.flops_per_token(hf, shape["T"]) * rate}, kinds
    return {**row, "note": f"out of memory at B={shape['batch_sizes'][-1]}"}, None


# ----------------------------------------------------------------------------------------------
# Decoding: inference's decoder (its CUDA graph, and its eager step) against transformers'
# generate


def decode_estimate(config, B):
    """Bytes decoding needs at its peak: bf16 weights, the static cache (keys and values, every
    layer, block_size rows of B samples), and a few (B, vocab) rows of logits in fp32 for
    sampling."""
    weights = 2 * n_params(config)
    cache = 2 * 2 * config.n_layer * B * config.block_size * config.n_embd
    return weights + cache + 4 * 4 * B * config.vocab_size


def n_params(config):
    """The parameters of a GPT of config, the tied embedding counted once, as a token reads it
    once."""
    with torch.device("meta"):
        return sum(p.numel() for p in tg.GPT(config).parameters())


def decode_rows(shape, device):
    """Batch 1 and 8, greedy and top-k 50, a 16-token prompt of <|endoftext|> (the greedy report's:
    bench/NOTES.md, "Greedy at 19 tokens/s"), decode_tokens new tokens each, weights in bf16: ours
    with CUDA_GRAPHS off (the eager step), ours as sample.py and serve.py run it (the CUDA graph
    where there is CUDA), and transformers' generate on a model of the same shape. A greedy row of
    the graph says whether its tokens are the eager step's. Returns the rows and the time by kind of
    ours at batch 1, greedy."""
    rows = []
    tokens = {}  # (who, B, mode): the tokens each sample made
    profiles = {}
    # eager first: the graph is checked on it
    for who in ("ours, eager step", "ours", "transformers generate"):
        inference.CUDA_GRAPHS = who != "ours, eager step"
        model = decode_model(who, shape["model"], device)
        path = "transformers"
        if who.startswith("ours"):  # generate decodes one request at a time: an unshared engine
            path = inference.decode_path(device, shared=False)
        for B in shape["decode_batches"]:
            for mode, sampling in (("greedy", dict(temperature=0)), ("top-k 50", dict(top_k=50))):
                row, tokens[who, B, mode] = decode_row(model, B, sampling, shape, device)
                row.update(what=f"decode, {who}", shape=f"B={B}, {mode}",
                           note=f"{path}; {row['note']}")
                if (who == "ours" and mode == "greedy"
                        and tokens[who, B, mode] != tokens["ours, eager step", B, mode]):
                    row["note"] += "; greedy tokens differ from the eager step's"
                rows.append(row)
                if B == 1 and mode == "greedy" and who.startswith("ours"):
                    run = functools.partial(decode, model, B, sampling, shape["decode_tokens"])
                    what = f"decode, {who}, batch 1 greedy, {shape['decode_tokens']} tokens"
                    profiles[what] = time_by_kind(run, device)
    inference.CUDA_GRAPHS = True
    return rows, profiles


def decode_model(who, config, device):
    """A random model of config in bf16 on device: ours held for inference, or transformers'
    GPT2LMHeadModel."""
    torch.manual_seed(0)
    if who.startswith("ours"):
        return inference.hold_for_inference(tg.GPT(config).to(device), torch.bfloat16)
    hf_logging.set_verbosity_error()
    hf = GPT2LMHeadModel(GPT2Config(n_positions=config.block_size, n_embd=config.n_embd,
                                    n_layer=config.n_layer, n_head=config.n_head,
                                    vocab_size=config.vocab_size))
    return hf.to(device, torch.bfloat16).eval()


def decode_row(model, B, sampling, shape, device):
    """One decoding measurement after a warm-up call (which, on CUDA, captures our graph): the row
    and the tokens. MFU counts 2 FLOPs per weight of a token's matmuls and 4 * n_layer * n_embd per
    position it attends to; the bandwidth share counts a step (B tokens) reading every bf16 weight
    once and the cache's rows in use."""
    config = shape["model"]
    n = shape["decode_tokens"]
    start(device)
    decode(model, B, sampling, 4)
    synchronize(device)
    t0 = time.perf_counter()
    out = decode(model, B, sampling, n)
    synchronize(device)
    rate = B * n / (time.perf_counter() - t0)
    C = config.n_embd
    L = config.n_layer
    ctx = 16 + n / 2  # the mean length attended to
    weights = n_params(config)
    matmul_weights = weights - config.block_size * C  # wpe is only looked up
    row = {"dtype": "bfloat16", "rate": rate, "unit": "new tokens/s", "memory": peak_memory(device),
           "note": f"{sum(map(len, out)) // B} tokens a sample",
           "flops": rate * (2 * matmul_weights + 4 * L * C * ctx),
           "bytes": rate / B * (2 * weights + 2 * 2 * L * B * ctx * C)}
    if isinstance(model, tg.GPT):
        row["estimate"] = decode_estimate(config, B) / 2**30
    return row, out


def decode(model, B, sampling, n):
    """n new tokens for each of B copies of the 16-token prompt of <|endoftext|>, never stopping
    early, from ours or from transformers (which min_new_tokens keeps from stopping)."""
    prompt = [tg.EOT] * 16
    if isinstance(model, tg.GPT):
        return generate(model, prompt, n, num_samples=B, stop=None, seed=0, **sampling)
    ids = torch.tensor([prompt] * B, device=model.device)
    torch.manual_seed(0)
    greedy = sampling.get("temperature") == 0
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=not greedy,
                             top_k=None if greedy else sampling["top_k"], pad_token_id=tg.EOT)
    return out[:, len(prompt):].tolist()


def cell(row, key, fmt):
    """A table cell: empty where the row has no such key, n/a where its value is None."""
    if key not in row:
        return ""
    if row[key] is None:
        return "n/a"
    return fmt.format(row[key])


def table(rows):
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, k, f) for _, k, f in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main():
    tg.tune_allocator()  # as train_gpt2.main() does
    # the docstring's first sentence, which runs over two lines
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on CPU, to check the script itself")
    args = p.parse_args()
    if args.dry_run:
        shape, device = DRY, "cpu"
    elif torch.cuda.is_available():
        shape, device = FULL, "cuda:0"
        torch.set_float32_matmul_precision("high")
    else:
        sys.exit("error: no CUDA GPU; this checks one (run --dry-run to check the script on CPU)")
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    auto = tg.resolve_dtype("auto", device.split(":")[0], lambda s: None)
    params = sum(p.numel() for p in tg.GPT(shape["model"]).parameters())
    print(f"{name}, torch {torch.__version__}, {params / 1e6:.0f}M parameters, dtype auto = {auto}")
    rows = [train_row(shape, device, "bfloat16"), train_row(shape, device, "float16"),
            train_row(shape, device, "bfloat16", "muon")]
    hf_row, hf_kinds = hf_train_row(shape, device, "bfloat16")
    rows += [hf_row, hellaswag_row(shape, device, auto), generate_row(shape, device, auto)]
    decoding, profiles = decode_rows(shape, device)
    ceilings, ceiling = ceiling_rows(shape, device)
    rows = against_ceilings(rows + decoding + ceilings, ceiling, shape)
    print(table(rows))
    if hf_kinds:
        profiles = {"train step, transformers (one step)": hf_kinds, **profiles}
    print(kind_table(profiles, device))
    print(f"{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
