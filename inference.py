"""Inference: decoding with a KV cache, streaming, stop strings/tokens, top-k/top-p, weights held for inference,
loading for inference. What sample.py, serve.py and bench/generate_throughput.py share; train_gpt2.py trains the
model, and prints its samples during training with the plain GPT.generate.

    model = load_for_inference("log/model_019073.pt", dtype="bfloat16")
    generate(model, tokens, 64, num_samples=4, seed=1)              # each sample's new tokens, cut at <|endoftext|>
    for nxt in generate_stream(model, tokens, 64, temperature=0):    # (num_samples,) new tokens a step
    for text, reason in stream_text(model, tokens, 64, ["\n\n"]):    # text safe to show, a piece a token
    for text, reason in stream_reply(model, [{"role": "user", "content": "Hi"}], 64):  # a chat model's reply
"""
import codecs
import contextlib
import math
import threading
import warnings
import weakref

import torch
import torch.nn as nn

import chat
from hellaswag import batched_rows, pack_windows, packed_inputs
from train_gpt2 import EOT, UserError, get_tokenizer, load_model, model_from_state

SAMPLING = dict(temperature=1.0, top_k=50, top_p=1.0)  # the defaults of sample.py, serve.py and sample_next


def seed_ok(seed):
    """Whether torch.Generator.manual_seed takes seed: any 64-bit integer, signed or not."""
    return -2 ** 63 <= seed < 2 ** 64


class KVCache:
    """One layer's keys and values for every position generated so far, in buffers sized for block_size,
    so that each new token's forward computes only its own row and attends to the stored ones."""

    def __init__(self, block_size):
        self.block_size, self.pos, self.k, self.v = block_size, 0, None, None

    def update(self, k, v):
        """Stores k, v (B, n_head, T, head_size) after the earlier positions; returns all of them."""
        assert self.pos == 0 or k.size(2) == 1, "a cache takes the whole prompt first, then one token a call"
        if self.k is None:  # allocated at first use, in the dtype autocast gives k and v
            shape = (*k.shape[:2], self.block_size, k.size(3))
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        start, self.pos = self.pos, self.pos + k.size(2)
        self.k[:, :, start:self.pos], self.v[:, :, start:self.pos] = k, v
        return self.k[:, :, :self.pos], self.v[:, :, :self.pos]


