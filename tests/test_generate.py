"""inference.generate: the KV cache and bf16 weights held for inference change no token, sampling is
repeatable and honours its limits, and sample.py uses it; the in-training samples are
GPT.generate's."""

import copy
import os
import sys

import pytest
import torch
from conftest import ROOT, run, tiny_model

import inference
import sample
from inference import (
    PackedLinear,
    generate,
    generate_stream,
    hold_for_inference,
    load_for_inference,
    sample_next,
)
from train_gpt2 import EOT, GPT, UserError, get_tokenizer, load_model

torch.set_num_threads(1)  # these models are tiny: threads would only contend for the 2 cores


def greedy_recompute(model, prompt, new_tokens, num_samples=1):
    """The reference: every step runs the whole (cropped) window through the model, no cache."""
    idx = torch.tensor([prompt] * num_samples)
    for _ in range(new_tokens):
        logits, _ = model(idx[:, -model.config.block_size :])
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx[:, len(prompt) :].tolist()


@pytest.mark.parametrize(
    "prompt", [[1, 2, 3], list(range(40, 60))], ids=["short", "longer_than_block"]
)
def test_cached_greedy_equals_full_recompute_across_the_crop(prompt):
    model = tiny_model(block_size=16)
    expected = greedy_recompute(model, prompt, 80, num_samples=2)
    got = generate(model, prompt, 80, temperature=0, num_samples=2, stop=None)
    assert got == expected
    assert len(set(expected[0])) > 5  # the path really varies, so a stale cache would show
    # the decoder without a cache: GPT.generate, greedy as top_k=1
    assert (
        model.generate(torch.tensor([prompt]), 80, top_k=1)[:, len(prompt) :].tolist()
        == expected[:1]
    )


def test_cache_takes_the_prompt_then_one_token_a_call(monkeypatch):
    model = tiny_model(block_size=16)
    calls = []
    original = GPT.forward

    def spy(self, idx, targets=None, cache=None):
        calls.append((idx.size(1), cache[0].pos))
        return original(self, idx, targets, cache)

    monkeypatch.setattr(GPT, "forward", spy)
    generate(model, [1, 2, 3, 4, 5], 14, temperature=0, stop=None)
    # the prompt into an empty cache, one token a call until the window is full, then whole windows
    assert calls == [(5, 0)] + [(1, 5 + i) for i in range(11)] + [(16, 0), (16, 0)]


def test_seeded_sampling_repeats_and_seeds_differ():
    model = tiny_model()
    a = generate(model, [5, 6], 64, num_samples=3, seed=123, stop=None)
    assert a == generate(model, [5, 6], 64, num_samples=3, seed=123, stop=None)
    assert a == generate(
        model, [5, 6], 64, num_samples=3, generator=torch.Generator().manual_seed(123), stop=None
    )
    assert a != generate(model, [5, 6], 64, num_samples=3, seed=124, stop=None)
    assert a[0] != a[1]  # the samples of one call differ from each other


def test_top_k_and_top_p_limit_the_candidates():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=0, generator=gen).tolist()) == {0, 1, 2, 3}
    assert set(sample_next(logits, top_k=2, generator=gen).tolist()) == {0, 1}
    assert set(sample_next(logits, top_k=0, top_p=0.8, generator=gen).tolist()) == {0, 1}
    assert set(sample_next(logits, top_k=0, top_p=0.81, generator=gen).tolist()) == {0, 1, 2}
    assert set(sample_next(logits, top_k=0, top_p=0.01, generator=gen).tolist()) == {0}
    # 0.5^10 vs 0.3^10: almost always 0
    low = sample_next(logits, temperature=0.1, top_k=0, generator=gen)
    assert (low == 0).float().mean() > 0.95
    assert sample_next(logits[:1], temperature=0).tolist() == [0]


def test_never_samples_vocabulary_padding_and_stops_at_eot():
    model = tiny_model(vocab_size=50304)
    with torch.no_grad():
        # padding rows would win every draw
        model.lm_head.weight[EOT + 1 :] = model.lm_head.weight[7] * 100
    out = generate(model, [1, 2], 30, temperature=0, stop=None) + generate(
        model, [1, 2], 30, top_k=0, seed=0, stop=None
    )
    assert all(t < EOT + 1 for row in out for t in row)

    with torch.no_grad():
        model.lm_head.weight[EOT] = model.lm_head.weight[7] * 50  # now <|endoftext|> wins
    assert generate(model, [1, 2], 30, temperature=0) == [[]]
    assert len(list(generate_stream(model, [1, 2], 30, temperature=0))) == 1


