"""Training curves from train_gpt2.py's log.txt, as a PNG, against GPT-2 and GPT-3 124M.

    python plot.py log --out=curves.png
    python plot.py log other_run/log.txt --labels=baseline,new --out=compare.png
    python plot.py log_finetune --logy                # a log-scale loss axis

Panels: train loss (smoothed) and val loss against step, the same against tokens seen, and
HellaSwag against step when a log has HellaSwag lines. The GPT-2/GPT-3 reference lines are drawn
when every run's record says it trained on FineWeb data (its data_dir), or with --refs: on other
text GPT-2's FineWeb val loss means nothing and would stretch the axis. Tokens per step:
--tokens_per_step if given, else the run's record's or newest readable checkpoint's
total_batch_size, else 524288 (GPT-2 124M's). --out's extension picks the format (.pdf, ...).
"""
import argparse
import contextlib
import json
import os
import sys

import torch

from train_gpt2 import (
    LOGGED_STEP,
    NUMPY_ARRAY_GLOBALS,
    RUN_RECORD,
    SETTINGS,
    UserError,
    list_checkpoints,
    missing_parent,
)

GPT2_124M_VAL_LOSS = 3.2924  # FineWeb-Edu val loss of OpenAI's GPT-2 124M
GPT2_124M_HELLASWAG = 0.2955
GPT3_124M_HELLASWAG = 0.337  # from the GPT-3 paper's table
FIGSIZE = (15, 4.5)  # inches, at DPI dots per inch: a 1500 x 450 pixel PNG
DPI = 100


def read_run_record(log_file):
    """The run record at the top of a train_gpt2.py log.txt (see run_record), or None if it has
    none."""
    with open(log_file, encoding="utf-8", errors="replace") as f:
        first = f.readline()
    if not first.startswith(RUN_RECORD):
        return None
    with contextlib.suppress(json.JSONDecodeError):
        return json.loads(first[len(RUN_RECORD):])
    return None


def read_log(path):
    """{"train": ([steps], [values]), "val": ..., "hella": ...} from log.txt lines
    `step kind value`."""
    if os.path.isdir(path):
        path = os.path.join(path, "log.txt")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such log; pass a run's log_dir or its log.txt")
    series = {"train": ([], []), "val": ([], []), "hella": ([], [])}
    with open(path, encoding="utf-8") as f:
        try:
            for n, line in enumerate(f, 1):
                # a note a person added, which train_gpt2.py's resume keeps
                if not LOGGED_STEP.match(line):
                    continue
                try:
                    step, kind, value = line.split()
                    series[kind][0].append(int(step))
                    series[kind][1].append(float(value))
                except (ValueError, KeyError):
                    raise UserError(f"{path}:{n}: {line.strip()!r} is not "
                                    f"`step train|val|hella value`") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not a text log (it holds bytes that are not UTF-8); "
                            f"pass a run's log_dir or its log.txt") from None
    # a run just begun has a record and no step yet
    if not any(steps for steps, _ in series.values()) and read_run_record(path) is None:
        raise UserError(f"{path}: not a train_gpt2.py log (no run record and no "
                        f"`step train|val|hella value` line); pass a run's log_dir or its log.txt")
    return series


def tokens_per_step(path):
    """total_batch_size from the log's run record; for a log written before records, from the
    newest readable checkpoint beside it, else the default's. An unreadable checkpoint (cut short by
    an interrupted copy, say) is skipped with a warning rather than refused: it only scales one
    panel's x axis, which an older checkpoint of the same run scales as well."""
    if os.path.isdir(path):
        run_dir = path
        log_file = os.path.join(run_dir, "log.txt")
    else:
        run_dir = os.path.dirname(path)
        log_file = path
    record = read_run_record(log_file)
    if record:
        return record["settings"]["total_batch_size"]
    for _, ckpt_path in reversed(list_checkpoints(run_dir)):
        try:
            # mmap: reads the config alone
            with torch.serialization.safe_globals(NUMPY_ARRAY_GLOBALS):
                ckpt = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=True)
            return ckpt["config"]["total_batch_size"]
        except Exception as e:
            print(f"warning: skipping {ckpt_path}, not a readable checkpoint "
                  f"({type(e).__name__}); the tokens axis uses an older one, else "
                  f"{SETTINGS['total_batch_size']}; --tokens_per_step sets it", file=sys.stderr)
    return SETTINGS["total_batch_size"]


def on_fineweb(path):
    """Whether the run's record says it trained on FineWeb or FineWeb-Edu shards (False without a
    record)."""
    log_file = os.path.join(path, "log.txt") if os.path.isdir(path) else path
    record = read_run_record(log_file)
    if not record:
        return False
    data_dir = os.path.basename(os.path.normpath(record["settings"]["data_dir"]))
    return "fineweb" in data_dir.lower()


def ema(values, smooth):
    out = []
    avg = values[0] if values else 0.0
    for v in values:
        avg = smooth * avg + (1 - smooth) * v
        out.append(avg)
    return out


