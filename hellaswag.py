"""HellaSwag: its data, its scoring, and a command line that scores any GPT-2 (a train_gpt2.py
checkpoint, a local Hugging Face directory, or a hub name). train_gpt2.py imports the scoring to
report acc_norm at each eval, as build-nanogpt's train_gpt2.py imports its hellaswag.py.

    python hellaswag.py --model=log/model_019073.pt  # downloads the val set once, into hellaswag/
    python hellaswag.py --model=gpt2 --hella_examples=500 --json=out.json

Scoring is completion-style, as in the GPT-2 reproductions: each of the 4 endings follows the
context, and only the ending's tokens are scored; see HELLA_METRICS for the three ways to pick an
ending. The library part (down to the command line) imports nothing of train_gpt2.py, which imports
it; the command line imports train_gpt2 as it runs, for the model, the device and the tokenizer.
"""

import argparse
import json
import math
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
    "acc_norm": "lowest mean loss per ending token (completion-style, as GPT-2 reproductions "
    "report)",
    "acc_norm_harness": "lowest summed loss per character of the ending (EleutherAI "
    "lm-eval-harness's acc_norm)",
}
# GPT-2's tokens (train_gpt2.EOT + 1): an answer is one of them; ids past them pad a model's
# vocabulary.
GPT2_TOKENS = 50257
HELLA_LSE_ROWS_GPU = 2048  # rows of logits a GPU normalizes at once (train_gpt2.LOSS_CHUNK_ROWS)
HELLA_FIELDS = {  # the fields scoring reads: check, what the check wants
    "ctx": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "endings": (
        lambda v: isinstance(v, list) and len(v) == 4 and all(isinstance(e, str) for e in v),
        "a list of 4 strings",
    ),
    "label": (lambda v: str(v) in ("0", "1", "2", "3"), "0, 1, 2 or 3"),
    "split_type": (lambda v: isinstance(v, str), "a string"),
}
# rows of logits a CPU turns to fp32 and normalizes at once (8 x 50304 fp32 = 1.6 MB, in cache)
HELLA_LSE_ROWS = 8


def read_hellaswag(path, limit=0):
    """The examples of a HellaSwag jsonl file (its first `limit` if > 0), checked: a bad line fails
    here, by line."""
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
                    raise ValueError(
                        f"{path}, line {lineno}: expected a JSON object, got "
                        f"{type(example).__name__}"
                    )
                for field, (ok, want) in HELLA_FIELDS.items():
                    if field not in example:
                        raise ValueError(f"{path}, line {lineno}: field {field!r} is missing")
                    if not ok(example[field]):
                        raise ValueError(
                            f"{path}, line {lineno}: field {field!r} should be {want}, "
                            f"got {example[field]!r}"
                        )
                # Hugging Face's copy stores it as a string
                example["label"] = int(example["label"])
                examples.append(example)
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not UTF-8 text ({e.reason}); HellaSwag's jsonl is UTF-8, uncompressed"
        ) from None
    return examples


def hellaswag_tokens(examples, block_size, enc):
    """Per example, with enc (train_gpt2.get_tokenizer()): context tokens (cut to fit block_size),
    each ending's tokens with its space, endings' lengths."""
    data = []
    for i, example in enumerate(examples):
        ends = [enc.encode(" " + e) for e in example["endings"]]
        room = block_size - max(map(len, ends))
        if room < 1:
            raise ValueError(
                f"HellaSwag example {i}: an ending is longer than block_size={block_size} tokens"
            )
        data.append(
            (enc.encode(example["ctx"])[-room:], ends, [len(e) for e in example["endings"]])
        )
    return data


