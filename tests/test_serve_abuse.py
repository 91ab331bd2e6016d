"""serve.py under abuse: every request is bounded, a slow client holds neither the model nor anyone
else, a crowd gets answers or clean 503s and leaves no thread behind, and web pages of other sites
are refused."""

import json
import socket
import threading
import time
import types

import openai
import pytest
import torch
from conftest import health, request, start_server, wait_for

from inference import generate
from serve import MAX_TOKENS
from train_gpt2 import get_tokenizer, load_model

torch.set_num_threads(1)
TIMEOUT = 2  # the server's --timeout: seconds a client has to send its whole request


@pytest.fixture(scope="module")
def server(serve_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("abuse") / "log"
    proc, url = start_server(serve_run.checkpoint, log, "--queue=4", f"--timeout={TIMEOUT}")
    yield types.SimpleNamespace(
        url=url,
        port=int(url.rsplit(":", 1)[1]),
        client=client(url),
        log=log,
        model=load_model(serve_run.checkpoint),
        enc=get_tokenizer(),
    )
    proc.terminate()
    proc.wait(timeout=10)


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(server, prompt, n):
    return server.enc.decode(generate(server.model, server.enc.encode(prompt), n, temperature=0)[0])


def test_max_tokens_past_the_bound_is_a_400_naming_it_and_the_bound(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model="tiny", prompt="Hi", max_tokens=MAX_TOKENS + 1)
    assert e.value.param == "max_tokens"
    assert (
        e.value.body["message"]
        == f"max_tokens={MAX_TOKENS + 1} is invalid; max_tokens must be an integer "
        f"from 1 to {MAX_TOKENS} (0 only with echo)"
    )
    assert (
        server.client.completions.create(
            model="tiny", prompt="Hi", max_tokens=2
        ).usage.completion_tokens
        == 2
    )


def dribble(sock, data, stop, pause=0.05):
    """Sends data a byte at a time until stop is set or the server closes the connection."""
    for byte in data:
        if stop.is_set():
            return
        try:
            sock.sendall(bytes([byte]))
        except OSError:  # the server closed it: what the test waits for
            return
        time.sleep(pause)


def closed_after(sock, start, timeout=15):
    """Seconds from start until the server closed sock (read as end of file or reset), and what it
    sent."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return time.monotonic() - start, data


def test_a_client_dribbling_its_headers_holds_no_one_up_and_is_cut_off_at_the_deadline(server):
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        "Content-Type: application/json\r\n"
    )
    # 20 s of bytes at 20 a second: longer than the deadline
    head += "X-Padding: " + "x" * 400 + "\r\n"
    slow = socket.create_connection(("127.0.0.1", server.port))
    start, stop = time.monotonic(), threading.Event()
    sender = threading.Thread(target=dribble, args=(slow, head.encode(), stop))
    sender.start()
    try:
        for _ in range(3):  # the model is free, and other clients are answered at once
            t0 = time.monotonic()
            r = server.client.completions.create(
                model="tiny", prompt="The cat", max_tokens=8, temperature=0
            )
            assert r.choices[0].text == greedy(server, "The cat", 8)
            assert time.monotonic() - t0 < 1.5
        assert health(server)["running"] == 0
        # all that while the slow client was still sending
        assert time.monotonic() - start < TIMEOUT
        # A byte every 50 ms would keep a timeout for each read from ever firing; the deadline is
        # for the whole request, so the server closes the connection at TIMEOUT s, without an answer
        # to a request never read.
        elapsed, data = closed_after(slow, start)
        assert TIMEOUT - 0.1 < elapsed < TIMEOUT + 2 and data == b""
        assert sender.is_alive()  # it had more to send
    finally:
        stop.set()
        sender.join(timeout=10)
        slow.close()
    assert "Request timed out" in server.log.read_text()


def test_a_body_that_never_arrives_gets_a_408_at_the_deadline_and_never_takes_the_model(server):
    slow = socket.create_connection(("127.0.0.1", server.port))
    start = time.monotonic()
    slow.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: "
        "application/json"
        f"\r\nContent-Length: 100\r\n\r\n{{\"prompt\": \"Hi\",".encode()
    )
    try:
        r = server.client.completions.create(model="tiny", prompt="Hi", max_tokens=4, temperature=0)
        assert r.choices[0].text == greedy(server, "Hi", 4)
        assert health(server)["running"] == 0
        elapsed, data = closed_after(slow, start)
    finally:
        slow.close()
    assert TIMEOUT - 0.1 < elapsed < TIMEOUT + 2
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 408 ")  # uvicorn speaks HTTP/1.1, and closes the connection
    assert (
        json.loads(body)["error"]["message"]
        == f"the request did not arrive within {TIMEOUT} s (--timeout)"
    )


def test_30_concurrent_clients_each_get_an_answer_or_a_503_and_leave_no_thread_behind(server):
    baseline = health(server)["threads"]
    results, start = [None] * 30, threading.Barrier(30)

    def call(i):
        c = client(server.url)  # a client of its own, as 30 programs would have
        start.wait()
        try:
            results[i] = (
                c.completions.create(
                    model="tiny", prompt="Once upon", max_tokens=200, temperature=0
                )
                .choices[0]
                .text
            )
        except openai.APIStatusError as e:
            results[i] = (e.status_code, e.message)
        except Exception as e:  # noqa: BLE001 - any other outcome (a reset connection, say) fails below, by name
            results[i] = repr(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)  # no deadlock
    text = greedy(server, "Once upon", 200)
    busy = [r for r in results if r != text]
    # never a 500, nor a hang
    assert all(r[0] == 503 and "the server is busy" in r[1] for r in busy), busy
    # --queue=4: some waited and were answered, the rest were told to retry
    assert 1 <= len(busy) < 30
    wait_for(lambda: health(server)["threads"] == baseline)  # every connection's thread has ended


def test_a_web_page_of_another_site_gets_403_and_the_servers_own_page_and_programs_pass(server):
    own = f"http://127.0.0.1:{server.port}"
    body = json.dumps({"prompt": "Hi", "max_tokens": 2})
    # A page on another site can POST text/plain without a CORS preflight; it must not reach the
    # model.
    status, data = request(
        server.url,
        "POST",
        "/v1/completions",
        body,
        {"Origin": "http://evil.example", "Content-Type": "text/plain"},
    )
    assert status == 403 and data["error"]["message"] == (
        f"Origin http://evil.example is not this server's origin ({own}): web pages of other sites "
        "may not use this server; open its own page, or call it from a program"
    )
    # a sandboxed or file page
    assert request(server.url, "GET", "/health", headers={"Origin": "null"})[0] == 403
    # the page itself
    assert request(server.url, "POST", "/v1/completions", body, {"Origin": own})[0] == 200
    # no Origin: curl, scripts
    assert request(server.url, "POST", "/v1/completions", body)[0] == 200


def test_a_host_that_is_not_the_servers_address_gets_403_on_loopback(server):
    # DNS rebinding: evil.example re-pointed at 127.0.0.1, so its page is same-origin, but its Host
    # is its own
    rebound = f"evil.example:{server.port}"
    for headers in ({"Host": rebound}, {"Host": rebound, "Origin": f"http://{rebound}"}):
        status, data = request(server.url, "GET", "/", headers=headers)
        assert status == 403 and data["error"]["message"].startswith(
            f"Host {rebound} is not this server's address: it serves 127.0.0.1:{server.port}, "
            f"[::1]:{server.port}, localhost:{server.port} only"
        )
    assert (
        request(server.url, "GET", "/health", headers={"Host": f"localhost:{server.port}"})[0]
        == 200
    )
    # another port
    assert request(server.url, "GET", "/health", headers={"Host": "127.0.0.1:1"})[0] == 403
