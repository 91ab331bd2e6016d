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
/detokenize, so that EleutherAI's lm-eval (--model local-completions) needs only the URL.

Requests are decoded together by continuous batching (inference.Engine): up to --slots sequences at
once, each joining at the next step and leaving when it ends; up to --queue more wait for a slot,
and any beyond get 503. Scoring (echo, logprobs) runs between decoding steps, its prompts packed
into few forwards. A client that hangs up frees its slot at the next step; one that has not sent its
whole request within --timeout is cut off, and never took a slot. Web pages of other sites get 403
(docs/serving.md, "Web pages"). The API itself is api.py; this file is its HTTP layer, Starlette on
uvicorn."""

import argparse
import asyncio
import errno
import ipaddress
import json
import logging
import os
import socket
import sys
import time
import traceback

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from api import API, MAX_TOKENS, APIError, Call, error_body
from inference import Engine, load_for_inference
from train_gpt2 import DTYPES, UserError, pick_device, resolve_dtype

__all__ = ["MAX_TOKENS", "main"]
MAX_BODY = (
    1 << 20
)  # bytes: a hundred full 1024-token windows as token ids; more is a mistake or an abuse
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html")
# Each answer closes its connection, so that --timeout bounds the one request a connection carries.
CLOSE = {"Connection": "close"}
log = logging.getLogger("serve")


class ClientGone(Exception):
    """The client closed its connection before its request was read."""


class DeadlineProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with one deadline for the request, from the connection on: a
    client that has not sent its request line and headers by then is cut off without an answer, so
    that one sending a byte now and then cannot keep a connection open, as it could under a timeout
    for each read. The body's part of the same deadline is the app's (read_body: a 408), handed to
    it in the scope."""

    timeout = 30.0  # --timeout

    def connection_made(self, transport):
        super().connection_made(transport)
        self.deadline = time.monotonic() + self.timeout
        self.timer = self.loop.call_later(self.timeout, self.expire)

    def handle_events(self):
        super().handle_events()
        if (
            self.cycle is not None
        ):  # the app's task is created, not yet run: it will find the deadline
            self.cycle.scope.setdefault("deadline", self.deadline)

    def expire(self):
        if self.cycle is None and not self.transport.is_closing():
            log.warning(
                "Request timed out: the request line and headers did not arrive within %g s "
                "(--timeout); connection closed",
                self.timeout,
            )
            self.transport.close()

    def connection_lost(self, exc):
        self.timer.cancel()
        super().connection_lost(exc)


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
    ports = {f"{name}:{port}" for name in names}
    return ports | (names if port == 80 else set())


def check_origin(request, hosts):
    """403 for a request a web page of another site sent (its Origin is not this server's), and, on
    loopback, for a Host that is not this server's address: a page whose name was re-pointed at
    127.0.0.1 (DNS rebinding) is then of its own origin, but names a Host of its own. Clients
    without an Origin (curl, the openai library, lm-eval) and this server's own page pass."""
    host, origin = request.headers.get("host"), request.headers.get("origin")
    if host is not None and hosts is not None and host.lower() not in hosts:
        served = ", ".join(sorted(h for h in hosts if ":" in h))
        raise APIError(
            403,
            f"Host {host} is not this server's address: it serves {served} only, so that a "
            f"web page cannot reach it under a name of its own (DNS rebinding)",
            kind="permission_error",
        )
    if origin is not None and (host is None or origin.lower() != f"http://{host}".lower()):
        raise APIError(
            403,
            f"Origin {origin} is not this server's origin (http://{host}): web pages of other "
            f"sites may not use this server; open its own page, or call it from a program",
            kind="permission_error",
        )


