"""Serve a model over HTTP: a web page to type into, and the OpenAI completions and chat completions
API for every other client.

    python serve.py --model=log/model_019073.pt        # then open http://127.0.0.1:8000
    python serve.py --model=log --port=8080             # a run directory: its newest checkpoint
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "Hello, my name is", "max_tokens": 32, "temperature": 0.8}'

Endpoints: GET / (the page), POST /v1/completions (prompt, max_tokens, temperature, top_p, seed,
stop, stream, echo, logprobs, and top_k as an extension), POST /v1/chat/completions (messages, for a
chat model: one fine-tuned with --preset=sft on chat.py's template; the page is then a
conversation), GET /v1/models, GET /health, and vLLM's GET /tokenizer_info, POST /tokenize and POST
/detokenize, so that EleutherAI's lm-eval (--model local-completions) needs only the URL. Requests
share one model and run one at a time, under a lock; up to --queue more wait their turn and any
beyond get 503. A request's prompts are scored together, packed into few forwards (inference.score).
A client that hangs up stops its generation at the next token; one that has not sent its whole
request within --timeout is cut off, and never held the model. Web pages of other sites get 403
(docs/serving.md, "Web pages").
"""
import argparse
import codecs
import contextlib
import errno
import io
import ipaddress
import itertools
import json
import os
import select
import socket
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import chat
from inference import (
    DTYPES,
    SAMPLING,
    encode,
    generate_stream,
    inference_dtype,
    load_for_inference,
    not_chat,
    sample_next,
    score,
    seed_ok,
    stream_text,
    text_stream,
)
from train_gpt2 import EOT, UserError, get_tokenizer, pick_device

# bytes: a hundred full 1024-token windows as token ids; a larger body is a mistake or an abuse
MAX_BODY = 1 << 20
# The most new tokens a request may ask for: four windows of GPT-2's 1024 positions. Past block_size
# each new token recomputes the whole window, so the longest completions cost the most while the
# model sees no more of the text; the bound keeps one request from holding the model, which every
# other request waits for, for long.
MAX_TOKENS = 4096
UNSUPPORTED = {"suffix": None, "best_of": 1, "frequency_penalty": 0, "presence_penalty": 0,
               "logit_bias": {}}  # OpenAI's fields this server does not implement: their defaults
CHAT_UNSUPPORTED = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {},
                    "logprobs": False, "top_logprobs": 0, "tools": [], "tool_choice": "none",
                    "functions": [], "function_call": "none",
                    "response_format": {"type": "text"}}  # and for chat completions
# a reply's default bound; a chat model ends its reply with <|end|> long before, as a rule
CHAT_MAX_TOKENS = 256
PROMPT = "a string, a list of strings, a list of token ids, or a list of lists of token ids"
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html")


