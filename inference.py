"""Inference: decoding with a KV cache (the Engine: continuous batching over slots), streaming,
stop strings/tokens, top-k/top-p, weights held for inference, loading for inference. What sample.py,
serve.py and bench/generate_throughput.py share; train_gpt2.py trains the model, and prints its
samples during training with the plain GPT.generate.

    model = load_for_inference("log/model_019073.pt", dtype="bfloat16")
    # each sample's new tokens, cut at <|endoftext|>
    generate(model, tokens, 64, num_samples=4, seed=1)
    # (num_samples,) new tokens a step
    for nxt in generate_stream(model, tokens, 64, temperature=0):
    # text safe to show, a piece a token
    for text, reason in stream_text(model, tokens, 64, ["\n\n"]):
    # the same, of ids from anywhere (the one streamer of stop strings)
    for token, text, reason in text_stream(token_ids, 64, ["\n\n"]):
    # many requests decoded together, each in a slot, a thread stepping the engine (serve.py)
    engine = Engine(model, slots=8)
    engine.submit(Sequences(tokens, 64, on_token=print))  # then engine.step() until it ends
    # a chat model's reply
    for text, reason in stream_reply(model, [{"role": "user", "content": "Hi"}], 64):
"""
import codecs
import collections
import concurrent.futures
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

# the defaults of sample.py, serve.py and sample_next
SAMPLING = dict(temperature=1.0, top_k=50, top_p=1.0)


def seed_ok(seed):
    """Whether torch.Generator.manual_seed takes seed: any 64-bit integer, signed or not."""
    return -2 ** 63 <= seed < 2 ** 64


class KVCache:
    """One layer's keys and values for every position generated so far, in buffers sized for
    block_size, so that each new token's forward computes only its own row and attends to the stored
    ones."""

    def __init__(self, block_size):
        self.block_size = block_size
        self.pos = 0
        self.k, self.v = None, None

    def update(self, k, v):
        """Stores k, v (B, n_head, T, head_size) after the earlier positions; returns all of
        them."""
        assert self.pos == 0 or k.size(2) == 1, \
            "a cache takes the whole prompt first, then one token a call"
        if self.k is None:  # allocated at first use, in the dtype autocast gives k and v
            shape = (*k.shape[:2], self.block_size, k.size(3))
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        start, self.pos = self.pos, self.pos + k.size(2)
        self.k[:, :, start:self.pos], self.v[:, :, start:self.pos] = k, v
        return self.k[:, :, :self.pos], self.v[:, :, :self.pos]


