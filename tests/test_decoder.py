"""inference's Decoder: the static KV cache kept from call to call, the fixed-shape step a CUDA graph replays, and
how the path is chosen. No CUDA here: the "fixed" path is the graph's step run eagerly, the arithmetic a graph
replays; the capture itself is left to bench/gpu_check.py on a GPU."""
import os
import sys

import pytest
import torch
from conftest import ROOT, tiny_model

import inference
from inference import KVCache, decode_path, generate, generate_stream, sample_next
from train_gpt2 import EOT

torch.set_num_threads(1)  # these models are tiny: threads would only contend for the 2 cores


@torch.no_grad()
def old_decoder(model, prompt, new_tokens, num_samples, generator=None, **sampling):
    """generate_stream as it was before the Decoder: a fresh KVCache per layer for every prompt and every
    slide of the window, one GPT.forward a token."""
    idx, bs, cache = torch.tensor([prompt] * num_samples), model.config.block_size, None
    for _ in range(new_tokens):
        if cache is None or cache[0].pos == bs:
            cache = [KVCache(bs) for _ in model.transformer.h]
            logits, _ = model(idx[:, -bs:], cache=cache)
        else:
            logits, _ = model(idx[:, -1:], cache=cache)
        nxt = sample_next(logits[:, -1, :EOT + 1].float(), generator=generator, **sampling)
        idx = torch.cat((idx, nxt[:, None]), dim=1)
    return idx[:, len(prompt):].tolist()


@pytest.fixture(params=["eager", "fixed"])
def path(request, monkeypatch):
    """Each test once with the CPU's eager step and once with the fixed-shape step that CUDA replays."""
    monkeypatch.setattr(inference, "decode_path", lambda device: request.param)
    return request.param


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("prompt", [[1, 2, 3], list(range(40, 60))], ids=["short", "longer_than_block"])
def test_greedy_equals_generate_and_the_old_decoder_across_the_window_fill(path, batch, prompt):
    model = tiny_model(block_size=16)
    new = 30  # 3 + 30 > 16: the window fills, then slides (and is recomputed) every token
    expected = model.generate(torch.tensor([prompt] * batch), new, top_k=1)[:, len(prompt):].tolist()
    assert len(set(expected[0])) > 5  # the path really varies, so a stale cache row would show
    assert old_decoder(model, prompt, new, batch, temperature=0) == expected
    assert generate(model, prompt, new, num_samples=batch, temperature=0, stop=None) == expected
    decoder = inference._DECODERS[model]
    assert decoder.path == path and decoder.caches[0].k.shape == (batch, 2, 16, 16)  # (B, heads, block, head)
    # the kept decoder again, its cache holding the last call's rows: nothing of them leaks into this call
    assert generate(model, prompt, new, num_samples=batch, temperature=0, stop=None) == expected
    assert inference._DECODERS[model] is decoder


def test_seeded_sampling_repeats(path):
    model = tiny_model()
    a = generate(model, [5, 6], 40, num_samples=3, seed=123, stop=None)
    assert a == generate(model, [5, 6], 40, num_samples=3, seed=123, stop=None)
    assert a != generate(model, [5, 6], 40, num_samples=3, seed=124, stop=None)
    if path == "eager":  # the same arithmetic as before, so the same draws from the same generator
        assert a == old_decoder(model, [5, 6], 40, 3, generator=torch.Generator().manual_seed(123))


def test_the_cache_is_allocated_once_for_a_batch_size():
    model = tiny_model()
    generate(model, [1, 2], 20, temperature=0)
    decoder = inference._DECODERS[model]
    k = decoder.caches[0].k
    generate(model, [3], 20, temperature=0)
    assert inference._DECODERS[model] is decoder and decoder.caches[0].k is k
    generate(model, [3], 20, temperature=0, num_samples=2)  # a new batch size: a new decoder, which is kept
    assert inference._DECODERS[model] is not decoder and inference._DECODERS[model].caches[0].k.size(0) == 2
    model.to(torch.float64)  # weights somewhere else: a graph captured over the old ones would read freed memory
    generate(model, [3], 5, temperature=0, num_samples=2)
    assert inference._DECODERS[model].caches[0].k.dtype == torch.float64


