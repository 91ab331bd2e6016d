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
        np.save(os.path.join(data_dir, f"num_train_{i + 1:06d}.npy"), np.arange(start, start + n, dtype=np.uint16))
        start += n
    np.save(os.path.join(data_dir, "num_val_000000.npy"), np.arange(0, 1000, dtype=np.uint16))
    return start


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_token_is_read_once_per_epoch_across_ranks(tmp_path, world):
    step = B * T * world
    # whole shards, one with a tail shorter than a step, and a short last shard
    sizes = [5 * 48 + 1, 4 * 48 + 1 + 7, 48 + 1]
    total = write_numbered_shards(str(tmp_path), sizes)
    loaders = [tg.DataLoaderLite(B, T, r, world, "train", str(tmp_path), seed=3) for r in range(world)]
    steps = loaders[0].steps_per_epoch()
    assert steps == sum((n - 1) // step for n in sizes)
    inputs, targets = [], []
    for _ in range(steps):
        for loader in loaders:
            x, y = loader.next_batch()
            assert x.shape == y.shape == (B, T)
            assert (y[:, :-1] == x[:, 1:]).all()
            inputs.append(x.flatten().numpy())
            targets.append(y.flatten().numpy())
    inputs, targets = np.concatenate(inputs), np.concatenate(targets)
    expected = []
    start = 0
    for n in sizes:
        used = (n - 1) // step * step  # whole group steps of this shard
        expected.append(np.arange(start, start + used))
        start += n
    expected = np.concatenate(expected)
    assert len(inputs) == len(np.unique(inputs)) == len(expected)  # each read once, by one rank
    assert np.array_equal(np.sort(inputs), expected)
    assert np.array_equal(np.sort(targets), expected + 1)
    assert total == sum(sizes)
    assert all(loader.state_dict()["epoch"] == 1 for loader in loaders)


def test_shard_order_is_permuted_per_epoch_by_seed(tmp_path):
    write_numbered_shards(str(tmp_path), [B * T + 1] * 8)

    def first_tokens(seed, epochs=3):
        loader = tg.DataLoaderLite(B, T, 0, 1, "train", str(tmp_path), seed=seed)
        return [[int(loader.next_batch()[0][0, 0]) // (B * T + 1) for _ in range(8)] for _ in range(epochs)]

    a, b = first_tokens(1), first_tokens(2)
    assert a == first_tokens(1)  # deterministic
    assert all(sorted(epoch) == list(range(8)) for epoch in a + b)  # each shard once per epoch
    assert a != b and a[0] != a[1]  # differs by seed and by epoch
    val = tg.DataLoaderLite(B, T, 0, 1, "val", str(tmp_path))
    assert val.next_batch()[0][0, 0] == 0  # validation is never shuffled


def test_state_dict_resumes_at_the_exact_batch(tmp_path):
    write_numbered_shards(str(tmp_path), [100, 77, 130])
    a = tg.DataLoaderLite(B, T, 1, 2, "train", str(tmp_path), seed=5)
    for _ in range(11):  # 9 steps per epoch: into the second
        a.next_batch()
    state = a.state_dict()
    assert set(state) == {"epoch", "shard", "pos"} and state["epoch"] == 1
    b = tg.DataLoaderLite(B, T, 1, 2, "train", str(tmp_path), seed=5)
    b.load_state_dict(state)
    for _ in range(10):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)


def test_shards_are_memory_mapped_not_loaded(tmp_path):
    write_numbered_shards(str(tmp_path), [1000])
    loader = tg.DataLoaderLite(B, T, 0, 1, "train", str(tmp_path))
    assert isinstance(loader.tokens, np.memmap) and loader.tokens.dtype == np.uint16


@pytest.mark.parametrize("content, message", [
    (np.zeros(0, np.uint16), "shard is empty"),
    (np.arange(100, dtype=np.int32), "want 1-D uint16 tokens"),
    (np.arange(10, dtype=np.uint16), "fewer than one step's B*T*world+1 = 17"),
    (b"this is not a numpy file", "cannot read shard"),
])
def test_bad_shards_are_named(tmp_path, content, message):
    write_numbered_shards(str(tmp_path), [100])
    bad = os.path.join(tmp_path, "bad_train_000009.npy")
    if isinstance(content, bytes):
        with open(bad, "wb") as f:
            f.write(content)
    else:
        np.save(bad, content)
    with pytest.raises(tg.UserError, match="bad_train_000009.npy") as err:
        tg.DataLoaderLite(B, T, 0, 1, "train", str(tmp_path))
    assert message in str(err.value)


def test_missing_shards_name_the_dir_and_the_prepare_command(tmp_path):
    with pytest.raises(tg.UserError, match=r"no train shards .* in '.*empty'.*prepare_fineweb.py"):
        tg.DataLoaderLite(B, T, 0, 1, "train", str(tmp_path / "empty"))
