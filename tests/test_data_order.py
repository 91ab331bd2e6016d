"""The data order is the run's, not the hardware's: 1, 2 and 3 ranks, and any B, read the same
tokens in the same order, across shard ends, so the per-step losses agree and a run resumes on
another world size or B."""

import os

import pytest
from conftest import ROOT, TINY, TORCHRUN, finished_run, run, train, train_losses, write_shards

# 384 tokens a step: 6 micro-batches of 2x32, split over 1, 2 or 3 ranks. Shards of ~1000 tokens put
# a shard end in every third step, and val rows that 2 or 3 ranks cannot share evenly.
ARGS = TINY + [
    "--B=2",
    "--total_batch_size=384",
    "--max_steps=12",
    "--eval_interval=6",
    "--checkpoint_interval=6",
    "--eval_tokens=1120",
]


def torchrun(nproc, args):
    return run(
        [
            *TORCHRUN,
            f"--nproc_per_node={nproc}",
            os.path.join(ROOT, "train_gpt2.py"),
            *args,
        ]
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("order") / "data")
    # 5300 train tokens: 13.8 steps a epoch
    write_shards(data_dir, [1500, 1000, 1100, 900, 1300, 1000])
    return data_dir


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    return finished_run(tmp_path_factory, "single", ARGS + [f"--data_dir={data}"])


def assert_close(a, b, tol=1e-5):
    assert sorted(a) == sorted(b) and all(abs(a[s] - b[s]) <= tol for s in a), (a, b)


@pytest.mark.parametrize("nproc, b", [(2, 2), (3, 2), (2, 1)])
def test_any_world_size_and_b_give_the_same_losses_across_shard_ends(
    data, single, tmp_path, nproc, b
):
    r = torchrun(nproc, ARGS + [f"--B={b}", f"--data_dir={data}", f"--log_dir={tmp_path}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"world size {nproc}, grad accum steps {384 // (32 * b * nproc)}" in r.stdout
    assert len(train_losses(single)) == 12  # 12 steps of 384 tokens cross 4 of the 5 shard ends
    assert_close(train_losses(str(tmp_path)), train_losses(single))
    assert_close(train_losses(str(tmp_path), "val"), train_losses(single, "val"))


def test_a_two_rank_run_stopped_at_a_checkpoint_resumes_on_one_process_with_b_halved(
    data, single, tmp_path
):
    # SIGTERM at rank 0's 19th micro-batch (3 a step): step 6 finishes, the checkpoint of step 7 is
    # written
    r = run(
        [
            *TORCHRUN,
            "--nproc_per_node=2",
            os.path.join(ROOT, "tests", "faulty_run.py"),
            *ARGS,
            f"--data_dir={data}",
            f"--log_dir={tmp_path}",
        ],
        env={"FAULT_AT": "train-batch@19", "FAULT_SIGNAL": "SIGTERM"},
    )
    assert "stopped by SIGTERM at step 7" in r.stdout, r.stderr[-3000:]
    r = train(ARGS + ["--B=1", f"--data_dir={data}", f"--log_dir={tmp_path}", "--resume=auto"])
    assert r.returncode == 0, r.stderr
    assert f"resumed from {tmp_path}/model_000007.pt at step 7" in r.stdout
    assert (
        "note: world size 2 -> 1, B 2 -> 1: every step still reads the same tokens in the same "
        "order" in r.stdout
    )
    assert_close(train_losses(str(tmp_path)), train_losses(single))
    assert_close(train_losses(str(tmp_path), "val"), train_losses(single, "val"))