async def read_body(request, timeout):
    """The whole body, by the connection's deadline (else 408); over MAX_BODY it is read away and
    refused (413), so that the client is not reset mid-send and can read the answer."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise APIError(411, "send the body with a Content-Length header")
    length = int(length)
    deadline = request.scope.get("deadline", time.monotonic() + timeout)
    chunks = []
    got = 0  # bytes received, kept or not
    more = True
    while more:
        try:
            message = await asyncio.wait_for(request.receive(), deadline - time.monotonic())
        except asyncio.TimeoutError:
            raise APIError(
                408, f"the request did not arrive within {timeout:g} s (--timeout)"
            ) from None
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        got += len(chunk)
        if length <= MAX_BODY:
            chunks.append(chunk)
        more = message.get("more_body", False)
    if length > MAX_BODY:
        raise APIError(413, f"the body is {length} bytes; the limit is {MAX_BODY} (1 MB)")
    if got < length:
        raise APIError(400, f"the body ended after {got} of its {length} bytes (Content-Length)")
    return b"".join(chunks)


async def cancel_when_gone(receive, call):
    """Waits for the client to close its connection, then cancels its work (the engine frees its
    slots at the next step). Run beside a request once its body is read."""
    while (await receive())["type"] != "http.disconnect":
        pass
    call.cancel()


def error(e):
    """OpenAI's error JSON for an APIError; a 503 says when to retry, and a 405 which methods there
    are."""
    headers = {503: {"Retry-After": "1"}, 405: {"Allow": "GET, POST"}}.get(e.status, {})
    return JSONResponse(error_body(e), e.status, {**headers, **CLOSE})


class EventStream(Response):
    """Server-sent events: each chunk as it is made, the last with finish_reason (and usage), then
    [DONE] (unless the client left before the end). Each write waits at most --timeout for the
    client to take it: a client that stops reading its stream must not hold a slot."""

    def __init__(self, events, call, timeout):
        self.events = events
        self.call = call  # cancelled when the client leaves, or when the stream ends
        self.timeout = timeout
        self.background = None

    async def __call__(self, scope, receive, send):
        watcher = asyncio.create_task(cancel_when_gone(receive, self.call))
        headers = [
            (b"content-type", b"text/event-stream"),
            (b"cache-control", b"no-cache"),
            (b"connection", b"close"),
        ]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            reason = None
            async for chunk in self.events:
                await self.write(send, json.dumps(chunk))
                reason = chunk["choices"][0]["finish_reason"]
            if reason:
                await self.write(send, "[DONE]")
            await send({"type": "http.response.body", "body": b""})
        finally:
            watcher.cancel()
            self.call.cancel()
            await self.events.aclose()

    async def write(self, send, data):
        message = {
            "type": "http.response.body",
            "body": f"data: {data}\n\n".encode(),
            "more_body": True,
        }
        await asyncio.wait_for(send(message), self.timeout)


def build_app(api, hosts, timeout):
    """The Starlette app: one route for every path and method, so that each answer, 404 and 405 too,
    is OpenAI's JSON, after the Origin and Host checks."""

    async def work(request, run, body):
        """run(call, body)'s answer, the request's work cancelled if its client leaves meanwhile."""
        call = Call(api, "chatcmpl" if request.url.path.endswith("chat/completions") else "cmpl")
        watcher = asyncio.create_task(cancel_when_gone(request.receive, call))
        try:
            answer = await run(call, body)
        except BaseException:
            call.cancel()
            raise
        finally:
            watcher.cancel()
        if answer is None:  # the client left: nobody is there to answer
            return Response(status_code=499, headers=CLOSE)
        if isinstance(answer, dict):
            call.cancel()  # nothing is left running; this only marks the call gone
            return JSONResponse(answer, headers=CLOSE)
        return EventStream(answer, call, timeout)

    async def get(request, path):
        if path == "/":
            with open(PAGE, "rb") as f:
                return Response(f.read(), media_type="text/html; charset=utf-8", headers=CLOSE)
        answers = {
            "/health": api.health,
            "/tokenizer_info": api.tokenizer_info,
            "/v1/models": api.models,
        }
        if path not in answers:
            raise APIError(404, f"no such endpoint: GET {path}", kind="not_found_error")
        return JSONResponse(answers[path](), headers=CLOSE)

    async def post(request, path):
        body = await read_body(
            request, timeout
        )  # whole before any answer: one to half a request is reset
        check_origin(request, hosts)
        if path == "/v1/completions":
            return await work(request, Call.completions, body)
        if path == "/v1/chat/completions":
            return await work(request, Call.chat_completions, body)
        if path == "/tokenize":
            return JSONResponse(api.tokenize(body), headers=CLOSE)
        if path == "/detokenize":
            return JSONResponse(api.detokenize(body), headers=CLOSE)
        raise APIError(
            404,
            f"no such endpoint: POST {path}; completions are POST /v1/completions",
            kind="not_found_error",
        )

    async def endpoint(request):
        path = request.url.path  # a query string (Azure's api-version=...) is ignored
        try:
            if request.method == "POST":
                return await post(request, path)
            check_origin(request, hosts)
            if request.method == "GET":
                return await get(request, path)
            raise APIError(
                405, f"{request.method} is not allowed: this server's endpoints take GET and POST"
            )
        except APIError as e:
            return error(e)
        except (
            UserError
        ) as e:  # what inference refuses, e.g. a token id outside a smaller vocabulary
            return error(APIError(400, str(e), "prompt"))
        except ClientGone:
            return Response(status_code=499, headers=CLOSE)
        except Exception as e:  # a bug of ours: say so, log it, and keep serving
            log.error("%s", traceback.format_exc())
            return error(
                APIError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")
            )

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", endpoint, methods=methods)])


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", required=True, help="checkpoint file, run directory, HF directory or hub name"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 opens it to the network"
    )
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument(
        "--device", default="auto", help="auto picks cuda, then mps, then cpu; or name one"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="the weights' dtype; auto: sample.py's, which serves generation best "
        "(docs/precision.md); float32 gives lm-eval the hf backend's numbers",
    )
    p.add_argument(
        "--slots",
        type=int,
        default=8,
        help="sequences decoded together, each in a slot of the KV cache; 1 serves one at a time",
    )
    p.add_argument(
        "--queue", type=int, default=8, help="requests that may wait for a slot; more get 503"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30,
        help="seconds a client has to send its whole request, and to take each write of the reply",
    )
    args = p.parse_args(argv)
    if not 0 <= args.port < 65536:
        sys.exit(
            f"error: --port={args.port} is out of range; --port must be 0 (any free port) to 65535"
        )
    if args.slots < 1:
        sys.exit(f"error: --slots={args.slots} is out of range; --slots must be 1 or more")
    if args.queue < 0:
        sys.exit(f"error: --queue={args.queue} is out of range; --queue must be 0 or more")
    if not args.timeout > 0:
        sys.exit(
            f"error: --timeout={args.timeout:g} is out of range; --timeout must be above 0 seconds"
        )
    return args


