"""train_gpt2.py with faults injected at exact moments, for the fault tests (used as the script to run,
alone or under torchrun). The faults are set by environment variables:

FAULT_AT=n          at the n-th moment of this process, send it FAULT_SIGNAL (default SIGKILL). Moments are
                    each batch read (train or val), each checkpoint half-written, just before and just after
                    each rename (a checkpoint's, and on rank 0 log.txt's rewrite at start-up), and just after
                    each old checkpoint is deleted.
FAULT_RANK=r        inject only on rank r, and only in the first attempt of a torchrun --max-restarts group.
FAULT_NAN_STEPS=a,b the a-th, b-th, ... training steps of this process (counting from 1) get a NaN loss.
"""
import io
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt2 as tg  # noqa: E402

active = (os.environ.get("RANK", "0") == os.environ.get("FAULT_RANK", "0")
          and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0")
fault_at = int(os.environ.get("FAULT_AT", 0)) if active else 0
fault_signal = signal.Signals[os.environ.get("FAULT_SIGNAL", "SIGKILL")]
nan_steps = {int(s) for s in os.environ.get("FAULT_NAN_STEPS", "").split(",") if s} if active else set()
moments = 0


def moment(what):
    global moments
    moments += 1
    if moments == fault_at:
        print(f"fault: {fault_signal.name} at moment {moments}, {what}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), fault_signal)


def wrap(owner, name, before=None, after=None):
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if before:
            moment(before(*args))
        result = real(*args, **kwargs)
        if after:
            moment(after(*args))
        return result
    setattr(owner, name, wrapped)


def save_in_two_halves(obj, f):
    buf = io.BytesIO()
    real_save(obj, buf)
    data = buf.getvalue()
    f.write(data[:len(data) // 2])
    f.flush()
    moment("checkpoint half-written")
    f.write(data[len(data) // 2:])


real_save = torch.save
torch.save = save_in_two_halves
wrap(tg.DataLoaderLite, "next_batch", before=lambda loader: f"{loader.split} batch")
wrap(os, "replace", before=lambda src, dst: f"before renaming to {dst}",
     after=lambda src, dst: f"after renaming to {dst}")
wrap(os, "remove", after=lambda path: f"after deleting {path}")

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