def pack_windows(windows, capacity, fill=True):
    """Windows (lists of token ids) packed into rows. Windows that share a start share its
    positions, as a HellaSwag example's endings share its context: sorted, so that texts with a
    common start are neighbours (and the longer first, so that a window that starts another is read
    off it for free), each window after the first of its group keeps only what follows the part it
    shares with that first, its trunk, while the group stays within `capacity` positions. fill:
    groups then fill rows as long as the longest group, largest first: as long as plain padded rows,
    and a short text fills the room a longer row leaves; else each group is a row. Or, where that
    takes more positions (rows x the longest), each window is a row of its own. Returns rows, each a
    list of groups (trunk window index, [(window index, shared length)])."""
    order = sorted(range(len(windows)), key=lambda i: (*windows[i], math.inf))
    groups = []
    sizes = []
    for i in order:
        w = windows[i]
        if groups:
            trunk = windows[groups[-1][0]]
            shared = next(
                (n for n, (a, b) in enumerate(zip(trunk, w)) if a != b), min(len(trunk), len(w))
            )
            if shared and sizes[-1] + len(w) - shared <= capacity:
                groups[-1][1].append((i, shared))
                sizes[-1] += len(w) - shared
                continue
        groups.append((i, []))
        sizes.append(len(w))
    rows = []  # first fit, largest groups first
    room = []
    for g in sorted(range(len(groups)), key=lambda g: -sizes[g]) if fill else ():
        r = next((r for r in range(len(rows)) if room[r] >= sizes[g]), None)
        if r is None:
            rows.append([])
            room.append(max(sizes))
            r = len(rows) - 1
        rows[r].append(groups[g])
        room[r] -= sizes[g]
    if not fill:
        rows = [[group] for group in groups]
    # Texts that share little (a batch of unrelated prompts, as lm-eval sends them sorted by length)
    # fill rows of the longest group's length unevenly: 30% more positions than a row each, measured
    # on a HellaSwag-like batch.
    alone = [[(i, [])] for i in order]
    return min(
        rows, alone, key=lambda rows: len(rows) * max(row_length(windows, row) for row in rows)
    )


def row_length(windows, row):
    return sum(
        len(windows[t]) + sum(len(windows[i]) - n for i, n in branches) for t, branches in row
    )


def packed_inputs(windows, rows, shape=None):
    """(tokens, positions, attention mask) of packed rows, right-padded to the longest (or to shape,
    (B, T)), and for each window the flat index of the hidden state at each of its positions. A
    trunk's tokens attend causally within it; a window that shares a trunk's first n tokens attends
    to those and, causally, to its own; padding, to itself: never an empty row of the mask, so never
    a NaN."""
    B, T = shape or (len(rows), max(row_length(windows, row) for row in rows))
    tokens = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = -1 - torch.arange(B * T).view(B, T)  # padding: a segment of its own for each position
    trunk_of = torch.full((B, T), -1)
    shared = torch.zeros(B, T, dtype=torch.long)
    states = {}
    segments = 0
    for r, row in enumerate(rows):
        at = 0
        for t, branches in row:
            n = len(windows[t])
            tokens[r, at : at + n] = torch.tensor(windows[t])
            pos[r, at : at + n] = torch.arange(n)
            seg[r, at : at + n] = segments
            trunk_of[r, at : at + n] = segments
            trunk_states = list(range(r * T + at, r * T + at + n))
            states[t] = trunk_states
            trunk = segments
            at = at + n
            segments = segments + 1
            for i, k in branches:
                rest = windows[i][k:]
                span = slice(at, at + len(rest))
                tokens[r, span] = torch.tensor(rest, dtype=torch.long)
                pos[r, span] = torch.arange(k, k + len(rest))
                seg[r, span] = segments
                trunk_of[r, span] = trunk
                shared[r, span] = k
                states[i] = trunk_states[:k] + list(range(r * T + at, r * T + at + len(rest)))
                at = at + len(rest)
                segments = segments + 1
    is_trunk = ((seg == trunk_of) & (seg >= 0))[:, None, :]
    mask = (seg[:, None, :] == seg[:, :, None]) | (
        is_trunk
        & (trunk_of[:, None, :] == trunk_of[:, :, None])
        & (pos[:, None, :] < shared[:, :, None])
    )
    mask &= torch.ones(T, T, dtype=torch.bool).tril()
    return (tokens, pos, mask[:, None]), states


