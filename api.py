"""The OpenAI-compatible API that serve.py serves, without the sockets: the request checks, OpenAI's
shapes, completions, chat completions, scoring and the tokenizer endpoints, over an inference.Engine
that a thread of its own steps. serve.py reads requests off the network and writes these answers
back.

    api = API(model, "log", engine, queue=8)
    call = Call(api)                       # one HTTP request's work; cancel() if its client leaves
    answer = await call.completions(body)  # a dict (JSON), an async iterator of chunks, or None
"""

import asyncio
import codecs
import json
import threading
import time
import uuid

import chat
from inference import SAMPLING, Sequences, encode, not_chat, score, seed_ok, text_feed
from train_gpt2 import EOT, get_tokenizer

# The most new tokens a request may ask for: four windows of GPT-2's 1024 positions. Past
# block_size each new token recomputes the whole window, so the longest completions cost the most
# while the model sees no more of the text; the bound keeps one request from holding a slot long.
MAX_TOKENS = 4096
# OpenAI's fields this server does not implement, at their defaults: refused unless so
UNSUPPORTED = {
    "suffix": None,
    "best_of": 1,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logit_bias": {},
}
CHAT_UNSUPPORTED = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logit_bias": {},
    "logprobs": False,
    "top_logprobs": 0,
    "tools": [],
    "tool_choice": "none",
    "functions": [],
    "function_call": "none",
    "response_format": {"type": "text"},
}
CHAT_MAX_TOKENS = (
    256  # a reply's default bound; a chat model ends its reply with <|end|> long before
)
PROMPT = "a string, a list of strings, a list of token ids, or a list of lists of token ids"


class APIError(Exception):
    """An OpenAI-style error: the HTTP status, the message, and the request field it is about (or
    None)."""

    def __init__(self, status, message, param=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param  # the request field it is about
        self.kind = kind


def error_body(e):
    """OpenAI's error JSON for an APIError."""
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}}


def is_ids(v):
    """Whether v is a non-empty list of token ids (bool is an int to Python, never to a JSON
    client)."""
    return (
        isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
    )


def parse_prompt(value, vocab):
    """The prompts of a request, each a string or a list of token ids below vocab; APIError (400) if
    not."""

    def refuse(why):
        shown = json.dumps(value)
        more = "..." if len(shown) > 80 else ""
        raise APIError(400, f"prompt={shown[:80]}{more} is invalid; {why}", "prompt")

    if value is None:
        return [""]  # OpenAI's default too: text after <|endoftext|>
    prompts = [value] if isinstance(value, str) or is_ids(value) else value
    strings = isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)
    ids = isinstance(prompts, list) and all(is_ids(p) for p in prompts)
    if not (isinstance(prompts, list) and prompts and (strings or ids)):
        refuse(f"prompt must be {PROMPT}, none of them empty")
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            try:
                p.encode()
            except (
                UnicodeEncodeError
            ) as e:  # a lone surrogate ("\ud800") is valid JSON, but not text
                refuse(f"prompt {i} is not text: {e.reason} at character {e.start}")
        elif not all(0 <= t < vocab for t in p):
            bad = next(t for t in p if not 0 <= t < vocab)
            refuse(f"prompt {i} holds token id {bad}, and token ids are 0 to {vocab - 1}")
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


def field(req, name, kinds, default, ok=None, want=""):
    """req[name], checked to be of kinds and ok; default when absent or null; APIError (400) naming
    it."""
    value = req.get(name)
    if value is None:
        return default
    # bool is an int to Python, never to a JSON client
    right_kind = isinstance(value, kinds) and isinstance(value, bool) == (kinds is bool)
    if not right_kind or (ok is not None and not ok(value)):
        raise APIError(400, f"{name}={json.dumps(value)} is invalid; {name} must be {want}", name)
    return value


def refuse_unsupported(req, defaults):
    """400 for a field this server does not implement, unless at its default: refused, never
    ignored."""
    for name, default in defaults.items():
        if req.get(name) not in (None, default):
            raise APIError(
                400,
                f"{name}={json.dumps(req[name])} is not supported by this server; leave it out",
                name,
            )


