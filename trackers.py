"""Experiment trackers beside log.txt: TensorBoard and Weights & Biases, each a sink of
train_gpt2.py's run log (write(step, metrics) and close()). train_gpt2.py imports this module only
when --tracker names one, so that a run without one loads neither package; this module does not
import train_gpt2, which hands it what it needs.
What goes where, and how each handles a resume: docs/training.md, Trackers."""
import glob
import json
import os
import secrets
import string
import struct
import sys
import zlib


def open_trackers(cfg, start_step, record, atomic_write):
    """The sinks cfg.tracker names, which parse_args has checked (known names, packages installed).
    record is the run record log.txt starts with; atomic_write is train_gpt2's, for the files kept
    across resumes."""
    sinks = []
    for name in cfg.tracker.split(","):
        if name == "tensorboard":
            sinks.append(TensorBoard(cfg.log_dir, start_step, record))
        elif name == "wandb":
            sinks.append(WandB(cfg, start_step, record, atomic_write))
    return sinks


class TensorBoard:
    """Event files in log_dir/tensorboard, one per start of the run
    (tensorboard --logdir=LOG_DIR/tensorboard). Each start purges from the step it starts at:
    TensorBoard's reader drops the events an earlier file holds at or after purge_step, so after a
    kill and a resume each step shows once, with the resumed run's value (and a fresh run, which
    starts at 0, replaces all). The run record is a text at the step each start begins at."""

    def __init__(self, log_dir, start_step, record):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(os.path.join(log_dir, "tensorboard"), purge_step=start_step)
        text = "```\n" + json.dumps(record, indent=2) + "\n```"
        self.writer.add_text("run_record", text, start_step)

    def write(self, step, metrics):
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        # on disk now, not when the writer's queue fills: a resume replaces only the steps after its
        # checkpoint, so one before it still queued at a kill would be missing for good
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandB:
    """A Weights & Biases run, its local files in log_dir/wandb (WANDB_MODE=offline: all of it, for
    `wandb sync`). Its id is kept in log_dir/wandb_run_id, so that --resume continues the same W&B
    run (resume="allow").

    W&B cannot take a logged step back: a step logged again is dropped, and syncing files that
    overlap would drop or renumber the later one's (rewinding, wandb.init(resume_from=...), is a
    server-side preview). So a resume logs only the steps after the last one W&B holds, and the
    killed run's values stand for the steps it logged after its last checkpoint: the same losses,
    when the resume is exact. Online, W&B says where it is (run.step); offline, the files of this
    run's earlier processes do."""

    def __init__(self, cfg, start_step, record, atomic_write):
        import wandb
        id_file = os.path.join(cfg.log_dir, "wandb_run_id")
        kept = kept_run_id(id_file) if start_step else None
        run_id = kept
        if not run_id:  # a fresh run is a new W&B run, and so is a resume of a run that had none
            alphabet = string.ascii_lowercase + string.digits
            run_id = "".join(secrets.choice(alphabet) for _ in range(8))
            with atomic_write(id_file, "w") as f:
                f.write(run_id + "\n")
        # read before wandb.init starts this process's file
        steps = (row.get("_step", -1) for path in wandb_files(cfg.log_dir, run_id)
                 for row in wandb_history(path))
        held = max(steps, default=-1)
        name = cfg.wandb_run_name or os.path.basename(os.path.abspath(cfg.log_dir))
        self.run = wandb.init(project=cfg.wandb_project, name=name, config=record, dir=cfg.log_dir,
                              id=run_id, resume="allow")
        if self.run.settings.mode in ("offline", "dryrun"):
            self.first = held + 1
        else:
            self.first = self.run.step
        if kept and self.first != start_step:
            if self.first > start_step:
                gap = (f"already holds steps {start_step}-{self.first - 1}: their values are the "
                       f"killed run's, which W&B cannot replace")
            else:
                gap = (f"lacks steps {self.first}-{start_step - 1}, lost at the kill before W&B "
                       f"stored them")
            print(f"W&B run {run_id} {gap}; log.txt has this run's losses for every step")

    def write(self, step, metrics):
        if step >= self.first:
            self.run.log(metrics, step=step)

    def close(self):
        # close runs in train()'s finally: what ends the run, if not its last step
        ended = sys.exc_info()[1]
        if isinstance(ended, SystemExit) and isinstance(ended.code, int):
            code = ended.code
        else:
            code = int(ended is not None)
        self.run.finish(exit_code=code)


def kept_run_id(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def wandb_files(log_dir, run_id):
    """The W&B files of run_id's processes in log_dir: online (run-*), offline (offline-run-*)."""
    pattern = os.path.join(glob.escape(log_dir), "wandb", f"*run-*-{run_id}", f"run-{run_id}.wandb")
    return sorted(glob.glob(pattern))


def wandb_history(path):
    """The history rows ({name: value}, "_step" among them) of a W&B run file: a 7-byte header, then
    records in leveldb's log format (32 KiB blocks of chunks, each a CRC-32, a length, a type and
    its bytes), each record a wandb.proto Record. Read up to a chunk cut short or unwritten: W&B's
    service writes whole blocks, so a kill loses the last one it had not filled."""
    from wandb.proto import wandb_internal_pb2
    with open(path, "rb") as f:
        data = f.read()
    rows = []
    parts = []  # the chunks of the record being read
    pos = 7  # past the header
    if data[:4] != b":W&B":
        return rows
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's last bytes, too few for a chunk header: padding
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        if kind == 0 or len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != crc:
            break
        pos += 7 + length
        parts.append(chunk)
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record.FromString(b"".join(parts))
            parts = []
            if record.HasField("history"):
                rows.append({item.key or ".".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