class APIError(Exception):
    """An OpenAI-style error: the HTTP status, the message, and the request field it is about (or
    None)."""

    def __init__(self, status, message, param=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind


def parse_prompt(value, vocab):
    """The prompts of a request, each a string or a list of token ids below vocab; APIError (400) if
    not."""
    def ids(v):  # bool is an int to Python, never to a JSON client
        return (isinstance(v, list) and v
                and all(isinstance(t, int) and not isinstance(t, bool) for t in v))

    def refuse(why):
        shown = json.dumps(value)
        more = "..." if len(shown) > 80 else ""
        raise APIError(400, f"prompt={shown[:80]}{more} is invalid; {why}", "prompt")

    if value is None:
        return [""]  # OpenAI's default too: text after <|endoftext|>
    prompts = [value] if isinstance(value, str) or ids(value) else value
    if not (isinstance(prompts, list) and prompts and (all(isinstance(p, str) for p in prompts)
                                                       or all(ids(p) for p in prompts))):
        refuse(f"prompt must be {PROMPT}, none of them empty")
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            try:
                p.encode()
            # a lone surrogate ("\ud800") is valid JSON, but not text
            except UnicodeEncodeError as e:
                refuse(f"prompt {i} is not text: {e.reason} at character {e.start}")
        elif not all(0 <= t < vocab for t in p):
            outside = next(t for t in p if not 0 <= t < vocab)
            refuse(f"prompt {i} holds token id {outside}, and token ids are 0 to {vocab - 1}")

    return prompts


def load_json(body):
    """A request body's JSON object; APIError (400) if it is not one."""
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(req, dict):
        raise APIError(400, "the body must be a JSON object")
    return req


def field(req, name, kinds, default, ok=lambda v: True, want=""):
    """req[name], checked to be of kinds and ok; default when absent or null; APIError (400) naming
    it if not."""
    value = req.get(name)
    if value is None:
        return default
    # bool is an int to Python, never to a JSON client
    if not isinstance(value, kinds) or isinstance(value, bool) != (kinds is bool) or not ok(value):
        raise APIError(400, f"{name}={json.dumps(value)} is invalid; {name} must be {want}", name)
    return value


def refuse_unsupported(req, defaults):
    """400 for a field this server does not implement, unless at its default: refused rather than
    silently ignored."""
    for name, default in defaults.items():
        if req.get(name) not in (None, default):
            raise APIError(400, f"{name}={json.dumps(req[name])} is not supported by this server; "
                                f"leave it out", name)


def parse_sampling(req, max_tokens):
    """The settings completions and chat completions share, with OpenAI's defaults but for
    temperature, top_k and top_p, which are inference.SAMPLING's: stop, temperature, top_p, top_k,
    seed, stream, and n (1 only); max_tokens is already checked."""
    stop = req.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > 4
            or not all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, f"stop={json.dumps(req['stop'])} is invalid; stop must be a non-empty "
                            f"string or a list of up to 4 of them", "stop")
    field(req, "n", int, 1, lambda v: v == 1, "1 (one completion per request)")
    return dict(
        max_tokens=max_tokens,
        temperature=field(req, "temperature", (int, float), SAMPLING["temperature"],
                          lambda v: 0 <= v <= 2, "from 0 (greedy) to 2"),
        top_p=field(req, "top_p", (int, float), SAMPLING["top_p"], lambda v: 0 < v <= 1,
                    "above 0 and at most 1"),
        top_k=field(req, "top_k", int, SAMPLING["top_k"], lambda v: v >= 0,
                    "0 (every token) or more"),
        seed=field(req, "seed", int, None, seed_ok, "a 64-bit integer"),
        stop=stop,
        stream=field(req, "stream", bool, False, want="true or false"),
    )


def parse_request(body, vocab=EOT + 1):
    """The prompts and settings of a /v1/completions body (parse_sampling's, and prompts, echo,
    logprobs); APIError (400) if one is wrong. vocab: the token ids a prompt may hold."""
    req = load_json(body)
    refuse_unsupported(req, UNSUPPORTED)
    prompts = parse_prompt(req.get("prompt"), vocab)
    echo = field(req, "echo", bool, False, want="true or false")
    least = 0 if echo else 1  # echo with max_tokens 0 scores the prompt alone
    want = f"an integer from {least} to {MAX_TOKENS}" + ("" if echo else " (0 only with echo)")
    max_tokens = field(req, "max_tokens", int, 16, lambda v: least <= v <= MAX_TOKENS, want)
    if len(prompts) * max_tokens > MAX_TOKENS:
        raise APIError(400, f"max_tokens={max_tokens} is invalid for {len(prompts)} prompts: a "
                            f"request makes at most {MAX_TOKENS} new tokens in all; send fewer "
                            f"prompts a request", "max_tokens")
    req = dict(prompts=prompts, echo=echo,
               logprobs=field(req, "logprobs", int, None, lambda v: 0 <= v <= 5,
                              "an integer from 0 to 5"),
               **parse_sampling(req, max_tokens))
    if req["stream"] and (len(prompts) > 1 or echo or req["logprobs"] is not None):
        raise APIError(400, "stream=true is for one prompt, without echo or logprobs; leave stream "
                            "out to get the whole reply at once", "stream")
    return req


