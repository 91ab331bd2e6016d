"""prepare_fineweb.py: exact tokens through the datasets path, interrupt-and-resume, and bad
input."""

import errno
import glob
import hashlib
import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
from conftest import ROOT, WORDS, run

import prepare_fineweb
from train_gpt2 import EOT, UserError, get_tokenizer, load_shard

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "",  # an empty document still gets its EOT
    "Ünïcödé, emoji 🙂 and <|endoftext|> as plain text, which must not become the special token.",
    "A long document that will not fit in one shard. " * 40,
] + [f"Document number {i} says {'hello ' * (i % 7)}and goodbye." for i in range(40)]


def expected_tokens(docs):
    enc = get_tokenizer()
    return np.array([t for d in docs for t in [EOT] + enc.encode_ordinary(d)], dtype=np.uint16)


def write_corpus(path, docs, column="text"):
    if path.endswith(".parquet"):
        pq.write_table(pa.table({column: docs, "id": list(range(len(docs)))}), path)
    else:
        with open(path, "w") as f:
            f.writelines(json.dumps({"id": i, column: d}) + "\n" for i, d in enumerate(docs))
    return path


def prepare(data_files, out, *extra):
    return prepare_fineweb.prepare(
        prepare_fineweb.parse_args(
            [
                f"--data_files={data_files}",
                f"--out={out}",
                "--shard_size=100",
                "--num_proc=1",
                *extra,
            ]
        )
    )


def shard_hashes(out):
    return {
        os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
        for p in sorted(glob.glob(os.path.join(out, "*")))
    }


def read_manifest(out):
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
@pytest.mark.parametrize("fmt", ["npy", "bin"])
def test_shards_hold_eot_plus_encoding_of_each_document_in_order(tmp_path, kind, fmt):
    data = write_corpus(str(tmp_path / f"corpus.{kind}"), DOCS)
    out = str(tmp_path / "out")
    prepare(
        data, out, f"--format={fmt}", *(["--num_proc=2", "--streaming"] if kind == "jsonl" else [])
    )
    # by shard number
    files = sorted(glob.glob(os.path.join(out, f"*.{fmt}")), key=lambda f: f[-10:])
    names = [os.path.basename(f) for f in files]
    assert names == [
        f"local_{'val' if i == 0 else 'train'}_{i:06d}.{fmt}" for i in range(len(files))
    ]
    shards = [np.asarray(load_shard(f)) for f in files]
    assert all(len(s) == 100 for s in shards[:-1]) and 0 < len(shards[-1]) <= 100
    np.testing.assert_array_equal(np.concatenate(shards), expected_tokens(DOCS))

    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["format"] == fmt and manifest["shard_size"] == 100
    assert [s["file"] for s in manifest["shards"]] == names
    assert [s["tokens"] for s in manifest["shards"]] == [len(s) for s in shards]
    assert [s["docs"] for s in manifest["shards"]] == [int((s == EOT).sum()) for s in shards]
    assert sum(s["docs"] for s in manifest["shards"]) == len(DOCS)


def test_a_txt_file_is_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("First line.\n\nSecond paragraph.\n")
    (tmp_path / "b.txt").write_text("Another file.")
    out = str(tmp_path / "out")
    prepare(str(tmp_path / "*.txt"), out)
    # the corpus is small, so a tenth went to val
    tokens = np.concatenate(
        [
            load_shard(os.path.join(out, f))
            for f in ("local_val_000000.npy", "local_train_000001.npy")
        ]
    )
    np.testing.assert_array_equal(
        tokens, expected_tokens(["First line.\n\nSecond paragraph.\n", "Another file."])
    )


