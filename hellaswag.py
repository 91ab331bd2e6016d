"""HellaSwag for any GPT-2: a train_gpt2.py checkpoint, a local Hugging Face directory, or a hub name.

    python hellaswag.py --model=log/model_019073.pt          # downloads the val set once, into hellaswag/
    python hellaswag.py --model=gpt2 --data=hellaswag_val.jsonl --limit=500 --json=out.json

Scoring is completion-style, as in the GPT-2 reproductions: see HELLA_METRICS. Training reports acc_norm
alone, from train_gpt2.evaluate_hellaswag; the losses behind all three come from train_gpt2.hellaswag_losses.
"""
import argparse
import json
import os
import sys
import time
import urllib.request

import torch
from tqdm import tqdm

from train_gpt2 import (
    EOT,
    SETTINGS,
    UserError,
    atomic_write,
    autocast_context,
    ending_lengths,
    hellaswag_losses,
    hellaswag_tokens,
    load_model,
    local_model_path,
    missing_parent,
    pick_device,
    read_hellaswag,
)

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLA_METRICS = {  # name: which ending is predicted
    "acc": "lowest summed loss over the ending's tokens",
    "acc_norm": "lowest mean loss per ending token (completion-style, as GPT-2 reproductions report)",
    "acc_norm_harness": "lowest summed loss per character of the ending (EleutherAI lm-eval-harness's acc_norm)",
}


def hellaswag_predictions(model, data, batch_tokens, autocast, fixed_shape=False):
    """The ending (0-3) each example's model picks under each of HELLA_METRICS, as an (N, 3) tensor."""
    total = hellaswag_losses(model, data, batch_tokens, autocast, fixed_shape)
    chars = torch.tensor([chars for *_, chars in data], dtype=torch.float64).view(-1, 4).clamp(min=1)
    return torch.stack([s.argmin(1) for s in (total, total / ending_lengths(data), total / chars)], dim=1)


def download(url, path):
    """url to path with a progress bar, written whole or not at all (atomic_write)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_write(path) as f, \
                tqdm(total=int(response.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                     desc=f"downloading {os.path.basename(path)}") as bar:
            while chunk := response.read(1 << 20):
                bar.update(f.write(chunk))
    except OSError as e:  # urllib's URLError and HTTPError are OSErrors
        raise UserError(f"cannot download {url} ({e}); put hellaswag_val.jsonl at {path} "
                        f"or pass --data=path.jsonl") from None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="train_gpt2.py checkpoint, Hugging Face directory, or hub name")
    p.add_argument("--data", default="",
                   help=f"HellaSwag jsonl (default: {SETTINGS['hella_data']}, downloaded there if missing)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N examples (0: all)")
    p.add_argument("--batch_tokens", type=int, default=0, help="tokens per forward pass, padding included "
                   "(default 8192 on a GPU; 2048 on CPU, where more gains nothing)")
    p.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu; or name one")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="autocast dtype")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (one shape, compiled once)")
    p.add_argument("--json", default="", help="also write the results to this file")
    args = p.parse_args(argv)
    for name in ("limit", "batch_tokens"):
        if getattr(args, name) < 0:
            sys.exit(f"error: --{name}={getattr(args, name)} is negative; pass 0 for the default or a positive number")
    # checked now, as the results come only after the whole evaluation
    problem = args.json and ("is a directory" if os.path.isdir(args.json) else missing_parent(args.json))
    if problem:
        sys.exit(f"error: --json={args.json}: {problem}; name a file in an existing directory")
    try:  # now, as a local path that does not exist would otherwise wait for the data and its download
        local_model_path(args.model)
    except UserError as e:
        sys.exit(f"error: {e}")
    return args


def accuracies(correct):
    """{metric: accuracy} from an (N, len(HELLA_METRICS)) bool tensor of right predictions."""
    return {name: correct[:, i].double().mean().item() for i, name in enumerate(HELLA_METRICS)}


def evaluate(args):
    path = args.data or SETTINGS["hella_data"]
    if not args.data and not os.path.isfile(path):
        download(URL, path)
    if not os.path.isfile(path):
        raise UserError(f"--data={path}: no such file")
    examples = read_hellaswag(path, args.limit)
    if not examples:
        raise UserError(f"{path}: holds no examples")
    device = pick_device(args.device)
    model = load_model(args.model).to(device)
    if model.config.vocab_size <= EOT:
        raise UserError(f"--model={args.model}: vocab_size {model.config.vocab_size} cannot hold GPT-2's tokens")
    data = hellaswag_tokens(examples, model.config.block_size)
    t0 = time.perf_counter()
    batch_tokens = args.batch_tokens or (2048 if device == "cpu" else 8192)
    if args.compile:  # scoring runs hidden_states, not forward
        model.hidden_states = torch.compile(model.hidden_states)
    preds = hellaswag_predictions(model, data, batch_tokens, autocast_context(device.split(":")[0], args.dtype),
                                  fixed_shape=args.compile)
    seconds = time.perf_counter() - t0
    correct = preds == torch.tensor([e["label"] for e in examples])[:, None]
    split_types = sorted({e["split_type"] for e in examples})
    by_split = {s: torch.tensor([e["split_type"] == s for e in examples]) for s in split_types}
    return {"model": args.model, "data": path, "examples": len(examples), "device": device, "dtype": args.dtype,
            "seconds": seconds, **accuracies(correct), "metrics": HELLA_METRICS,
            "split_type": {s: {"examples": int(m.sum()), **accuracies(correct[m])} for s, m in by_split.items()}}


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        results = evaluate(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    n = results["examples"]
    print(f"HellaSwag: {n} examples of {results['data']}, model {results['model']}, {results['device']} "
          f"{results['dtype']}, {n / results['seconds']:.1f} examples/s")
    for name, meaning in HELLA_METRICS.items():
        print(f"{name:17s} {results[name]:.4f}  {meaning}")
    for split, r in results["split_type"].items():
        scores = ", ".join(f"{name} {r[name]:.4f}" for name in HELLA_METRICS)
        print(f"  {split} ({r['examples']} examples): {scores}")
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        except OSError as e:
            sys.exit(f"error: cannot write --json={args.json} ({e}); the results are printed above")


if __name__ == "__main__":
    main()
