"""export_gguf.py: llama.cpp itself, through llama-cpp-python, loads the GGUF and gives our tokens,
our logits and our greedy text; a chat model's template, its control tokens and its stop survive;
bad input is refused in one line with no file left.

The llama.cpp tests skip where llama_cpp is not installed (its install builds llama.cpp from source:
README's set-up); CI installs it. llama.cpp runs on 1 thread with an f32 KV cache, so that the
weights' type is the only rounding a GGUF adds.
"""

import copy
import errno
import json
import os
import sys
import types
from contextlib import closing

import numpy as np
import pytest
import torch
from conftest import ROOT, request, run, start_server, stop, tiny_model
from test_chat_serve import ASK, END_AT, ends_at  # its chat model: random text, then <|end|>

import chat
import export_gguf
from inference import encode, generate
from train_gpt2 import (
    CHAT_TOKENS,
    EOT,
    GPT,
    MODEL_KEYS,
    GPTConfig,
    UserError,
    get_tokenizer,
    load_model,
)

TEXT = (
    "  Leading spaces,\n\nnewlines\tand tabs; digits 1234567 and 3.14159, punctuation?!... "
    "<<>>--- naïve café Ünïcödé Ελληνικά 日本語 🦙🚀<|endoftext|> after the end.\n   "
)
GREEDY_BLOCK = 160  # the greedy model's context: its longest prompt is past half of it
OUTTYPES = ("f32", "f16", "q8_0")


def save(model, path):
    """model as a train_gpt2.py checkpoint at path; returns path."""
    config = {**{k: getattr(model.config, k) for k in MODEL_KEYS}, "chat": model.config.chat}
    torch.save({"model": model.state_dict(), "config": config}, path)
    return str(path)