class PackedLinear(nn.Module):
    """A Linear for inference on CPU in bf16, its weight also held reordered into oneDNN's blocked layout. A
    one-token step is a matrix-vector product per weight, bound by memory bandwidth; at the 124M shape plain bf16
    F.linear reads the weights at about half the speed of this op, which is the one torch.compile's freezing pass
    emits for CPU, and gives the same numbers bit for bit. weight stays a parameter, so that state_dict, weight
    tying and the parameter count are unchanged."""

    def __init__(self, linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)  # laid out for batch 1

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def hold_for_inference(model, dtype):
    """model, in place, with its weights in dtype, in eval mode; on a CPU with oneDNN's bf16 kernels, its
    Linears become PackedLinears. For generation and scoring only: the packed weights do not train."""
    model.to(dtype).eval()
    if (model.lm_head.weight.device.type == "cpu" and dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        for module in list(model.modules()):
            for name, child in module.named_children():
                if type(child) is nn.Linear:
                    setattr(module, name, PackedLinear(child))
    return model


def encode(model, text):
    """text's token ids for model: "<|endoftext|>" is that token, as are a chat model's template tokens ("<|user|>",
    "<|end|>"...: the raw chat template); any other special token's name is plain text."""
    enc = get_tokenizer()
    special = enc.special_tokens_set if model.config.chat else {"<|endoftext|>"}
    return enc.encode(text, allowed_special=special, disallowed_special=())


def load_for_inference(spec, device="cpu", dtype="float32"):
    """train_gpt2.load_model's GPT (any checkpoint, run directory, Hugging Face directory or hub name) on device,
    held for inference with its weights in dtype ("bfloat16" or "float32")."""
    return hold_for_inference(load_model(spec).to(device), getattr(torch, dtype))


def sample_next(logits, temperature=SAMPLING["temperature"], top_k=SAMPLING["top_k"], top_p=SAMPLING["top_p"],
                generator=None):
    """One token per row of (B, vocab) float logits: the argmax at temperature 0, else a draw from the
    top_k likeliest tokens (0: all), narrowed to the fewest whose probabilities sum to top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the likelier tokens already hold top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, -math.inf))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def prompt_rows(model, tokens, num_samples):
    """The prompt as a (num_samples, T) tensor on the model's device; UserError for what the model cannot take."""
    idx = torch.as_tensor(tokens, dtype=torch.long, device=model.lm_head.weight.device)
    if idx.numel() == 0:
        raise UserError("the prompt is empty; start it with <|endoftext|> for an unconditioned sample")
    if idx.max() >= model.config.vocab_size:
        raise UserError(f"the prompt holds token {idx.max().item()}, outside the model's {model.config.vocab_size}")
    return idx.view(1, -1).repeat(num_samples, 1)


class StaticKVCache(KVCache):
    """A KVCache that a Decoder keeps from call to call, its buffers allocated at the first prompt, and that also
    serves the fixed-shape step: while `at` holds a position (a (1,) long tensor on the model's device), update
    writes the new token's keys and values at that row and returns the whole buffers, which the step's mask
    limits to the rows written so far. Shapes then never change from step to step, as a CUDA graph needs."""

    at = None

    def update(self, k, v):
        if self.k is None:
            # Zeros, not KVCache's empty rows: the fixed-shape step's mask hides the rows not yet written, but
            # a NaN left there by the allocator would still reach the output (its weight is 0, and 0 * NaN = NaN).
            shape = (*k.shape[:2], self.block_size, k.size(3))
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        if self.at is None:  # the prompt, or a step at a known position: KVCache's arithmetic
            return super().update(k, v)
        self.k.index_copy_(2, self.at, k)
        self.v.index_copy_(2, self.at, v)
        return self.k, self.v


CUDA_GRAPHS = True  # False: CUDA decodes with the eager step too (benches compare the two in one process)
GRAPH_WARMUP = 2  # eager fixed-shape steps on a side stream before the capture, as CUDA graph capture needs


def decode_path(device):
    """How a model on device runs its one-token step: "graph" (the fixed-shape step, replayed as a CUDA graph)
    where CUDA is, else "eager" (GPT.forward over the cache's filled rows, today's arithmetic), for CPU and MPS,
    where a graph would save no launches: their ops run on the calling thread anyway. "fixed" (the graph's
    fixed-shape step, run eagerly) is only chosen by tests and benches, to check the graph's arithmetic."""
    use = CUDA_GRAPHS and torch.device(device).type == "cuda" and torch.cuda.is_available()
    return "graph" if use else "eager"


def next_logits(model, logits):
    """The last position's float logits (B, tokens) of a forward's (B, T, vocab): ids past the real tokens (GPT-2's
    50257, and a chat model's template tokens) are vocabulary padding, never tokens."""
    return logits[:, -1, :model.config.real_tokens].float()


class Decoder:
    """What decoding keeps between calls for one model held for inference and one batch size: a StaticKVCache per
    layer, sized for block_size once, and on CUDA the one-token step captured as a CUDA graph, replayed for every
    token after. One stream uses it at a time (lock); decoder_for gives any other stream a decoder of its own."""

    def __init__(self, model, batch, path, key=None):
        device = model.lm_head.weight.device
        self.path, self.key, self.pos, self.lock = path, key, 0, threading.Lock()
        self.caches = [StaticKVCache(model.config.block_size) for _ in model.transformer.h]
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)  # the step's input token ...
        self.at = torch.zeros(1, dtype=torch.long, device=device)  # ... and its position, written before each step
        self.rows = torch.arange(model.config.block_size, device=device)
        self.graph, self.out, self.warm, self.stream = None, None, 0, None

    def prefill(self, model, idx):
        """Logits for the token after idx (B, T <= block_size), which fills the cache's rows 0..T-1."""
        for cache in self.caches:
            cache.pos = 0
        self.pos = idx.size(1)
        return next_logits(model, model(idx, cache=self.caches)[0])

    def step(self, model, nxt):
        """Logits for the token after nxt (B,), which goes at position self.pos (< block_size)."""
        self.pos += 1
        if self.path == "eager":
            return next_logits(model, model(nxt[:, None], cache=self.caches)[0])
        self.tok.copy_(nxt[:, None])
        self.at.fill_(self.pos - 1)  # a kernel with the value as its argument: no wait for the GPU
        for cache in self.caches:
            cache.pos = self.pos  # kept true, so that a prompt or an eager step may follow
        if self.path == "fixed":
            return self.fixed_step(model)
        return self.graph_step(model)

    def fixed_step(self, model):
        """GPT.forward's one-token step on fixed shapes: self.tok at position self.at (a tensor, so that a graph
        reads it afresh), attending to every cache row through a mask of the rows written."""
        mask = (self.rows <= self.at).view(1, 1, 1, -1)
        for cache in self.caches:
            cache.at = self.at
        try:
            return next_logits(model, model.lm_head(model.hidden_states(self.tok, self.at, mask, self.caches)))
        finally:
            for cache in self.caches:
                cache.at = None

    def graph_step(self, model):
        """fixed_step replayed as a CUDA graph: one launch for the whole step instead of ~15 a layer, which at
        batch 1 take longer to issue than the GPU takes to run them. The first GRAPH_WARMUP steps run eagerly on
        a side stream (capture needs cuBLAS's workspace and the allocator warmed up on it); the next is captured,
        then replayed. Its logits land in the same buffer each replay, read before the next one is queued."""
        if self.graph is None and self.warm < GRAPH_WARMUP:
            self.warm += 1
            self.stream = self.stream or torch.cuda.Stream()
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                out = self.fixed_step(model)
            torch.cuda.current_stream().wait_stream(self.stream)
            return out
        if self.graph is None:
            # Autocast's cache of cast weights would hand the graph tensors that are freed when the caller's
            # autocast ends; a held model has no casts to cache, and this keeps it so whatever the caller holds.
            autocast = dict(enabled=torch.is_autocast_enabled("cuda"), dtype=torch.get_autocast_dtype("cuda"))
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.autocast("cuda", cache_enabled=False, **autocast), \
                        torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self.out = self.fixed_step(model)
            except RuntimeError as e:  # e.g. an attention kernel that cannot be captured: the same step, eagerly
                warnings.warn(f"CUDA graph capture of the decoding step failed ({e}); decoding without it")
                self.path = "fixed"
                return self.fixed_step(model)
            self.graph = graph
        self.graph.replay()
        return self.out


