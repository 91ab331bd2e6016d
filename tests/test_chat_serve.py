"""Talking to a chat model: serve.py's POST /v1/chat/completions through the real openai client
(OpenAI's shapes, streamed or not; the reply ends at <|end|> with finish_reason "stop"; a base model
and a bad field get 400s that say what to do), the page's conversation in chromium, and sample.py
--chat in a terminal.

The model is a tiny GPT whose config says chat=True, its weights random but for one coordinate of
the residual stream that carries position alone: it is zero before position END_AT and huge from
there, and <|end|> is the one token whose embedding points along it. So the model writes random
text, then <|end|> from position END_AT: a reply stops there, and max_tokens can end it sooner.

SERVE_SCREENSHOT=docs/serve_chat.png python -m pytest tests/test_chat_serve.py -k page   # the docs'
picture"""

import http.client
import json
import os
import shutil
import subprocess
import sys
import types
import urllib.request

import numpy as np
import openai
import pytest
import torch
from conftest import (
    ARITHMETIC_QUESTIONS,
    ROOT,
    WORDS,
    run,
    start_server,
    stop,
    tiny_model,
    train,
    write_arithmetic_chats,
)

import chat
from inference import stream_reply
from train_gpt2 import MODEL_KEYS, get_tokenizer, load_model

torch.set_num_threads(1)
END_AT = 40  # the position from which the model writes <|end|>
ASK = [{"role": "user", "content": "What is 2+3?"}]


