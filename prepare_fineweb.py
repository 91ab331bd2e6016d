"""Tokenise a text corpus with GPT-2's BPE into the uint16 shards train_gpt2.py reads.

    python prepare_fineweb.py                                        # FineWeb-Edu sample-10BT -> edu_fineweb10B/
    python prepare_fineweb.py --dataset=fineweb --name=sample-100BT --streaming
    python prepare_fineweb.py --data_files='corpus/*.parquet' --text_column=content --out=my_shards
    python prepare_fineweb.py --dataset=pydoc                        # Python's own docs, offline (the quickstart)

Shard 000000 is the val split (--val_tokens long, else one shard; a corpus that fits in one shard has its
first tenth held out), the rest are train. Each shard is written to a temp file and renamed when
complete, and manifest.json records how many documents every shard consumed, so rerunning an interrupted
command skips the finished shards and ends byte-identical to a run that was never interrupted.
"""
import argparse
import glob
import hashlib
import json
import multiprocessing
import os
import platform
import signal
import sys
import tempfile
import time

import numpy as np
from tqdm import tqdm

from train_gpt2 import (
    EOT,
    LLMC_HEADER_BYTES,
    LLMC_MAGIC,
    LLMC_VERSION,
    UserError,
    atomic_write,
    get_tokenizer,
    remove_stale_temp_files,
)

DATASETS = {  # hub repository (none: built locally), shard file prefix, default output directory
    "fineweb-edu": dict(repo="HuggingFaceFW/fineweb-edu", prefix="edufineweb", out="edu_fineweb{size}"),
    "fineweb": dict(repo="HuggingFaceFW/fineweb", prefix="fineweb", out="fineweb{size}"),
    "pydoc": dict(repo=None, prefix="pydoc", out="pydoc_topics"),
}
LOCAL = dict(prefix="local", out="local_shards")  # --data_files
# datasets' own loaders; a .txt file is one document, as a corpus of one file per document expects
BUILDERS = {".txt": ("text", {"sample_by": "document"}), ".jsonl": ("json", {}), ".json": ("json", {}),
            ".parquet": ("parquet", {})}
SHARD_SIZE = 10 ** 8           # tokens per shard
PYDOC_SHARD_SIZE = 2 ** 14     # the pydoc corpus is ~139K tokens: a 16K-token val shard and 8 train shards
EOT_ARRAY = np.array([EOT], dtype=np.uint32)
BATCH_DOCS = 128               # documents per pool task: enough to amortise its cost, few enough to balance the end


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=DATASETS, help="fineweb-edu (default), fineweb, or pydoc "
                   "(the Python docs this interpreter ships, for an offline run)")
    p.add_argument("--name", default="sample-10BT", help="hub subset: sample-10BT, sample-100BT, sample-350BT, ...")
    p.add_argument("--streaming", action="store_true", help="tokenise while downloading, keeping no local copy")
    p.add_argument("--data_files", help="glob of local .txt, .jsonl or .parquet files instead of a hub dataset")
    p.add_argument("--text_column", default="text", help="column holding each document's text")
    p.add_argument("--out", help="output directory (default: from the dataset, e.g. edu_fineweb10B)")
    p.add_argument("--shard_size", type=int, help=f"tokens per shard (default {SHARD_SIZE:,}; pydoc "
                   f"{PYDOC_SHARD_SIZE:,})")
    p.add_argument("--num_proc", type=int, default=os.cpu_count(), help="tokenising processes (default: all CPUs)")
    p.add_argument("--format", choices=("npy", "bin"), default="npy", help="npy, or llm.c's .bin")
    p.add_argument("--val_tokens", type=int, help="tokens of the val split, shard 000000 (default: one shard; "
                   "a tenth of a corpus that fits in one shard)")
    args = p.parse_args(argv)
    if args.dataset and args.data_files:
        raise UserError("give --dataset or --data_files, not both")
    if not args.data_files:
        args.dataset = args.dataset or "fineweb-edu"
    spec = DATASETS[args.dataset] if args.dataset else LOCAL
    if args.out is None:  # sample-10BT goes to edu_fineweb10B, where train_gpt2.py looks by default
        size = args.name[len("sample-"):].removesuffix("T") if args.name.startswith("sample-") else "_" + args.name
        args.out = spec["out"].format(size=size)
    if args.shard_size is None:
        args.shard_size = PYDOC_SHARD_SIZE if args.dataset == "pydoc" else SHARD_SIZE
    if args.shard_size < 1 or args.num_proc < 1:
        raise UserError("--shard_size and --num_proc must be positive")
    if args.val_tokens is not None and args.val_tokens < 1:
        raise UserError(f"--val_tokens={args.val_tokens} is not positive; the val split needs at least one token "
                        f"(leave it out for the default)")
    args.prefix = spec["prefix"]
    return args