class PackedLinear(nn.Module):
    """A Linear for inference on CPU, its weight also held reordered into oneDNN's blocked layout
    for a matmul over `rows` rows. A decoding step is a matrix product of a few rows per weight,
    bound by memory bandwidth. In bf16, at the 124M shape, plain F.linear reads the weights at about
    half the speed of this op, which is the one torch.compile's freezing pass emits for CPU, and
    gives the same numbers bit for bit. In float32, plain F.linear (MKL) over an Engine's 8 rows
    took twice as long as over 1; this op laid out for 8 rows took about as long as over 1, in the
    same arithmetic summed in another order (the last bits differ from F.linear's). weight stays a
    parameter, so that state_dict, weight tying and the parameter count are unchanged."""

    def __init__(self, linear, rows):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def onednn_bf16():
    """Whether this CPU runs oneDNN's bf16 kernels (AVX-512 or Arm's BF16; torch's own query), which
    PackedLinear needs: elsewhere bf16 weights stay plain Linears, whose bf16 matmuls torch
    emulates."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def packed_rows(dtype):
    """The rows a PackedLinear of dtype on this CPU is laid out for, or None where Linears stay
    plain: bf16 for 1 (a lone request's step: torch.compile's layout) with oneDNN's bf16 kernels,
    float32 for an Engine's 8 slots (about as fast over 1 row as the layout for 1, and half again
    as fast over 8) wherever oneDNN is."""
    if dtype == torch.bfloat16 and onednn_bf16():
        return 1
    if dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return 8
    return None


def hold_for_inference(model, dtype):
    """model, in place, with its weights in dtype, in eval mode; on a CPU where oneDNN has kernels
    for dtype (packed_rows), its Linears become PackedLinears. For generation and scoring only: the
    packed weights do not train."""
    model.to(dtype).eval()
    rows = packed_rows(dtype)
    if model.lm_head.weight.device.type == "cpu" and rows is not None:
        for module in list(model.modules()):
            for name, child in module.named_children():
                if type(child) is nn.Linear:
                    setattr(module, name, PackedLinear(child, rows))
    return model


def encode(model, text):
    """text's token ids for model: "<|endoftext|>" is that token, as are a chat model's template
    tokens ("<|user|>", "<|end|>"...: the raw chat template); any other special token's name is
    plain text."""
    enc = get_tokenizer()
    special = enc.special_tokens_set if model.config.chat else {"<|endoftext|>"}
    return enc.encode(text, allowed_special=special, disallowed_special=())


def load_for_inference(spec, device="cpu", dtype="float32"):
    """train_gpt2.load_model's GPT (any checkpoint, run directory, Hugging Face directory or hub
    name) on device, held for inference with its weights in dtype ("bfloat16", "float16" or
    "float32")."""
    return hold_for_inference(load_model(spec).to(device), getattr(torch, dtype))


def sample_next(logits, temperature=SAMPLING["temperature"], top_k=SAMPLING["top_k"],
                top_p=SAMPLING["top_p"], generator=None):
    """One token per row of (B, vocab) float logits: the argmax at temperature 0, else a draw from
    the top_k likeliest tokens (0: all), narrowed to the fewest whose probabilities sum to top_p."""
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
    """The prompt as a (num_samples, T) tensor on the model's device; UserError for what the model
    cannot take."""
    idx = torch.as_tensor(tokens, dtype=torch.long, device=model.lm_head.weight.device)
    if idx.numel() == 0:
        raise UserError("the prompt is empty; start it with <|endoftext|> for an unconditioned "
                        "sample")
    if idx.max() >= model.config.vocab_size:
        raise UserError(f"the prompt holds token {idx.max().item()}, outside the model's "
                        f"{model.config.vocab_size}")
    return idx.view(1, -1).repeat(num_samples, 1)


class StaticKVCache(KVCache):
    """One layer's keys and values for an Engine's slots: a row of block_size positions for each
    slot, allocated at the first prompt. A prompt (or the one-token step of a request alone) goes
    into the rows from `row` on, after position `pos`, by KVCache's arithmetic. While `at` holds
    every row's position (a (slots,) long tensor on the model's device), a step writes each row's
    new key and value at its own position and returns every row's first `width` positions, which
    the step's mask limits, row by row, to the positions that row has written. Shapes then change
    only with the width, as a CUDA graph (one per width) needs."""

    row = 0
    at = None
    width = None

    def __init__(self, block_size, slots):
        super().__init__(block_size)
        self.slots = slots

    def update(self, k, v):
        if self.k is None:
            # Zeros, not KVCache's empty rows: the step's mask hides the positions a row has not
            # written, but a NaN left there by the allocator would still reach the output (its
            # weight is 0, and 0 * NaN = NaN).
            shape = (self.slots, k.size(1), self.block_size, k.size(3))
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
            self.every = torch.arange(self.slots, device=k.device)
        if self.at is None:
            rows = slice(self.row, self.row + k.size(0))
            start, self.pos = self.pos, self.pos + k.size(2)
            self.k[rows, :, start:self.pos], self.v[rows, :, start:self.pos] = k, v
            return self.k[rows, :, :self.pos], self.v[rows, :, :self.pos]
        # (slots, n_head, head_size): each row's at its own position
        self.k[self.every, :, self.at] = k[:, :, 0]
        self.v[self.every, :, self.at] = v[:, :, 0]
        return self.k[:, :, :self.width], self.v[:, :, :self.width]


# False: CUDA decodes with the eager step too (benches compare the two in one process)
CUDA_GRAPHS = True
GRAPH_WARMUP = 2  # eager steps on a side stream before the capture, as CUDA graph capture needs
# The shared step attends to the first positions of every slot, a multiple of WIDTH that covers the
# furthest row: a lone request at position 40 reads 64 positions of each slot, not block_size.
WIDTH = 64


def decode_path(device, shared=True):
    """How an Engine on device runs its step: "graph" (the fixed-width step replayed as a CUDA
    graph) where CUDA is; elsewhere (CPU, MPS: their ops run on the calling thread anyway, so a
    graph would save no launches) "fixed", the same step run op by op, for an engine whose requests
    share the batch, and "eager" for one that runs one request at a time: GPT.forward over the rows
    that request has filled, which costs less than attending to all block_size positions, and has no
    company to be independent of."""
    if CUDA_GRAPHS and torch.device(device).type == "cuda" and torch.cuda.is_available():
        return "graph"
    if shared:
        return "fixed"
    return "eager"


def next_logits(model, logits):
    """The last position's float logits (B, tokens) of a forward's (B, T, vocab): ids past the real
    tokens (GPT-2's 50257, and a chat model's template tokens) are vocabulary padding, never tokens.
    """
    return logits[:, -1, :model.config.real_tokens].float()


class Sequences:
    """One request to an Engine: num_samples continuations of the prompt `tokens`, each in a slot of
    its own, drawn together (one sample_next over their rows) from the request's own generator when
    it has one (seed or generator; else torch's global one). stop: a token id or a tuple of them
    that ends a row; the request ends when every row has made one, after max_new_tokens, when
    on_token says so or once cancelled. on_token(tokens) gets each step's (num_samples,) new tokens
    on the engine's thread, and returns True to end the request there (a stop string); on_end(error)
    is called once at the end, error the exception of a step that failed, else None."""

    def __init__(self, tokens, max_new_tokens, num_samples=1, stop=EOT, on_token=None, on_end=None,
                 **sampling):
        sampling = {**SAMPLING, **sampling}
        self.seed = sampling.pop("seed", None)
        self.generator = sampling.pop("generator", None)
        self.sampling = sampling
        self.tokens = tokens
        self.max_new_tokens = max_new_tokens
        self.num_samples = num_samples
        self.stop = stop
        self.on_token, self.on_end = on_token, on_end
        self.slots, self.made = [], 0
        self.cancelled = False
        self.ended = False

    def cancel(self):
        """Ends the request at the engine's next step, from any thread: its client has left."""
        self.cancelled = True


class Engine:
    """Continuous batching over one model held for inference: a StaticKVCache per layer with `slots`
    rows, each holding one sequence at its own position. Each step() first runs the jobs waiting
    (scoring, between two steps), then decodes one token for every running sequence in one batched
    forward, where each row attends to its own positions only, then prefills waiting requests into
    free slots, each alone, and draws their first token from that prefill: they join the next step.
    A request that ends frees its slots at once.

    Where requests share it, the step is fixed-width (decode_path's "fixed", and "graph" on CUDA):
    every slot's row is computed, running or not, so a request's tokens never depend on who shares
    the batch (on a CPU a float32 matmul over 1 row and over 8 differ in the last bits). Each row
    attends to the first `width` positions of its slot under a mask that hides those past its own:
    width is the multiple of WIDTH that covers the furthest running row, so a lone short request
    does not read block_size positions of every slot. A row's attention is the same at any width
    (tests/test_decoder.py checks it: the hidden positions get exact zeros, and the kernel sums the
    ones it sees in the same order whatever follows them), where attention over the 40 positions
    a row has written, unpadded, would differ from its attention over 64 in the last bits. On CUDA
    each width is a graph of its own, captured when first met. An engine for one request at a time
    (engine_for's, or one slot) runs GPT.forward over the rows filled ("eager"), today's batch
    decoding.

    One thread steps it: run() for a server, or a caller's loop of step(). submit, call, cancel and
    load may be called from any thread."""

    def __init__(self, model, slots, key=None, shared=True):
        self.model = model
        self.slots = slots
        self.key = key  # what engine_for keys it by
        self.device = model.lm_head.weight.device
        self.path = decode_path(self.device, shared and slots > 1)
        self.bs = model.config.block_size
        self.caches = [StaticKVCache(self.bs, slots) for _ in model.transformer.h]
        # the step's input tokens and their positions, rewritten before each step
        self.tok = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self.at = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.positions = torch.arange(self.bs, device=self.device)
        self.width = self.bs  # the positions of each slot the step attends to, set before each step
        self.graphs = {}  # on CUDA, width -> (the step's graph there, the logits it writes),
        self.pool = None  # the memory pool those graphs share,
        self.warm = 0  # the eager steps run before the first capture,
        self.stream = None  # and the side stream they ran on
        self.free, self.running = list(range(slots)), []
        self.waiting = collections.deque()  # requests for a slot, oldest first
        self.jobs = collections.deque()  # (fn, future) to run between steps
        self.wake = threading.Condition()  # guards free, running, waiting and jobs across threads
        self.lock = threading.Lock()  # held by whoever steps it, for engine_for's callers
        self.steps = 0  # batched decoding steps so far

    def submit(self, seq):
        """Queues seq for a slot; UserError for a prompt the model cannot take or more samples than
        slots."""
        idx = prompt_rows(self.model, seq.tokens, 1)
        if seq.num_samples > self.slots:
            raise UserError(f"{seq.num_samples} samples need as many slots; this engine has "
                            f"{self.slots}")
        if seq.generator is None and seq.seed is not None:
            seq.generator = torch.Generator(self.device).manual_seed(seq.seed)
        seq.idx = idx.repeat(seq.num_samples, 1)
        stop = () if seq.stop is None else seq.stop
        seq.stop_ids = torch.tensor(stop, dtype=torch.long, device=self.device).view(-1)
        seq.done = torch.zeros(seq.num_samples, dtype=torch.bool, device=self.device)
        with self.wake:
            self.waiting.append(seq)
            self.wake.notify()
        return seq

    def call(self, fn):
        """fn() run on the engine's thread between two steps; returns a Future of its result."""
        future = concurrent.futures.Future()
        with self.wake:
            self.jobs.append((fn, future))
            self.wake.notify()
        return future

    def cancel(self, seq):
        """seq.cancel(), and the engine woken to free its slot."""
        seq.cancel()
        with self.wake:
            self.wake.notify()

    def load(self):
        """(slots running, rows and jobs waiting for the engine)."""
        with self.wake:
            waiting = sum(s.num_samples for s in self.waiting) + len(self.jobs)
            return self.slots - len(self.free), waiting

    def run(self, on_error=None):
        """Steps whenever there is work, for as long as the process lives: a server's engine thread.
        A step that fails ends the requests it ran with the error (on_error(exception) hears of it),
        and the engine goes on with the next ones."""
        while True:
            with self.wake:
                self.wake.wait_for(lambda: self.running or self.waiting or self.jobs)
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - its requests were told; the engine goes on
                if on_error is not None:
                    on_error(e)

    @torch.no_grad()
    def step(self):
        """The jobs waiting, then one token for every running request, then the waiting requests
        that fit."""
        while self.jobs:
            with self.wake:
                fn, future = self.jobs.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as e:  # noqa: BLE001 - the caller gets it from the future
                    future.set_exception(e)
        for seq in [s for s in self.running if s.cancelled]:
            self.end(seq)
        try:
            if self.running:
                self.decode()
            self.join()
        except Exception as e:
            for seq in list(self.running):
                self.end(seq, e)
            raise

    def decode(self):
        running, logits = list(self.running), {}
        stepping = [s for s in running if s.pos < self.bs]
        if stepping and self.path == "eager":  # one request, in the slots from its first on
            (seq,) = stepping
            for cache in self.caches:
                cache.row, cache.pos = seq.slots[0], seq.pos
            logits[seq] = next_logits(self.model, self.model(seq.idx[:, -1:], cache=self.caches)[0])
            seq.pos += 1
            self.steps += 1
        elif stepping:
            self.tok.zero_()  # a free slot's row decodes token 0 at position 0, never read
            self.at.zero_()
            for seq in stepping:
                self.tok[seq.rows] = seq.idx[:, -1:]
                self.at[seq.rows] = seq.pos
                seq.pos += 1
            furthest = max(seq.pos for seq in stepping)  # the positions the furthest row attends to
            self.width = min(self.bs, -(-furthest // WIDTH) * WIDTH)
            out = self.graph_step() if self.path == "graph" else self.fixed_step()
            for seq in stepping:
                logits[seq] = out[seq.rows]
            self.steps += 1
        for seq in running:
            if seq not in logits:
                # Positions are learned and absolute: once the window slides, every kept token sits
                # at a new position, so the stored keys and values are stale and the window is
                # recomputed, row by row.
                # After the step, which wrote its rows' position 0.
                logits[seq] = torch.cat([self.prefill(seq.idx[i:i + 1, -self.bs:], slot)
                                         for i, slot in enumerate(seq.slots)])
        for seq in running:
            self.emit(seq, logits[seq])

    def join(self):
        while True:
            with self.wake:
                seq = self.waiting[0] if self.waiting else None
                if seq is None or not (seq.cancelled or seq.num_samples <= len(self.free)):
                    return
                self.waiting.popleft()
                if not seq.cancelled:
                    seq.slots = [self.free.pop(0) for _ in range(seq.num_samples)]
                    self.running.append(seq)
            if seq.cancelled:
                self.end(seq)
                continue
            seq.rows = torch.tensor(seq.slots, device=self.device)
            first, *others = seq.slots
            prompt = seq.idx[:1, -self.bs:]
            logits = self.prefill(prompt, first)
            seq.pos = prompt.size(1)
            for cache in self.caches:  # the samples of one prompt share its keys and values
                cache.k[others, :, :seq.pos] = cache.k[first, :, :seq.pos].clone()
                cache.v[others, :, :seq.pos] = cache.v[first, :, :seq.pos].clone()
            self.emit(seq, logits.expand(seq.num_samples, -1))

    def prefill(self, idx, slot):
        """Logits for the token after idx (1, T <= block_size), which fills slot's row from position
        0."""
        for cache in self.caches:
            cache.row, cache.pos = slot, 0
        return next_logits(self.model, self.model(idx, cache=self.caches)[0])

    def emit(self, seq, logits):
        nxt = sample_next(logits, generator=seq.generator, **seq.sampling)
        seq.idx = torch.cat((seq.idx, nxt[:, None]), dim=1)
        seq.made += 1
        said = seq.on_token is not None and bool(seq.on_token(nxt))
        ended = said or seq.made == seq.max_new_tokens
        if not ended and len(seq.stop_ids):  # waits for a GPU: only where a stop token may end it
            seq.done |= torch.isin(nxt, seq.stop_ids)
            ended = bool(seq.done.all())
        if ended:
            self.end(seq)

    def end(self, seq, error=None):
        """Ends seq where it is, waiting or running: its slots are free for the next step."""
        with self.wake:
            if seq in self.running:
                self.running.remove(seq)
                self.free = sorted(self.free + seq.slots)
            elif seq in self.waiting:
                self.waiting.remove(seq)
        if not seq.ended:
            seq.ended = True
            if seq.on_end is not None:
                seq.on_end(error)

    def fixed_step(self):
        """One token for every slot: self.tok at positions self.at (tensors, so that a graph reads
        them afresh), each row attending to its cache row's first self.width positions, masked to
        those up to its own position."""
        model = self.model
        mask = self.positions[None, :self.width] <= self.at[:, None]
        for cache in self.caches:
            cache.at, cache.width = self.at, self.width
        try:
            x = model.hidden_states(self.tok, self.at[:, None], mask[:, None, None], self.caches)
            return next_logits(model, model.lm_head(x))
        finally:
            for cache in self.caches:
                cache.at = None

    def graph_step(self):
        """fixed_step replayed as a CUDA graph: one launch for the whole step instead of ~15 a
        layer, which at small batches take longer to issue than the GPU takes to run them. A graph
        per width, captured when the step first reaches it, all in one memory pool (they never run
        at once). The first GRAPH_WARMUP steps run eagerly on a side stream (capture needs cuBLAS's
        workspace and the allocator warmed up on it). A graph's logits land in the same buffer each
        replay, read before the next step is queued."""
        if not self.graphs and self.warm < GRAPH_WARMUP:
            self.warm += 1
            self.stream = self.stream or torch.cuda.Stream()
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                out = self.fixed_step()
            torch.cuda.current_stream().wait_stream(self.stream)
            return out
        if self.width not in self.graphs:
            # Autocast's cache of cast weights would hand the graph tensors that are freed when the
            # caller's autocast ends; a held model has no casts to cache, and this keeps it so
            # whatever the caller holds.
            enabled = torch.is_autocast_enabled("cuda")
            dtype = torch.get_autocast_dtype("cuda")
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.autocast("cuda", enabled=enabled, dtype=dtype, cache_enabled=False), \
                        torch.cuda.graph(graph, self.pool, capture_error_mode="thread_local"):
                    out = self.fixed_step()
            except RuntimeError as e:  # e.g. an attention kernel that cannot be captured
                warnings.warn(f"CUDA graph capture of the decoding step failed ({e}); decoding "
                              f"without it")
                self.path = "fixed"
                return self.fixed_step()
            self.pool = graph.pool()
            self.graphs[self.width] = graph, out
        graph, out = self.graphs[self.width]
        graph.replay()
        return out


# model -> its Engine; none holds its model, so a model can be freed
_ENGINES = weakref.WeakKeyDictionary()


def engine_for(model, slots):
    """The model's kept Engine for this many slots, for one request at a time (decode_path's "eager"
    on a CPU), locked for the caller, who steps it; a new one (which replaces it) if anything it
    depends on changed: the slots, the autocast state (the cache's dtype) or where any weight lives
    (a captured graph reads weights by address). A caller while another steps it gets an engine of
    its own."""
    device = model.lm_head.weight.device
    key = (slots, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type),
           tuple(p.data_ptr() for p in model.parameters()))
    engine = _ENGINES.get(model)
    if engine is None or engine.key != key:
        engine = _ENGINES[model] = Engine(model, slots, key, shared=False)
    if engine.lock.acquire(blocking=False):
        return engine
    engine = Engine(model, slots, shared=False)
    engine.lock.acquire()
    return engine


def inference_model(model):
    """The GPT to decode with: unwrapped from torch.compile's wrapper and from
    train_gpt2.CompiledOrEager (whose attribute forwarding does not reach `_orig_mod`), since a
    compiled model would trace and recompile as the cache grows; under autocast to a dtype other
    than its weights', a copy held in that dtype."""
    model = getattr(model, "compiled", model)  # CompiledOrEager's torch.compile wrapper
    model = getattr(model, "_orig_mod", model)
    device = model.lm_head.weight.device
    dtype = None
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    if dtype not in (None, model.lm_head.weight.dtype):
        # Autocast would cast all the weights again for every token: three times the memory traffic
        # of a decoder that reads them once, already cast. So decode with a copy held in autocast's
        # dtype, built each call (tens of ms): kept, it would hold a stale second copy of the
        # weights through training.
        fresh = model_from_state(model.config, model.state_dict(), device, dtype)
        model = hold_for_inference(fresh, dtype)
    return model


@torch.no_grad()
def generate_stream(model, tokens, max_new_tokens, num_samples=1, stop=EOT, **sampling):
    """Continues the prompt `tokens` num_samples times, yielding each new position's (num_samples,)
    tokens, until max_new_tokens or until every sample has produced `stop` (None: never stops).
    sampling: sample_next's temperature (0: greedy), top_k and top_p, SAMPLING's unless given, and
    seed or generator, which make the draws repeatable. The samples decode side by side in an Engine
    of num_samples slots, the model's own (engine_for), which keeps its cache, and on CUDA the graph
    of its step, from call to call. A compiled model decodes uncompiled: it would recompile as the
    sequence grows."""
    model = inference_model(model)
    made = []
    seq = Sequences(tokens, max_new_tokens, num_samples, stop, on_token=made.append, **sampling)
    engine = engine_for(model, num_samples)
    try:
        engine.submit(seq)
        while not seq.ended:
            engine.step()
            yield from made
            made.clear()
    finally:
        engine.end(seq)  # a caller that stopped reading: its slots are free for the next user
        engine.lock.release()


def generate(model, tokens, max_new_tokens, num_samples=1, stop=EOT, **sampling):
    """generate_stream's tokens gathered: one list of new tokens per sample, each cut before `stop`.
    Read from the device once, at the end, so that a GPU is never waited on between tokens that
    nothing stops."""
    steps = list(generate_stream(model, tokens, max_new_tokens, num_samples, stop, **sampling))
    rows = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(num_samples)]
    return [row[:row.index(stop)] if stop in row else row for row in rows]


def text_stream(tokens, limit, stop=(), ends=(EOT,)):
    """The one streamer of stop strings, sample.py's and serve.py's: new token ids as the text a
    reader is shown. For each id taken from the iterable `tokens`, (token, piece, finish_reason).
    piece is the text that is safe to show by then: never a character still missing bytes, nor what
    may be the start of a stop string. finish_reason is None until the last id's: "stop" at an id of
    `ends` (<|endoftext|>; a chat reply's chat.STOP) or at a stop string, which the text ends before
    (the ids taken keep the one that completed it), else "length" at the limit-th id. tokens must
    hold that many ids, or one that ends the text; the caller closes it (it may be a
    generate_stream, which holds its model's decoder until closed)."""
    enc = get_tokenizer()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    # the characters a stop string may still be completing
    hold = max(map(len, stop), default=1) - 1
    text = ""
    sent = 0
    for made, token in enumerate(tokens, 1):
        if token in ends:
            yield token, text[sent:] + decoder.decode(b"", final=True), "stop"
            return
        text += decoder.decode(enc.decode_single_token_bytes(token))
        hits = [i for i in (text.find(s, max(0, sent - hold)) for s in stop) if i >= 0]
        if hits:
            yield token, text[sent:min(hits)], "stop"
            return
        if made == limit:
            yield token, text[sent:] + decoder.decode(b"", final=True), "length"
            return
        piece = text[sent:max(sent, len(text) - hold)]
        sent += len(piece)
        yield token, piece, None


def text_feed(limit, stop=(), ends=(EOT,)):
    """text_stream driven a token at a time, for a caller that is handed each token rather than
    iterating them (serve.py's engine callback): feed(token) gives its (piece, finish_reason)."""
    box = []
    stream = text_stream(iter(box.pop, None), limit, stop, ends)

    def feed(token):
        box.append(token)
        _, piece, reason = next(stream)
        return piece, reason

    return feed


def stream_text(model, tokens, max_new_tokens, stop=(), ends=(EOT,), **sampling):
    """generate_stream's one sample through text_stream: a (piece, finish_reason) per new token."""
    # text_stream decides where the text ends
    new = generate_stream(model, tokens, max_new_tokens, stop=None, **sampling)
    with contextlib.closing(new):
        for _, piece, reason in text_stream((t.item() for t in new), max_new_tokens, stop, ends):
            yield piece, reason


# ----------------------------------------------------------------------------------------------
# Scoring: the log-probability of every token of many texts at once, for serve.py's echo and
# logprobs.

SCORE_TOKENS = 16384  # positions a scoring forward takes at most: B x T of the packed rows
# Positions a group of windows that share a start may take (or twice the longest window, if more):
# room for a context and its endings. Rows are as long as the longest group: attention over a packed
# row is computed whole and masked, so rows much longer than their texts cost more attention than
# padding would (16 texts of 64 packed in one 1024-wide row made attention a third of a forward on
# CPU).
SCORE_ROW = 256
SCORE_CHUNK = 256  # positions projected to logits at a time: 256 x 50257 fp32 is 51 MB


@torch.no_grad()
def score(model, windows, top=0, gone=lambda: False):
    """Log-probabilities of many texts in few forwards. windows: (tokens, first, nxt), tokens at
    most block_size ids, read as one text from position 0: wanted are the log-probabilities of
    tokens[first:] (first >= 1), each given the tokens before it, and of nxt, an id, given all of
    them; nxt None asks instead for the distribution after the last token. Returns for each window
    (log-probabilities, the `top` likeliest tokens at each of those positions as (ids,
    log-probabilities), and when nxt is None the float32 logits after the last token, on the model's
    device); or None once gone() says the client left, checked before each forward. Over GPT-2's
    50257 tokens only: ids past them pad the vocabulary. Windows are packed by
    hellaswag.pack_windows, HellaSwag's packer too."""
    model = getattr(model, "_orig_mod", model)
    device, bs = model.lm_head.weight.device, model.config.block_size
    texts = [list(tokens) for tokens, _, _ in windows]
    assert all(1 <= len(t) <= bs for t in texts)
    assert all(1 <= f <= len(t) for t, (_, f, _) in zip(texts, windows))
    # room for a context and its endings in one row
    capacity = max(SCORE_ROW, 2 * max(map(len, texts)))
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
        # Windows that share a start share its hidden states: each is projected to logits once (a
        # context that four endings share, once, not four times), and every window reads its own
        # targets off those rows.
        unique, which = torch.tensor(picks, device=device).unique(return_inverse=True)
        targets = torch.tensor(targets, device=device)
        lps = torch.empty(len(picks), device=device)
        tops = []
        lasts = {}
        for at in range(0, len(unique), SCORE_CHUNK):
            # The model's own head, then the real tokens' columns: a matmul onto the 50257 rows
            # alone is an odd shape, which on CPU took 45% longer than onto all 50304.
            rows = unique[at:at + SCORE_CHUNK]
            logits = model.lm_head(h[rows])[:, :model.config.real_tokens].float()
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
# Chat: a chat model's reply to a conversation (chat.py's template), for serve.py's
# /v1/chat/completions and sample.py --chat.


def not_chat(model, name):
    """None for a chat model (its config has chat=True: fine-tuned on conversations); else why it
    cannot chat, and the fix, in one line."""
    if model.config.chat:
        return None
    return (f"{name} is a base model, not a chat model: it was never fine-tuned on conversations "
            f"(its config has no chat=True), so it has not learnt the chat template's tokens and "
            f"cannot reply to messages; fine-tune it first (python train_gpt2.py --preset=sft "
            f"--init_from=... on conversations, docs/training.md), or continue text with "
            f"/v1/completions")


def stream_reply(model, messages, max_new_tokens, stop=(), **sampling):
    """stream_text's (piece, finish_reason) of a chat model's reply to messages: what it writes
    after chat.prompt(messages) (its last block_size ids), ending at <|end|> (or <|endoftext|>:
    chat.STOP) or a stop string with "stop", or after max_new_tokens with "length". ValueError with
    chat.problem's reason for what is not a conversation."""
    tokens = chat.prompt(messages)[-model.config.block_size:]
    return stream_text(model, tokens, max_new_tokens, stop, ends=chat.STOP, **sampling)
