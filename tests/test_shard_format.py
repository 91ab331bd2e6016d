"""llm.c .bin shards: the bytes prepare_fineweb.py writes, the loader's checks, and .npy/.bin
equivalence."""

import os

import numpy as np
import pytest
import torch

from prepare_fineweb import write_shard
from train_gpt2 import LLMC_MAGIC, DataLoaderLite, Settings, UserError, load_shard


def write_both(tmp_path, sizes, seed=0):
    """The same random shards once as .npy and once as .bin; returns the two directories."""
    rng = np.random.default_rng(seed)
    dirs = [str(tmp_path / fmt) for fmt in ("npy", "bin")]
    for d in dirs:
        os.makedirs(d)
    for i, n in enumerate(sizes):
        tokens = rng.integers(0, 50257, n).astype(np.uint16)
        for d, fmt in zip(dirs, ("npy", "bin")):
            write_shard(os.path.join(d, f"t_{'val' if i == 0 else 'train'}_{i:06d}.{fmt}"), tokens)
    return dirs


def test_bin_shard_is_llmc_header_then_uint16_tokens(tmp_path):
    tokens = np.array([50256, 0, 1, 65535, 300], dtype=np.uint16)
    path = str(tmp_path / "x_val_000000.bin")
    write_shard(path, tokens)
    raw = open(path, "rb").read()
    assert len(raw) == 1024 + 2 * len(tokens)
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, 5] and not header[3:].any()
    assert np.frombuffer(raw[1024:], dtype="<u2").tolist() == tokens.tolist()
    np.testing.assert_array_equal(load_shard(path), tokens)
    assert not os.path.exists(path + ".tmp")


def test_npy_and_bin_shards_give_identical_batches(tmp_path):
    npy_dir, bin_dir = write_both(tmp_path, [3000, 2500, 4100, 3300])
    for split in ("train", "val"):
        loaders = [
            DataLoaderLite(Settings(B=4, T=32, data_dir=d, seed=5), split)
            for d in (npy_dir, bin_dir)
        ]
        for _ in range(150):  # several epochs, so the shard permutations are compared too
            (xa, ya), (xb, yb) = (loader.next_batch() for loader in loaders)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: raw[:-2], "truncated or corrupt"),
        (lambda raw: np.int32(LLMC_MAGIC + 1).tobytes() + raw[4:], "not an llm.c shard"),
        (lambda raw: raw[:4] + np.int32(2).tobytes() + raw[8:], "not an llm.c shard"),
    ],
)
def test_damaged_bin_shard_is_refused_by_name(tmp_path, damage, message):
    path = str(tmp_path / "x_train_000001.bin")
    write_shard(path, np.arange(100, dtype=np.uint16))
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(damage(raw))
    with pytest.raises(UserError, match=message) as e:
        load_shard(path)
    assert path in str(e.value)
