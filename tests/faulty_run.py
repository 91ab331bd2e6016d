"""train_gpt2.py with faults injected at named points, for the fault tests (used as the script to
run,
alone or under torchrun). The faults are set by environment variables:

FAULT_AT=point@n    at the n-th time this process reaches `point`, send it FAULT_SIGNAL (default
SIGKILL).
                    The points: train-batch and val-batch (a micro-batch read),
                    checkpoint-half-written, checkpoint-rename and checkpoint-renamed (just before
                    and just after a checkpoint's rename), log-rename (log.txt's rewrite at
                    start-up, before its rename) and checkpoint-deleted (just after an old
                    checkpoint is deleted).
FAULT_RANK=r        inject only on rank r, and only in the first attempt of a torchrun
--max-restarts group. FAULT_NAN_STEPS=a,b the a-th, b-th, ... training steps of this process
(counting from 1) get a NaN loss."""

import collections
import io
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt2 as tg  # noqa: E402

active = (
    os.environ.get("RANK", "0") == os.environ.get("FAULT_RANK", "0")
    and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
)
fault_point, _, fault_count = (os.environ.get("FAULT_AT", "") if active else "").partition("@")
fault_signal = signal.Signals[os.environ.get("FAULT_SIGNAL", "SIGKILL")]
nan_steps = (
    {int(s) for s in os.environ.get("FAULT_NAN_STEPS", "").split(",") if s} if active else set()
)
reached = collections.Counter()


def point(name):
    if not name:
        return
    reached[name] += 1
    if name == fault_point and reached[name] == int(fault_count):
        print(f"fault: {fault_signal.name} at {name}@{fault_count}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), fault_signal)


def wrap(owner, attr, before=None, after=None):
    real = getattr(owner, attr)

    def wrapped(*args, **kwargs):
        if before:
            point(before(*args))
        result = real(*args, **kwargs)
        if after:
            point(after(*args))
        return result

    setattr(owner, attr, wrapped)


def save_in_two_halves(obj, f):
    buf = io.BytesIO()
    real_save(obj, buf)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    point("checkpoint-half-written")
    f.write(data[len(data) // 2 :])


def renamed(dst):
    if dst.endswith(".pt"):
        return "checkpoint"
    return "log" if dst.endswith("log.txt") else ""


real_save = torch.save
torch.save = save_in_two_halves
wrap(tg.DataLoaderLite, "read", before=lambda loader, *_: f"{loader.split}-batch")
wrap(
    os,
    "replace",
    before=lambda src, dst: renamed(dst) and f"{renamed(dst)}-rename",
    after=lambda src, dst: renamed(dst) == "checkpoint" and "checkpoint-renamed",
)
wrap(os, "remove", after=lambda path: path.endswith(".pt") and "checkpoint-deleted")

train_steps = 0
real_train_step, real_forward = tg.train_step, tg.GPT.forward


def train_step(*args, **kwargs):
    global train_steps
    train_steps += 1
    return real_train_step(*args, **kwargs)


def forward(self, idx, targets=None, *args, **kwargs):
    logits, loss = real_forward(self, idx, targets, *args, **kwargs)
    if loss is not None and self.training and train_steps in nan_steps:
        loss = loss * float("nan")
    return logits, loss


tg.train_step, tg.GPT.forward = train_step, forward

if __name__ == "__main__":
    tg.main()