def ends_at(model, position, dim=0, big=100.0):
    """model, in place, made to write <|end|> (chat.END) from `position` on (see the module's
    docstring)."""
    with torch.no_grad():
        w = model.lm_head.weight  # tied with the token embedding
        w[:, dim] = 0
        w[chat.END] = 0
        # enough to win where the coordinate is large, too little to win where it is ~0
        w[chat.END, dim] = 2.0
        wpe = model.transformer.wpe.weight
        wpe[:, dim] = 0
        wpe[position:, dim] = big
        for block in model.transformer.h:  # nothing else writes the coordinate
            for linear in (block.attn.c_proj, block.mlp.c_proj):
                linear.weight[dim] = 0
                linear.bias[dim] = 0
        model.transformer.ln_f.weight[dim], model.transformer.ln_f.bias[dim] = 1, 0
    return model


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A checkpoint of a tiny chat model (block_size 64, GPT-2's padded vocabulary, weights
    sharpened so that text varies) that ends its replies at END_AT."""
    model = ends_at(tiny_model(block_size=64, vocab_size=50304, chat=True), END_AT)
    path = tmp_path_factory.mktemp("chat_model") / "model_000001.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "config": {**{k: getattr(model.config, k) for k in MODEL_KEYS}, "chat": True},
        },
        path,
    )
    return str(path)


@pytest.fixture(scope="module")
def server(chat_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("chat_serve") / "log"
    proc, url = start_server(chat_model, log)
    yield types.SimpleNamespace(
        url=url, client=client(url), model=load_model(chat_model), enc=get_tokenizer()
    )
    proc.terminate()
    proc.wait(timeout=10)


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def reply(model, messages, max_tokens=64, **sampling):
    """(text, finish_reason) of inference.stream_reply: what the server should answer."""
    text, reason = "", None
    for piece, reason in stream_reply(
        model, messages, max_tokens, **{"temperature": 0, **sampling}
    ):
        text += piece
    return text, reason


def request(url, path, body):
    """(status, the raw reply body) of a POST with a JSON body."""
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    status, data = response.status, response.read().decode()
    conn.close()
    return status, data


def test_a_reply_is_openais_shape_and_ends_at_end_with_stop(server):
    r = server.client.chat.completions.create(model="tiny", messages=ASK, temperature=0)
    prompt = chat.prompt(ASK)
    made = END_AT - len(prompt) + 1  # the tokens before <|end|>: one per position up to END_AT
    text, reason = reply(server.model, ASK)
    assert (text, reason) == (
        server.enc.decode(
            server.model.generate(
                # GPT.generate's greedy
                torch.tensor([prompt]),
                made,
                top_k=1,
            )[0, len(prompt) :].tolist()
        ),
        "stop",
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    # a varied text, then <|end|>
    assert r.choices[0].finish_reason == "stop" and len(set(text.split())) > 3
    # <|end|> counts
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), made + 1)

    short = server.client.chat.completions.create(
        model="tiny", messages=ASK, temperature=0, max_tokens=5
    )
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 5
    assert short.choices[0].message.content == server.enc.decode(server.enc.encode(text)[:5])


def test_streamed_chunks_are_openais_and_join_to_the_reply(server):
    text, _ = reply(server.model, ASK)
    chunks = list(
        server.client.chat.completions.create(
            model="tiny", messages=ASK, temperature=0, stream=True
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    pieces = [c.choices[0].delta.content for c in chunks[1:-1]]
    # streamed as made, not in one piece
    assert len(pieces) > 5 and all(pieces) and "".join(pieces) == text
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert (
        chunks[-1].choices[0].delta.content is None
        and chunks[-1].usage.completion_tokens > len(pieces) - 1
    )
    status, raw = request(
        server.url, "/v1/chat/completions", {"messages": ASK, "stream": True, "max_tokens": 3}
    )
    events = [e for e in raw.split("\n\n") if e]
    assert status == 200 and events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"


def test_earlier_turns_a_system_message_a_stop_string_and_a_seed(server):
    first, _ = reply(server.model, ASK)
    turns = [
        {"role": "system", "content": "Be brief."},
        *ASK,
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And 4+4?"},
    ]
    r = server.client.chat.completions.create(model="tiny", messages=turns, temperature=0)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == reply(server.model, turns)
    assert r.usage.prompt_tokens == len(chat.prompt(turns))
    assert r.choices[0].message.content != first  # the earlier turns are in the prompt

    stop = first[8:12]
    cut = server.client.chat.completions.create(
        model="tiny", messages=ASK, temperature=0, stop=["nowhere", stop]
    )
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == (
        first[: first.index(stop)],
        "stop",
    )

    sampled = [
        server.client.chat.completions.create(
            model="tiny", messages=ASK, temperature=0.9, top_p=0.9, seed=5
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert (
        sampled[0]
        == sampled[1]
        == reply(server.model, ASK, temperature=0.9, top_p=0.9, seed=5)[0]
        != first
    )


def test_a_conversation_longer_than_block_size_is_cropped_from_the_left_and_the_reply_says_so(
    server,
):
    long = [{"role": "user", "content": " ".join(f"w{i}" for i in range(40))}, *ASK]
    n = len(chat.prompt(long))
    assert n > 64
    r = server.client.chat.completions.create(
        model="tiny", messages=long, temperature=0, max_tokens=4
    )
    assert (r.usage.prompt_tokens, r.usage.prompt_tokens_cropped) == (64, n - 64)
    assert (
        r.warning
        == f"the conversation has {n} tokens, more than block_size=64: the model saw its last 64"
    )
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == reply(
        server.model, long, 4
    )


def test_a_bad_field_gets_a_400_naming_it_and_the_server_keeps_serving(server):
    for field, value in (
        ("messages", []),
        ("messages", "Hi"),
        ("messages", [{"role": "robot", "content": "Hi"}]),
        ("messages", [{"role": "user", "content": 3}]),
        ("messages", [{"role": "user"}]),
        ("temperature", 3),
        ("top_p", 0),
        ("max_tokens", 0),
        ("max_tokens", 4097),
        ("stop", 5),
        ("n", 2),
        ("seed", "x"),
        ("stream", "yes"),
        ("logprobs", True),
        ("tools", [{"x": 1}]),
        ("max_completion_tokens", -1),
    ):
        body = {"messages": ASK, field: value}
        with pytest.raises(openai.BadRequestError) as e:
            server.client.chat.completions.create(model="tiny", messages=ASK, extra_body=body)
        assert e.value.param == field and field in e.value.message, (field, value, e.value.message)
    status, body = request(
        server.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}
    )
    assert status == 400 and json.loads(body)["error"]["param"] == "messages"
    assert (
        server.client.chat.completions.create(
            model="tiny", messages=ASK, max_tokens=2
        ).usage.completion_tokens
        == 2
    )


def test_text_parts_and_a_developer_message_are_read_as_openais_api_means_them(server):
    plain = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is\n2+3?"},
    ]
    api = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+3?"}],
        },
    ]
    r = server.client.chat.completions.create(model="tiny", messages=api, temperature=0)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == reply(server.model, plain)
    assert r.usage.prompt_tokens == len(chat.prompt(plain))
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(
            model="tiny",
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}
            ],
        )
    assert (
        e.value.param == "messages"
        and e.value.body["message"]
        == "message 1's content part 2 is of type 'image_url'; this model reads text parts only: "
        '{"type": "text", "text": "..."}'
    )


def test_a_completion_may_spell_the_template_on_a_chat_model(server):
    first, _ = reply(server.model, ASK)
    raw = "<|endoftext|><|user|>What is 2+3?<|end|><|assistant|>"
    r = server.client.completions.create(model="tiny", prompt=raw, max_tokens=40, temperature=0)
    assert r.usage.prompt_tokens == len(chat.prompt(ASK)) and r.choices[0].text.startswith(
        first + "<|end|>"
    )


def test_models_and_health_say_chat(server):
    assert [m.chat for m in server.client.models.list()] == [True]
    with urllib.request.urlopen(f"{server.url}/health", timeout=30) as r:
        assert json.load(r)["chat"] is True


def test_a_base_model_gets_a_400_that_names_the_fix(serve_run, tmp_path):
    proc, url = start_server(serve_run.checkpoint, tmp_path / "log")
    try:
        base = client(url)
        with pytest.raises(openai.BadRequestError) as e:
            base.chat.completions.create(model="tiny", messages=ASK)
        assert e.value.param == "model" and "not a chat model" in e.value.message
        assert "--preset=sft" in e.value.message and "/v1/completions" in e.value.message
        assert [m.chat for m in base.models.list()] == [False]
        assert (
            base.completions.create(model="tiny", prompt="Hi", max_tokens=3).usage.completion_tokens
            == 3
        )
        # a base model: plain text
        spelt = base.completions.create(model="tiny", prompt="<|user|>", max_tokens=1)
        assert spelt.usage.prompt_tokens == len(get_tokenizer().encode_ordinary("<|user|>")) > 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_terminal_chat_streams_replies_and_keeps_the_conversation(chat_model, tmp_path):
    model = load_model(chat_model)
    first, _ = reply(model, [{"role": "system", "content": "Be brief."}, *ASK], 8)
    turns = [
        {"role": "system", "content": "Be brief."},
        *ASK,
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And 4+4?"},
    ]
    second, _ = reply(model, turns, 8)
    assert second != reply(model, turns[-1:], 8)[0]  # the second reply depends on the first turn
    # then end of input
    (tmp_path / "in").write_text("What is 2+3?\n\nAnd 4+4?\n/clear\nWhat is 2+3?\n")
    args = [
        sys.executable,
        f"{ROOT}/sample.py",
        "--chat",
        f"--model={chat_model}",
        "--system=Be brief.",
        "--temperature=0",
        "--max_new_tokens=8",
        "--dtype=float32",
        "--device=cpu",
    ]
    with open(tmp_path / "in") as stdin:
        r = run(args, stdin=stdin, timeout=120)
    assert r.returncode == 0, r.stderr
    # an empty line asks nothing; /clear forgets
    assert r.stdout == f"> {first}\n> > {second}\n> > {first}\n> \n"
    (tmp_path / "quit").write_text("What is 2+3?\n/quit\nnever read\n")
    with open(tmp_path / "quit") as stdin:
        assert run(args, stdin=stdin, timeout=120).stdout == f"> {first}\n> "


def test_the_terminal_chat_refuses_a_base_model(serve_run):
    r = run(
        [
            sys.executable,
            f"{ROOT}/sample.py",
            "--chat",
            f"--model={serve_run.checkpoint}",
            "--device=cpu",
        ],
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    assert r.returncode == 1 and "not a chat model" in r.stderr and "--preset=sft" in r.stderr


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
RECORD = """
window.bodies = [];  // each request body the page POSTs, as the server receives it
const fetch0 = window.fetch;
window.fetch = (url, options) => {
  if (options && options.body) window.bodies.push([url, JSON.parse(options.body)]);
  return fetch0(url, options);
};
// the conversation's text length at each change: a reply that streams in grows in steps
window.lengths = [];
new MutationObserver(() => window.lengths.push(
  document.getElementById("conversation").textContent.length))
  .observe(document.getElementById("conversation"),
           {childList: true, subtree: true, characterData: true});