def test_two_open_streams_each_get_a_cache(path):
    model = tiny_model()
    first = [t.tolist() for t in generate_stream(model, [1, 2, 3], 20, temperature=0, stop=None)]
    second = [t.tolist() for t in generate_stream(model, [9, 8], 20, top_k=0, seed=5, stop=None)]
    a = generate_stream(model, [1, 2, 3], 20, temperature=0, stop=None)
    b = generate_stream(model, [9, 8], 20, top_k=0, seed=5, stop=None)
    together = [(x.tolist(), y.tolist()) for x, y in zip(a, b)]  # interleaved, token by token
    assert [x for x, _ in together] == first and [y for _, y in together] == second
    a.close()
    b.close()
    assert inference._DECODERS[model].lock.acquire(blocking=False)  # a closed stream gives its decoder back


def test_the_fixed_step_has_no_host_sync_nor_python_branch_on_a_tensor():
    """What a CUDA graph capture forbids, checked without CUDA: the step traces as one graph (dynamo's
    fullgraph breaks at any .item(), bool(tensor) or data-dependent branch), its inputs being the tensors
    tok and at that each step rewrites."""
    model = tiny_model()
    decoder = inference.Decoder(model, 2, "fixed")
    with torch.no_grad():
        decoder.prefill(model, torch.tensor([[1, 2, 3]] * 2))
        decoder.tok.fill_(4)
        decoder.at.fill_(3)
        torch._dynamo.reset()
        traced = torch.compile(decoder.fixed_step, fullgraph=True, backend="eager")(model)
        decoder.caches[0].k[:, :, 3].zero_()  # the row the step writes, so that the second run must write it again
        assert torch.equal(traced, decoder.fixed_step(model))
    torch._dynamo.reset()


def test_cuda_graphs_are_chosen_only_where_cuda_is(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [decode_path(d) for d in ("cuda", "cuda:0", "cpu", "mps")] == ["eager"] * 4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [decode_path(d) for d in ("cuda", torch.device("cuda", 1), "cpu", "mps")] == [
        "graph", "graph", "eager", "eager"]
    monkeypatch.setattr(inference, "CUDA_GRAPHS", False)
    assert decode_path("cuda:0") == "eager"
    monkeypatch.setattr(inference, "CUDA_GRAPHS", True)
    model = tiny_model()  # on the CPU, where CUDA is said to be there: still the eager step, and no CUDA call
    assert generate(model, [1, 2], 20, temperature=0, stop=None) == old_decoder(model, [1, 2], 20, 1, temperature=0)
    assert inference._DECODERS[model].path == "eager"


def test_a_compiled_wrapper_is_unwrapped(monkeypatch):
    from train_gpt2 import CompiledOrEager
    model = tiny_model()
    assert inference.inference_model(CompiledOrEager(model, print)) is model
    assert inference.inference_model(torch.compile(model)) is model
    assert inference.inference_model(model) is model


def test_greedy_check_prints_a_line_per_weights_and_mode(capsys):
    """bench/greedy_check.py, the greedy report's setting step by step, on a 2-layer model: it runs, and greedy
    issues fewer ops a step than top-k, with no read of a device value (a GPU wait) where top-k's CPU sampling
    has some."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import greedy_check
    greedy_check.main(["--tiny", "--device=cpu", "--new_tokens=3"])
    rows = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines()[3:]]
    assert [(r[0].strip(), r[1].strip(), r[2].strip()) for r in rows] == [
        (w, m, "3") for w in ("fp32 under bf16 autocast", "bf16 held") for m in ("greedy", "top-k 50")]
    ops = [float(r[5]) for r in rows]
    assert ops[0] < ops[1] and ops[2] < ops[3] and [r[6].strip() for r in rows][::2] == ["0", "0"]
    assert all(r[7].strip() == "0" for r in rows)  # nothing compiled