def parse_sampling(req, max_tokens):
    """The settings completions and chat completions share, with OpenAI's defaults but for
    temperature, top_k and top_p, which are inference.SAMPLING's: stop, temperature, top_p, top_k,
    seed, stream, and n (1 only); max_tokens is already checked."""
    stop = req.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > 4
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise APIError(
            400,
            f"stop={json.dumps(req['stop'])} is invalid; stop must be a non-empty string "
            f"or a list of up to 4 of them",
            "stop",
        )
    field(req, "n", int, 1, lambda v: v == 1, "1 (one completion per request)")
    return dict(
        max_tokens=max_tokens,
        temperature=field(
            req,
            "temperature",
            (int, float),
            SAMPLING["temperature"],
            lambda v: 0 <= v <= 2,
            "from 0 (greedy) to 2",
        ),
        top_p=field(
            req,
            "top_p",
            (int, float),
            SAMPLING["top_p"],
            lambda v: 0 < v <= 1,
            "above 0 and at most 1",
        ),
        top_k=field(
            req, "top_k", int, SAMPLING["top_k"], lambda v: v >= 0, "0 (every token) or more"
        ),
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
        raise APIError(
            400,
            f"max_tokens={max_tokens} is invalid for {len(prompts)} prompts: a request makes "
            f"at most {MAX_TOKENS} new tokens in all; send fewer prompts a request",
            "max_tokens",
        )
    logprobs = field(req, "logprobs", int, None, lambda v: 0 <= v <= 5, "an integer from 0 to 5")
    req = dict(prompts=prompts, echo=echo, logprobs=logprobs, **parse_sampling(req, max_tokens))
    if req["stream"] and (len(prompts) > 1 or echo or req["logprobs"] is not None):
        raise APIError(
            400,
            "stream=true is for one prompt, without echo or logprobs; leave stream out to "
            "get the whole reply at once",
            "stream",
        )
    return req


def api_messages(messages):
    """messages as OpenAI's API may send them, in chat.py's form: a developer message (OpenAI's
    newer name for a system message) as system, and content as a list of text parts joined by
    newlines (as vLLM joins them); APIError (400) for a part that is not text. What is not a list is
    left for chat.problem."""
    if not isinstance(messages, list):
        return messages
    plain = []
    for i, message in enumerate(messages, 1):
        parts = message.get("content") if isinstance(message, dict) else None
        if isinstance(parts, list) and parts:
            for j, part in enumerate(parts, 1):
                text = isinstance(part, dict) and part.get("type") == "text"
                if not (text and isinstance(part.get("text"), str)):
                    if isinstance(part, dict):
                        what = f"of type {chat.short(part.get('type'))}"
                    else:
                        what = chat.short(part)
                    raise APIError(
                        400,
                        f"message {i}'s content part {j} is {what}; this model reads text "
                        f'parts only: {{"type": "text", "text": "..."}}',
                        "messages",
                    )
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
        raise APIError(
            400,
            f'{reason}; messages must be a list of {{"role": "system", "user" or '
            f'"assistant", "content": a string}}',
            "messages",
        )
    for i, message in enumerate(messages, 1):
        try:
            message["content"].encode()
        except UnicodeEncodeError as e:  # a lone surrogate ("\ud800") is valid JSON, but not text
            raise APIError(
                400,
                f"message {i}'s content is not text: {e.reason} at character {e.start}",
                "messages",
            ) from None
    if req.get("max_tokens") is not None:
        name = "max_tokens"
    else:
        name = "max_completion_tokens"
    max_tokens = field(
        req,
        name,
        int,
        CHAT_MAX_TOKENS,
        lambda v: 1 <= v <= MAX_TOKENS,
        f"an integer from 1 to {MAX_TOKENS}",
    )
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


class API:
    """What every request shares: the model, its name, the tokenizer, and the Engine that decodes
    for all, stepped by a thread of its own (start()). Requests beyond the engine's slots wait, up
    to `queue` of them; any more get 503."""

    def __init__(self, model, name, engine, queue):
        self.model = model
        self.name = name
        self.engine = engine
        self.queue = queue  # requests that may wait for a slot
        self.enc = get_tokenizer()

    def start(self, on_error):
        """The engine's thread, a daemon: it holds nothing a process must finish at exit."""
        thread = threading.Thread(
            target=self.engine.run, args=(on_error,), name="engine", daemon=True
        )
        thread.start()
        return thread

    def admit(self):
        """503 at once if every slot runs and --queue requests are already waiting."""
        running, waiting = self.engine.load()
        if running + waiting >= self.engine.slots + self.queue:
            raise APIError(
                503,
                f"the server is busy: {waiting} requests are already waiting; retry shortly",
                kind="server_error",
            )

    def encode(self, prompt):
        """A prompt's token ids: a string's ("" is <|endoftext|>, which a string may also name), or
        the ids given."""
        if isinstance(prompt, list):
            return prompt
        return encode(self.model, prompt) or [EOT]

    def health(self):
        running, waiting = self.engine.load()
        return {
            "status": "ok",
            "model": self.name,
            "chat": self.model.config.chat,
            "slots": self.engine.slots,
            "running": running,
            "waiting": waiting,
            "steps": self.engine.steps,
            "threads": threading.active_count(),  # back to their idle counts once clients leave
            "tasks": len(asyncio.all_tasks()),
        }

    def tokenizer_info(self):
        """vLLM's GET /tokenizer_info, which lm-eval's local-completions looks for."""
        return {
            "tokenizer_class": "GPT2Tokenizer",
            "eos_token": "<|endoftext|>",
            "bos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "vocab_size": EOT + 1,
            "model_max_length": self.model.config.block_size,
        }

    def models(self):
        return {
            "object": "list",
            "data": [  # chat: whether /v1/chat/completions takes it
                {
                    "id": self.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "train_gpt2",
                    "chat": self.model.config.chat,
                }
            ],
        }

    def tokenize(self, body):
        """vLLM's POST /tokenize, which lm-eval's local-completions asks for the tokenizer
        (add_special_tokens changes nothing: GPT-2's tokenizer adds none)."""
        prompt = load_json(body).get("prompt")
        if not isinstance(prompt, str):
            raise APIError(
                400,
                f"prompt={json.dumps(prompt)[:80]} is invalid; prompt must be a string",
                "prompt",
            )
        parse_prompt(prompt, EOT + 1)  # refuses what is not text
        tokens = encode(self.model, prompt)
        return {
            "count": len(tokens),
            "max_model_len": self.model.config.block_size,
            "tokens": tokens,
            "token_strs": None,
        }

    def detokenize(self, body):
        """vLLM's POST /detokenize: the text of token ids."""
        tokens = load_json(body).get("tokens")
        ok = isinstance(tokens, list) and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= EOT for t in tokens
        )
        if not ok:
            raise APIError(
                400,
                f"tokens={json.dumps(tokens)[:80]} is invalid; tokens must be a list of "
                f"token ids from 0 to {EOT}",
                "tokens",
            )
        return {"prompt": self.enc.decode(tokens)}