def export(checkpoint, out_dir, outtypes=OUTTYPES, command_line=False):
    """{outtype: the GGUF of checkpoint}; command_line: the first written by export_gguf.py as a
    user runs it."""
    paths = {}
    for outtype in outtypes:
        path = paths[outtype] = os.path.join(out_dir, f"model-{outtype}.gguf")
        if command_line:
            r = run(
                [
                    sys.executable,
                    f"{ROOT}/export_gguf.py",
                    f"--model={checkpoint}",
                    f"--out={path}",
                    f"--outtype={outtype}",
                ],
                timeout=300,
            )
            assert (r.returncode, r.stderr, r.stdout) == (0, "", f"wrote {path}\n"), r.stderr
            command_line = False
        else:
            export_gguf.export_gguf(load_model(checkpoint), path, outtype)
    return paths


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def llama(llama_cpp, path, n_ctx):
    return llama_cpp.Llama(
        path,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        n_threads=1,
        n_threads_batch=1,
        logits_all=True,
        verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
    """conftest's trained tiny model (block_size 64, GPT-2's padded vocabulary) and its GGUFs."""
    out = tmp_path_factory.mktemp("gguf_trained")
    return types.SimpleNamespace(
        model=load_model(tiny_run.checkpoint),
        gguf=export(tiny_run.checkpoint, str(out), OUTTYPES + ("bf16",), command_line=True),
    )


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """conftest's sharpened random model, whose greedy text varies, with room for 64 new tokens
    after a prompt past half its context; and its GGUFs."""
    out = tmp_path_factory.mktemp("gguf_sharp")
    model = tiny_model(block_size=GREEDY_BLOCK, vocab_size=50304)
    checkpoint = save(model, out / "model_000001.pt")
    return types.SimpleNamespace(model=load_model(checkpoint), gguf=export(checkpoint, str(out)))


def test_the_file_holds_llama_cpps_gpt2_names_types_and_only_the_real_tokens(trained, llama_cpp):
    import gguf

    reader = gguf.GGUFReader(trained.gguf["q8_0"])
    field = {name: f.contents() for name, f in reader.fields.items()}
    assert field["general.architecture"] == "gpt2" and field["gpt2.context_length"] == 64
    assert (field["gpt2.embedding_length"], field["gpt2.feed_forward_length"]) == (32, 128)
    assert (field["gpt2.block_count"], field["gpt2.attention.head_count"]) == (2, 2)
    assert field["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert field["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (field["tokenizer.ggml.model"], field["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    tokens, merges = field["tokenizer.ggml.tokens"], field["tokenizer.ggml.merges"]
    assert (len(tokens), len(merges)) == (50257, 50000)  # not the padding rows
    assert tokens[:3] == ["!", '"', "#"] and tokens[220] == "Ġ" and merges[0] == "Ġ t"
    assert tokens[-1] == "<|endoftext|>"
    normal, control = gguf.TokenType.NORMAL, gguf.TokenType.CONTROL
    assert field["tokenizer.ggml.token_type"][-2:] == [normal, control]
    assert [field[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "eot")] == [EOT] * 3
    assert "tokenizer.chat_template" not in field
    types_ = {t.name: t.tensor_type.name for t in reader.tensors}
    assert len(types_) == 4 + 12 * 2 and "output.weight" not in types_  # tied to token_embd
    assert {n for n, t in types_.items() if t == "Q8_0"} == {"token_embd.weight"} | {
        f"blk.{i}.{k}.weight"
        for i in range(2)
        for k in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
    }
    assert types_["position_embd.weight"] == "F32" and types_["blk.1.ffn_norm.bias"] == "F32"
    shapes = {t.name: t.shape.tolist() for t in reader.tensors}
    assert shapes["token_embd.weight"] == [32, 50257]
    assert shapes["blk.0.attn_qkv.weight"] == [32, 96]

    with closing(llama(llama_cpp, trained.gguf["f32"], 64)) as llm:
        assert (llm.n_vocab(), llm._model.n_ctx_train(), llm.n_embd()) == (50257, 64, 32)
        assert llm.metadata["general.architecture"] == "gpt2"


def test_llama_cpp_tokenizes_and_detokenizes_as_we_do(trained, llama_cpp):
    ours = encode(trained.model, TEXT)  # <|endoftext|> is that token, as sample.py encodes
    assert EOT in ours and len(ours) > 40
    with closing(llama(llama_cpp, trained.gguf["f32"], 64)) as llm:
        assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == ours
        assert llm.detokenize(ours, special=True).decode() == TEXT
        assert llm.tokenize(b"Hi", add_bos=True) == [17250]  # no bos: sample.py adds none either


def our_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0, :, : model.config.real_tokens].numpy()


def llama_logits(llm, ids):
    """llama.cpp's logits at every position of ids, from one batch (logits_all)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def rounded(model, dtype):
    """A copy of model with the rounding a GGUF of dtype (f16, bf16) brings: each weight matrix
    (every Linear's, and the token embedding tied to lm_head) stored in dtype, and each matrix
    product's input rounded to dtype, as ggml's matmul converts it; sums stay float32, and norms,
    biases and the position embedding, f32 in the file, are untouched."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(module.weight.to(dtype).float())
                module.register_forward_pre_hook(lambda module, args: (args[0].to(dtype).float(),))
    return model


def test_llama_cpp_gives_our_logits_within_1e_4_in_f32(trained, llama_cpp):
    ids = encode(trained.model, TEXT)[:64]  # the whole context
    with closing(llama(llama_cpp, trained.gguf["f32"], 64)) as llm:
        np.testing.assert_allclose(
            llama_logits(llm, ids), our_logits(trained.model, ids), atol=1e-4, rtol=0
        )


@pytest.mark.parametrize("outtype, dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_llama_cpp_gives_our_logits_within_the_rounding_of_f16_and_bf16(
    trained, llama_cpp, outtype, dtype
):
    # The rounding: what storing the weights in the outtype and rounding each matmul's input to it
    # does to our own logits. llama.cpp's logits are within twice that of ours (its rounding and
    # the one measured may err in opposite ways); q8_0's, which round to 8 bits, are not.
    ids = encode(trained.model, TEXT)[:64]
    ours = our_logits(trained.model, ids)
    rounding = np.abs(our_logits(rounded(trained.model, dtype), ids) - ours).max()
    assert 1e-5 < rounding < 1e-2
    with closing(llama(llama_cpp, trained.gguf[outtype], 64)) as llm:
        np.testing.assert_allclose(llama_logits(llm, ids), ours, atol=2 * rounding, rtol=0)
    if outtype == "f16":
        with closing(llama(llama_cpp, trained.gguf["q8_0"], 64)) as llm:
            assert np.abs(llama_logits(llm, ids) - ours).max() > 4 * rounding


def llama_greedy(llm, prompt, new):
    """new tokens after prompt from llama.cpp's own greedy sampler (temp 0)."""
    tokens = llm.generate(prompt, temp=0)
    return [next(tokens) for _ in range(new)]


def greedy_prompts(block_size):
    enc = get_tokenizer()
    long = enc.encode(" ".join(f"line {i}: the dog runs;" for i in range(40)))
    assert len(long) > block_size // 2 + 16
    return [[EOT], enc.encode("Hello, I'm a language model,"), long[: block_size // 2 + 10]]


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_64_greedy_tokens_from_llama_cpp_are_ours(sharp, llama_cpp, outtype):
    with closing(llama(llama_cpp, sharp.gguf[outtype], GREEDY_BLOCK)) as llm:
        for prompt in greedy_prompts(GREEDY_BLOCK):  # the last runs to position 154 of 160
            ours = generate(sharp.model, prompt, 64, stop=None, temperature=0)[0]
            assert len(set(ours)) > 16  # a text that varies, not one token repeated
            assert llama_greedy(llm, prompt, 64) == ours, (outtype, len(prompt))


def test_q8_0s_first_16_greedy_tokens_are_ours(trained, llama_cpp):
    # On the trained model: q8_0 also rounds the activations to 8 bits, and on the sharpened one
    # that moves logits by more than its top two tokens' gap.
    with closing(llama(llama_cpp, trained.gguf["q8_0"], 64)) as llm:
        for prompt in greedy_prompts(64):
            ours = generate(trained.model, prompt, 16, stop=None, temperature=0)[0]
            assert llama_greedy(llm, prompt, 16) == ours, len(prompt)


@pytest.fixture(scope="module")
def chat_gguf(tmp_path_factory):
    """test_chat_serve's tiny chat model, which writes random text and then <|end|> at position
    END_AT: its checkpoint, its f32 GGUF and its Modelfile, and serve.py serving the checkpoint."""
    out = tmp_path_factory.mktemp("gguf_chat")
    model = ends_at(tiny_model(block_size=64, vocab_size=50304, chat=True), END_AT)
    checkpoint = save(model, out / "model_000001.pt")
    path = export(checkpoint, str(out), ["f32"])["f32"]
    proc, url = start_server(checkpoint, out / "serve.log")
    yield types.SimpleNamespace(path=path, url=url, modelfile=str(out / "model-f32.Modelfile"))
    stop(proc)


def test_a_chat_models_template_renders_our_ids_in_jinja2_and_in_llama_cpp(chat_gguf, llama_cpp):
    import gguf
    import jinja2.sandbox

    fields = gguf.GGUFReader(chat_gguf.path).fields
    template = fields["tokenizer.chat_template"].contents()
    assert template == chat.JINJA
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 3+4?"},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": " And 2+2?\n"},
    ]
    env = jinja2.sandbox.ImmutableSandboxedEnvironment()
    text = env.from_string(template).render(messages=messages, add_generation_prompt=True)
    enc = get_tokenizer()
    assert enc.encode(text, allowed_special="all") == chat.prompt(messages)
    with closing(llama(llama_cpp, chat_gguf.path, 64)) as llm:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == chat.prompt(messages)
        vocab = llm._model.vocab
        for token in CHAT_TOKENS.values():
            assert llama_cpp.llama_vocab_get_attr(vocab, token) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
        assert (llm.n_vocab(), llm.token_eos(), llama_cpp.llama_vocab_eot(vocab)) == (
            50261,
            chat.END,
            chat.END,
        )
        assert all(llama_cpp.llama_vocab_is_eog(vocab, t) for t in chat.STOP)
    assert fields["tokenizer.ggml.token_type"].contents()[-5:] == [gguf.TokenType.CONTROL] * 5


def test_llama_cpp_fed_chat_prompt_stops_at_end_with_serve_pys_reply(chat_gguf, llama_cpp):
    status, served = request(
        chat_gguf.url,
        "POST",
        "/v1/chat/completions",
        body=json.dumps({"messages": ASK, "temperature": 0, "max_tokens": 60}),
        headers={"Content-Type": "application/json"},
    )
    assert status == 200 and served["choices"][0]["finish_reason"] == "stop"
    reply = served["choices"][0]["message"]["content"]
    prompt = chat.prompt(ASK)
    assert served["usage"]["completion_tokens"] == END_AT - len(prompt) + 2  # <|end|> counts
    with closing(llama(llama_cpp, chat_gguf.path, 64)) as llm:
        theirs = llm.create_completion(prompt, max_tokens=60, temperature=0)
        assert len(set(reply.split())) > 3  # a varied text, then <|end|>
        assert theirs["choices"][0]["text"] == reply
        assert theirs["choices"][0]["finish_reason"] == "stop"  # at an end-of-generation token
        assert llama_greedy(llm, prompt, END_AT - len(prompt) + 2)[-1] == chat.END


def test_a_chat_models_modelfile_holds_the_template_in_ollamas_syntax(chat_gguf):
    with open(chat_gguf.modelfile) as f:
        lines = f.read().splitlines()
    assert lines == [
        "FROM ./model-f32.gguf",
        'TEMPLATE """<|endoftext|>{{ range .Messages }}<|{{ .Role }}|>{{ .Content }}'
        '<|end|>{{ end }}<|assistant|>"""',
        'PARAMETER stop "<|end|>"',
        'PARAMETER stop "<|endoftext|>"',
        "PARAMETER num_ctx 64",
    ]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny model's checkpoint, one with --bias=False, and a file that is no checkpoint."""
    out = tmp_path_factory.mktemp("gguf_refusals")
    (out / "garbage.pt").write_bytes(b"not a checkpoint")
    no_bias = GPT(
        GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=1, n_embd=8, bias=False)
    )
    return types.SimpleNamespace(
        good=save(tiny_model(vocab_size=50304), out / "good.pt"),
        no_bias=save(no_bias, out / "no_bias.pt"),
        garbage=str(out / "garbage.pt"),
    )


@pytest.mark.parametrize(
    "model, out, extra, message",
    [
        ("good", "m.gguf", ["--outtype=q4_0"], "--outtype=q4_0 is not one of f32, f16, bf16, q8_0"),
        ("good", "there.gguf", [], "--out={tmp}/there.gguf exists; delete it or name another file"),
        (
            "good",
            "nodir/m.gguf",
            [],
            "--out={tmp}/nodir/m.gguf: no directory {tmp}/nodir; name a "
            "file in an existing directory",
        ),
        (
            "no_bias",
            "m.gguf",
            [],
            "the model was trained with --bias=False, and llama.cpp's gpt2 "
            "architecture needs biases in every Linear and LayerNorm layer; only a --bias=True "
            "model can be exported",
        ),
        (
            "garbage",
            "m.gguf",
            [],
            "{garbage}: not a readable train_gpt2.py checkpoint, it is "
            "truncated, corrupt or another kind of file (BadZipFile: File is not a zip file)",
        ),
    ],
    ids=["unknown outtype", "out exists", "out's directory missing", "no biases", "not a model"],
)
def test_bad_input_is_one_line_and_no_file(checkpoints, tmp_path, model, out, extra, message):
    (tmp_path / "there.gguf").write_bytes(b"mine")
    args = [f"--model={getattr(checkpoints, model)}", f"--out={tmp_path / out}", *extra]
    with pytest.raises(SystemExit) as exit:  # sys.exit(message): the message on stderr, status 1
        export_gguf.main(args)
    assert exit.value.code == "error: " + message.format(tmp=tmp_path, garbage=checkpoints.garbage)
    assert os.listdir(tmp_path) == ["there.gguf"]
    assert (tmp_path / "there.gguf").read_bytes() == b"mine"
    if model == "no_bias":  # once as a user meets it: one line on stderr, exit status 1
        r = run([sys.executable, f"{ROOT}/export_gguf.py", *args], timeout=120)
        assert (r.returncode, r.stderr, r.stdout) == (1, exit.value.code + "\n", "")
        assert os.listdir(tmp_path) == ["there.gguf"]


def test_a_disk_that_fills_mid_write_leaves_neither_file(checkpoints, tmp_path, monkeypatch):
    import gguf

    def full_disk(self, **kw):
        self.fout[0].write(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    model = tiny_model(vocab_size=50304, chat=True)
    out = str(tmp_path / "chat.gguf")
    with pytest.raises(UserError) as e:
        export_gguf.export_gguf(model, out)
    assert str(e.value) == (
        f"cannot write --out={out} (No space left on device); name a writable "
        f"place with room for it"
    )
    assert os.listdir(tmp_path) == []
    (tmp_path / "chat.Modelfile").write_text("mine")  # a chat export never overwrites one
    with pytest.raises(UserError, match="chat.Modelfile, the Modelfile a chat model's export"):
        export_gguf.export_gguf(model, out)
    assert os.listdir(tmp_path) == ["chat.Modelfile"]


def test_the_benchs_dry_run_decodes_with_each(llama_cpp):
    r = run([sys.executable, f"{ROOT}/bench/llamacpp_decode.py", "--dry-run"], timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    names = [row.split(" | ")[0][2:] for row in rows[1:]]
    assert names[0] == "ours, float32" and names[-3:] == [f"llama.cpp, {t}" for t in OUTTYPES]
    assert rows[1].endswith("| 16/16 |")  # ours agrees with itself