def api_messages(messages):
    """messages as OpenAI's API may send them, in chat.py's form: a developer message (OpenAI's
    newer name for a system message) as system, and content as a list of text parts joined by
    newlines (as vLLM joins them); APIError (400) for a part that is not text. What is not a list of
    objects is left for chat.problem to name."""
    if not isinstance(messages, list):
        return messages
    plain = []
    for i, message in enumerate(messages, 1):
        parts = message.get("content") if isinstance(message, dict) else None
        if isinstance(parts, list) and parts:
            for j, part in enumerate(parts, 1):
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    if isinstance(part, dict):
                        what = f"of type {chat.short(part.get('type'))}"
                    else:
                        what = chat.short(part)
                    raise APIError(400, f"message {i}'s content part {j} is {what}; this model "
                                        f"reads text parts only: "
                                        f"{{\"type\": \"text\", \"text\": \"...\"}}", "messages")
            message = {**message, "content": "\n".join(part["text"] for part in parts)}
        if isinstance(message, dict) and message.get("role") == "developer":
            message = {**message, "role": "system"}
        plain.append(message)
    return plain


def parse_chat_request(body):
    """The messages and settings of a /v1/chat/completions body (parse_sampling's, and messages,
    checked by chat.problem); APIError (400) if one is wrong. max_completion_tokens, OpenAI's newer
    name, may stand for max_tokens."""
    req = load_json(body)
    refuse_unsupported(req, CHAT_UNSUPPORTED)
    messages = api_messages(req.get("messages"))
    reason = chat.problem(messages)
    if reason:
        raise APIError(400, f"{reason}; messages must be a list of {{\"role\": \"system\", "
                            f"\"user\" or \"assistant\", \"content\": a string}}", "messages")
    for i, message in enumerate(messages, 1):
        try:
            message["content"].encode()
        except UnicodeEncodeError as e:  # a lone surrogate ("\ud800") is valid JSON, but not text
            raise APIError(400, f"message {i}'s content is not text: {e.reason} at character "
                                f"{e.start}", "messages") from None
    name = "max_tokens" if req.get("max_tokens") is not None else "max_completion_tokens"
    max_tokens = field(req, name, int, CHAT_MAX_TOKENS, lambda v: 1 <= v <= MAX_TOKENS,
                       f"an integer from 1 to {MAX_TOKENS}")
    return dict(messages=messages, **parse_sampling(req, max_tokens))


def token_text(enc, token):
    """A token as OpenAI's logprobs name it: its text, or "bytes:\\xe2\\x80" when it holds part of a
    character."""
    raw = enc.decode_single_token_bytes(token)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def top_dict(enc, entry):
    """OpenAI's top_logprobs entry, {token text: log-probability}, from (ids, log-probabilities),
    likeliest first ([] for none)."""
    return {token_text(enc, token): logp for token, logp in zip(*entry)}