"""


def test_the_page_holds_a_conversation(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail(
            "needs Debian's chromium and chromium-driver: apt-get install -y chromium "
            "chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=900,700",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(server.url)
        wait = WebDriverWait(driver, 60)
        # /v1/models said chat
        wait.until(lambda d: d.find_element(By.ID, "message").is_displayed())
        assert not driver.find_element(By.ID, "prompt").is_displayed()
        driver.execute_script(RECORD)

        def fill(**values):
            for name, value in values.items():
                box = driver.find_element(By.ID, name)
                box.clear()
                box.send_keys(str(value))

        def bubbles():
            return [
                (e.get_attribute("class"), e.get_attribute("textContent"))
                for e in driver.find_elements(By.CSS_SELECTOR, "#conversation .msg")
            ]

        def said(n):
            return (
                len(driver.execute_script("return window.bodies")) == n
                and driver.find_element(By.ID, "send").is_enabled()
                and "finish_reason: " in driver.find_element(By.ID, "status").text
            )

        # a short first reply leaves the second room before END_AT
        fill(temperature=0, max_tokens=12)
        driver.find_element(By.ID, "message").send_keys("What is 2+3?", Keys.ENTER)
        wait.until(lambda d: said(1))
        first, _ = reply(server.model, ASK, 12)
        assert bubbles() == [("msg user", "What is 2+3?"), ("msg assistant", first)]
        lengths = driver.execute_script("return window.lengths")
        # The reply only grew; how many steps the browser shows depends on how reads batch the
        # stream's events.
        assert lengths == sorted(lengths) and len(set(lengths)) > 1

        fill(max_tokens=64)
        driver.find_element(By.ID, "message").send_keys("And 4+4?", Keys.ENTER)
        wait.until(lambda d: said(2))
        # at <|end|>
        assert driver.find_element(By.ID, "status").text.endswith("finish_reason: stop")
        turns = [
            *ASK,
            {"role": "assistant", "content": first},
            {"role": "user", "content": "And 4+4?"},
        ]
        (_, asked), (url, body) = driver.execute_script("return window.bodies")
        assert (
            url == "/v1/chat/completions" and asked["messages"] == ASK and body["messages"] == turns
        )
        assert asked["stream"] is True and body["stream"] is True
        second, _ = reply(server.model, turns)
        # and it depends on the first turn
        assert second and second != reply(server.model, turns[-1:])[0]
        assert bubbles()[2:] == [("msg user", "And 4+4?"), ("msg assistant", second)]
        shot = tmp_path / "chat.png"
        driver.save_screenshot(str(shot))
        if os.environ.get("SERVE_SCREENSHOT"):
            shutil.copy(shot, os.environ["SERVE_SCREENSHOT"])

        # New chat: the next request carries no earlier turn
        driver.find_element(By.ID, "clear").click()
        fill(max_tokens=12)
        driver.find_element(By.ID, "message").send_keys("What is 2+3?", Keys.ENTER)
        wait.until(lambda d: said(3))
        assert driver.execute_script("return window.bodies")[2][1]["messages"] == ASK
        assert bubbles() == [("msg user", "What is 2+3?"), ("msg assistant", first)]
    finally:
        driver.quit()


def test_sft_teaches_a_tiny_model_to_answer_sums(tmp_path):
    """End to end, as a user would: a tiny model pretrained briefly on plain text
    (prepare_fineweb.py on a .txt of sentences), then --preset=sft on conftest's single-digit
    arithmetic chats; through /v1/chat/completions and the openai client, at least 90 of the 100
    sums (each phrasing in turn) get the right number and finish_reason stop, while the base model,
    served the same way, gets a 400 on the chat endpoint and almost none right as a completion of
    the question. AdamW at these sizes sat at the sums' marginal for 1,000 steps (13/100); Muon with
    a cosine decay learns them (docs/serving.md)."""
    steps = 1000
    rng = np.random.default_rng(0)
    (tmp_path / "text.txt").write_text(
        "".join(
            " ".join(rng.choice(WORDS, rng.integers(4, 12))).capitalize() + ".\n"
            for _ in range(3000)
        )
    )
    data = write_arithmetic_chats(tmp_path / "chats.jsonl", 4000, seed=1)
    for source, out in ((tmp_path / "text.txt", "text"), (data, "chats")):
        r = run(
            [
                sys.executable,
                f"{ROOT}/prepare_fineweb.py",
                f"--data_files={source}",
                f"--out={tmp_path / out}",
                "--shard_size=20000",
                "--num_proc=1",
            ],
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
    common = [
        "--B=8",
        "--T=64",
        "--total_batch_size=512",
        "--compile=False",
        "--dtype=float32",
        "--device=cpu",
        "--sample_count=0",
        "--hella_data=",
        "--eval_tokens=512",
    ]
    r = train(
        [
            *common,
            "--n_layer=2",
            "--n_head=4",
            "--n_embd=64",
            "--vocab_size=50304",
            "--block_size=64",
            "--warmup_steps=5",
            "--max_steps=30",
            "--eval_interval=30",
            "--checkpoint_interval=30",
            "--max_lr=3e-3",
            "--min_lr=3e-4",
            f"--data_dir={tmp_path / 'text'}",
            f"--log_dir={tmp_path / 'base'}",
        ],
        timeout=900,
    )
    assert r.returncode == 0, r.stderr
    r = train(
        [
            *common,
            "--preset=sft",
            f"--init_from={tmp_path / 'base' / 'model_000030.pt'}",
            f"--data_dir={tmp_path / 'chats'}",
            "--optimizer=muon",
            "--muon_lr=1e-2",
            "--max_lr=3e-3",
            "--min_lr=3e-4",
            "--warmup_steps=0",
            f"--max_steps={steps}",
            f"--eval_interval={steps}",
            f"--checkpoint_interval={steps}",
            f"--log_dir={tmp_path / 'sft'}",
        ],
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    sums = [
        (a, b, ARITHMETIC_QUESTIONS[(10 * a + b) % len(ARITHMETIC_QUESTIONS)].format(a=a, b=b))
        for a in range(10)
        for b in range(10)
    ]

    proc, url = start_server(tmp_path / "sft", tmp_path / "sft.log")
    try:
        sft_client = client(url)
        replies = [
            sft_client.chat.completions.create(
                model="sft", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=4
            ).choices[0]
            for _, _, q in sums
        ]
    finally:
        stop(proc)
    sft = sum(
        c.message.content.strip() == str(a + b) and c.finish_reason == "stop"
        for (a, b, _), c in zip(sums, replies)
    )
    proc, url = start_server(tmp_path / "base", tmp_path / "base.log")
    try:
        base_client = client(url)
        with pytest.raises(openai.BadRequestError):
            base_client.chat.completions.create(
                model="base", messages=[{"role": "user", "content": sums[0][2]}]
            )
        texts = [
            base_client.completions.create(model="base", prompt=q, temperature=0, max_tokens=4)
            .choices[0]
            .text
            for _, _, q in sums
        ]
    finally:
        stop(proc)
    base = sum(text.strip().startswith(str(a + b)) for (a, b, _), text in zip(sums, texts))
    print(f"sums right: base {base}/100, after {steps} SFT steps {sft}/100")
    assert sft >= 90 and base <= 10, (base, sft)