class Completion:
    """One prompt's completion on the engine: its text, as inference.text_stream's (piece,
    finish_reason) pieces, arrives on an asyncio queue from the engine's thread, then None when the
    sequence ends (an exception if its step failed). taken: its new tokens, up to the one that ended
    the text."""

    def __init__(self, api, tokens, req, ends=(EOT,)):
        bs = api.model.config.block_size
        self.cropped = max(0, len(tokens) - bs)
        self.tokens = tokens[-bs:]
        self.taken = []
        self.queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        feed = text_feed(req["max_tokens"], req["stop"], ends)

        def on_token(nxt):
            self.taken.append(nxt.item())
            piece, reason = feed(self.taken[-1])
            loop.call_soon_threadsafe(self.queue.put_nowait, (piece, reason))
            return reason is not None

        def on_end(error):
            loop.call_soon_threadsafe(self.queue.put_nowait, error)

        self.seq = Sequences(
            self.tokens,
            req["max_tokens"],
            stop=ends,
            on_token=on_token,
            on_end=on_end,
            temperature=req["temperature"],
            top_k=req["top_k"],
            top_p=req["top_p"],
            seed=req["seed"],
        )

    async def pieces(self):
        """Yields (text, None, None) for each piece of text as it is made safe to send, and last
        ("", finish_reason, usage); ends early, with nothing more, when the sequence was cancelled.
        """
        while True:
            item = await self.queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                return  # cancelled: the client left
            piece, reason = item
            yield piece, None, None
            if reason:
                break
        made, seen = len(self.taken), len(self.tokens)
        usage = dict(
            prompt_tokens=seen,
            completion_tokens=made,
            total_tokens=seen + made,
            prompt_tokens_cropped=self.cropped,
        )  # dropped from the left to fit block_size
        yield "", reason, usage

    async def whole(self):
        """(text, finish_reason, usage) of the whole completion; None once the client left."""
        text = ""
        reason = usage = None
        async for piece, reason, usage in self.pieces():
            text += piece
        if usage is None:
            return None
        return text, reason, usage