def text_offsets(enc, tokens, start=0):
    """Each token's offset in the text the tokens decode to, counted from start (a token that begins
    inside a character: that character's)."""
    decoder, offsets = codecs.getincrementaldecoder("utf-8")(errors="replace"), []
    for t in tokens:
        offsets.append(start)
        start += len(decoder.decode(enc.decode_single_token_bytes(t)))
    return offsets


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client does not keep the process alive at Ctrl-C
    # connections the kernel holds until accepted; socketserver's 5 had a burst reset
    request_queue_size = 128

    def __init__(self, address, queue, timeout=30.0):
        super().__init__(address, Handler)
        self.model = None  # loaded once the port is ours
        self.name = None
        self.enc = get_tokenizer()
        # one generation at a time: they share the model (and its one CPU or GPU)
        self.lock = threading.Lock()
        self.count_lock = threading.Lock()
        self.queue = queue
        self.waiting = 0
        self.running = 0
        # seconds a client has to send its request, and to take each write of the reply
        self.timeout = timeout
        self.hosts = local_hosts(address[0], self.server_address[1])

    @contextlib.contextmanager
    def turn(self):
        """Waits for the model; 503 at once if --queue requests are already waiting."""
        with self.count_lock:
            if self.waiting >= self.queue:
                raise APIError(503, f"the server is busy: {self.waiting} requests are already "
                                    f"waiting; retry shortly", kind="server_error")
            self.waiting += 1
        with self.lock:
            with self.count_lock:
                self.waiting -= 1
                self.running += 1
            try:
                yield
            finally:
                with self.count_lock:
                    self.running -= 1

    def encode(self, prompt):
        """A prompt's token ids: a string's ("" is <|endoftext|>, which a string may also name;
        inference.encode), or the ids given."""
        if isinstance(prompt, list):
            return prompt
        return encode(self.model, prompt) or [EOT]

    def complete(self, req, tokens, gone, ends=(EOT,)):
        """Yields (text, finish_reason, usage) for one prompt's tokens: text pieces as they are made
        safe to send (never part of a stop string), and last a ("", reason, usage) with
        finish_reason "stop" (at a token of `ends` or a stop string) or "length"."""
        block_size = self.model.config.block_size
        cropped, tokens = max(0, len(tokens) - block_size), tokens[-block_size:]
        pieces = stream_text(self.model, tokens, req["max_tokens"], req["stop"], ends,
                             temperature=req["temperature"], top_k=req["top_k"], top_p=req["top_p"],
                             seed=req["seed"])
        with contextlib.closing(pieces):
            # max_tokens >= 1: at least the one with a reason
            for made, (text, reason) in enumerate(pieces, 1):
                if gone():
                    return
                yield text, None, None
        usage = dict(prompt_tokens=len(tokens), completion_tokens=made,
                     total_tokens=len(tokens) + made,
                     prompt_tokens_cropped=cropped)  # dropped from the left to fit block_size
        yield "", reason, usage

    def completions(self, req, gone):
        """(choices, usage, warning or None) of a whole reply, each prompt's choice at its index;
        None once gone() says the client left."""
        prompts = [self.encode(p) for p in req["prompts"]]
        if req["logprobs"] is not None:
            made = self.scored(req, prompts, gone)
            if made is None:
                return None
        else:
            made = []
            for tokens in prompts:
                text, reason, usage = "", "length", dict(completion_tokens=0)
                if req["max_tokens"]:  # else echo alone: the prompt is the whole text
                    for piece, reason, usage in self.complete(req, tokens, gone):
                        text += piece
                    if usage is None:
                        return None
                made.append((usage["completion_tokens"], text, reason, None))
        choices = [{"text": (self.enc.decode(tokens) if req["echo"] else "") + text, "index": i,
                    "logprobs": logprobs, "finish_reason": reason}
                   for i, (tokens, (_, text, reason, logprobs)) in enumerate(zip(prompts, made))]
        bs = self.model.config.block_size
        seen, new = sum(min(len(p), bs) for p in prompts), sum(m[0] for m in made)
        usage = dict(prompt_tokens=seen, completion_tokens=new, total_tokens=seen + new,
                     prompt_tokens_cropped=sum(max(0, len(p) - bs) for p in prompts))
        nulls = req["echo"] and req["logprobs"] is not None
        long = [f"prompt {i} has {len(p)} tokens, more than block_size={bs}: the model saw its "
                f"last {bs}" + (f", and its first {len(p) - bs} have logprob null" if nulls else "")
                for i, p in enumerate(prompts) if len(p) > bs]
        return choices, usage, "; ".join(long) or None

    def scored(self, req, prompts, gone):
        """Each prompt's (new tokens made, text, finish_reason, logprobs), logprobs as OpenAI's:
        every token listed (the prompt's too, with echo), its log-probability, the `logprobs`
        likeliest tokens at its place, and its offset in the text. The prompts are scored together
        (inference.score packs them into few forwards), and the first new token of each is drawn
        from that same forward, as generate_stream would draw it; the rest come from
        generate_stream, and one more scoring pass gives their log-probabilities. A prompt longer
        than block_size is scored on its last block_size + 1 tokens, as lm-eval crops one: its last
        block_size tokens get log-probabilities. A new token is scored given the block_size tokens
        before it, as it was made. None once gone() says the client left."""
        model = self.model
        bs = model.config.block_size
        top = req["logprobs"]
        limit = req["max_tokens"]
        sampling = dict(temperature=req["temperature"], top_k=req["top_k"], top_p=req["top_p"])
        # per prompt: the window of its own tokens (echo), that of its first new token
        windows, at = [], []
        for p in prompts:
            mine = None
            if req["echo"]:
                mine = len(windows)
                windows.append((p, 1, None) if len(p) <= bs else (p[-1 - bs:-1], 1, p[-1]))
            after = mine if mine is not None and len(p) <= bs else None
            if limit and after is None:
                after = len(windows)
                windows.append((p[-bs:], len(p[-bs:]), None))
            at.append((mine, after))
        first = score(model, windows, top, gone)
        if first is None:
            return None
        out = []
        for p, (mine, after) in zip(prompts, at):
            tokens, lps, tops = [], [], []
            if mine is not None:
                got, got_tops, _ = first[mine]
                tokens, lps = list(p), [None] * (len(p) - len(got)) + got
                tops = [None] * (len(p) - len(got)) + (got_tops if top else [[]] * len(got))
            new, text, reason = [], "", "length"
            if limit:
                logits = first[after][2]
                generator = None
                if req["seed"] is not None:
                    generator = torch.Generator(logits.device).manual_seed(req["seed"])
                token = sample_next(logits[None], generator=generator, **sampling).item()
                rest = generate_stream(model, p + [token], limit - 1, stop=None,
                                       generator=generator, **sampling)
                drawn = itertools.chain([token], (t.item() for t in rest))
                with contextlib.closing(rest):  # run only as far as text_stream reads it
                    for taken, piece, reason in text_stream(drawn, limit, req["stop"]):
                        if gone():
                            return None
                        new.append(taken)
                        text += piece
                logp = logits.log_softmax(dim=-1)
                lps.append(logp[token].item())
                best = logp.topk(top)
                tops.append((best.indices.tolist(), best.values.tolist()))
            out.append((p, new, tokens + new, lps, tops, text, reason))
        # the new tokens after the first, each given the block_size tokens before it
        later, windows = [], []
        for i, (p, new, *_) in enumerate(out):
            seq = p + new
            for j in range(len(p) + 1, len(seq)):
                later.append(i)
                windows.append((seq[max(0, j - bs):j], min(j, bs), seq[j]))
        scores = score(model, windows, top, gone) if windows else []
        if scores is None:
            return None
        for i, (lps, tops, _) in zip(later, scores):
            out[i][3].extend(lps)
            out[i][4].extend(tops if top else [[]])
        made = []
        for p, new, tokens, lps, tops, text, reason in out:
            # offsets count from the prompt's start
            start = 0 if req["echo"] else len(self.enc.decode(p))
            logprobs = dict(tokens=[token_text(self.enc, t) for t in tokens], token_logprobs=lps,
                            top_logprobs=[None if t is None else top_dict(self.enc, t)
                                          for t in tops],
                            text_offset=text_offsets(self.enc, tokens, start))
            made.append((len(new), text, reason, logprobs))
        return made


