"""Tokenise a text corpus with GPT-2's BPE into the uint16 shards train_gpt2.py reads.

    python prepare_fineweb.py                  # FineWeb-Edu sample-10BT -> edu_fineweb10B/
    python prepare_fineweb.py --dataset=fineweb --name=sample-100BT --streaming
    python prepare_fineweb.py --data_files='corpus/*.parquet' --text_column=content --out=my_shards
    python prepare_fineweb.py --dataset=pydoc  # Python's own docs, offline (the quickstart)
    # any hub dataset; conversations, for --preset=sft
    python prepare_fineweb.py --dataset=HuggingFaceTB/smol-smoltalk

Shard 000000 is the val split (--val_tokens long, else one shard; a corpus that fits in one shard
has its first tenth held out), the rest are train. Each shard is written to a temp file and renamed
when complete, and manifest.json records how many documents every shard consumed, so rerunning an
interrupted command skips the finished shards and ends byte-identical to a run that was never
interrupted.

Rows with a `messages` column are conversations
([{"role": "system"|"user"|"assistant", "content": "..."}, ...], the hub's chat format): each
becomes chat.render's tokens, and beside each shard NAME.mask.npy holds one uint8 per token, 1 where
the token is a target to train on (the assistant's words and their <|end|>). All rows are checked
before anything is written (as they come, with --streaming).
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

import chat
from train_gpt2 import (
    CHAT_TOKENS,
    EOT,
    LLMC_HEADER_BYTES,
    LLMC_MAGIC,
    LLMC_VERSION,
    UserError,
    atomic_write,
    get_tokenizer,
    remove_stale_temp_files,
)

# hub repository (none: built locally), shard file prefix, default output directory
DATASETS = {
    "fineweb-edu": dict(repo="HuggingFaceFW/fineweb-edu", prefix="edufineweb",
                        out="edu_fineweb{size}"),
    "fineweb": dict(repo="HuggingFaceFW/fineweb", prefix="fineweb", out="fineweb{size}"),
    "pydoc": dict(repo=None, prefix="pydoc", out="pydoc_topics"),
}
LOCAL = dict(prefix="local", out="local_shards")  # --data_files
# datasets' own loaders; a .txt file is one document, as a corpus of one file per document expects
BUILDERS = {
    ".txt": ("text", {"sample_by": "document"}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
}
SHARD_SIZE = 10 ** 8  # tokens per shard
# the pydoc corpus is ~139K tokens: a 16K-token val shard and 8 train shards
PYDOC_SHARD_SIZE = 2 ** 14
EOT_ARRAY = np.array([EOT], dtype=np.uint32)
# documents per pool task: enough to amortise its cost, few enough to balance the end
BATCH_DOCS = 128


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset",
                   help="fineweb-edu (default), fineweb, pydoc (the Python docs this interpreter "
                        "ships, for an offline run), or any hub dataset as owner/name")
    p.add_argument("--name",
                   help="hub subset: sample-10BT (fineweb's default), sample-100BT, "
                        "sample-350BT, ...")
    p.add_argument("--streaming", action="store_true",
                   help="tokenise while downloading, keeping no local copy")
    p.add_argument("--data_files",
                   help="glob of local .txt, .jsonl or .parquet files instead of a hub dataset")
    p.add_argument("--text_column", default="text", help="column holding each document's text")
    p.add_argument("--out",
                   help="output directory (default: from the dataset, e.g. edu_fineweb10B)")
    p.add_argument("--shard_size", type=int,
                   help=f"tokens per shard (default {SHARD_SIZE:,}; pydoc {PYDOC_SHARD_SIZE:,})")
    p.add_argument("--num_proc", type=int, default=os.cpu_count(),
                   help="tokenising processes (default: all CPUs)")
    p.add_argument("--format", choices=("npy", "bin"), default="npy", help="npy, or llm.c's .bin")
    p.add_argument("--val_tokens", type=int,
                   help="tokens of the val split, shard 000000 (default: one shard; "
                        "a tenth of a corpus that fits in one shard)")
    args = p.parse_args(argv)
    if args.dataset and args.data_files:
        raise UserError("give --dataset or --data_files, not both")
    if not args.data_files:
        args.dataset = args.dataset or "fineweb-edu"
    if args.dataset and args.dataset not in DATASETS and args.dataset.count("/") != 1:
        raise UserError(f"--dataset={args.dataset}: expected {', '.join(DATASETS)} "
                        f"or a hub dataset as owner/name")
    if args.dataset in ("fineweb-edu", "fineweb"):
        args.name = args.name or "sample-10BT"
    if args.dataset in DATASETS:
        spec = DATASETS[args.dataset]
    elif args.dataset:  # a hub dataset's shards and directory are named after it
        name = args.dataset.split("/")[-1]
        spec = dict(repo=args.dataset, prefix=name, out=name)
    else:
        spec = LOCAL
    if args.out is None:  # sample-10BT goes to edu_fineweb10B, where train_gpt2.py looks by default
        subset = args.name or ""
        if subset.startswith("sample-"):
            size = subset[len("sample-"):].removesuffix("T")
        else:
            size = "_" + subset
        args.out = spec["out"].format(size=size)
    if args.shard_size is None:
        args.shard_size = PYDOC_SHARD_SIZE if args.dataset == "pydoc" else SHARD_SIZE
    if args.shard_size < 1 or args.num_proc < 1:
        raise UserError("--shard_size and --num_proc must be positive")
    if args.val_tokens is not None and args.val_tokens < 1:
        raise UserError(f"--val_tokens={args.val_tokens} is not positive; the val split needs at "
                        f"least one token (leave it out for the default)")
    args.prefix = spec["prefix"]
    args.repo = spec.get("repo")
    return args


def write_pydoc_corpus(directory):
    """The interpreter's pydoc topics (~465 KB of English) as a jsonl file, one topic a
    document."""
    from pydoc_data.topics import topics
    path = os.path.join(directory, "pydoc_topics.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics))
    return path


def resolve_source(args, scratch):
    """(load_dataset path, its keyword arguments, the source as recorded in the manifest)."""
    if args.repo:
        return args.repo, {"name": args.name}, {"dataset": args.repo, "name": args.name}
    if args.dataset == "pydoc":
        files = [write_pydoc_corpus(scratch)]
        source = {"dataset": "pydoc", "python": platform.python_version()}
    else:
        matched = sorted(glob.glob(args.data_files, recursive=True))
        files = [f for f in matched if os.path.isfile(f)]
        if not files:
            only_dirs = ""
            if matched:
                only_dirs = (f", only directories; name the files in them, "
                             f"e.g. --data_files='{matched[0]}/*.parquet'")
            raise UserError(f"--data_files={args.data_files!r} matches no files{only_dirs}")
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
    """False for a file with nothing in it, which datasets would fail on (a parquet file of zero
    rows)."""
    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            return pq.read_metadata(path).num_rows > 0
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable parquet file ({e})") from None
    return os.path.getsize(path) > 0


def tokenizer_hash(enc):
    """sha256 of GPT-2's tokens' bytes in id order: equal hashes mean the same ids for the same
    text. The chat template's tokens (never made from text) are recorded apart, as the manifest's
    chat_tokens."""
    h = hashlib.sha256(enc.name.encode())
    for i in range(min(enc.n_vocab, EOT + 1)):
        b = enc.decode_single_token_bytes(i)
        h.update(len(b).to_bytes(2, "little") + b)
    return h.hexdigest()


# the dataset's text (or messages) column, memory-mapped Arrow, that tokenize_task reads from
_rows = None
_handoff = None  # the scratch directory where pool workers leave their tokens
_chat = False  # whether the rows are conversations


def init_worker(rows, handoff=None, conversations=False):
    """Keeps the text column for tokenize_task; in a pool's worker also keeps the handoff directory,
    builds the encoder and leaves Ctrl-C to the main process, which stops the pool."""
    global _rows, _handoff, _chat
    _rows = rows
    _handoff = handoff
    _chat = conversations
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
        raise UserError(f"a document's text is {bad!r}, not a string; name the column of documents "
                        f"with --text_column, or drop the rows without text") from None
    # one pass from the uint32 pieces into uint16: prepare() checked that every id of the encoder
    # fits
    pieces = [part for doc in docs for part in (EOT_ARRAY, doc)]
    tokens = np.concatenate(pieces, dtype=np.uint16, casting="unsafe")
    return tokens, [len(doc) + 1 for doc in docs]


class BadRow(Exception):
    """(row, reason): the dataset's row (from 0) is not a conversation to train on; prepare() says
    where it is."""


def conversation_problem(messages):
    """chat.problem's reason, or that a conversation has no assistant message to train on; None for
    a good one."""
    reason = chat.problem(messages)
    if reason:
        return reason
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message, so nothing to train on"
    return None


def tokenize_chats(conversations, first):
    """tokenize() of conversations (rows first, first + 1, ...): chat.render's ids, each
    conversation one document (its EOT first), and the mask of targets to train, uint8; a bad one
    raises BadRow."""
    ids = []
    trained = []
    lens = []
    for row, messages in enumerate(conversations, first):
        reason = conversation_problem(messages)
        if reason:
            raise BadRow(row, reason)
        tokens, mask = chat.render(messages)
        ids += tokens
        trained += mask
        lens.append(len(tokens))
    return np.array(ids, dtype=np.uint16), lens, np.array(trained, dtype=np.uint8)


def tokenize_task(task):
    """tokenize() (or tokenize_chats) of a task: a range of the column's rows, which the worker
    reads itself (a range costs the main process nothing to send, where reading and pickling the
    texts kept it busy on a core the workers need), or (first row, the texts) when streaming.
    Returns tokens, lengths, and the mask or None."""
    if isinstance(task, range):
        first = task.start
        texts = _rows[task.start:task.stop]
    else:
        first, texts = task
    return tokenize_chats(texts, first) if _chat else (*tokenize(texts), None)


def check_task(task):
    """Refuses (BadRow) the first row of a task's range that is not a conversation to train on."""
    for row, messages in zip(task, _rows[task.start:task.stop]):
        reason = conversation_problem(messages)
        if reason:
            raise BadRow(row, reason)


