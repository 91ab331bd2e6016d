"""HellaSwag: its data, its scoring, and a command line that scores any GPT-2 (a train_gpt2.py
checkpoint, a local Hugging Face directory, or a hub name). train_gpt2.py imports the scoring to report
acc_norm at each eval, as build-nanogpt's train_gpt2.py imports its hellaswag.py.

    python hellaswag.py --model=log/model_019073.pt          # downloads the val set once, into hellaswag/
    python hellaswag.py --model=gpt2 --data=hellaswag_val.jsonl --limit=500 --json=out.json

Scoring is completion-style, as in the GPT-2 reproductions: each of the 4 endings follows the context, and
only the ending's tokens are scored; see HELLA_METRICS for the three ways to pick an ending. The library
part (down to the command line) imports nothing of train_gpt2.py, which imports it; the command line
imports train_gpt2 when it runs, for the model, the device and the tokenizer.
"""
import argparse
import json
import os
import sys
import time
import urllib.request

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLA_METRICS = {  # name: which ending is predicted
    "acc": "lowest summed loss over the ending's tokens",
    "acc_norm": "lowest mean loss per ending token (completion-style, as GPT-2 reproductions report)",
    "acc_norm_harness": "lowest summed loss per character of the ending (EleutherAI lm-eval-harness's acc_norm)",
}
# GPT-2's tokens (train_gpt2.EOT + 1): an answer is one of them; ids past them pad a model's vocabulary.
GPT2_TOKENS = 50257
HELLA_LSE_ROWS_GPU = 2048  # rows of logits a GPU normalizes at once (train_gpt2.LOSS_CHUNK_ROWS)
HELLA_FIELDS = {  # the fields scoring reads: check, what the check wants
    "ctx": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "endings": (lambda v: isinstance(v, list) and len(v) == 4 and all(isinstance(e, str) for e in v),
                "a list of 4 strings"),
    "label": (lambda v: str(v) in ("0", "1", "2", "3"), "0, 1, 2 or 3"),
    "split_type": (lambda v: isinstance(v, str), "a string")}
HELLA_LSE_ROWS = 8  # rows of logits a CPU turns to fp32 and normalizes at once (8 x 50304 fp32 = 1.6 MB, in cache)
def read_hellaswag(path, limit=0):
    """The examples of a HellaSwag jsonl file (its first `limit` if > 0), checked: a bad line fails here, by line."""
    examples = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if limit and len(examples) == limit:
                    break
                if not line.strip():
                    continue
                try:
                    example = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(example, dict):
                    raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(example).__name__}")
                for field, (ok, want) in HELLA_FIELDS.items():
                    if field not in example:
                        raise ValueError(f"{path}, line {lineno}: field {field!r} is missing")
                    if not ok(example[field]):
                        raise ValueError(f"{path}, line {lineno}: field {field!r} should be {want}, "
                                        f"got {example[field]!r}")
                example["label"] = int(example["label"])  # Hugging Face's copy stores it as a string
                examples.append(example)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason}); HellaSwag's jsonl is UTF-8, uncompressed") from None
    return examples

def hellaswag_tokens(examples, block_size, enc):
    """Per example, with enc (train_gpt2.get_tokenizer()): context tokens (cut to fit block_size), each
    ending's tokens with its space, endings' lengths."""
    data = []
    for i, example in enumerate(examples):
        ends = [enc.encode(" " + e) for e in example["endings"]]
        room = block_size - max(map(len, ends))
        if room < 1:
            raise ValueError(f"HellaSwag example {i}: an ending is longer than block_size={block_size} tokens")
        data.append((enc.encode(example["ctx"])[-room:], ends, [len(e) for e in example["endings"]]))
    return data