@pytest.mark.parametrize(
    "k,num_proc,failure", [(1, 1, "ctrl-c"), (4, 2, "ctrl-c"), (3, 2, "disk full")]
)
def test_interrupted_run_resumes_to_identical_shards(tmp_path, monkeypatch, k, num_proc, failure):
    data = write_corpus(str(tmp_path / "corpus.jsonl"), DOCS)
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    prepare(data, whole)
    reference = shard_hashes(whole)
    assert len(reference) > k + 4  # shards + manifest: the interruption falls mid-corpus

    real_write = prepare_fineweb.write_shard
    written, partial = [], []

    def crash_on_shard_k(path, tokens):  # in the middle of writing shard k
        if len(written) == k:
            if failure == "ctrl-c":  # a partial temp file, as a killed process leaves
                with open(path + ".tmp", "wb") as f:
                    f.write(b"partial")
                raise KeyboardInterrupt
            with prepare_fineweb.atomic_write(path) as f:
                f.write(b"partial")
                partial.append(f.name)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f.name)
        written.append(path)
        real_write(path, tokens)

    monkeypatch.setattr(prepare_fineweb, "write_shard", crash_on_shard_k)
    with pytest.raises(SystemExit) as e:
        prepare_fineweb.main(
            [
                f"--data_files={data}",
                f"--out={resumed}",
                "--shard_size=100",
                f"--num_proc={num_proc}",
            ]
        )
    if failure == "ctrl-c":
        assert e.value.code.startswith("interrupted: finished shards are kept")
    else:  # one line that says what and what to do, and the partial shard's space is given back
        assert partial[0].startswith(os.path.join(resumed, f"local_train_{k:06d}.npy."))
        assert e.value.code == (
            f"error: [Errno {errno.ENOSPC}] No space left on device: '{partial[0]}'; finished "
            f"shards are kept: fix that, then run the same command again to resume"
        )
        assert not glob.glob(os.path.join(resumed, "*.tmp"))
    assert len(glob.glob(os.path.join(resumed, "*.npy"))) == k
    assert not read_manifest(resumed)["complete"]
    monkeypatch.setattr(prepare_fineweb, "write_shard", real_write)

    stats = prepare(data, resumed, f"--num_proc={num_proc}")
    # the finished shards were not redone
    assert stats["tokens"] == len(expected_tokens(DOCS)) - 100 * k
    # shards and manifest alike; the killed run's .tmp was removed
    assert shard_hashes(resumed) == reference
    assert prepare(data, resumed)["tokens"] == 0  # a complete directory is left alone


def test_spawned_workers_give_the_same_shards(tmp_path):
    data = write_corpus(str(tmp_path / "corpus.jsonl"), DOCS)
    prepare(data, str(tmp_path / "one"))
    code = (
        "import multiprocessing, sys; multiprocessing.set_start_method('spawn'); import "
        "prepare_fineweb; prepare_fineweb.main(sys.argv[1:])"
    )
    r = run(
        [
            sys.executable,
            "-c",
            code,
            f"--data_files={data}",
            f"--out={tmp_path / 'two'}",
            "--shard_size=100",
            "--num_proc=2",
        ],
        env={"PYTHONPATH": ROOT},
    )
    assert r.returncode == 0, r.stderr
    assert shard_hashes(str(tmp_path / "two")) == shard_hashes(str(tmp_path / "one"))


def error_of(*argv):
    with pytest.raises(SystemExit) as e:
        prepare_fineweb.main(list(argv))
    return e.value.code


def test_no_matching_files_fails_in_one_line_with_exit_1(tmp_path):
    r = run(
        [
            sys.executable,
            os.path.join(ROOT, "prepare_fineweb.py"),
            f"--data_files={tmp_path}/none*.jsonl",
            f"--out={tmp_path / 'out'}",
        ]
    )
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: --data_files='{tmp_path}/none*.jsonl' matches no files"


def test_a_directory_for_data_files_says_to_name_the_files_in_it(tmp_path):
    assert error_of(f"--data_files={tmp_path}", f"--out={tmp_path / 'out'}") == (
        f"error: --data_files='{tmp_path}' matches no files, only directories; name the files in "
        f"them, e.g. --data_files='{tmp_path}/*.parquet'"
    )


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_document_without_text_is_one_line(tmp_path, num_proc):
    pq.write_table(
        pa.table({"text": ["hello world", None, "bye"]}), str(tmp_path / "nulls.parquet")
    )
    assert error_of(
        f"--data_files={tmp_path / 'nulls.parquet'}",
        f"--out={tmp_path / 'out'}",
        f"--num_proc={num_proc}",
    ) == (
        "error: a document's text is None, not a string; name the column "
        "of documents with --text_column, or drop the rows without text"
    )
    assert not glob.glob(str(tmp_path / "out" / "*.npy"))