class Call:
    """The work of one HTTP request on the engine: the sequences it submitted and the scoring it
    asked for, which cancel() ends (its client left), freeing their slots at the engine's next step.
    """

    def __init__(self, api, prefix="cmpl"):
        self.api = api
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.seqs, self.gone = [], False

    def cancel(self):
        self.gone = True
        for seq in self.seqs:
            self.api.engine.cancel(seq)

    def submit(self, completion):
        self.seqs.append(completion.seq)
        self.api.engine.submit(completion.seq)
        return completion

    async def score(self, windows, top):
        """inference.score on the engine's thread, between two decoding steps; None once the client
        left."""
        future = self.api.engine.call(
            lambda: score(self.api.model, windows, top, lambda: self.gone)
        )
        return await asyncio.wrap_future(future)

    async def completions(self, body):
        """POST /v1/completions: a dict, an async iterator of chunks (stream), or None (the client
        left)."""
        api = self.api
        req = parse_request(body, api.model.config.real_tokens)
        prompts = [api.encode(p) for p in req["prompts"]]
        api.admit()  # only now, with the request read and checked, does it take a place
        if req["stream"]:
            completion = self.submit(Completion(api, prompts[0], req))
            return self.completion_events(completion.pieces())
        if req["logprobs"] is not None:
            made = await self.scored(req, prompts)
        else:
            made = await self.generated(req, prompts)
            made = (
                None if made is None else [(n, text, reason, None) for n, text, reason, _ in made]
            )
        if made is None:
            return None
        echoed = [api.enc.decode(tokens) if req["echo"] else "" for tokens in prompts]
        choices = [
            {"text": echo + text, "index": i, "logprobs": logprobs, "finish_reason": reason}
            for i, (echo, (_, text, reason, logprobs)) in enumerate(zip(echoed, made))
        ]
        bs = api.model.config.block_size
        seen = sum(min(len(p), bs) for p in prompts)
        new = sum(m[0] for m in made)
        usage = dict(
            prompt_tokens=seen,
            completion_tokens=new,
            total_tokens=seen + new,
            prompt_tokens_cropped=sum(max(0, len(p) - bs) for p in prompts),
        )
        nulls = req["echo"] and req["logprobs"] is not None
        long = [
            f"prompt {i} has {len(p)} tokens, more than block_size={bs}: the model saw its last "
            f"{bs}"
            + (f", and its first {len(p) - bs} have logprob null" if nulls else "")
            for i, p in enumerate(prompts)
            if len(p) > bs
        ]
        body = {**self.completion("", None, usage), "choices": choices}
        if long:
            body["warning"] = "; ".join(long)
        return body

    async def generated(self, req, prompts):
        """Each prompt's (new tokens made, text, finish_reason, the new tokens up to the one that
        ended the text), all decoded side by side; None once the client left."""
        if not req["max_tokens"]:  # echo alone: the prompt is the whole text
            return [(0, "", "length", []) for _ in prompts]
        completions = [self.submit(Completion(self.api, tokens, req)) for tokens in prompts]
        wholes = await asyncio.gather(*(c.whole() for c in completions))
        if any(w is None for w in wholes):
            return None
        return [
            (usage["completion_tokens"], text, reason, c.taken)
            for c, (text, reason, usage) in zip(completions, wholes)
        ]

    async def scored(self, req, prompts):
        """Each prompt's (new tokens made, text, finish_reason, logprobs), logprobs as OpenAI's:
        every token listed (the prompt's too, with echo), its log-probability, the `logprobs`
        likeliest tokens at its place, and its offset in the text. The new tokens come from the
        engine, all prompts side by side; then one scoring pass (inference.score packs its texts
        into few forwards) gives the log-probability of the prompts' tokens (echo) and of each new
        token, given the block_size tokens before it, as it was made. A prompt longer than
        block_size is scored on its last block_size + 1 tokens, as lm-eval crops one: its last
        block_size tokens get log-probabilities. None once the client left."""
        api, top = self.api, req["logprobs"]
        bs = api.model.config.block_size
        generated = await self.generated(req, prompts)
        if generated is None:
            return None
        windows, spans = [], []  # per prompt: its windows' (start, end) in windows
        for p, (made, text, reason, new) in zip(prompts, generated):
            start = len(windows)
            if req["echo"]:
                windows.append((p, 1, None) if len(p) <= bs else (p[-1 - bs : -1], 1, p[-1]))
            seq = p + new
            for j in range(len(p), len(seq)):
                windows.append((seq[max(0, j - bs) : j], min(j, bs), seq[j]))
            spans.append((start, len(windows), new))
        scores = await self.score(windows, top) if windows else []
        if scores is None:
            return None
        out = []
        for p, (made, text, reason, _), (start, end, new) in zip(prompts, generated, spans):
            tokens = []
            lps = []
            tops = []
            for w in range(start, end):
                got, got_tops, _ = scores[w]
                if req["echo"] and w == start:
                    tokens = list(p)
                    lps = [None] * (len(p) - len(got)) + got
                    tops = [None] * (len(p) - len(got)) + (got_tops if top else [[]] * len(got))
                else:
                    lps += got
                    tops += got_tops if top else [[]]
            tokens += new
            offset = (
                0 if req["echo"] else len(api.enc.decode(p))
            )  # offsets count from the prompt's start
            logprobs = dict(
                tokens=[token_text(api.enc, t) for t in tokens],
                token_logprobs=lps,
                top_logprobs=[None if t is None else top_dict(api.enc, t) for t in tops],
                text_offset=text_offsets(api.enc, tokens, offset),
            )
            out.append((made, text, reason, logprobs))
        return out

    async def chat_completions(self, body):
        """OpenAI's chat completions: the assistant's reply to `messages`, generated from
        chat.prompt(messages) until <|end|> (finish_reason "stop"), a stop string, or max_tokens
        ("length"). A base model gets 400."""
        api = self.api
        refusal = not_chat(api.model, api.name)
        if refusal:
            raise APIError(400, refusal, "model")
        req = parse_chat_request(body)
        api.admit()
        completion = self.submit(Completion(api, chat.prompt(req["messages"]), req, chat.STOP))
        if req["stream"]:
            return self.chat_events(completion.pieces())
        whole = await completion.whole()
        if whole is None:
            return None
        text, reason, usage = whole
        body = {**self.chat_chunk(None, reason, usage), "object": "chat.completion"}
        body["choices"][0]["message"] = {"role": "assistant", "content": text}
        if usage["prompt_tokens_cropped"]:
            seen = usage["prompt_tokens"]
            body["warning"] = (
                f"the conversation has {seen + usage['prompt_tokens_cropped']} tokens, more "
                f"than block_size={seen}: the model saw its last {seen}"
            )
        return body

    async def completion_events(self, pieces):
        """Completion pieces as text_completion chunks: one per piece of text, the last with
        finish_reason."""
        async for text, reason, usage in pieces:
            if text or reason:
                yield self.completion(text, reason, usage)

    async def chat_events(self, pieces):
        """Completion pieces as OpenAI's chat.completion.chunk objects: the role first, a delta per
        piece of text, then an empty delta with finish_reason and usage."""
        yield self.chat_chunk({"role": "assistant", "content": ""})
        async for text, reason, usage in pieces:
            if text:
                yield self.chat_chunk({"content": text})
            if reason:
                yield self.chat_chunk({}, reason, usage)

    def chat_chunk(self, delta, reason=None, usage=None):
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        if delta is None:  # a whole reply: the caller puts its message in place of the delta
            del choice["delta"]
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.api.name,
            "choices": [choice],
        }
        return {**body, "usage": usage} if usage else body

    def completion(self, text, reason, usage):
        body = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.api.name,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}],
        }
        return {**body, "usage": usage} if usage else body