def tokenize_to_file(task):
    """tokenize_task() in a pool worker, which leaves the tokens (and mask) in a file of the handoff
    directory and returns its path. Returned through the pool's pipe, which holds 64 KB, the tokens
    kept the worker waiting until the main process woke to drain them: ~3 ms a task with three
    processes on two cores, and all the while the main process wrote a shard."""
    tokens, lens, mask = tokenize_task(task)
    fd, path = tempfile.mkstemp(dir=_handoff)
    with open(fd, "wb") as f:
        tokens.tofile(f)
        if mask is not None:
            mask.tofile(f)
    return path, lens


def take_file(path, lens):
    """The tokens (and mask, else None) that tokenize_to_file left at path."""
    data = np.fromfile(path, dtype=np.uint8)
    n = 2 * sum(lens)  # bytes of the uint16 tokens; the mask, if any, follows them
    os.remove(path)
    return data[:n].view(np.uint16), lens, data[n:] if len(data) > n else None


def write_shard(path, tokens):  # or a mask, NAME.mask.npy
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
    Refuses a directory that holds shards of another source or settings, or shards of unknown
    origin."""
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
        raise UserError(f"{path} is not a readable manifest ({e}); use another --out, or delete "
                        f"{out} to start over") from None
    compared = settings.keys() | manifest.keys() - {"shards", "complete", "chat_tokens"}
    differ = sorted(k for k in compared if manifest.get(k) != settings.get(k))
    if differ:
        raise UserError(f"{out} holds shards from a different source (its manifest differs in "
                        f"{', '.join(differ)}); use another --out, or delete {out} to start over")
    kept = []
    # a deleted shard (or mask) is written again, and so is every one after it
    for shard in manifest["shards"]:
        files = [shard[k] for k in ("file", "mask") if k in shard]
        if not all(os.path.exists(os.path.join(out, f)) for f in files):
            manifest["complete"] = False
            break
        kept.append(shard)
    manifest["shards"] = kept
    return manifest


class ShardWriter:
    """Cuts the token stream into shards in out: the val shard first (val_size tokens), then train
    shards of shard_size, each written whole (atomic_write) and recorded in the manifest with the
    tokens of its last document that run on into the next shard (carry), so that an interrupted run
    resumes where it stopped. Conversations' masks are cut alike, each written beside its shard as
    NAME.mask.npy."""

    def __init__(self, args, manifest, conversations=False):
        self.args = args
        self.manifest = manifest
        self.shards = manifest["shards"]
        self.val_size = args.val_tokens or args.shard_size
        self.buf = np.empty(max(self.val_size, args.shard_size), dtype=np.uint16)
        self.fill = 0  # tokens in buf
        # in step with buf
        self.mask = np.empty(len(self.buf), dtype=np.uint8) if conversations else None
        # carry of the full buffer: written once more tokens show it is not the last shard
        self.full_carry = 0

    def size(self):
        return self.args.shard_size if self.shards else self.val_size

    def write(self, end, carry):
        """Writes buf[:end] (and its mask) as the next shard."""
        a = self.args
        tokens = self.buf[:end]
        split = "val" if not self.shards else "train"
        name = f"{a.prefix}_{split}_{len(self.shards):06d}.{a.format}"
        docs = int(np.count_nonzero(tokens == EOT))
        shard = {"file": name, "tokens": end, "docs": docs, "carry": carry}
        if self.mask is not None:
            shard["mask"] = name.rsplit(".", 1)[0] + ".mask.npy"
            write_shard(os.path.join(a.out, shard["mask"]), self.mask[:end])
        write_shard(os.path.join(a.out, name), tokens)
        self.shards.append(shard)
        save_manifest(a.out, self.manifest)

    def add(self, toks, lens, mask=None):
        """Appends documents' tokens (lens: each document's length; mask: a conversation's), writing
        each shard as it fills."""
        ends = np.cumsum(lens)
        pos = 0
        while pos < len(toks):
            if self.fill == self.size():
                self.write(self.fill, self.full_carry)
                self.fill = 0
            take = min(self.size() - self.fill, len(toks) - pos)
            self.buf[self.fill:self.fill + take] = toks[pos:pos + take]
            if mask is not None:
                self.mask[self.fill:self.fill + take] = mask[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == self.size():
                self.full_carry = int(ends[np.searchsorted(ends, pos)] - pos)

    def close(self):
        """Writes what is left; a corpus that fits one shard gives its first tenth to val. Marks it
        complete."""
        if not self.shards:  # the whole corpus is in buf, so the val split can be cut from it now
            if self.args.val_tokens is not None:
                raise UserError(f"--val_tokens={self.args.val_tokens} leaves no train tokens: "
                                f"the corpus is {self.fill:,} tokens; give fewer, or leave it out "
                                f"to hold out a tenth")
            val = max(1, self.fill // 10)  # a whole shard of val would leave train nothing
            print(f"note: the corpus ({self.fill:,} tokens) fits in one shard, so its first "
                  f"{val:,} tokens (10%) are the val split and the rest train; --val_tokens=N sets "
                  f"the val split's size")
            # the document cut at val ends where the next begins
            later = np.flatnonzero(self.buf[val:self.fill] == EOT)
            self.write(val, int(later[0]) if len(later) else self.fill - val)
            self.buf = self.buf[val:self.fill]
            self.fill -= val
            self.mask = None if self.mask is None else self.mask[val:]
        if self.fill:
            self.write(self.fill, 0)
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
        raise UserError(f"cannot write to --out={out} ({e.strerror}); "
                        f"choose a writable directory") from None


def jsonl_lines(files):
    """(path, line number, line) of each row of local .jsonl files, as datasets reads them: blank
    lines are none."""
    for path in files if files and files[0].lower().endswith(".jsonl") else []:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield from ((path, n, line) for n, line in enumerate(f, 1) if line.strip())


def locate(row, files):
    """Where the dataset's row (from 0) is: its file and line in local .jsonl files, else its
    number."""
    for i, (path, n, _) in enumerate(jsonl_lines(files)):
        if i == row:
            return f"{path}, line {n}"
    return f"row {row + 1}"


def bad_line(files):
    """Why datasets could not load local .jsonl files: the first line that is no JSON object (or a
    bad conversation) and what is wrong with it; None if no line is."""
    for path, n, line in jsonl_lines(files):
        try:
            row = json.loads(line)
        except ValueError as e:
            return f"{path}, line {n}: not valid JSON ({getattr(e, 'msg', e)})"
        if not isinstance(row, dict):
            reason = f"{chat.short(row)} is not a JSON object"
        else:
            reason = "messages" in row and conversation_problem(row["messages"])
        if reason:
            return f"{path}, line {n}: {reason}"
    return None


def open_dataset(args, path, options):
    """The dataset, checked to have rows and the text column or messages (conversations); and
    whether it is conversations."""
    import datasets
    try:
        ds = datasets.load_dataset(path, split="train", streaming=args.streaming, **options)
        first = next(iter(ds), None)
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as e:
        cause = str(e.__cause__ or e)  # datasets wraps the reader's error, which says what is wrong
        if "corresponds to no data" not in cause:  # datasets' words for a split of zero rows
            why = bad_line(options.get("data_files"))
            raise UserError(why or f"cannot load {args.data_files or path}: "
                                   f"{cause.splitlines()[0]}") from None
        first = None
    if first is None:
        raise UserError(f"the dataset is empty: {args.data_files or path} has no rows")
    if args.text_column not in first and "messages" not in first:
        raise UserError(f"no column {args.text_column!r} in the dataset; its columns are "
                        f"{', '.join(first)}; name the text column with --text_column "
                        f"(conversations: messages)")
    return ds, "messages" in first


def prepare(args):
    """Writes (or completes) the shards in args.out; returns this run's tokens, docs and seconds."""
    enc = get_tokenizer()
    if enc.max_token_value >= 2 ** 16:
        raise UserError(f"the tokenizer's ids reach {enc.max_token_value}, which does not fit the "
                        f"uint16 shards")
    check_out(args.out)
    with tempfile.TemporaryDirectory() as scratch:
        path, options, source = resolve_source(args, scratch)
        settings = {"source": source, "text_column": args.text_column,
                    "shard_size": args.shard_size, "format": args.format,
                    "tokenizer": tokenizer_hash(enc)}
        # only when given, so that the default's manifest is the same as before
        if args.val_tokens is not None:
            settings["val_tokens"] = args.val_tokens
        manifest = open_manifest(args.out, settings)
        if manifest["complete"]:
            print(f"{args.out} is already complete; nothing to do")
            return {"tokens": 0, "docs": 0, "seconds": 0.0}
        ds, conversations = open_dataset(args, path, options)
        column = "messages" if conversations else args.text_column
        if conversations and manifest.setdefault("chat_tokens", CHAT_TOKENS) != CHAT_TOKENS:
            raise UserError(f"{args.out} holds conversations whose template tokens differ from "
                            f"chat.py's ({manifest['chat_tokens']}); use another --out, or delete "
                            f"{args.out} to start over")
        writer = ShardWriter(args, manifest, conversations)
        docs_done = sum(s["docs"] for s in writer.shards)
        # tokens of the last begun document not yet written
        carry = writer.shards[-1]["carry"] if writer.shards else 0
        skip = docs_done - (1 if carry else 0)
        if args.streaming:
            # no local copy for workers to read: the main process reads and sends the texts
            rows = None
            batches = ds.select_columns([column]).skip(skip).iter(batch_size=BATCH_DOCS)
            work = ((skip + i * BATCH_DOCS, batch[column]) for i, batch in enumerate(batches))
        else:
            # the column pickles as a reference to its memory-mapped Arrow files, so workers open
            # it themselves
            rows = ds[column]
            work = (range(i, min(i + BATCH_DOCS, len(ds)))
                    for i in range(skip, len(ds), BATCH_DOCS))
        tokens_run = 0
        docs_run = 0
        t0 = time.perf_counter()
        bar = None
        init_worker(rows, None, conversations)  # with --num_proc=1 the main process tokenises
        pool = None
        if args.num_proc > 1:
            pool = multiprocessing.Pool(args.num_proc, initializer=init_worker,
                                        initargs=(rows, scratch, conversations))
        try:
            if conversations and not args.streaming:  # every row checked before anything is written
                work = list(work)
                for _ in pool.imap(check_task, work) if pool else map(check_task, work):
                    pass
            bar = tqdm(total=None if args.streaming else len(ds), initial=skip, unit="doc",
                       unit_scale=True, desc=args.out)
            if pool:
                results = (take_file(path, lens)
                           for path, lens in pool.imap(tokenize_to_file, work))
            else:
                results = map(tokenize_task, work)
            for toks, lens, mask in results:
                # the first document was cut by the last finished shard: only its tail is new
                if carry:
                    cut = lens[0] - carry
                    toks = toks[cut:]
                    if mask is not None:
                        mask = mask[cut:]
                    lens[0] = carry
                    carry = 0
                writer.add(toks, lens, mask)
                tokens_run += len(toks)
                docs_run += len(lens)
                bar.update(len(lens))
                rate = tokens_run / (time.perf_counter() - t0)
                bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
        except BadRow as e:
            where = locate(e.args[0], options.get("data_files"))
            raise UserError(f"{where}: {e.args[1]}") from None
        finally:
            if pool:
                pool.terminate()
            if bar is not None:
                bar.close()
        writer.close()

    seconds = time.perf_counter() - t0
    shards = writer.shards
    total = sum(s["tokens"] for s in shards)
    docs = sum(s["docs"] for s in shards)
    print(f"{args.out}: {len(shards)} shards (1 val, {len(shards) - 1} train), {total:,} tokens "
          f"from {docs:,} documents; this run: {tokens_run:,} tokens in {seconds:.1f}s, "
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
        sys.exit(f"error: {e}; finished shards are kept: fix that, then run the same command again "
                 f"to resume")


if __name__ == "__main__":
    main()