def test_an_unreadable_manifest_is_one_line_and_left_alone(tmp_path):
    data = write_corpus(str(tmp_path / "c.jsonl"), DOCS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"source": ')
    assert error_of(f"--data_files={data}", f"--out={out}") == (
        f"error: {out}/manifest.json is not a readable manifest (Expecting value: line 1 column 12 "
        f"(char 11)); use another --out, or delete {out} to start over"
    )
    assert (out / "manifest.json").read_text() == '{"source": '


def test_missing_text_column(tmp_path):
    data = write_corpus(str(tmp_path / "c.parquet"), DOCS, column="body")
    msg = error_of(f"--data_files={data}", f"--out={tmp_path / 'out'}")
    assert msg.startswith("error: no column 'text'") and "body" in msg and "--text_column" in msg
    prepare(data, str(tmp_path / "out"), "--text_column=body")  # and naming it works


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), str(tmp_path / "empty.parquet"))
    for name in ("empty.jsonl", "blank.jsonl", "empty.parquet"):
        msg = error_of(f"--data_files={tmp_path / name}", f"--out={tmp_path / 'out'}")
        assert msg.startswith("error: the dataset is empty"), msg
    assert not glob.glob(str(tmp_path / "out" / "*.npy"))


def test_unwritable_out_dir(tmp_path):
    data = write_corpus(str(tmp_path / "c.jsonl"), DOCS)
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "sub"):
        msg = error_of(f"--data_files={data}", f"--out={out}")
        assert msg.startswith(f"error: cannot write to --out={out}") and "writable directory" in msg
    assert blocker.read_text() == "keep me"


def test_out_dir_with_shards_of_another_source_is_refused_untouched(tmp_path):
    out = str(tmp_path / "out")
    first = write_corpus(str(tmp_path / "a.jsonl"), DOCS)
    prepare(first, out)
    before = shard_hashes(out)
    other = write_corpus(str(tmp_path / "b.jsonl"), DOCS[::-1])
    msg = error_of(f"--data_files={other}", f"--out={out}", "--shard_size=100")
    assert msg.startswith(
        f"error: {out} holds shards from a different source (its manifest differs in source)"
    )
    # other settings too
    assert "error" in error_of(f"--data_files={first}", f"--out={out}", "--shard_size=400")
    assert shard_hashes(out) == before

    os.remove(os.path.join(out, "manifest.json"))  # shards of unknown origin, e.g. another tool's
    assert "no manifest.json" in error_of(
        f"--data_files={first}", f"--out={out}", "--shard_size=100"
    )
    assert len(shard_hashes(out)) == len(before) - 1


def test_dataset_and_data_files_together_are_refused(tmp_path):
    assert (
        error_of("--dataset=fineweb", f"--data_files={tmp_path}/*.jsonl")
        == "error: give --dataset or --data_files, not both"
    )


def test_default_output_directories_follow_the_dataset():
    assert prepare_fineweb.parse_args([]).out == "edu_fineweb10B"
    assert (
        prepare_fineweb.parse_args(["--dataset=fineweb", "--name=sample-100BT"]).out
        == "fineweb100B"
    )
    assert (
        prepare_fineweb.parse_args(["--name=CC-MAIN-2024-10"]).out == "edu_fineweb_CC-MAIN-2024-10"
    )
    args = prepare_fineweb.parse_args(["--dataset=pydoc"])
    assert (args.out, args.shard_size, args.prefix) == (
        "pydoc_topics",
        prepare_fineweb.PYDOC_SHARD_SIZE,
        "pydoc",
    )


