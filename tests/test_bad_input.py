"""Bad files and settings: each case is a real run that must print one line naming what is wrong,
exit non-zero, and leave what was on disk as it was. The bad-input table of docs/failures.md ("What
happens when things go wrong") lists the same cases."""

import dataclasses
import io
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import ROOT, TINY, train, write_shards

import train_gpt2 as tg


def llmc_bin(tokens, claimed):
    header = np.zeros(256, dtype="<i4")
    header[:3] = tg.LLMC_MAGIC, tg.LLMC_VERSION, claimed
    return header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes()


def npy(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def with_token(n, at, value):
    tokens = np.random.default_rng(1).integers(0, 500, n).astype(np.uint16)
    tokens[at] = value
    return npy(tokens)


CUT = "a checkpoint cut short, as an interrupted copy leaves it"
# one of the good shards (val 0, train 1-3) every case starts from
TRAIN1 = "data/tiny_train_000001.npy"
# (name, {file in the case's directory: new bytes, or None to delete it}, extra args, what stderr's
# one line says)
CASES = [
    (
        "no shards in data_dir",
        {"data": None},
        [],
        "error: no train shards (*_train_NNNNNN.npy or .bin) in '{dir}/data'; run `python "
        "prepare_fineweb.py` first",
    ),
    (
        "truncated .npy shard",
        {TRAIN1: with_token(5000, 0, 0)[:3000]},
        [],
        "error: {dir}/" + TRAIN1 + ": cannot read shard (",
    ),
    (
        "file that is not a .npy shard",
        {TRAIN1: b"<html>404 Not Found</html>"},
        [],
        "error: {dir}/" + TRAIN1 + ": cannot read shard (",
    ),
    (
        "shard of int32, not uint16",
        {TRAIN1: npy(np.arange(5000, dtype=np.int32))},
        [],
        "error: {dir}/" + TRAIN1 + ": shard holds int32 of shape (5000,), want 1-D uint16 tokens",
    ),
    (
        "empty shard",
        {TRAIN1: npy(np.zeros(0, np.uint16))},
        [],
        "error: {dir}/" + TRAIN1 + ": shard is empty",
    ),
    (
        "train split shorter than one step",
        {f"data/tiny_train_00000{i}.npy": npy(np.zeros(80, np.uint16)) for i in (1, 2, 3)},
        [],
        "error: the train shards in '{dir}/data' hold 240 tokens, fewer than one step's "
        "total_batch_size+1 = 257; lower --total_batch_size",
    ),
    (
        ".bin shard with a wrong header",
        {"data/tiny_train_000009.bin": bytes(2048)},
        [],
        "error: {dir}/data/tiny_train_000009.bin: not an llm.c shard (want magic 20240520 version "
        "1)",
    ),
    (
        "truncated .bin shard",
        {"data/tiny_train_000009.bin": llmc_bin(range(3000), 5000)},
        [],
        "error: {dir}/data/tiny_train_000009.bin: header says 5000 tokens, so 11024 bytes, but "
        "the file has 7024; it is truncated or corrupt",
    ),
    (
        "train token >= vocab_size",
        {
            "data/tiny_train_000002.npy": None,
            "data/tiny_train_000003.npy": None,
            TRAIN1: with_token(5000, 70, 600),
        },
        [],
        "error: {dir}/"
        + TRAIN1
        + ": token 600 at position 70 is >= vocab_size 512; the shard is corrupt or from "
        "another tokenizer",
    ),
    (
        "val token >= vocab_size",
        {"data/tiny_val_000000.npy": with_token(4000, 3, 50000)},
        [],
        "error: {dir}/data/tiny_val_000000.npy: token 50000 at position 3 is >= vocab_size 512; "
        "the shard is corrupt or from another tokenizer",
    ),
    (
        "checkpoint of another model shape",
        {},
        ["--resume={other}"],
        "error: {other}: checkpoint was trained with n_layer=1 (run has 2); pass matching "
        "settings or a fresh log_dir",
    ),
    (
        "--resume file that is not a checkpoint",
        {},
        ["--resume={dir}/data/tiny_val_000000.npy"],
        "error: {dir}/data/tiny_val_000000.npy: not a readable train_gpt2.py checkpoint, it is "
        "truncated, corrupt or another kind of file (",
    ),
    (
        "truncated checkpoint",
        {"cut.pt": CUT},
        ["--resume={dir}/cut.pt"],
        "error: {dir}/cut.pt: not a readable train_gpt2.py checkpoint, it is truncated, corrupt "
        "or another kind of file (",
    ),
    (
        "--resume=auto, every checkpoint unreadable",
        {"log/model_000004.pt": CUT},
        ["--resume=auto"],
        "error: no checkpoint in {dir}/log can be read (1 tried, see the warnings above); move "
        "them away to start afresh",
    ),
    (
        "--resume file that does not exist",
        {},
        ["--resume={dir}/log/model_000123.pt"],
        "error: --resume={dir}/log/model_000123.pt: no such checkpoint file",
    ),
    (
        "T longer than block_size",
        {},
        ["--T=128"],
        "error: T=128 is longer than block_size=64; lower --T or raise --block_size",
    ),
    (
        "total_batch_size not a multiple of B*T*world",
        {},
        ["--total_batch_size=300"],
        "error: total_batch_size=300 is not a multiple of B*T*world_size = 4*32*1 = 128; change "
        "--total_batch_size or --B",
    ),
    (
        "unknown setting",
        {},
        ["--lr=3"],
        "error: unknown setting '--lr=3'; use --name=value with a name from: data_dir, log_dir, "
        "total_batch_size, B,",
    ),
    (
        "setting of the wrong type",
        {},
        ["--B=four"],
        "error: --B=four: expected an integer (default 64)",
    ),
    (
        "log_dir is a file",
        {"log": b""},
        [],
        "error: cannot write to log_dir '{dir}/log' ([Errno 17] File exists: '{dir}/log'); point "
        "--log_dir at a writable directory",
    ),
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case, run a few at a time, as each costs a Python start more than it computes."""
    base = tmp_path_factory.mktemp("bad_input")
    other = str(base / "other.pt")  # a good checkpoint of a 1-layer model
    cfg = tg.parse_args(TINY + ["--n_layer=1", f"--log_dir={base}"])
    write_shards(str(base / "data"), [4000, 5000, 3000, 4100])
    model = tg.GPT(tg.model_config(dataclasses.asdict(cfg)))
    loader = tg.DataLoaderLite(dataclasses.replace(cfg, data_dir=str(base / "data")), "train")
    tg.save_checkpoint(
        tg.Run(
            cfg, model=model, optimizer=tg.build_optimizer(model, cfg, "cpu"), train_loader=loader
        ),
        4,
    )
    os.rename(tg.checkpoint_path(str(base), 4), other)
    cut = open(other, "rb").read()[:5000]

    def run_case(i):
        _, files, args, message = CASES[i]
        top = base / f"case{i}"
        write_shards(str(top / "data"), [4000, 5000, 3000, 4100])
        for name, content in files.items():
            path = top / name
            if content is None:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                continue
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(cut if content is CUT else content)
        before = snapshot(top)
        fill = dict(dir=top, other=other)
        r = train(
            TINY
            + [
                f"--data_dir={top}/data",
                f"--log_dir={top}/log",
                "--peak_flops=1e12",
                *(a.format(**fill) for a in args),
            ]
        )
        return r, message.format(**fill), before, snapshot(top)

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(run_case, range(len(CASES))))


def snapshot(top):
    """{path: bytes} of every file under top except log.txt, which a failed start may rewrite."""
    return {
        os.path.join(d, n): open(os.path.join(d, n), "rb").read()
        for d, _, names in os.walk(top)
        for n in names
        if n != "log.txt"
    }


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_line(outcomes, i):
    r, message, before, after = outcomes[i]
    assert r.returncode == 1, r.stderr
    assert len(r.stderr.splitlines()) == 1 and message in r.stderr, r.stderr
    assert after == before  # nothing lost, nothing written


def test_docs_list_every_case():
    readme = open(os.path.join(ROOT, "docs", "failures.md")).read()
    for name, _, _, message in CASES:
        assert f"| {name} |" in readme, name
        assert max(re.split(r"\{\w+\}", message.removeprefix("error: ")), key=len) in readme, (
            message
        )