def hellaswag_groups(data, batch_tokens, fixed_shape):
    """hellaswag_batches' batches as (example indices, row length, rows)."""
    sizes = [len(ctx) + sum(map(len, ends)) for ctx, ends, _ in data]
    order = sorted(range(len(data)), key=lambda i: -sizes[i])
    longest = max(sizes, default=1)
    groups, start = [], 0
    while start < len(order):
        length = longest if fixed_shape else sizes[order[start]]
        count = max(1, batch_tokens // length)
        idx = order[start:start + count]
        start += count
        groups.append((idx, length, count if fixed_shape else len(idx)))
    return groups

def hellaswag_batches(data, batch_tokens, fixed_shape=False):
    """Batches of ~batch_tokens tokens, a right-padded row per example: the context, then the 4 endings, each placed
    after the context, attending to it and itself only. Longest first; fixed_shape: one shape, one compile. Yields
    (indices, (tokens, positions, mask), (states to project; per ending token: its state, id, ending 4j + k))."""
    for idx, length, rows in hellaswag_groups(data, batch_tokens, fixed_shape):
        tokens, pos = (torch.zeros(rows, length, dtype=torch.long) for _ in range(2))
        part = torch.full((rows, length), 5)  # 0: context, k + 1: ending k, 5: padding, which is never scored
        states, pick, targets, ending = [], [], [], []
        for j, i in enumerate(idx):
            ctx, ends, _ = data[i]
            c = len(ctx)
            tokens[j, :c], pos[j, :c], part[j, :c] = torch.tensor(ctx), torch.arange(c), 0
            shared = len(states)  # the last context token predicts every ending's first token: projected once
            states.append(j * length + c - 1)
            at = c
            for k, end in enumerate(ends):
                n = len(end)
                span = slice(at, at + n)
                tokens[j, span], pos[j, span], part[j, span] = torch.tensor(end), torch.arange(c, c + n), k + 1
                pick += [shared, *range(len(states), len(states) + n - 1)]
                states += range(j * length + at, j * length + at + n - 1)  # token t predicts token t + 1
                targets += end
                ending += [4 * j + k] * n
                at += n
        # Padding sees the context and the padding before it: never an empty row, so never a NaN.
        mask = (part[:, None, :] == 0) | (part[:, None, :] == part[:, :, None])
        mask &= torch.ones(length, length, dtype=torch.bool).tril()
        yield idx, (tokens, pos, mask[:, None]), tuple(map(torch.tensor, (states, pick, targets, ending)))

@torch.no_grad()
def hellaswag_losses(model, data, batch_tokens, autocast, fixed_shape=False, forwards=0):
    """(N, 4) float64 summed ending losses, projecting only states that predict an ending token (all logits cost most of
    the time); sharded, a rank runs one-token forwards up to `forwards`."""
    device = next(model.parameters()).device
    losses = torch.zeros(len(data), 4, dtype=torch.float64)
    with autocast:  # one region for all batches, so that autocast casts each weight once, not once a forward
        zero, sees_itself = (torch.zeros(1, 1, dtype=torch.long, device=device),
                             torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device))
        for _ in range(forwards - len(hellaswag_groups(data, batch_tokens, fixed_shape))):
            model.hidden_states(zero, zero, sees_itself)
        for idx, inputs, scored in hellaswag_batches(data, batch_tokens, fixed_shape):
            tokens, pos, mask = (t.to(device) for t in inputs)
            states, pick, targets, ending = (t.to(device) for t in scored)
            h = model.hidden_states(tokens, pos, mask)
            # Real tokens' rows only: at logit 0 the padding ids would take much of a pretrained model's probability.
            logits = F.linear(h.flatten(0, 1)[states], model.lm_head.weight[:GPT2_TOKENS])  # (N, real tokens)
            # Each row's log-sum-exp in fp32 as x - log_softmax(x) at any column: one fused pass, logsumexp makes four.
            # A few rows at a time stay in a CPU's cache: an fp32 copy of all logits took longer than the matmul.
            chunk = HELLA_LSE_ROWS if device.type == "cpu" else HELLA_LSE_ROWS_GPU
            chunks = (x.float() for x in logits.split(chunk))
            lse = torch.cat([x[:, 0] - F.log_softmax(x, dim=1)[:, 0] for x in chunks])
            nll = lse[pick] - logits[pick, targets].float()
            total = torch.zeros(4 * len(idx), device=device).index_add_(0, ending, nll)
            losses[idx] = total.view(-1, 4).double().cpu()
    return losses


def ending_lengths(data):
    """(N, 4) float64: each ending's length in tokens, what acc_norm divides its summed loss by."""
    return torch.tensor([list(map(len, ends)) for _, ends, _ in data], dtype=torch.float64).view(-1, 4)