def test_the_bare_command_reads_fineweb_edus_sample_10bt_through_the_hub_call(tmp_path):
    """The hub cannot be reached here, but datasets.load_dataset reads a local directory named like
    the repository the same way it reads the hub's: the README's configs, the data files, the subset
    by --name. So the bare `python prepare_fineweb.py`, run beside a stand-in of
    HuggingFaceFW/fineweb-edu, takes the code path it takes on a node, and must read only the
    sample-10BT subset into edu_fineweb10B/."""
    repo = tmp_path / "HuggingFaceFW" / "fineweb-edu"
    (repo / "sample" / "10BT").mkdir(parents=True)
    write_corpus(str(repo / "sample" / "10BT" / "000_00000.parquet"), DOCS[:20])
    write_corpus(str(repo / "sample" / "10BT" / "001_00000.parquet"), DOCS[20:])
    write_corpus(
        str(repo / "other.parquet"), ["A document of another subset, which must not be read."]
    )
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files: other.parquet\n"
        "- config_name: sample-10BT\n  data_files: sample/10BT/*\n---\n"
    )
    r = run(
        [
            sys.executable,
            os.path.join(ROOT, "prepare_fineweb.py"),
            "--shard_size=100",
            "--num_proc=2",
        ],
        cwd=tmp_path,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = str(tmp_path / "edu_fineweb10B")
    files = sorted(glob.glob(os.path.join(out, "*.npy")), key=lambda f: f[-10:])
    assert [os.path.basename(f) for f in files] == [
        f"edufineweb_{'val' if i == 0 else 'train'}_{i:06d}.npy" for i in range(len(files))
    ]
    np.testing.assert_array_equal(
        np.concatenate([np.load(f) for f in files]), expected_tokens(DOCS)
    )
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["source"] == {
        "dataset": "HuggingFaceFW/fineweb-edu",
        "name": "sample-10BT",
    }


def test_a_tokenizer_with_ids_past_uint16_is_refused_before_anything_is_written(
    tmp_path, monkeypatch
):
    gpt2 = get_tokenizer()
    wide = tiktoken.Encoding(
        "wide",
        pat_str=gpt2._pat_str,
        mergeable_ranks=gpt2._mergeable_ranks,
        special_tokens={"<|endoftext|>": EOT, "<|wide|>": 2**16},
    )
    monkeypatch.setattr(prepare_fineweb, "get_tokenizer", lambda: wide)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="ids reach 65536, which does not fit the uint16 shards"):
        prepare(write_corpus(str(tmp_path / "c.jsonl"), DOCS), str(out))
    assert not out.exists()


def write_text(path, n_words=18_000, seed=0):
    """One .txt file, so one document: about 20k tokens of text, as a small fine-tuning corpus
    is."""
    rng = np.random.default_rng(seed)
    words = [
        w.capitalize() + "." if i % 9 == 8 else w for i, w in enumerate(rng.choice(WORDS, n_words))
    ]
    path.write_text(" ".join(words) + "\n", encoding="utf-8")
    return path


def split_of(out, fmt="npy"):
    """The tokens of the val shard and of each train shard, from the files on disk."""
    files = sorted(glob.glob(os.path.join(out, f"*.{fmt}")), key=lambda f: f[-10:])
    assert os.path.basename(files[0]) == f"local_val_000000.{fmt}"
    assert [os.path.basename(f) for f in files[1:]] == [
        f"local_train_{i:06d}.{fmt}" for i in range(1, len(files))
    ]
    return [np.asarray(load_shard(f)) for f in files]


def independent_tokens(path):
    enc = get_tokenizer()
    return np.array([EOT] + enc.encode_ordinary(path.read_text(encoding="utf-8")), dtype=np.uint16)


def test_a_text_within_one_shard_holds_out_a_tenth_for_val_and_says_so(tmp_path, capsys):
    text = write_text(tmp_path / "input.txt")
    out = str(tmp_path / "out")
    prepare_fineweb.main([f"--data_files={text}", f"--out={out}", "--num_proc=1"])
    expected = independent_tokens(text)
    assert 15_000 < len(expected) < 30_000
    val, *train = split_of(out)
    assert len(val) == len(expected) // 10 and len(train) == 1
    assert np.concatenate([val, *train]).tobytes() == expected.tobytes()
    note = (
        f"note: the corpus ({len(expected):,} tokens) fits in one shard, so its first {len(val):,} "
        "tokens (10%) are the val split and the rest train; --val_tokens=N sets the val split's "
        "size\n"
    )
    assert note in capsys.readouterr().out
    manifest = read_manifest(out)
    assert "val_tokens" not in manifest  # the default's manifest has the keys it had before
    assert [s["tokens"] for s in manifest["shards"]] == [len(val), len(expected) - len(val)]
    # the one document goes on into train: that is the carry a resume would trim
    assert [(s["docs"], s["carry"]) for s in manifest["shards"]] == [
        (1, len(expected) - len(val)),
        (0, 0),
    ]