def test_each_sample_stops_at_its_own_stop_token():
    model = tiny_model()
    full = generate(model, [3], 40, num_samples=4, seed=1, stop=None)
    stop = full[0][5]
    cut = generate(model, [3], 40, num_samples=4, seed=1, stop=stop)
    assert cut == [row[: row.index(stop)] if stop in row else row for row in full]


def test_generate_on_a_compiled_model_runs_uncompiled():
    model = tiny_model()
    compiled = torch.compile(model)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    got = generate(compiled, [1, 2, 3], 20, seed=3, stop=None)
    assert got == generate(model, [1, 2, 3], 20, seed=3, stop=None)
    # nothing was traced, so nothing recompiles per token
    assert not torch._dynamo.utils.counters["stats"]


def test_bad_prompts_are_refused():
    model = tiny_model(vocab_size=64)
    with pytest.raises(UserError, match="prompt is empty"):
        generate(model, [], 5)
    with pytest.raises(UserError, match="outside the model's 64"):
        generate(model, [1, 64], 5)


def test_training_prints_samples_from_generate(tiny_run):
    lines = [line for line in tiny_run.stdout.splitlines() if line.startswith("sample ")]
    # at the evals of steps 4 and 8
    assert [line[:8] for line in lines] == ["sample 0", "sample 1"] * 2
    model = load_model(tiny_run.checkpoint)
    enc = get_tokenizer()
    prompt = enc.encode("Hello, I'm a language model,")
    out = model.generate(
        torch.tensor([prompt] * 2),
        16 - len(prompt),
        top_k=50,
        generator=torch.Generator().manual_seed(42),
    )[:, len(prompt) :].tolist()
    expected = [row[: row.index(EOT)] if EOT in row else row for row in out]
    assert lines[2:] == [f"sample {i}: {enc.decode(prompt + t)!r}" for i, t in enumerate(expected)]


def test_sample_cli_streams_one_sample_and_prints_several(tiny_run, capsys):
    args = [
        f"--model={tiny_run.checkpoint}",
        "--prompt=The cat",
        "--max_new_tokens=12",
        "--seed=7",
        "--dtype=float32",
        "--device=cpu",
    ]
    model, enc = load_model(tiny_run.checkpoint), get_tokenizer()
    prompt = enc.encode("The cat")

    one = run([sys.executable, f"{ROOT}/sample.py", *args])
    assert one.returncode == 0, one.stderr
    assert one.stdout == enc.decode(prompt + generate(model, prompt, 12, seed=7)[0]) + "\n"

    sample.main(args + ["--num_samples=2"])
    texts = [enc.decode(prompt + t) for t in generate(model, prompt, 12, num_samples=2, seed=7)]
    assert capsys.readouterr().out == "".join(f"--- sample {i}\n{t}\n" for i, t in enumerate(texts))

    sample.main(args[:1] + ["--prompt=", "--max_new_tokens=5", "--seed=1"])
    assert capsys.readouterr().out.startswith("<|endoftext|>")


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--num_samples=0", "--num_samples=0 is out of range; --num_samples must be 1 or more"),
        ("--num_samples=-1", "--num_samples=-1 is out of range; --num_samples must be 1 or more"),
        (
            "--max_new_tokens=-5",
            "--max_new_tokens=-5 is out of range; --max_new_tokens must be 1 or more",
        ),
        (
            "--temperature=-1",
            "--temperature=-1.0 is out of range; --temperature must be 0 (greedy) or more, e.g. "
            "0.8",
        ),
        (
            "--temperature=nan",
            "--temperature=nan is out of range; --temperature must be 0 (greedy) or more, e.g. 0.8",
        ),
        (
            "--top_k=-3",
            "--top_k=-3 is out of range; --top_k must be 0 (every token) or more, e.g. 50",
        ),
        (
            "--top_p=0",
            "--top_p=0.0 is out of range; --top_p must be above 0 and at most 1, e.g. 0.95",
        ),
        (
            "--top_p=1.5",
            "--top_p=1.5 is out of range; --top_p must be above 0 and at most 1, e.g. 0.95",
        ),
    ],
)
def test_sample_cli_refuses_settings_out_of_range(tiny_run, capsys, arg, message):
    # sys.exit(message): the message on stderr, exit status 1
    with pytest.raises(SystemExit) as exit:
        sample.main([f"--model={tiny_run.checkpoint}", "--max_new_tokens=2", "--device=cpu", arg])
    assert exit.value.code == f"error: {message}"
    assert capsys.readouterr().out == ""  # refused before sampling anything