_DECODERS = weakref.WeakKeyDictionary()  # model -> its Decoder; none holds its model, so a model can be freed


def decoder_for(model, batch):
    """The model's kept Decoder for this batch size, a new one (which replaces it) if anything it depends on
    changed: the batch size, the autocast state (the cache's dtype) or where any weight lives (a captured
    graph reads weights by address). A second stream while the first is still open gets a decoder of its own."""
    device = model.lm_head.weight.device
    key = (batch, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type),
           tuple(p.data_ptr() for p in model.parameters()))
    decoder = _DECODERS.get(model)
    if decoder is None or decoder.key != key:
        decoder = _DECODERS[model] = Decoder(model, batch, decode_path(device), key)
    if decoder.lock.acquire(blocking=False):
        return decoder
    decoder = Decoder(model, batch, decode_path(device))
    decoder.lock.acquire()
    return decoder


def inference_model(model):
    """The GPT to decode with: unwrapped from torch.compile's wrapper and from train_gpt2.CompiledOrEager (whose
    attribute forwarding does not reach `_orig_mod`), since a compiled model would trace and recompile as
    the cache grows; under autocast to a dtype other than its weights', a copy held in that dtype."""
    model = getattr(model, "compiled", model)  # CompiledOrEager's torch.compile wrapper
    model = getattr(model, "_orig_mod", model)
    device = model.lm_head.weight.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    if dtype not in (None, model.lm_head.weight.dtype):
        # Autocast would cast all the weights again for every token: three times the memory traffic of a
        # decoder that reads them once, already cast. So decode with a copy held in autocast's dtype, built
        # each call (tens of ms): kept, it would hold a stale second copy of the weights through training.
        model = hold_for_inference(model_from_state(model.config, model.state_dict(), device, dtype), dtype)
    return model