@pytest.mark.parametrize("shard_size", [None, 5000])
def test_val_tokens_gives_exactly_that_many_val_tokens(tmp_path, shard_size):
    text = write_text(tmp_path / "input.txt")
    out = str(tmp_path / "out")
    prepare_fineweb.main(
        [
            f"--data_files={text}",
            f"--out={out}",
            "--num_proc=1",
            "--val_tokens=1234",
            *([f"--shard_size={shard_size}"] if shard_size else []),
        ]
    )
    expected = independent_tokens(text)
    val, *train = split_of(out)
    assert len(val) == 1234
    assert [len(t) for t in train[:-1]] == [shard_size] * (len(train) - 1) and len(train) == (
        1 if shard_size is None else -(-(len(expected) - 1234) // shard_size)
    )
    assert np.concatenate([val, *train]).tobytes() == expected.tobytes()
    assert read_manifest(out)["val_tokens"] == 1234


@pytest.mark.parametrize("k", [1, 3])
def test_val_tokens_resumes_to_identical_shards_and_is_kept_to(tmp_path, monkeypatch, k):
    data = write_corpus(str(tmp_path / "corpus.jsonl"), DOCS)
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    prepare(data, whole, "--val_tokens=250")
    reference = shard_hashes(whole)
    assert len(load_shard(os.path.join(whole, "local_val_000000.npy"))) == 250

    real_write = prepare_fineweb.write_shard
    written = []

    def interrupt_on_shard_k(path, tokens):
        if len(written) == k:
            raise KeyboardInterrupt
        written.append(path)
        real_write(path, tokens)

    monkeypatch.setattr(prepare_fineweb, "write_shard", interrupt_on_shard_k)
    assert error_of(
        f"--data_files={data}",
        f"--out={resumed}",
        "--shard_size=100",
        "--num_proc=1",
        "--val_tokens=250",
    ).startswith("interrupted")
    monkeypatch.setattr(prepare_fineweb, "write_shard", real_write)
    assert error_of(
        f"--data_files={data}", f"--out={resumed}", "--shard_size=100", "--num_proc=1"
    ).startswith(
        f"error: {resumed} holds shards from a different source (its manifest differs in "
        "val_tokens)"
    )
    stats = prepare(data, resumed, "--val_tokens=250")
    assert stats["tokens"] == len(expected_tokens(DOCS)) - 250 - 100 * (k - 1)
    assert shard_hashes(resumed) == reference


@pytest.mark.parametrize(
    "value, message",
    [
        (
            "0",
            "--val_tokens=0 is not positive; the val split needs at least one token (leave it out "
            "for the default)",
        ),
        (
            "-5",
            "--val_tokens=-5 is not positive; the val split needs at least one token (leave it "
            "out for the default)",
        ),
        (
            "ALL",
            "--val_tokens={n} leaves no train tokens: the corpus is {n:,} tokens; give fewer, or "
            "leave it out to hold out a tenth",
        ),
        (
            "MORE",
            "--val_tokens={m} leaves no train tokens: the corpus is {n:,} tokens; give fewer, or "
            "leave it out to hold out a tenth",
        ),
    ],
)
def test_val_tokens_that_leave_no_val_or_no_train_are_refused_in_one_line_writing_nothing(
    tmp_path, value, message
):
    text = write_text(tmp_path / "input.txt", n_words=300)
    n = len(independent_tokens(text))
    value = {"ALL": str(n), "MORE": str(n + 1)}.get(value, value)
    out = tmp_path / "out"
    r = run(
        [
            sys.executable,
            os.path.join(ROOT, "prepare_fineweb.py"),
            f"--data_files={text}",
            f"--out={out}",
            "--num_proc=1",
            f"--val_tokens={value}",
        ]
    )
    assert r.returncode == 1
    # after the progress bar
    assert r.stderr.splitlines()[-1] == "error: " + message.format(n=n, m=n + 1)
    assert not r.stderr.splitlines()[-1].startswith("Traceback") and "error" not in r.stdout
    assert not out.exists() or os.listdir(out) == []
