"""The sharded loader: coverage across ranks, shuffling, exact position state, and bad shards."""

import os

import numpy as np
import pytest

import train_gpt2 as tg

B, T = 2, 8


def write_numbered_shards(data_dir, sizes):
    """Train shards whose tokens are all distinct, so that where each token went can be checked."""
    os.makedirs(data_dir, exist_ok=True)
    start = 0
    for i, n in enumerate(sizes):
        np.save(
            os.path.join(data_dir, f"num_train_{i + 1:06d}.npy"),
            np.arange(start, start + n, dtype=np.uint16),
        )
        start += n
    np.save(os.path.join(data_dir, "num_val_000000.npy"), np.arange(0, 1000, dtype=np.uint16))
    return start


@pytest.mark.parametrize("world, b", [(1, 2), (1, 6), (2, 3), (3, 2), (6, 1)])
def test_every_token_is_read_once_per_epoch_across_ranks_whatever_the_world_size(
    tmp_path, world, b
):
    """Shards of odd sizes, some shorter than a step: over an epoch every token is an input exactly
    once, in the stream order that does not depend on world or B, and group steps run on into the
    next epoch."""
    sizes = [5 * 48 + 1, 4 * 48 + 7, 11, 48 + 1, 3]
    total = write_numbered_shards(str(tmp_path), sizes)
    cfg = tg.Settings(B=b, T=T, data_dir=str(tmp_path), seed=3)
    loaders = [tg.DataLoaderLite(cfg, "train", (r, world)) for r in range(world)]
    group = b * T * world
    stream = []  # every rank's tokens, laid where they sit in the stream
    for _ in range(-(-total // group) + 1):  # past the epoch's end
        for loader in loaders:
            x, y = loader.next_batch()
            assert x.shape == y.shape == (b, T)
            assert (y[:, :-1] == x[:, 1:]).all()
            stream.append(x.flatten().numpy())
    stream = np.concatenate(stream)
    epoch = stream[:total]
    assert np.array_equal(np.sort(epoch), np.arange(total))  # each token once, by one rank
    order = tg.DataLoaderLite(tg.Settings(B=1, T=T, data_dir=str(tmp_path), seed=3), "train").order(
        0
    )
    starts = np.cumsum([0] + sizes)
    assert np.array_equal(
        epoch, np.concatenate([np.arange(starts[i], starts[i + 1]) for i in order])
    )
    first_of_next = tg.DataLoaderLite(
        tg.Settings(B=1, T=T, data_dir=str(tmp_path), seed=3), "train"
    ).order(1)[0]
    assert stream[total] == starts[first_of_next]  # the next epoch follows with no gap
    assert all(loader.state_dict()["epoch"] == 1 for loader in loaders)


def test_shard_order_is_permuted_per_epoch_by_seed(tmp_path):
    # one batch a shard, its last target the next one's first
    write_numbered_shards(str(tmp_path), [B * T] * 8)

    def first_tokens(seed, epochs=3):
        loader = tg.DataLoaderLite(
            tg.Settings(B=B, T=T, data_dir=str(tmp_path), seed=seed), "train"
        )
        return [
            [int(loader.next_batch()[0][0, 0]) // (B * T) for _ in range(8)] for _ in range(epochs)
        ]

    a, b = first_tokens(1), first_tokens(2)
    assert a == first_tokens(1)  # deterministic
    assert all(sorted(epoch) == list(range(8)) for epoch in a + b)  # each shard once per epoch
    assert a != b and a[0] != a[1]  # differs by seed and by epoch
    val = tg.DataLoaderLite(tg.Settings(B=B, T=T, data_dir=str(tmp_path)), "val")
    assert val.next_batch()[0][0, 0] == 0  # validation is never shuffled


def test_state_dict_resumes_at_the_exact_batch(tmp_path):
    write_numbered_shards(str(tmp_path), [100, 77, 130])
    a = tg.DataLoaderLite(tg.Settings(B=B, T=T, data_dir=str(tmp_path), seed=5), "train", (1, 2))
    for _ in range(11):  # 9 steps per epoch: into the second
        a.next_batch()
    state = a.state_dict()
    assert set(state) == {"epoch", "shard", "pos"} and state["epoch"] == 1
    b = tg.DataLoaderLite(tg.Settings(B=B, T=T, data_dir=str(tmp_path), seed=5), "train", (1, 2))
    b.load_state_dict(state)
    for _ in range(10):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)


def test_shards_are_memory_mapped_not_loaded(tmp_path):
    write_numbered_shards(str(tmp_path), [1000])
    loader = tg.DataLoaderLite(tg.Settings(B=B, T=T, data_dir=str(tmp_path)), "train")
    assert isinstance(loader.tokens, np.memmap) and loader.tokens.dtype == np.uint16


@pytest.mark.parametrize(
    "content, message",
    [
        (np.zeros(0, np.uint16), "shard is empty"),
        (np.arange(100, dtype=np.int32), "want 1-D uint16 tokens"),
        (b"this is not a numpy file", "cannot read shard"),
    ],
)
def test_bad_shards_are_named(tmp_path, content, message):
    write_numbered_shards(str(tmp_path), [100])
    bad = os.path.join(tmp_path, "bad_train_000009.npy")
    if isinstance(content, bytes):
        with open(bad, "wb") as f:
            f.write(content)
    else:
        np.save(bad, content)
    with pytest.raises(tg.UserError, match="bad_train_000009.npy") as err:
        tg.DataLoaderLite(tg.Settings(B=B, T=T, data_dir=str(tmp_path)), "train")
    assert message in str(err.value)


def test_missing_shards_name_the_dir_and_the_prepare_command(tmp_path):
    with pytest.raises(tg.UserError, match=r"no train shards .* in '.*empty'.*prepare_fineweb.py"):
        tg.DataLoaderLite(tg.Settings(B=B, T=T, data_dir=str(tmp_path / "empty")), "train")


def test_llmc_bin_shard_gives_the_same_batches_as_npy(tmp_path):
    """Batches are read from the file at the shard's data offset: 1024 header bytes in llm.c's
    format."""
    tokens = np.arange(3 * B * T + 1, dtype=np.uint16) * 7
    header = np.zeros(256, dtype="<i4")
    header[:3] = tg.LLMC_MAGIC, tg.LLMC_VERSION, len(tokens)
    os.makedirs(tmp_path / "bin")
    with open(tmp_path / "bin" / "c_train_000001.bin", "wb") as f:
        f.write(header.tobytes() + tokens.astype("<u2").tobytes())
    os.makedirs(tmp_path / "npy")
    np.save(tmp_path / "npy" / "c_train_000001.npy", tokens)
    a, b = (
        tg.DataLoaderLite(tg.Settings(B=B, T=T, data_dir=str(tmp_path / d)), "train")
        for d in ("bin", "npy")
    )
    for i in range(3):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
        assert np.array_equal(xa.flatten(), tokens[i * B * T : (i + 1) * B * T])