@torch.no_grad()
def generate_stream(model, tokens, max_new_tokens, num_samples=1, stop=EOT, **sampling):
    """Continues the prompt `tokens` num_samples times, yielding each new position's (num_samples,) tokens,
    until max_new_tokens or until every sample has produced `stop` (None: never stops). sampling: sample_next's
    temperature (0: greedy), top_k and top_p, SAMPLING's unless given, and seed or generator, which make the
    draws repeatable. A compiled model decodes uncompiled: it would recompile as the sequence grows. The
    model's Decoder (decoder_for) holds the cache, and on CUDA the graph of the step, from call to call."""
    model = inference_model(model)
    device = model.lm_head.weight.device
    idx = prompt_rows(model, tokens, num_samples)
    sampling = {**SAMPLING, **sampling}
    seed = sampling.pop("seed", None)
    if sampling.get("generator") is None and seed is not None:
        sampling["generator"] = torch.Generator(device).manual_seed(seed)
    bs = model.config.block_size
    done = torch.zeros(num_samples, dtype=torch.bool, device=device)
    decoder = decoder_for(model, num_samples)
    try:
        logits = decoder.prefill(model, idx[:, -bs:])
        for made in range(1, max_new_tokens + 1):
            nxt = sample_next(logits, **sampling)
            idx = torch.cat((idx, nxt[:, None]), dim=1)
            yield nxt
            if stop is not None:  # the check waits for the GPU: only where a stop can end the stream
                done |= nxt == stop
                if done.all():
                    return
            if made < max_new_tokens:
                # Positions are learned and absolute: once the window slides, every kept token sits at a
                # new position, so the stored keys and values are stale and the window is recomputed.
                full = decoder.pos == bs
                logits = decoder.prefill(model, idx[:, -bs:]) if full else decoder.step(model, nxt)
    finally:
        decoder.lock.release()


def generate(model, tokens, max_new_tokens, num_samples=1, stop=EOT, **sampling):
    """generate_stream's tokens gathered: one list of new tokens per sample, each cut before `stop`. Read from
    the device once, at the end, so that a GPU is never waited on between tokens that nothing stops."""
    steps = list(generate_stream(model, tokens, max_new_tokens, num_samples, stop, **sampling))
    rows = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(num_samples)]
    return [row[:row.index(stop)] if stop in row else row for row in rows]


def stream_text(model, tokens, max_new_tokens, stop=(), ends=(EOT,), **sampling):
    """generate_stream's one sample as text: a (piece, finish_reason) per new token. piece is the text that is
    safe to show by then: never a character still missing bytes, nor what may be the start of a stop string.
    finish_reason is None until the last token's: "stop" at a token of `ends` (<|endoftext|>; a chat reply's
    chat.STOP) or at a stop string, which the text ends before, else "length"."""
    enc, decoder = get_tokenizer(), codecs.getincrementaldecoder("utf-8")(errors="replace")
    hold = max(map(len, stop), default=1) - 1  # the characters a stop string may still be completing
    text, sent = "", 0
    with contextlib.closing(generate_stream(model, tokens, max_new_tokens, **sampling)) as stream:
        for made, nxt in enumerate(stream, 1):
            if nxt.item() in ends:
                yield text[sent:] + decoder.decode(b"", final=True), "stop"
                return
            text += decoder.decode(enc.decode_single_token_bytes(nxt.item()))
            hits = [i for i in (text.find(s, max(0, sent - hold)) for s in stop) if i >= 0]
            if hits:
                yield text[sent:min(hits)], "stop"
                return
            if made == max_new_tokens:
                yield text[sent:] + decoder.decode(b"", final=True), "length"
                return
            piece = text[sent:max(sent, len(text) - hold)]
            sent += len(piece)
            yield piece, None


# ----------------------------------------------------------------------------------------------
# Scoring: the log-probability of every token of many texts at once, for serve.py's echo and logprobs.

SCORE_TOKENS = 16384  # positions a scoring forward takes at most: B x T of the packed rows
# Positions a group of windows that share a start may take (or twice the longest window, if more): room for a
# context and its endings. Rows are as long as the longest group: attention over a packed row is computed whole
# and masked, so rows much longer than their texts cost more attention than padding would (16 texts of 64 packed
# in one 1024-wide row made attention a third of a forward on CPU).
SCORE_ROW = 256
SCORE_CHUNK = 256  # positions projected to logits at a time: 256 x 50257 fp32 is 51 MB


