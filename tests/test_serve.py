"""serve.py through the real openai client: its completions are inference.generate's, streamed or
not; its errors are OpenAI's JSON and it keeps serving; a client that hangs up frees the model; a
full queue gets 503; echo and logprobs give a plain forward's log-probabilities, for every form of
prompt."""

import http.client
import json
import os
import socket
import sys
import threading
import types

import openai
import pytest
import torch
from conftest import ROOT, health, request, run, start_server, wait_for

from inference import generate
from serve import MAX_TOKENS
from train_gpt2 import EOT, get_tokenizer, load_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def server(serve_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "log"
    # a run directory: its newest readable checkpoint; one slot, so that a second request waits
    proc, url = start_server(serve_run.dir, log, "--slots=1", "--queue=1")
    assert "warning: skipping" in log.read_text() and "model_000002.pt" in log.read_text()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield types.SimpleNamespace(
        url=url,
        client=client,
        run_dir=serve_run.dir,
        model=load_model(serve_run.checkpoint),
        enc=get_tokenizer(),
    )
    proc.terminate()
    proc.wait(timeout=10)


def expected_text(server, prompt, max_tokens, **sampling):
    tokens = server.enc.encode(prompt)
    return server.enc.decode(generate(server.model, tokens, max_tokens, **sampling)[0])


def test_greedy_text_equals_generate_and_streamed_chunks_join_to_it(server):
    prompt = "The cat sat on the"
    r = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    text = expected_text(server, prompt, 24, temperature=0)
    assert len(set(text.split())) > 3  # a varied text, so that a wrong token would show
    assert r.choices[0].text == text and r.choices[0].finish_reason == "length"
    n = len(server.enc.encode(prompt))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        n,
        24,
        n + 24,
    )

    chunks = list(
        server.client.completions.create(
            model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True
        )
    )
    assert len(chunks) > 5  # streamed as it was made, not in one piece
    assert "".join(c.choices[0].text for c in chunks) == text
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert chunks[-1].usage.completion_tokens == 24