def listen(host, port):
    """A listening socket on host:port, or one line naming the fix."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(
            128
        )  # connections the kernel holds until accepted: a burst waits instead of a reset
        return sock
    except OSError as e:
        wrong_host = (
            isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL
        )  # not this machine's
        fix = "check --host" if wrong_host else "pick another --port"
        sys.exit(f"error: cannot listen on {host}:{port} ({e.strerror}); {fix}")


def main(argv=None):
    args = parse_args(argv)
    sock = listen(
        args.host, args.port
    )  # the port first: a taken one fails at once, not after a long load
    try:
        device = pick_device(args.device)
        # One model serves both jobs: auto takes decoding's dtype, since generation is what a
        # served model does most (docs/precision.md, "--dtype=auto")
        dtype = resolve_dtype(args.dtype, torch.device(device).type, None, job="decode")
        model = load_for_inference(args.model, device, dtype)
    except UserError as e:
        sock.close()
        sys.exit(f"error: {e}")
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    name = os.path.basename(os.path.normpath(args.model))
    api = API(model, name, Engine(model, args.slots), args.queue)
    api.start(
        lambda e: log.error("a decoding step failed:\n%s", "".join(traceback.format_exception(e)))
    )
    host, port = sock.getsockname()[:2]
    DeadlineProtocol.timeout = args.timeout
    config = uvicorn.Config(
        build_app(api, local_hosts(args.host, port), args.timeout),
        http=DeadlineProtocol,
        log_config=None,
        timeout_graceful_shutdown=2,
        lifespan="off",
    )
    where = f"http://{host}:{port}"
    print(f"serving {args.model} on {where} ({device}, {dtype}), {args.slots} slots", flush=True)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


if __name__ == "__main__":
    main()