def evaluate_hellaswag(model, data, labels, batch_tokens, autocast, sharded=False):
    """(acc_norm, examples) over all ranks: the pick is the ending with the lowest mean loss per token.
    sharded: an FSDP model, whose forward is a collective, so every rank runs as many."""
    device = next(model.parameters()).device
    forwards = 0
    if sharded:  # every rank runs the most batches any rank has
        forwards = torch.tensor(len(hellaswag_groups(data, batch_tokens, True)), device=device)
        dist.all_reduce(forwards, op=dist.ReduceOp.MAX)
    losses = hellaswag_losses(model, data, batch_tokens, autocast, True, int(forwards))
    picks = (losses / ending_lengths(data)).argmin(dim=1)
    counts = torch.tensor([len(labels), (picks == labels).sum().item()], device=device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    n, correct = counts.tolist()
    return correct / max(n, 1), n


def hellaswag_predictions(model, data, batch_tokens, autocast, fixed_shape=False):
    """The ending (0-3) each example's model picks under each of HELLA_METRICS, as an (N, 3) tensor."""
    total = hellaswag_losses(model, data, batch_tokens, autocast, fixed_shape)
    chars = torch.tensor([chars for *_, chars in data], dtype=torch.float64).view(-1, 4).clamp(min=1)
    return torch.stack([s.argmin(1) for s in (total, total / ending_lengths(data), total / chars)], dim=1)


# ----------------------------------------------------------------------------------------------
# The command line: it imports train_gpt2 inside its functions, as train_gpt2 imports this file.


def download(url, path):
    """url to path with a progress bar, written whole or not at all (atomic_write)."""
    import train_gpt2 as tg

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, tg.atomic_write(path) as f, \
                tqdm(total=int(response.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                     desc=f"downloading {os.path.basename(path)}") as bar:
            while chunk := response.read(1 << 20):
                bar.update(f.write(chunk))
    except OSError as e:  # urllib's URLError and HTTPError are OSErrors
        raise tg.UserError(f"cannot download {url} ({e}); put hellaswag_val.jsonl at {path} "
                        f"or pass --data=path.jsonl") from None


def parse_args(argv):
    import train_gpt2 as tg

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="train_gpt2.py checkpoint, Hugging Face directory, or hub name")
    p.add_argument("--data", default="",
                   help=f"HellaSwag jsonl (default: {tg.SETTINGS['hella_data']}, downloaded there if missing)")
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
    problem = args.json and ("is a directory" if os.path.isdir(args.json) else tg.missing_parent(args.json))
    if problem:
        sys.exit(f"error: --json={args.json}: {problem}; name a file in an existing directory")
    try:  # now, as a local path that does not exist would otherwise wait for the data and its download
        tg.local_model_path(args.model)
    except tg.UserError as e:
        sys.exit(f"error: {e}")
    return args


def accuracies(correct):
    """{metric: accuracy} from an (N, len(HELLA_METRICS)) bool tensor of right predictions."""
    return {name: correct[:, i].double().mean().item() for i, name in enumerate(HELLA_METRICS)}


def evaluate(args):
    import train_gpt2 as tg

    path = args.data or tg.SETTINGS["hella_data"]
    if not args.data and not os.path.isfile(path):
        download(URL, path)
    if not os.path.isfile(path):
        raise tg.UserError(f"--data={path}: no such file")
    try:
        examples = read_hellaswag(path, args.limit)
    except ValueError as e:
        raise tg.UserError(str(e)) from None
    if not examples:
        raise tg.UserError(f"{path}: holds no examples")
    device = tg.pick_device(args.device)
    model = tg.load_model(args.model).to(device)
    if model.config.vocab_size < GPT2_TOKENS:
        raise tg.UserError(f"--model={args.model}: vocab_size {model.config.vocab_size} cannot hold GPT-2's tokens")
    try:
        data = hellaswag_tokens(examples, model.config.block_size, tg.get_tokenizer())
    except ValueError as e:
        raise tg.UserError(str(e)) from None
    t0 = time.perf_counter()
    batch_tokens = args.batch_tokens or (2048 if device == "cpu" else 8192)
    if args.compile:  # scoring runs hidden_states, not forward
        model.hidden_states = torch.compile(model.hidden_states)
    preds = hellaswag_predictions(model, data, batch_tokens, tg.autocast_context(device.split(":")[0], args.dtype),
                                  fixed_shape=args.compile)
    seconds = time.perf_counter() - t0
    correct = preds == torch.tensor([e["label"] for e in examples])[:, None]
    split_types = sorted({e["split_type"] for e in examples})
    by_split = {s: torch.tensor([e["split_type"] == s for e in examples]) for s in split_types}
    return {"model": args.model, "data": path, "examples": len(examples), "device": device, "dtype": args.dtype,
            "seconds": seconds, **accuracies(correct), "metrics": HELLA_METRICS,
            "split_type": {s: {"examples": int(m.sum()), **accuracies(correct[m])} for s, m in by_split.items()}}


def main(argv=None):
    import train_gpt2 as tg

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        results = evaluate(args)
    except tg.UserError as e:
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