def batched_rows(windows, rows, batch_tokens, fixed_shape=False):
    """rows, longest first, in batches of about batch_tokens positions (at least one row): [(rows,
    shape)], shape what packed_inputs pads them to. fixed_shape: every batch as wide as the longest
    row and as many rows as the first, so that a compiled model meets one shape; None: as wide as
    its longest row."""
    rows = sorted(rows, key=lambda row: -row_length(windows, row))
    longest = row_length(windows, rows[0]) if rows else 1
    batches = []
    start = 0
    while start < len(rows):
        width = longest if fixed_shape else row_length(windows, rows[start])
        count = max(1, batch_tokens // width)
        batches.append((rows[start : start + count], (count, longest) if fixed_shape else None))
        start += count
    return batches


def hellaswag_layout(data, batch_tokens, fixed_shape=False):
    """HellaSwag's windows, window 4i + k the context of example i then its ending k, and their
    batches (batched_rows'): each example's endings share its context's positions (pack_windows), an
    example a row."""
    windows = [ctx + end for ctx, ends, _ in data for end in ends]
    capacity = max((len(ctx) + sum(map(len, ends)) for ctx, ends, _ in data), default=1)
    # An example a row, not rows filled to the longest: attention over a row is computed whole, and
    # HellaSwag's lengths vary enough that filled rows cost more attention than the padding they
    # save.
    rows = pack_windows(windows, capacity, fill=False)
    return windows, batched_rows(windows, rows, batch_tokens, fixed_shape)


def hellaswag_batches(data, batch_tokens, fixed_shape=False):
    """Batches of ~batch_tokens tokens, longest first; fixed_shape: one shape, one compile. Yields
    (example indices, (tokens, positions, mask), (windows scored, states to project, and per ending
    token: its state's index among them, its id, its window's index among those scored))."""
    windows, batches = hellaswag_layout(data, batch_tokens, fixed_shape)
    for rows, shape in batches:
        inputs, states = packed_inputs(windows, rows, shape)
        scored = sorted(states)
        flat = []
        targets = []
        ending = []
        for j, w in enumerate(scored):
            ctx, ends, _ = data[w // 4]
            end = ends[w % 4]
            flat += states[w][len(ctx) - 1 : -1]  # token t predicts token t + 1
            targets += end
            ending += [j] * len(end)
        # The last context token predicts every ending's first token: its state is projected once.
        unique, pick = torch.tensor(flat).unique(return_inverse=True)
        examples = sorted({w // 4 for w in scored})
        yield (
            examples,
            inputs,
            (torch.tensor(scored), unique, pick, torch.tensor(targets), torch.tensor(ending)),
        )


@torch.no_grad()
def hellaswag_losses(model, data, batch_tokens, autocast, fixed_shape=False, forwards=0):
    """(N, 4) float64 summed ending losses, projecting only states that predict an ending token (all
    logits cost most of the time); sharded, a rank runs one-token forwards up to `forwards`."""
    device = next(model.parameters()).device
    losses = torch.zeros(len(data), 4, dtype=torch.float64)
    with autocast:
        # one region for all batches, so that autocast casts each weight once, not once a forward
        zero = torch.zeros(1, 1, dtype=torch.long, device=device)
        sees_itself = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
        for _ in range(forwards - len(hellaswag_layout(data, batch_tokens, fixed_shape)[1])):
            model.hidden_states(zero, zero, sees_itself)
        for _, inputs, scored in hellaswag_batches(data, batch_tokens, fixed_shape):
            tokens, pos, mask = (t.to(device) for t in inputs)
            windows = scored[0]
            states, pick, targets, ending = (t.to(device) for t in scored[1:])
            h = model.hidden_states(tokens, pos, mask)
            # Real tokens' rows only: at logit 0 the padding ids would take much of a pretrained
            # model's probability. (N, GPT2_TOKENS)
            logits = F.linear(h.flatten(0, 1)[states], model.lm_head.weight[:GPT2_TOKENS])
            # Each row's log-sum-exp in fp32 as x - log_softmax(x) at any column: one fused pass,
            # logsumexp makes four. A few rows at a time stay in a CPU's cache: an fp32 copy of all
            # logits took longer than the matmul.
            chunk = HELLA_LSE_ROWS if device.type == "cpu" else HELLA_LSE_ROWS_GPU
            chunks = (x.float() for x in logits.split(chunk))
            lse = torch.cat([x[:, 0] - F.log_softmax(x, dim=1)[:, 0] for x in chunks])
            nll = lse[pick] - logits[pick, targets].float()
            total = torch.zeros(len(windows), device=device).index_add_(0, ending, nll)
            losses.view(-1)[windows] = total.double().cpu()
    return losses


def ending_lengths(data):
    """(N, 4) float64: each ending's length in tokens, what acc_norm divides its summed loss by."""
    return torch.tensor([list(map(len, ends)) for _, ends, _ in data], dtype=torch.float64).view(
        -1, 4
    )


def evaluate_hellaswag(model, data, labels, batch_tokens, autocast, sharded=False):
    """(acc_norm, examples) over all ranks: the pick is the ending with the lowest mean loss per
    token. sharded: an FSDP model, whose forward is a collective, so every rank runs as many."""
    device = next(model.parameters()).device
    forwards = 0
    if sharded:  # every rank runs the most batches any rank has
        forwards = torch.tensor(len(hellaswag_layout(data, batch_tokens, True)[1]), device=device)
        dist.all_reduce(forwards, op=dist.ReduceOp.MAX)
    losses = hellaswag_losses(model, data, batch_tokens, autocast, True, int(forwards))
    picks = (losses / ending_lengths(data)).argmin(dim=1)
    counts = torch.tensor([len(labels), (picks == labels).sum().item()], device=device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    n, correct = counts.tolist()
    return correct / max(n, 1), n


def hellaswag_predictions(model, data, batch_tokens, autocast, fixed_shape=False):
    """The ending (0-3) each example's model picks under each HELLA_METRICS, as an (N, 3) tensor."""
    total = hellaswag_losses(model, data, batch_tokens, autocast, fixed_shape)
    chars = (
        torch.tensor([chars for *_, chars in data], dtype=torch.float64).view(-1, 4).clamp(min=1)
    )
    return torch.stack(
        [s.argmin(1) for s in (total, total / ending_lengths(data), total / chars)], dim=1
    )


# ----------------------------------------------------------------------------------------------
# The command line: it imports train_gpt2 inside its functions, as train_gpt2 imports this file.


def download(url, path):
    """url to path with a progress bar, written whole or not at all (atomic_write)."""
    import train_gpt2 as tg

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        with (
            urllib.request.urlopen(url, timeout=60) as response,
            tg.atomic_write(path) as f,
            tqdm(
                total=int(response.headers.get("Content-Length") or 0) or None,
                unit="B",
                unit_scale=True,
                desc=f"downloading {os.path.basename(path)}",
            ) as bar,
        ):
            while chunk := response.read(1 << 20):
                bar.update(f.write(chunk))
    except OSError as e:  # urllib's URLError and HTTPError are OSErrors
        raise tg.UserError(
            f"cannot download {url} ({e}); put hellaswag_val.jsonl at {path} "
            f"or pass --hella_data=path.jsonl"
        ) from None


def parse_args(argv):
    import train_gpt2 as tg

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        required=True,
        help="train_gpt2.py checkpoint, Hugging Face directory, or hub name",
    )
    p.add_argument(
        "--hella_data",
        default=tg.SETTINGS["hella_data"],
        help="HellaSwag jsonl (default: %(default)s, downloaded there if missing)",
    )
    p.add_argument(
        "--hella_examples",
        type=int,
        default=tg.SETTINGS["hella_examples"],
        help="score only the file's first N examples (0: all)",
    )
    p.add_argument(
        "--batch_tokens",
        type=int,
        default=0,
        help="tokens per forward pass, padding included "
        "(default 8192 on a GPU; 2048 on CPU, where more gains nothing)",
    )
    p.add_argument(
        "--device", default="auto", help="auto picks cuda, then mps, then cpu; or name one"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=tg.DTYPES,
        help="autocast dtype; auto: bfloat16 where the device has it natively, else float32",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the model (one shape, compiled once)"
    )
    p.add_argument("--json", default="", help="also write the results to this file")
    for arg in argv:  # train_gpt2.py's names, so that a flag means one thing in both
        old = arg.split("=")[0]
        if old in ("--data", "--limit"):
            new = {"--data": "--hella_data", "--limit": "--hella_examples"}[old]
            sys.exit(f"error: {old} is now {new}, as train_gpt2.py names it")
    args = p.parse_args(argv)
    for name in ("hella_examples", "batch_tokens"):
        if getattr(args, name) < 0:
            sys.exit(
                f"error: --{name}={getattr(args, name)} is negative; pass 0 for the default or a "
                "positive number"
            )
    # checked now, as the results come only after the whole evaluation
    problem = args.json and (
        "is a directory" if os.path.isdir(args.json) else tg.missing_parent(args.json)
    )
    if problem:
        sys.exit(f"error: --json={args.json}: {problem}; name a file in an existing directory")
    # now, as a local path that does not exist would otherwise wait for the data and its download
    try:
        tg.local_model_path(args.model)
    except tg.UserError as e:
        sys.exit(f"error: {e}")
    return args


def accuracies(correct):
    """{metric: accuracy} from an (N, len(HELLA_METRICS)) bool tensor of right predictions."""
    return {name: correct[:, i].double().mean().item() for i, name in enumerate(HELLA_METRICS)}


def evaluate(args):
    import train_gpt2 as tg

    path = args.hella_data
    if path == tg.SETTINGS["hella_data"] and not os.path.isfile(path):
        download(URL, path)
    if not os.path.isfile(path):
        raise tg.UserError(f"--hella_data={path}: no such file")
    try:
        examples = read_hellaswag(path, args.hella_examples)
    except ValueError as e:
        raise tg.UserError(str(e)) from None
    if not examples:
        raise tg.UserError(f"{path}: holds no examples")
    device = tg.pick_device(args.device)
    model = tg.load_model(args.model).to(device)
    if model.config.vocab_size < GPT2_TOKENS:
        raise tg.UserError(
            f"--model={args.model}: vocab_size {model.config.vocab_size} cannot hold GPT-2's tokens"
        )
    try:
        data = hellaswag_tokens(examples, model.config.block_size, tg.get_tokenizer())
    except ValueError as e:
        raise tg.UserError(str(e)) from None
    t0 = time.perf_counter()
    batch_tokens = args.batch_tokens or (2048 if device == "cpu" else 8192)
    if args.compile:  # scoring runs hidden_states, not forward
        model.hidden_states = torch.compile(model.hidden_states)
    dtype = tg.resolve_dtype(args.dtype, device.split(":")[0], None, job="score")
    preds = hellaswag_predictions(
        model,
        data,
        batch_tokens,
        tg.autocast_context(device.split(":")[0], dtype),
        fixed_shape=args.compile,
    )
    seconds = time.perf_counter() - t0
    correct = preds == torch.tensor([e["label"] for e in examples])[:, None]
    split_types = sorted({e["split_type"] for e in examples})
    by_split = {s: torch.tensor([e["split_type"] == s for e in examples]) for s in split_types}
    return {
        "model": args.model,
        "data": path,
        "examples": len(examples),
        "device": device,
        "dtype": dtype,
        "seconds": seconds,
        **accuracies(correct),
        "metrics": HELLA_METRICS,
        "split_type": {
            s: {"examples": int(m.sum()), **accuracies(correct[m])} for s, m in by_split.items()
        },
    }


def main(argv=None):
    import train_gpt2 as tg

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        results = evaluate(args)
    except tg.UserError as e:
        sys.exit(f"error: {e}")
    n = results["examples"]
    print(
        f"HellaSwag: {n} examples of {results['data']}, model {results['model']}, "
        f"{results['device']} {results['dtype']}, {n / results['seconds']:.1f} examples/s"
    )
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