def test_sample_cli_says_a_mistyped_checkpoint_path_does_not_exist(tiny_run, tmp_path):
    log_dir = os.path.dirname(tiny_run.checkpoint)
    for spec, hint in (
        (f"{log_dir}/model_000099.pt", f"the newest checkpoint there is {tiny_run.checkpoint}"),
        (f"{tmp_path}/nowhere/model.pt", "check the path"),
        ("./no_such_hf_dir", "check the path"),
    ):
        # offline, so that without the check the hub lookup fails at once instead of retrying for 30
        # s
        result = run(
            [sys.executable, f"{ROOT}/sample.py", f"--model={spec}"], env={"HF_HUB_OFFLINE": "1"}
        )
        assert result.returncode == 1
        assert result.stderr == f"error: --model={spec}: no such file or directory; {hint}\n"


def held_linear():
    """The Linear this CPU holds bf16 weights in: oneDNN's PackedLinear where it has bf16 kernels
    (AVX-512, Arm BF16), else the plain nn.Linear, whose bf16 matmuls torch emulates."""
    return PackedLinear if inference.onednn_bf16() else torch.nn.Linear


@pytest.mark.parametrize("onednn", ["this CPU", "no oneDNN bf16"])
def test_bf16_inference_holds_packed_weights_that_change_no_number(onednn, monkeypatch):
    # as on a CPU without AVX-512: the weights stay plain bf16 Linears
    if onednn == "no oneDNN bf16":
        monkeypatch.setattr(inference, "onednn_bf16", lambda: False)
    model = tiny_model(vocab_size=50304)
    plain = copy.deepcopy(model).to(torch.bfloat16)
    held = hold_for_inference(copy.deepcopy(model), torch.bfloat16)
    for linear in (held.lm_head, held.transformer.h[0].mlp.c_fc):
        assert type(linear) is held_linear() and linear.weight.dtype == torch.bfloat16
    assert held.lm_head.weight is held.transformer.wte.weight  # still tied, still in state_dict
    assert held.state_dict().keys() == model.state_dict().keys()
    idx = torch.tensor([[1, 2, 3, 4, 5]])
    # oneDNN's packed layout, the same bf16 arithmetic
    assert torch.equal(held(idx)[0], plain(idx)[0])
    greedy = generate(plain, [1, 2, 3], 30, temperature=0, stop=None)
    assert generate(held, [1, 2, 3], 30, temperature=0, stop=None) == greedy
    # under autocast, fp32 weights decode from such a copy, made per call; the model itself is
    # untouched
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert generate(model, [1, 2, 3], 30, temperature=0, stop=None) == greedy
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("onednn", [True, False], ids=["oneDNN", "no oneDNN"])
def test_float32_inference_packs_its_weights_for_an_engines_rows_where_onednn_is(
    onednn, monkeypatch
):
    if onednn and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: onednn)
    model = tiny_model(vocab_size=50304)
    held = hold_for_inference(copy.deepcopy(model), torch.float32)
    assert type(held.lm_head) is (PackedLinear if onednn else torch.nn.Linear)
    assert inference.packed_rows(torch.float32) == (8 if onednn else None)
    assert held.lm_head.weight is held.transformer.wte.weight
    assert held.state_dict().keys() == model.state_dict().keys()
    idx = torch.tensor([[1, 2, 3, 4, 5]] * 8)
    expected = model(idx)[0]
    got = held(idx)[0]  # float32 arithmetic summed in oneDNN's order: equal to float32's precision
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert generate(held, [1, 2, 3], 30, temperature=0, stop=None) == \
        generate(model, [1, 2, 3], 30, temperature=0, stop=None)