def write_pydoc_corpus(directory):
    """The interpreter's pydoc topics (~465 KB of English) as a jsonl file, one topic a document."""
    from pydoc_data.topics import topics
    path = os.path.join(directory, "pydoc_topics.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics))
    return path


def resolve_source(args, scratch):
    """(load_dataset path, its keyword arguments, the source as recorded in the manifest)."""
    if args.dataset and DATASETS[args.dataset]["repo"]:
        repo = DATASETS[args.dataset]["repo"]
        return repo, {"name": args.name}, {"dataset": repo, "name": args.name}
    if args.dataset == "pydoc":
        files = [write_pydoc_corpus(scratch)]
        source = {"dataset": "pydoc", "python": platform.python_version()}
    else:
        matched = sorted(glob.glob(args.data_files, recursive=True))
        files = [f for f in matched if os.path.isfile(f)]
        if not files:
            raise UserError(f"--data_files={args.data_files!r} matches no files" + (
                f", only directories; name the files in them, e.g. --data_files='{matched[0]}/*.parquet'"
                if matched else ""))
        source = {"data_files": {os.path.abspath(f): os.path.getsize(f) for f in files}}
    kinds = {os.path.splitext(f)[1].lower() for f in files}
    if len(kinds) > 1 or not kinds <= set(BUILDERS):
        raise UserError(f"--data_files matches {', '.join(sorted(kinds))} files; "
                        f"want all of one kind: {', '.join(BUILDERS)}")
    files = [f for f in files if has_rows(f)]
    if not files:
        raise UserError(f"the dataset is empty: {args.data_files or 'pydoc'} holds no documents")
    builder, options = BUILDERS[kinds.pop()]
    return builder, {"data_files": files, **options}, source


def has_rows(path):
    """False for a file with nothing in it, which datasets would fail on (a parquet file of zero rows)."""
    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            return pq.read_metadata(path).num_rows > 0
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable parquet file ({e})") from None
    return os.path.getsize(path) > 0


def tokenizer_hash(enc):
    """sha256 of every token's bytes in id order: equal hashes mean the same ids for the same text."""
    h = hashlib.sha256(enc.name.encode())
    for i in range(enc.n_vocab):
        b = enc.decode_single_token_bytes(i)
        h.update(len(b).to_bytes(2, "little") + b)
    return h.hexdigest()


_rows = None  # the dataset's text column, memory-mapped Arrow, that tokenize_task reads from
_handoff = None  # the scratch directory where pool workers leave their tokens


def init_worker(rows, handoff=None):
    """Keeps the text column for tokenize_task; in a pool's worker also keeps the handoff directory, builds
    the encoder and leaves Ctrl-C to the main process, which stops the pool."""
    global _rows, _handoff
    _rows, _handoff = rows, handoff
    if multiprocessing.parent_process():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        get_tokenizer()


def tokenize(texts):
    """EOT then the tokens of each document, as one uint16 array, and each document's length in it.
    Runs in the pool's workers; each builds its own encoder on first use, so 'spawn' works too."""
    enc = get_tokenizer()
    # encode_to_numpy with no special tokens is encode_ordinary without building a Python list
    try:
        docs = [enc.encode_to_numpy(text, disallowed_special=()) for text in texts]
    except TypeError:
        bad = next(text for text in texts if not isinstance(text, str))
        raise UserError(f"a document's text is {bad!r}, not a string; name the column of documents with "
                        f"--text_column, or drop the rows without text") from None
    # one pass from the uint32 pieces into uint16: prepare() checked that every id of the encoder fits
    tokens = np.concatenate([part for doc in docs for part in (EOT_ARRAY, doc)], dtype=np.uint16, casting="unsafe")
    return tokens, [len(doc) + 1 for doc in docs]


def tokenize_task(task):
    """tokenize() of a task: a range of the column's rows, which the worker reads itself (a range costs the
    main process nothing to send, where reading and pickling the texts kept it busy on a core the workers
    need), or the texts themselves when streaming."""
    return tokenize(_rows[task.start:task.stop] if isinstance(task, range) else task)


def tokenize_to_file(task):
    """tokenize_task() in a pool worker, which leaves the tokens in a file of the handoff directory and returns
    its path. Returned through the pool's pipe, which holds 64 KB, the tokens kept the worker waiting until
    the main process woke to drain them: ~3 ms a task with three processes on two cores, and all the while
    the main process wrote a shard."""
    tokens, lens = tokenize_task(task)
    fd, path = tempfile.mkstemp(dir=_handoff)
    with open(fd, "wb") as f:
        tokens.tofile(f)
    return path, lens


def take_file(path):
    tokens = np.fromfile(path, dtype=np.uint16)
    os.remove(path)
    return tokens


def write_shard(path, tokens):
    with atomic_write(path) as f:
        if path.endswith(".bin"):
            header = np.zeros(LLMC_HEADER_BYTES // 4, dtype="<i4")
            header[:3] = LLMC_MAGIC, LLMC_VERSION, len(tokens)
            f.write(header.tobytes())
            f.write(tokens.astype("<u2").tobytes())
        else:
            np.save(f, tokens)


def save_manifest(out, manifest):
    with atomic_write(os.path.join(out, "manifest.json"), "w") as f:
        f.write(json.dumps(manifest, indent=1))


def open_manifest(out, settings):
    """The manifest of earlier runs into out (with only the shards still on disk), or a fresh one.
    Refuses a directory that holds shards of another source or settings, or shards of unknown origin."""
    path = os.path.join(out, "manifest.json")
    if not os.path.exists(path):
        if glob.glob(os.path.join(out, "*_val_*.*")) + glob.glob(os.path.join(out, "*_train_*.*")):
            raise UserError(f"{out} holds shards but no manifest.json, so their source is unknown; "
                            f"use another --out or delete them")
        return {**settings, "shards": [], "complete": False}
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable manifest ({e}); use another --out, or delete {out} to start "
                        f"over") from None
    differ = sorted(k for k in settings.keys() | manifest.keys() - {"shards", "complete"}
                    if manifest.get(k) != settings.get(k))
    if differ:
        raise UserError(f"{out} holds shards from a different source (its manifest differs in "
                        f"{', '.join(differ)}); use another --out, or delete {out} to start over")
    kept = []
    for shard in manifest["shards"]:  # a deleted shard is written again, and so is every one after it
        if not os.path.exists(os.path.join(out, shard["file"])):
            manifest["complete"] = False
            break
        kept.append(shard)
    manifest["shards"] = kept
    return manifest


class ShardWriter:
    """Cuts the token stream into shards in out: the val shard first (val_size tokens), then train shards of
    shard_size, each written whole (atomic_write) and recorded in the manifest with the tokens of its last
    document that run on into the next shard (carry), so that an interrupted run resumes where it stopped."""

    def __init__(self, args, manifest):
        self.args, self.manifest, self.shards = args, manifest, manifest["shards"]
        self.val_size = args.val_tokens or args.shard_size
        self.buf, self.fill = np.empty(max(self.val_size, args.shard_size), dtype=np.uint16), 0
        self.full_carry = 0  # carry of the full buffer: written once more tokens show it is not the last shard

    def size(self):
        return self.args.shard_size if self.shards else self.val_size

    def write(self, tokens, carry):
        a = self.args
        name = f"{a.prefix}_{'val' if not self.shards else 'train'}_{len(self.shards):06d}.{a.format}"
        write_shard(os.path.join(a.out, name), tokens)
        self.shards.append({"file": name, "tokens": len(tokens), "docs": int(np.count_nonzero(tokens == EOT)),
                            "carry": carry})
        save_manifest(a.out, self.manifest)

    def add(self, toks, lens):
        """Appends documents' tokens (lens: each document's length), writing each shard as it fills."""
        ends, pos = np.cumsum(lens), 0
        while pos < len(toks):
            if self.fill == self.size():
                self.write(self.buf[:self.fill], self.full_carry)
                self.fill = 0
            take = min(self.size() - self.fill, len(toks) - pos)
            self.buf[self.fill:self.fill + take] = toks[pos:pos + take]
            self.fill, pos = self.fill + take, pos + take
            if self.fill == self.size():
                self.full_carry = int(ends[np.searchsorted(ends, pos)] - pos)

    def close(self):
        """Writes what is left; a corpus that fits one shard gives its first tenth to val. Marks it complete."""
        if not self.shards:  # the whole corpus is in buf, so the val split can be cut from it now
            if self.args.val_tokens is not None:
                raise UserError(f"--val_tokens={self.args.val_tokens} leaves no train tokens: the corpus is "
                                f"{self.fill:,} tokens; give fewer, or leave it out to hold out a tenth")
            val = max(1, self.fill // 10)  # a whole shard of val would leave train nothing
            print(f"note: the corpus ({self.fill:,} tokens) fits in one shard, so its first {val:,} tokens (10%) are "
                  f"the val split and the rest train; --val_tokens=N sets the val split's size")
            later = np.flatnonzero(self.buf[val:self.fill] == EOT)  # the document cut at val ends where the next begins
            self.write(self.buf[:val], int(later[0]) if len(later) else self.fill - val)
            self.buf, self.fill = self.buf[val:self.fill], self.fill - val
        if self.fill:
            self.write(self.buf[:self.fill], 0)
        self.manifest["complete"] = True
        save_manifest(self.args.out, self.manifest)


def check_out(out):
    """out exists and takes files; a killed run's temp files there are gone."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
        remove_stale_temp_files(out)
    except OSError as e:
        raise UserError(f"cannot write to --out={out} ({e.strerror}); choose a writable directory") from None


def open_dataset(args, path, options):
    """The dataset and its first row, checked to have rows and the text column."""
    import datasets
    try:
        ds = datasets.load_dataset(path, split="train", streaming=args.streaming, **options)
        first = next(iter(ds), None)
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as e:
        cause = str(e.__cause__ or e)  # datasets wraps the reader's error, which says what is wrong
        if "corresponds to no data" not in cause:  # datasets' words for a split of zero rows
            raise UserError(f"cannot load {args.data_files or path}: {cause.splitlines()[0]}") from None
        first = None
    if first is None:
        raise UserError(f"the dataset is empty: {args.data_files or path} has no rows")
    if args.text_column not in first:
        raise UserError(f"no column {args.text_column!r} in the dataset; its columns are "
                        f"{', '.join(first)}; name the text column with --text_column")
    return ds


def prepare(args):
    """Writes (or completes) the shards in args.out; returns this run's tokens, docs and seconds."""
    enc = get_tokenizer()
    if enc.max_token_value >= 2 ** 16:
        raise UserError(f"the tokenizer's ids reach {enc.max_token_value}, which does not fit the uint16 shards")
    check_out(args.out)
    with tempfile.TemporaryDirectory() as scratch:
        path, options, source = resolve_source(args, scratch)
        settings = {"source": source, "text_column": args.text_column, "shard_size": args.shard_size,
                    "format": args.format, "tokenizer": tokenizer_hash(enc)}
        if args.val_tokens is not None:  # only when given, so that the default's manifest is the same as before
            settings["val_tokens"] = args.val_tokens
        manifest = open_manifest(args.out, settings)
        if manifest["complete"]:
            print(f"{args.out} is already complete; nothing to do")
            return {"tokens": 0, "docs": 0, "seconds": 0.0}
        ds = open_dataset(args, path, options)
        writer = ShardWriter(args, manifest)
        docs_done = sum(s["docs"] for s in writer.shards)
        carry = writer.shards[-1]["carry"] if writer.shards else 0  # tokens of the last begun document not yet written
        skip = docs_done - (1 if carry else 0)
        if args.streaming:  # no local copy for workers to read: the main process reads and sends the texts
            rows = None
            work = (batch[args.text_column] for batch in
                    ds.select_columns([args.text_column]).skip(skip).iter(batch_size=BATCH_DOCS))
        else:  # the column pickles as a reference to its memory-mapped Arrow files, so workers open it themselves
            rows = ds[args.text_column]
            work = (range(i, min(i + BATCH_DOCS, len(ds))) for i in range(skip, len(ds), BATCH_DOCS))
        tokens_run = docs_run = 0
        t0 = time.perf_counter()
        bar = tqdm(total=None if args.streaming else len(ds), initial=skip, unit="doc", unit_scale=True,
                   desc=args.out)
        init_worker(rows)  # with --num_proc=1 the main process tokenises
        pool = (multiprocessing.Pool(args.num_proc, initializer=init_worker, initargs=(rows, scratch))
                if args.num_proc > 1 else None)
        results = (((take_file(path), lens) for path, lens in pool.imap(tokenize_to_file, work)) if pool
                   else map(tokenize_task, work))
        try:
            for toks, lens in results:
                if carry:  # the first document was cut by the last finished shard: only its tail is new
                    toks, lens[0], carry = toks[lens[0] - carry:], carry, 0
                writer.add(toks, lens)
                tokens_run += len(toks)
                docs_run += len(lens)
                bar.update(len(lens))
                bar.set_postfix_str(f"{tokens_run / (time.perf_counter() - t0):,.0f} tokens/s", refresh=False)
        finally:
            if pool:
                pool.terminate()
            bar.close()
        writer.close()

    seconds = time.perf_counter() - t0
    shards = writer.shards
    total = sum(s["tokens"] for s in shards)
    print(f"{args.out}: {len(shards)} shards (1 val, {len(shards) - 1} train), {total:,} tokens from "
          f"{sum(s['docs'] for s in shards):,} documents; this run: {tokens_run:,} tokens in {seconds:.1f}s, "
          f"{tokens_run / seconds:,.0f} tokens/s, {docs_run / seconds:,.0f} docs/s")
    return {"tokens": tokens_run, "docs": docs_run, "seconds": seconds}


def main(argv=None):
    try:
        prepare(parse_args(sys.argv[1:] if argv is None else argv))
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: finished shards are kept; run the same command again to resume")
    except OSError as e:  # most often a full disk
        sys.exit(f"error: {e}; finished shards are kept: fix that, then run the same command again to resume")


if __name__ == "__main__":
    main()