def test_the_same_seed_repeats_and_samples_as_generate(server):
    sampling = dict(temperature=0.9, top_p=0.9, seed=11)
    texts = [
        server.client.completions.create(
            model="tiny", prompt="Once upon", max_tokens=20, **sampling, extra_body={"top_k": 40}
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert texts[0] == texts[1] == expected_text(server, "Once upon", 20, top_k=40, **sampling)
    other = server.client.completions.create(
        model="tiny",
        prompt="Once upon",
        max_tokens=20,
        temperature=0.9,
        top_p=0.9,
        seed=12,
        extra_body={"top_k": 40},
    )
    assert other.choices[0].text != texts[0]


def test_a_stop_string_ends_the_text_before_it_streamed_or_not(server):
    full = expected_text(server, "The cat sat on the", 24, temperature=0)
    stop = full[9:13]
    cut = full[: full.index(stop)]
    r = server.client.completions.create(
        model="tiny",
        prompt="The cat sat on the",
        max_tokens=24,
        temperature=0,
        stop=["never appears", stop],
    )
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    chunks = server.client.completions.create(
        model="tiny",
        prompt="The cat sat on the",
        max_tokens=24,
        temperature=0,
        stop=stop,
        stream=True,
    )
    assert "".join(c.choices[0].text for c in chunks) == cut


def test_a_prompt_longer_than_block_size_is_cropped_from_the_left_and_usage_says_so(server):
    prompt = " ".join(f"w{i}" for i in range(80))
    tokens = server.enc.encode(prompt)
    r = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    assert (r.usage.prompt_tokens, r.usage.prompt_tokens_cropped) == (64, len(tokens) - 64)
    assert r.choices[0].text == server.enc.decode(
        generate(server.model, tokens[-64:], 8, temperature=0)[0]
    )


def test_malformed_json_gets_a_400_json_error_and_the_server_keeps_serving(server):
    status, body = request(
        server.url,
        "POST",
        "/v1/completions",
        b'{"prompt": "Hi", "max_tokens": 4',
        {"Content-Type": "application/json"},
    )
    assert status == 400
    assert (
        body["error"]["type"] == "invalid_request_error"
        and "not valid JSON" in body["error"]["message"]
    )
    for field, value in (
        ("temperature", -1),
        ("top_p", 0),
        ("max_tokens", 0),
        ("stop", 5),
        ("top_k", -2),
        ("prompt", [["a"]]),
        ("prompt", []),
        ("prompt", [1, "a"]),
        ("prompt", [[1], [50257]]),
        ("logprobs", 6),
        ("logprobs", True),
        ("echo", "yes"),
        ("best_of", 2),
        ("stop", ""),
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            server.client.completions.create(
                model="tiny", prompt="Hi", max_tokens=4, extra_body={field: value}
            )
        assert e.value.param == field and f"{field}=" in e.value.message
    assert (
        server.client.completions.create(
            model="tiny", prompt="Hi", max_tokens=4
        ).usage.completion_tokens
        == 4
    )


def test_unknown_paths_get_404_and_oversized_bodies_413(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client.embeddings.create(model="tiny", input="Hi")
    assert "no such endpoint: POST /v1/embeddings" in e.value.message
    assert request(server.url, "GET", "/v2/nothing")[0] == 404
    with pytest.raises(openai.APIStatusError) as e:
        server.client.completions.create(model="tiny", prompt="x" * (1 << 20), max_tokens=4)
    assert e.value.status_code == 413 and "the limit is 1048576" in e.value.message
    name = os.path.basename(server.run_dir)
    assert [m.id for m in server.client.models.list()] == [name]
    counts = ("threads", "tasks", "steps")
    assert {k: v for k, v in health(server).items() if k not in counts} == {
        "status": "ok",
        "model": name,
        "chat": False,
        "slots": 1,
        "running": 0,
        "waiting": 0,
    }


def test_other_methods_get_a_json_405_naming_the_allowed_ones_and_a_query_string_is_ignored(server):
    for method in ("PUT", "PATCH", "DELETE", "OPTIONS"):
        conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=60)
        conn.request(
            method,
            "/v1/completions",
            body=b'{"prompt": "Hi"}',
            headers={"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        assert (response.status, response.getheader("Allow")) == (405, "GET, POST")
        assert (
            json.loads(response.read())["error"]["message"]
            == f"{method} is not allowed: this server's endpoints take GET and POST"
        )
        conn.close()
    # Azure-style clients add ?api-version=...: the path is what routes, and both 64-bit ends of
    # seed are taken
    client = openai.OpenAI(
        base_url=f"{server.url}/v1",
        api_key="unused",
        max_retries=0,
        timeout=60,
        default_query={"api-version": "2024-02-01"},
    )
    for seed in (-(2**63), 2**64 - 1):
        r = client.completions.create(
            model="tiny", prompt="The cat", max_tokens=4, temperature=1, seed=seed
        )
        assert r.choices[0].text == expected_text(server, "The cat", 4, temperature=1.0, seed=seed)
    assert request(server.url, "GET", "/health?verbose=1")[1]["status"] == "ok"


def test_a_client_that_hangs_up_mid_stream_frees_the_model(server):
    stream = server.client.completions.create(
        model="tiny", prompt="Hi", max_tokens=MAX_TOKENS, stream=True
    )
    for _, chunk in zip(range(3), stream):
        assert chunk.choices[0].text
    assert health(server)["running"] == 1
    stream.close()
    wait_for(lambda: health(server)["running"] == 0)  # long before 4096 tokens
    assert (
        server.client.completions.create(
            model="tiny", prompt="Hi", max_tokens=3
        ).usage.completion_tokens
        == 3
    )


def test_a_full_queue_gets_503_and_the_waiting_request_runs_next(server):
    stream = server.client.completions.create(
        model="tiny", prompt="Hi", max_tokens=MAX_TOKENS, stream=True
    )
    next(iter(stream))  # this one holds the model
    waiting = {}
    thread = threading.Thread(
        target=lambda: waiting.update(
            r=server.client.completions.create(
                model="tiny", prompt="Hi", max_tokens=5, temperature=0
            )
        )
    )
    thread.start()
    wait_for(lambda: health(server)["waiting"] == 1)  # --queue=1: the queue is now full
    with pytest.raises(openai.InternalServerError) as e:
        server.client.completions.create(model="tiny", prompt="Hi", max_tokens=5)
    assert e.value.status_code == 503 and e.value.response.headers["Retry-After"] == "1"
    assert e.value.type == "server_error" and "busy" in e.value.message
    stream.close()
    thread.join(timeout=30)
    assert waiting["r"].choices[0].text == expected_text(server, "Hi", 5, temperature=0)


def test_a_bad_model_or_a_taken_port_is_one_line(serve_run, tmp_path):
    result = run([sys.executable, f"{ROOT}/serve.py", f"--model={tmp_path}/nowhere.pt", "--port=0"])
    assert (result.returncode, result.stderr) == (
        1,
        f"error: --model={tmp_path}/nowhere.pt: no such file or directory; check the path\n",
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(
            [
                sys.executable,
                f"{ROOT}/serve.py",
                f"--model={serve_run.dir}",
                f"--port={port}",
                "--device=cpu",
            ]
        )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"error: cannot listen on 127.0.0.1:{port} (Address already in use); pick another --port"
    )
    # TEST-NET-1
    result = run(
        [
            sys.executable,
            f"{ROOT}/serve.py",
            f"--model={serve_run.dir}",
            "--host=192.0.2.1",
            "--device=cpu",
        ]
    )
    assert (result.returncode, result.stderr) == (
        1,
        "error: cannot listen on 192.0.2.1:8000 (Cannot assign requested address); check --host\n",
    )


def forward_logprobs(server, tokens):
    """(T, 50257) float64 log-probabilities of a plain full forward of tokens (at most block_size):
    row t is the distribution after tokens[:t + 1]."""
    with torch.no_grad():
        logits = server.model(torch.tensor([tokens]))[0][0, :, : EOT + 1]
    return logits.double().log_softmax(dim=-1)


def test_echo_logprobs_of_several_prompts_are_a_plain_forwards_in_every_prompt_form(server):
    texts = ["The cat sat on the mat", "The cat sat on a hat, naïvely", "Once upon a time", "x"]
    ids = [server.enc.encode(t) for t in texts]
    replies = [
        server.client.completions.create(
            model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=3
        )
        for prompt in (texts, ids)
    ]
    single = [
        server.client.completions.create(
            model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=3
        )
        for prompt in (texts[1], ids[1])
    ]
    assert [c.index for c in replies[0].choices] == [0, 1, 2, 3]
    assert (
        replies[0].usage.prompt_tokens == sum(map(len, ids))
        and replies[0].usage.completion_tokens == 0
    )
    for reply in replies:
        for text, tokens, choice in zip(texts, ids, reply.choices):
            lp = choice.logprobs
            assert choice.text == text and choice.finish_reason == "length"
            assert lp.tokens == [server.enc.decode([t]) for t in tokens]
            assert [text[o : o + len(t)] for o, t in zip(lp.text_offset, lp.tokens)] == lp.tokens
            ref = forward_logprobs(server, tokens)
            # the first token has no context
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            want = [ref[t - 1, tokens[t]].item() for t in range(1, len(tokens))]
            assert max((abs(a - b) for a, b in zip(lp.token_logprobs[1:], want)), default=0) < 1e-5
            for t, top in enumerate(lp.top_logprobs[1:]):
                values, best = ref[t].topk(3)
                assert list(top) == [server.enc.decode([i]) for i in best.tolist()]
                assert max(abs(a - b) for a, b in zip(top.values(), values.tolist())) < 1e-5
    for r in single:  # alone, as packed with the others
        assert r.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
            replies[0].choices[1].logprobs.token_logprobs[1:], abs=1e-5
        )


def test_new_tokens_logprobs_are_greedys_and_their_text_is_generates(server):
    prompt = "The cat sat on the"
    tokens = server.enc.encode(prompt)
    # past block_size 64: the window slides
    new = generate(server.model, tokens, 70, temperature=0)[0]
    for echo in (False, True):
        r = server.client.completions.create(
            model="tiny", prompt=prompt, max_tokens=70, temperature=0, echo=echo, logprobs=1
        )
        choice = r.choices[0]
        assert choice.text == (prompt if echo else "") + server.enc.decode(new)
        lp = choice.logprobs
        listed = (tokens if echo else []) + new
        assert lp.tokens == [server.enc.decode([t]) for t in listed]
        # offsets count from the prompt's start, echoed or not
        assert lp.text_offset[-len(new)] == len(prompt)
        seq = tokens + new
        # each new token given the 64 before it
        for k, t in enumerate(range(len(tokens), len(seq))):
            ref = forward_logprobs(server, seq[max(0, t - 64) : t])[-1]
            got, top = lp.token_logprobs[-len(new) + k], lp.top_logprobs[-len(new) + k]
            assert abs(got - ref[seq[t]].item()) < 1e-5
            assert top == {lp.tokens[-len(new) + k]: got}  # greedy: the likeliest token, exactly
    assert r.usage.completion_tokens == 70


def test_a_prompt_past_block_size_is_scored_on_its_last_block_size_tokens_and_the_reply_says_so(
    server,
):
    tokens = server.enc.encode(" ".join(f"w{i}" for i in range(60)))  # 120 tokens
    r = server.client.completions.create(
        model="tiny", prompt=[tokens, tokens[:10]], max_tokens=0, echo=True, logprobs=0
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(tokens) and lp.token_logprobs[: len(tokens) - 64] == [None] * (
        len(tokens) - 64
    )
    # lm-eval's crop: the last 64 tokens given the 65th before
    ref = forward_logprobs(server, tokens[-65:-1])
    want = [ref[t, tokens[-64 + t]].item() for t in range(64)]
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[-64:], want)) < 1e-5
    assert lp.top_logprobs[-1] == {}  # logprobs=0: the chosen tokens' alone
    assert r.usage.prompt_tokens_cropped == len(tokens) - 64
    assert r.model_extra["warning"] == (
        f"prompt 0 has {len(tokens)} tokens, more than block_size=64: the model saw "
        f"its last 64, and its first {len(tokens) - 64} have logprob null"
    )


def test_several_prompts_complete_in_order_and_their_limits_are_400s(server):
    prompts = ["The cat sat on the", "Once upon"]
    r = server.client.completions.create(model="tiny", prompt=prompts, max_tokens=12, temperature=0)
    assert [c.text for c in r.choices] == [
        expected_text(server, p, 12, temperature=0) for p in prompts
    ]
    assert r.usage.completion_tokens == 24
    r = server.client.completions.create(
        model="tiny", prompt="The cat", max_tokens=5, temperature=0, echo=True
    )
    assert r.choices[0].text == "The cat" + expected_text(server, "The cat", 5, temperature=0)
    for kwargs, field in (
        (dict(prompt=["a"] * 9, max_tokens=500), "max_tokens"),
        (dict(prompt=["a", "b"], stream=True), "stream"),
        (dict(prompt="a", logprobs=1, stream=True), "stream"),
        (dict(prompt="a", max_tokens=0), "max_tokens"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            server.client.completions.create(model="tiny", **{"max_tokens": 4, **kwargs})
        assert e.value.param == field and f"{field}=" in e.value.message
    assert (
        e.value.body["message"]
        == "max_tokens=0 is invalid; max_tokens must be an integer from 1 to 4096 (0 only "
        "with echo)"
    )


def test_the_tokenizer_endpoints_answer_as_vllms_and_refuse_bad_input(server):
    status, body = request(
        server.url,
        "POST",
        "/tokenize",
        json.dumps({"prompt": "Hello<|endoftext|>", "add_special_tokens": False}),
    )
    assert (
        status == 200
        and body["tokens"] == [*server.enc.encode("Hello"), EOT]
        and body["count"] == 2
    )
    assert body["max_model_len"] == 64
    assert request(server.url, "POST", "/detokenize", json.dumps({"tokens": body["tokens"]})) == (
        200,
        {"prompt": "Hello<|endoftext|>"},
    )
    status, info = request(server.url, "GET", "/tokenizer_info")
    assert status == 200 and info["eos_token"] == info["bos_token"] == "<|endoftext|>"
    for path, sent, field in (
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": "\ud800"}, "prompt"),
        ("/detokenize", {"tokens": [1, EOT + 1]}, "tokens"),
        ("/detokenize", {}, "tokens"),
    ):
        status, reply = request(server.url, "POST", path, json.dumps(sent))
        assert (
            status == 400
            and reply["error"]["param"] == field
            and f"{field}=" in reply["error"]["message"]
        )