def test_load_model_takes_a_run_directory_and_a_dtype(serve_run, capsys):
    # model_000002.pt is cut short: skipped, with a warning on stderr
    newest = load_model(serve_run.dir)
    assert "warning: skipping" in capsys.readouterr().err
    expected = load_model(serve_run.checkpoint)
    assert all(
        torch.equal(a, b)
        for a, b in zip(newest.state_dict().values(), expected.state_dict().values())
    )
    held = load_for_inference(serve_run.dir, dtype="bfloat16")
    assert held.lm_head.weight.dtype == torch.bfloat16 and type(held.lm_head) is held_linear()
    assert generate(held, [1, 2], 10, temperature=0) == generate(
        hold_for_inference(expected, torch.bfloat16), [1, 2], 10, temperature=0
    )


@pytest.mark.parametrize(
    "device, hardware, decode, score",
    [
        (
            "cpu",
            {"avx512_bf16"},
            "bfloat16",
            "bfloat16",
        ),  # AMD Zen 4, Intel Cooper Lake: native bf16
        ("cpu", {"amx_bf16"}, "bfloat16", "bfloat16"),  # Intel Sapphire Rapids
        # no native bf16: decoding still gains, scoring does not
        ("cpu", {"avx2", "fma"}, "bfloat16", "float32"),
        (
            "cpu",
            {"avx512f", "avx512bw"},
            "bfloat16",
            "float32",
        ),  # AVX-512 without its BF16 extension
        ("cuda", (8, 0), "bfloat16", "bfloat16"),  # Ampere and later
        ("cuda", (7, 5), "float16", "float16"),  # T4: bf16 emulated, fp16 native
        ("mps", True, "bfloat16", "bfloat16"),  # macOS 14 or later
        ("mps", False, "float16", "float16"),
    ],
)
def test_auto_dtype_is_chosen_per_job_from_what_the_hardware_has(
    monkeypatch, device, hardware, decode, score
):
    import train_gpt2

    monkeypatch.setattr(train_gpt2, "cpu_flags", lambda: hardware if device == "cpu" else set())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: hardware)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda *a: hardware)
    assert train_gpt2.resolve_dtype("auto", device, None, job="decode") == decode
    assert train_gpt2.resolve_dtype("auto", device, None, job="score") == score
    for named in ("bfloat16", "float16", "float32"):  # a named dtype is taken as it is
        for job in ("decode", "score"):
            assert train_gpt2.resolve_dtype(named, device, None, job=job) == named


@pytest.mark.parametrize("script", ["sample", "serve"])
@pytest.mark.parametrize("native", [True, False])
def test_sample_and_serve_decode_in_the_auto_dtype_by_default(
    script, native, serve_run, monkeypatch, capsys
):
    """Both scripts take --dtype=auto by default and load the model in decoding's auto dtype: bf16
    on any CPU (halving the bytes each token reads pays even where bf16 arithmetic is emulated)."""
    import serve
    import train_gpt2

    monkeypatch.setattr(train_gpt2, "cpu_flags", lambda: {"avx512_bf16"} if native else {"avx2"})
    loaded = []

    def load(spec, device, dtype):
        loaded.append(dtype)
        return load_for_inference(spec, device, dtype)

    module = {"sample": sample, "serve": serve}[script]
    monkeypatch.setattr(module, "load_for_inference", load)
    # returns once loaded
    monkeypatch.setattr(serve.uvicorn.Server, "run", lambda self, sockets: None)
    args = [f"--model={serve_run.checkpoint}", "--device=cpu"]
    module.main(
        args + (["--max_new_tokens=2", "--temperature=0"] if script == "sample" else ["--port=0"])
    )
    assert module.parse_args(args).dtype == "auto" and loaded == ["bfloat16"]
    if script == "serve":
        assert "(cpu, bfloat16)" in capsys.readouterr().out


def test_the_dtype_bench_prints_decode_and_score_for_both_dtypes():
    result = run([sys.executable, f"{ROOT}/bench/dtype_auto.py", "--dry-run"], timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = ["job", "float32", "tok/s", "bfloat16", "tok/s", "bf16/fp32"]
    assert len(lines) == 4 and lines[1].split() == header
    for line, job in zip(lines[2:], ("decode", "score")):
        name, fp32, bf16, ratio = line.split()
        assert name == job and float(fp32) > 0 and float(bf16) > 0
        assert abs(float(ratio.rstrip("x")) - float(bf16) / float(fp32)) < 0.01
    held = "PackedLinear" if inference.onednn_bf16() else "Linear"
    assert lines[0].endswith(f"bf16 weights held as {held}")