def image_path(out, formats):
    """The file savefig will write for --out, given the extensions it knows: a name without one gets
    .png, as savefig gives it."""
    if not out:
        raise UserError("--out is empty; name the image to write, e.g. --out=curves.png")
    if os.path.isdir(out):
        example = os.path.join(out, "curves.png")
        raise UserError(f"--out={out} is a directory; name a file in it, e.g. --out={example}")
    ext = os.path.splitext(out)[1][1:].lower()
    if ext and ext not in formats:
        raise UserError(f"--out={out}: matplotlib cannot write .{ext} files; "
                        f"end the name with one of: " + ", ".join(f".{f}" for f in sorted(formats)))
    if missing_parent(out):
        raise UserError(f"--out={out}: {missing_parent(out)}; name a file in an existing directory")
    return out if ext else out + ".png"


def plot(runs, out, smooth=0.9, refs=False, logy=False):
    """runs: [(label, series, tokens_per_step)]; refs draws the GPT-2/GPT-3 124M lines, logy a
    log-scale loss axis. Writes the PNG and returns the figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    has_hella = any(series["hella"][0] for _, series, _ in runs)
    fig, axes = plt.subplots(1, 3 if has_hella else 2, figsize=FIGSIZE, dpi=DPI)
    by_step, by_tokens, hella = (*axes, None)[:3]
    for i, (label, series, tps) in enumerate(runs):
        color = f"C{i}"
        for ax, scale in ((by_step, 1), (by_tokens, tps)):
            steps, losses = series["train"]
            ax.plot([s * scale for s in steps], ema(losses, smooth), color=color, alpha=0.6,
                    label=f"{label} train")
            steps, losses = series["val"]
            ax.plot([s * scale for s in steps], losses, color=color, marker=".",
                    label=f"{label} val")
        if series["hella"][0]:
            hella.plot(*series["hella"], color=color, marker=".", label=label)
    for ax in (by_step, by_tokens):
        if refs:
            ax.axhline(GPT2_124M_VAL_LOSS, color="gray", linestyle="--", label="GPT-2 124M val")
        ax.set_ylabel("loss")
        if logy:
            ax.set_yscale("log")
    by_step.set_xlabel("step")
    by_tokens.set_xlabel("tokens")
    by_tokens.xaxis.set_major_formatter(EngFormatter())
    titles = [(by_step, f"loss (train EMA {smooth})"), (by_tokens, "loss vs tokens")]
    if hella:
        if refs:
            hella.axhline(GPT2_124M_HELLASWAG, color="gray", linestyle="--", label="GPT-2 124M")
            hella.axhline(GPT3_124M_HELLASWAG, color="black", linestyle="--", label="GPT-3 124M")
        hella.set_xlabel("step")
        hella.set_ylabel("HellaSwag acc_norm")
        titles.append((hella, "HellaSwag"))
    for ax, title in titles:
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="log_dir or log.txt of each run to overlay")
    p.add_argument("--out", default="curves.png",
                   help="image to write; its extension picks the format "
                        "(.png, .pdf, .svg, ...; none: .png)")
    p.add_argument("--labels", default="", help="comma-separated legend names (default: the paths)")
    p.add_argument("--tokens_per_step", type=int, default=None,
                   help="tokens per step of every run (default: "
                        "from each run's newest checkpoint, else 524288)")
    p.add_argument("--smooth", type=float, default=0.9,
                   help="EMA factor for train loss, in [0, 1) (0: none)")
    p.add_argument("--refs", action="store_true",
                   help="draw the GPT-2/GPT-3 124M reference lines (default: only "
                        "when every run's record says FineWeb data)")
    p.add_argument("--logy", action="store_true", help="log-scale loss axis")
    args = p.parse_args(argv)
    try:
        # optional dependency: fail before any work
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        sys.exit("error: plot.py needs matplotlib; install it with: pip install matplotlib")
    labels = args.labels.split(",") if args.labels else args.runs
    try:
        out = image_path(args.out, FigureCanvasBase.get_supported_filetypes())
        if not 0 <= args.smooth < 1:  # written so that nan fails too
            raise UserError(f"--smooth={args.smooth} is out of range; --smooth must be at least 0 "
                            f"(no smoothing) and below 1")
        if args.tokens_per_step is not None and args.tokens_per_step < 1:
            raise UserError(f"--tokens_per_step={args.tokens_per_step} is not positive; pass the "
                            f"run's total_batch_size, or leave it out to read it from a checkpoint")
        if len(labels) != len(args.runs):
            raise UserError(f"--labels names {len(labels)} runs but {len(args.runs)} were given")
        runs = [(label, read_log(path), args.tokens_per_step or tokens_per_step(path))
                for label, path in zip(labels, args.runs)]
        refs = args.refs or all(map(on_fineweb, args.runs))
        plot(runs, out, args.smooth, refs, args.logy)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