def local_hosts(host, port):
    """The Host headers a server bound to loopback accepts, "127.0.0.1:8000" and the like; None when
    it is bound to another address, whose names this server cannot know."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = False
    if not loopback:
        return None
    names = {"localhost", "127.0.0.1", "[::1]", f"[{host}]" if ":" in host else host}
    return {f"{name}:{port}" for name in names} | (names if port == 80 else set())


class DeadlineReader(io.RawIOBase):
    """A socket's bytes until a deadline. Each read waits at most for the time left, so a client
    that sends a byte now and then cannot keep its request open past the deadline, as it could under
    a timeout for each read."""

    def __init__(self, sock, deadline):
        self.sock, self.deadline = sock, deadline

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class Handler(BaseHTTPRequestHandler):
    server_version = "train_gpt2-serve"

    def do_GET(self):
        self.respond(self.get)

    def do_POST(self):
        self.respond(self.post)

    def do_PUT(self):  # and PATCH, DELETE, OPTIONS: a JSON 405, not the library's HTML 501
        self.close_connection = True  # a body it may have sent is never read
        self.respond(self.refuse_method)
    do_PATCH = do_DELETE = do_OPTIONS = do_PUT

    def refuse_method(self):
        self.check_origin()
        raise APIError(405, f"{self.command} is not allowed: this server's endpoints take GET and "
                            f"POST")

    def setup(self):
        super().setup()
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.answered = False
        # The whole request (request line, headers, body) must arrive within --timeout of the
        # connection, so that a slow or silent client holds one thread for a bounded time, and never
        # the model: the model is taken only once a request is read and checked.
        self.rfile.close()
        deadline = time.monotonic() + self.server.timeout
        self.rfile = io.BufferedReader(DeadlineReader(self.connection, deadline))

    def read_done(self):
        """Writes from here on each wait at most --timeout for the client to take them: a client
        that stops reading its stream must not hold the model."""
        self.connection.settimeout(self.server.timeout)

    def respond(self, handle):
        self.read_done()  # the request line and headers are in
        # a query string (Azure's api-version=...) is ignored
        self.route = urllib.parse.urlsplit(self.path).path
        try:
            handle()
        # the body did not arrive in time, or the client stopped taking the reply
        except TimeoutError:
            self.close_connection = True
            if not self.answered:
                with contextlib.suppress(OSError):
                    self.fail(408, f"the request did not arrive within {self.server.timeout:g} s "
                                   f"(--timeout)")
        except APIError as e:
            self.fail(e.status, e.message, e.param, e.kind)
        # what inference refuses, e.g. a token id outside a smaller vocabulary
        except UserError as e:
            self.fail(400, str(e), "prompt")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left; nobody is there to tell
        except Exception as e:  # a bug of ours: say so, log it, and keep serving
            self.log_error("%s", traceback.format_exc())
            if not self.answered:
                self.fail(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")

    def fail(self, status, message, param=None, kind="invalid_request_error"):
        """OpenAI's error JSON; a 503 says when to retry, and a 405 which methods there are."""
        error = {"message": message, "type": kind, "param": param, "code": None}
        self.send_json(status, {"error": error},
                       {503: {"Retry-After": "1"}, 405: {"Allow": "GET, POST"}}.get(status, {}))

    def send_response(self, *args):
        self.answered = True
        super().send_response(*args)

    def check_origin(self):
        """403 for a request a web page of another site sent (its Origin is not this server's), and,
        on loopback, for a Host that is not this server's address: a page whose name was re-pointed
        at 127.0.0.1 (DNS rebinding) is then of its own origin, but names a Host of its own. Clients
        without an Origin (curl, the openai library, lm-eval) and this server's own page pass."""
        host, origin = self.headers.get("Host"), self.headers.get("Origin")
        hosts = self.server.hosts
        if host is not None and hosts is not None and host.lower() not in hosts:
            served = ", ".join(sorted(h for h in hosts if ":" in h))
            raise APIError(403, f"Host {host} is not this server's address: it serves {served} "
                                f"only, so that a web page cannot reach it under a name of its own "
                                f"(DNS rebinding)", kind="permission_error")
        if origin is not None and (host is None or origin.lower() != f"http://{host}".lower()):
            raise APIError(403, f"Origin {origin} is not this server's origin (http://{host}): "
                                f"web pages of other sites may not use this server; open its own "
                                f"page, or call it from a program", kind="permission_error")

    def get(self):
        self.check_origin()
        if self.route == "/":
            with open(PAGE, "rb") as f:
                self.send_body(200, f.read(), "text/html; charset=utf-8")
        elif self.route == "/health":
            s = self.server
            self.send_json(200, {"status": "ok", "model": s.name, "chat": s.model.config.chat,
                                 "running": s.running, "waiting": s.waiting,
                                 # back to its idle count once clients leave
                                 "threads": threading.active_count()})
        elif self.route == "/tokenizer_info":  # vLLM's, which lm-eval's local-completions looks for
            self.send_json(200, {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>",
                                 "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                                 "vocab_size": EOT + 1,
                                 "model_max_length": self.server.model.config.block_size})
        elif self.route == "/v1/models":
            # chat: whether /v1/chat/completions takes it
            self.send_json(200, {"object": "list", "data": [
                {"id": self.server.name, "object": "model", "created": 0, "owned_by": "train_gpt2",
                 "chat": self.server.model.config.chat}]})
        else:
            raise APIError(404, f"no such endpoint: GET {self.path}", kind="not_found_error")

    def read_body(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise APIError(411, "send the body with a Content-Length header")
        length = int(length)
        if length > MAX_BODY:
            self.discard(length)
            raise APIError(413, f"the body is {length} bytes; the limit is {MAX_BODY} (1 MB)")
        body = self.rfile.read(length)
        if len(body) < length:
            raise APIError(400, f"the body ended after {len(body)} of its {length} bytes "
                                f"(Content-Length)")
        self.read_done()
        return body

    def post(self):
        # read whole before any answer: a reply to a half-read request may be reset
        body = self.read_body()
        self.check_origin()
        handle = {"/v1/completions": self.completions,
                  "/v1/chat/completions": self.chat_completions,
                  "/tokenize": self.tokenize, "/detokenize": self.detokenize}.get(self.route)
        if handle is None:
            raise APIError(404, f"no such endpoint: POST {self.path}; completions are POST "
                                f"/v1/completions",
                           kind="not_found_error")
        handle(body)

    def completions(self, body):
        s = self.server
        req = parse_request(body, s.model.config.real_tokens)
        with s.turn():  # only now, with the request read and checked, wait for the model
            if req["stream"]:
                pieces = s.complete(req, s.encode(req["prompts"][0]), self.client_gone)
                self.stream(self.completion_events(pieces))
                return
            reply = s.completions(req, self.client_gone)
            if reply is not None:  # else the client left before the end
                choices, usage, warning = reply
                body = {**self.completion("", None, usage), "choices": choices}
                self.send_json(200, {**body, "warning": warning} if warning else body)

    def chat_completions(self, body):
        """OpenAI's chat completions: the assistant's reply to `messages`, generated from
        chat.prompt(messages) until <|end|> (finish_reason "stop"), a stop string, or max_tokens
        ("length"). A base model gets 400."""
        s = self.server
        refusal = not_chat(s.model, s.name)
        if refusal:
            raise APIError(400, refusal, "model")
        req = parse_chat_request(body)
        self.id, tokens = f"chatcmpl-{uuid.uuid4().hex}", chat.prompt(req["messages"])
        with s.turn():  # only now, with the request read and checked, wait for the model
            pieces = s.complete(req, tokens, self.client_gone, chat.STOP)
            if req["stream"]:
                self.stream(self.chat_events(pieces))
                return
            text, reason, usage = "", None, None
            for piece, reason, usage in pieces:
                text += piece
            if usage is None:
                return  # the client left before the end
            body = {**self.chat_chunk(None, reason, usage), "object": "chat.completion"}
            body["choices"][0]["message"] = {"role": "assistant", "content": text}
            if usage["prompt_tokens_cropped"]:
                seen = usage["prompt_tokens"]
                body["warning"] = (f"the conversation has {seen + usage['prompt_tokens_cropped']} "
                                   f"tokens, more than block_size={seen}: the model saw its last "
                                   f"{seen}")
            self.send_json(200, body)

    def tokenize(self, body):
        """vLLM's POST /tokenize, which lm-eval's local-completions asks for the tokenizer
        (add_special_tokens changes nothing: GPT-2's tokenizer adds none)."""
        prompt = load_json(body).get("prompt")
        if not isinstance(prompt, str):
            raise APIError(400, f"prompt={json.dumps(prompt)[:80]} is invalid; prompt must be a "
                                f"string", "prompt")
        parse_prompt(prompt, EOT + 1)  # refuses what is not text
        tokens = encode(self.server.model, prompt)
        self.send_json(200, {"count": len(tokens),
                             "max_model_len": self.server.model.config.block_size,
                             "tokens": tokens, "token_strs": None})

    def detokenize(self, body):
        """vLLM's POST /detokenize: the text of token ids."""
        tokens = load_json(body).get("tokens")
        if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= EOT for t in tokens):
            raise APIError(400, f"tokens={json.dumps(tokens)[:80]} is invalid; tokens must be a "
                                f"list of token ids from 0 to {EOT}", "tokens")
        self.send_json(200, {"prompt": self.server.enc.decode(tokens)})

    def stream(self, events):
        """Server-sent events: each chunk of `events` as it is made, the last with finish_reason and
        usage, then [DONE] (unless the client left before the end)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        reason = None
        for chunk in events:
            self.event(json.dumps(chunk))
            reason = chunk["choices"][0]["finish_reason"]
        if reason:
            self.event("[DONE]")

    def completion_events(self, pieces):
        """complete()'s pieces as text_completion chunks: one per piece of text, the last with
        finish_reason."""
        for text, reason, usage in pieces:
            if text or reason:
                yield self.completion(text, reason, usage)

    def chat_events(self, pieces):
        """complete()'s pieces as OpenAI's chat.completion.chunk objects: the role first, a delta
        per piece of text, then an empty delta with finish_reason and usage."""
        yield self.chat_chunk({"role": "assistant", "content": ""})
        for text, reason, usage in pieces:
            if text:
                yield self.chat_chunk({"content": text})
            if reason:
                yield self.chat_chunk({}, reason, usage)

    def chat_chunk(self, delta, reason=None, usage=None):
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.server.name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": reason}]}
        if delta is None:  # a whole reply: the caller puts its message in place of the delta
            del body["choices"][0]["delta"]
        return {**body, "usage": usage} if usage else body

    def event(self, data):
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def completion(self, text, reason, usage):
        body = {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.server.name,
                "choices": [{"text": text, "index": 0, "logprobs": None,
                             "finish_reason": reason}]}
        return {**body, "usage": usage} if usage else body

    def client_gone(self):
        """Whether the client has closed its end: the socket then reads as end-of-file."""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            if select.select([self.connection], [], [], 0)[0]:
                return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        return False

    def discard(self, length):
        """Reads an oversized body away, so that the client is not reset mid-send and can read our
        answer."""
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                break
            length -= len(chunk)

    def send_json(self, status, obj, headers={}):
        self.send_body(status, json.dumps(obj).encode(), "application/json", headers)

    def send_body(self, status, body, content_type, headers={}):
        self.send_response(status)
        fields = {"Content-Type": content_type, "Content-Length": str(len(body)), **headers}
        for name, value in fields.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True,
                   help="checkpoint file, run directory, HF directory or hub name")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 opens it to the network")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--device", default="auto",
                   help="auto picks cuda, then mps, then cpu; or name one")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="the weights' dtype; auto: sample.py's, which serves generation best "
                        "(docs/precision.md); float32 gives lm-eval the hf backend's numbers")
    p.add_argument("--queue", type=int, default=8,
                   help="requests that may wait for the model; more get 503")
    p.add_argument("--timeout", type=float, default=30,
                   help="seconds a client has to send its whole request, and to take each write of "
                        "the reply")
    args = p.parse_args(argv)
    if not 0 <= args.port < 65536:
        sys.exit(f"error: --port={args.port} is out of range; --port must be 0 (any free port) "
                 f"to 65535")
    if args.queue < 0:
        sys.exit(f"error: --queue={args.queue} is out of range; --queue must be 0 or more")
    if not args.timeout > 0:
        sys.exit(f"error: --timeout={args.timeout:g} is out of range; --timeout must be above 0 "
                 f"seconds")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:  # the port first: a taken one fails at once, not after a long model load
        server = Server((args.host, args.port), args.queue, args.timeout)
    except OSError as e:
        # an unknown host, or not this machine's address
        wrong_host = isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL
        fix = "check --host" if wrong_host else "pick another --port"
        sys.exit(f"error: cannot listen on {args.host}:{args.port} ({e.strerror}); {fix}")
    try:
        device = pick_device(args.device)
        # One model serves both jobs: auto takes decoding's dtype, since generation is what a served
        # model does most (docs/precision.md, "--dtype=auto")
        dtype = inference_dtype(args.dtype, torch.device(device).type, job="decode")
        server.model = load_for_inference(args.model, device, dtype)
    except UserError as e:
        server.server_close()
        sys.exit(f"error: {e}")
    server.name = os.path.basename(os.path.normpath(args.model))
    host, port = server.server_address[:2]
    print(f"serving {args.model} on http://{host}:{port} ({device}, {dtype})", flush=True)
    with server:
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()


if __name__ == "__main__":
    main()
