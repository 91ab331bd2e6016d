"""What a GPU does with this project, in one command and one table (under 8 minutes on a CUDA GPU).

    python bench/gpu_check.py             # GPT-2 124M on the first CUDA GPU
    python bench/gpu_check.py --dry-run   # tiny shapes on CPU: what the test suite runs, so the script never rots

Rows: the training step (train_gpt2.train_step, compiled, T=1024, fused AdamW) in bf16 and in fp16 with its
gradient scaler, at the largest B of 64, 32, 16 that fits, as tokens/s and MFU against the datasheet peak for
that dtype; HellaSwag scoring (train_gpt2.hellaswag_losses on synthetic examples in the real format) in
examples/s; generation with the KV cache in new tokens/s. Every row has the peak memory that its measurement
allocated (torch.cuda.max_memory_allocated); a training row also has train_gpt2.estimate_memory's figure
for it. A dtype the GPU lacks (bf16 before Ampere) is a row that says so.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]
from conftest import write_hellaswag  # noqa: E402
from train_throughput import SyntheticLoader  # noqa: E402

import train_gpt2 as tg  # noqa: E402
from inference import generate  # noqa: E402

# The table's columns: (header, the row's key, how a value prints). A measurement fills the keys it has.
COLUMNS = [("measurement", "what", "{}"), ("dtype", "dtype", "{}"), ("B x T", "shape", "{}"),
           ("throughput", "rate", "{:,.0f}"), ("unit", "unit", "{}"), ("MFU", "mfu", "{:.1%}"),
           ("peak memory GiB", "memory", "{:.2f}"), ("estimate GiB", "estimate", "{:.2f}"), ("note", "note", "{}")]

FULL = dict(model=tg.GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768), T=1024,
            batch_sizes=(64, 32, 16), warmup=3, steps=10, hella_examples=500, gen_samples=8, gen_tokens=256,
            compile=True)
DRY = dict(model=tg.GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32), T=32,
           batch_sizes=(4, 2), warmup=1, steps=2, hella_examples=8, gen_samples=2, gen_tokens=8, compile=False)


def start(device):
    """Frees what the last measurement left (its compiled graphs hold its weights) and sets the peak-memory
    mark to what is allocated now."""
    torch._dynamo.reset()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_row(shape, device, dtype):
    """The training step at the largest B that fits."""
    row = {"what": "train step", "dtype": dtype, "unit": "tokens/s"}
    device_type = device.split(":")[0]
    if device_type == "cuda" and dtype == "bfloat16" and not tg.native_bf16(device_type):
        return {**row, "note": "no native bf16 on this device"}
    for B in shape["batch_sizes"]:
        start(device)
        torch.manual_seed(0)
        raw = tg.GPT(shape["model"]).to(device)
        model = tg.CompiledOrEager(raw, print) if shape["compile"] else raw
        optimizer = tg.build_optimizer(raw, tg.Settings(), device_type)
        run = tg.Run(tg.Settings(), device=device, trained=model, optimizer=optimizer,
                     train_loader=SyntheticLoader(B, shape["T"], shape["model"].vocab_size),
                     autocast=tg.autocast_context(device_type, dtype), scaler=tg.grad_scaler(device_type, dtype))
        try:
            times = []
            for i in range(shape["warmup"] + shape["steps"]):
                t0 = time.perf_counter()
                tg.train_step(run, 6e-4)
                times.append(time.perf_counter() - t0)
        except torch.OutOfMemoryError:
            del raw, model, optimizer, run
            continue
        rate = B * shape["T"] / statistics.median(times[shape["warmup"]:])
        peak = tg.device_peak_flops(device_type, 0.0, dtype)
        return {**row, "shape": f"{B} x {shape['T']}", "rate": rate, "memory": peak_memory(device),
                "mfu": tg.flops_per_token(raw, shape["T"]) * rate / peak if peak else None,
                "estimate": estimate(shape, B, dtype, raw)}
    return {**row, "note": f"out of memory at B={shape['batch_sizes'][-1]}"}


def estimate(shape, B, dtype, model):
    """train_gpt2.estimate_memory's total for this step, in GiB: what the peak memory column checks it against."""
    m = shape["model"]
    cfg = tg.parse_args([f"--B={B}", f"--T={shape['T']}", f"--total_batch_size={B * shape['T']}", f"--dtype={dtype}",
                         f"--n_layer={m.n_layer}", f"--n_head={m.n_head}", f"--n_embd={m.n_embd}",
                         f"--block_size={m.block_size}", f"--vocab_size={m.vocab_size}"])
    return sum(tg.estimate_memory(cfg, sum(p.numel() for p in model.parameters()), 1).values()) / 2**30


def hellaswag_row(shape, device, dtype):
    with tempfile.TemporaryDirectory() as tmp:
        examples = tg.read_hellaswag(write_hellaswag(os.path.join(tmp, "hella.jsonl"), shape["hella_examples"]))
    data = tg.hellaswag_tokens(examples, shape["model"].block_size)
    torch.manual_seed(0)
    model = tg.GPT(shape["model"]).to(device).eval()
    autocast, batch_tokens = tg.autocast_context(device.split(":")[0], dtype), 8 * shape["T"]
    start(device)
    tg.hellaswag_losses(model, data[:8], batch_tokens, autocast)  # warm-up
    t0 = time.perf_counter()
    tg.hellaswag_losses(model, data, batch_tokens, autocast)
    synchronize(device)
    return {"what": "HellaSwag", "dtype": dtype, "shape": f"{batch_tokens} tokens", "unit": "examples/s",
            "rate": len(data) / (time.perf_counter() - t0), "mfu": None, "memory": peak_memory(device)}


def generate_row(shape, device, dtype):
    torch.manual_seed(0)
    model = tg.GPT(shape["model"]).to(device).eval()
    autocast, prompt = tg.autocast_context(device.split(":")[0], dtype), [tg.EOT] * 16
    start(device)
    with autocast:
        generate(model, prompt, 4, num_samples=shape["gen_samples"], seed=0, stop=None)  # warm-up
        t0 = time.perf_counter()
        generate(model, prompt, shape["gen_tokens"], num_samples=shape["gen_samples"], seed=0, stop=None)
        synchronize(device)
    return {"what": "generation, KV cache", "dtype": dtype, "shape": f"{shape['gen_samples']} samples",
            "unit": "new tokens/s", "rate": shape["gen_samples"] * shape["gen_tokens"] / (time.perf_counter() - t0),
            "mfu": None, "memory": peak_memory(device)}


def table(rows):
    cell = lambda row, key, fmt: "" if key not in row else "n/a" if row[key] is None else fmt.format(row[key])
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, k, f) for _, k, f in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main():
    tg.tune_allocator()  # as train_gpt2.main() does
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, to check the script itself")
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
            hellaswag_row(shape, device, auto), generate_row(shape, device, auto)]
    print(table(rows))
    print(f"{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