@torch.no_grad()
def score(model, windows, top=0, gone=lambda: False):
    """Log-probabilities of many texts in few forwards. windows: (tokens, first, nxt), tokens at most block_size
    ids, read as one text from position 0: wanted are the log-probabilities of tokens[first:] (first >= 1), each
    given the tokens before it, and of nxt, an id, given all of them; nxt None asks instead for the distribution
    after the last token. Returns for each window (log-probabilities, the `top` likeliest tokens at each of those
    positions as (ids, log-probabilities), and when nxt is None the float32 logits after the last token, on the
    model's device); or None once gone() says the client left, checked before each forward. Over GPT-2's 50257
    tokens only: ids past them pad the vocabulary. Windows are packed by hellaswag.pack_windows, HellaSwag's
    packer too."""
    model = getattr(model, "_orig_mod", model)
    device, bs = model.lm_head.weight.device, model.config.block_size
    texts = [list(tokens) for tokens, _, _ in windows]
    assert all(1 <= len(t) <= bs for t in texts) and all(1 <= f <= len(t) for t, (_, f, _) in zip(texts, windows))
    capacity = max(SCORE_ROW, 2 * max(map(len, texts)))  # room for a context and its endings in one row
    results = [None] * len(windows)
    for batch, shape in batched_rows(texts, pack_windows(texts, capacity), SCORE_TOKENS):
        if gone():
            return None
        (tokens, pos, mask), states = packed_inputs(texts, batch, shape)
        h = model.hidden_states(tokens.to(device), pos.to(device), mask.to(device)).flatten(0, 1)
        picks, targets = [], []
        for w in states:
            _, first, nxt = windows[w]
            picks += states[w][first - 1:]
            targets += texts[w][first:] + [-1 if nxt is None else nxt]
        # Windows that share a start share its hidden states: each is projected to logits once (a context that
        # four endings share, once, not four times), and every window reads its own targets off those rows.
        unique, which = torch.tensor(picks, device=device).unique(return_inverse=True)
        targets = torch.tensor(targets, device=device)
        lps, tops, lasts = torch.empty(len(picks), device=device), [], {}
        for at in range(0, len(unique), SCORE_CHUNK):
            # The model's own head, then the real tokens' columns: a matmul onto the 50257 rows alone is an odd
            # shape, which on CPU took 45% longer than onto all 50304.
            logits = model.lm_head(h[unique[at:at + SCORE_CHUNK]])[:, :model.config.real_tokens].float()
            logp = logits.log_softmax(dim=-1)
            mine = ((which >= at) & (which < at + len(logits))).nonzero()[:, 0]
            lps[mine] = logp[which[mine] - at, targets[mine].clamp(min=0)]
            if top:
                tops.append(logp.topk(top, dim=-1))
            lasts.update((j, logits[which[j] - at]) for j in mine[targets[mine] < 0].tolist())
        if top:  # each pick's row's
            top_ids = torch.cat([x.indices for x in tops])[which].tolist()
            top_lps = torch.cat([x.values for x in tops])[which].tolist()
        lps = lps.tolist()
        at = 0
        for w in states:  # in the order the picks were made
            n = len(texts[w]) - windows[w][1] + 1
            has_next = windows[w][2] is not None
            span = slice(at, at + (n if has_next else n - 1))
            results[w] = (lps[span], list(zip(top_ids[span], top_lps[span])) if top else None,
                          None if has_next else lasts[at + n - 1])
            at += n
    return results


# ----------------------------------------------------------------------------------------------
# Chat: a chat model's reply to a conversation (chat.py's template), for serve.py's /v1/chat/completions and
# sample.py --chat.

def not_chat(model, name):
    """None for a chat model (its config has chat=True: fine-tuned on conversations); else why it cannot chat, and
    the fix, in one line."""
    if model.config.chat:
        return None
    return (f"{name} is a base model, not a chat model: it was never fine-tuned on conversations (its config has no "
            f"chat=True), so it has not learnt the chat template's tokens and cannot reply to messages; fine-tune it "
            f"first (python train_gpt2.py --preset=sft --init_from=... on conversations, docs/training.md), or "
            f"continue text with /v1/completions")


def stream_reply(model, messages, max_new_tokens, stop=(), **sampling):
    """stream_text's (piece, finish_reason) of a chat model's reply to messages: what it writes after
    chat.prompt(messages) (its last block_size ids), ending at <|end|> (or <|endoftext|>: chat.STOP) or a stop string
    with "stop", or after max_new_tokens with "length". ValueError with chat.problem's reason for what is not a
    conversation."""
    tokens = chat.prompt(messages)[-model.config.block_size:]
    return stream_text(model, tokens, max_new_tokens, stop, ends=chat.STOP, **sampling)
