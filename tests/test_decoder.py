"""inference's Engine: continuous batching over a static KV cache of slots kept from call to call, a
request's tokens the same alone and in any company, slots freed and filled step by step, and the
fixed-shape step a CUDA graph replays. No CUDA here: the eager path is the graph's step run op by
op, the arithmetic a graph replays; the capture itself is left to bench/gpu_check.py on a GPU."""

import os
import sys

import pytest
import torch
from conftest import ROOT, tiny_model

import inference
from inference import (
    Engine,
    KVCache,
    Sequences,
    decode_path,
    generate,
    generate_stream,
    sample_next,
)
from train_gpt2 import EOT, GPT, GPTConfig

torch.set_num_threads(1)  # these models are tiny: threads would only contend for the 2 cores


@torch.no_grad()
def old_decoder(model, prompt, new_tokens, num_samples, generator=None, **sampling):
    """generate_stream as it was before the Decoder: a fresh KVCache per layer for every prompt and
    every slide of the window, one GPT.forward a token."""
    idx = torch.tensor([prompt] * num_samples)
    bs = model.config.block_size
    cache = None
    for _ in range(new_tokens):
        if cache is None or cache[0].pos == bs:
            cache = [KVCache(bs) for _ in model.transformer.h]
            logits, _ = model(idx[:, -bs:], cache=cache)
        else:
            logits, _ = model(idx[:, -1:], cache=cache)
        nxt = sample_next(logits[:, -1, : EOT + 1].float(), generator=generator, **sampling)
        idx = torch.cat((idx, nxt[:, None]), dim=1)
    return idx[:, len(prompt) :].tolist()


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize(
    "prompt", [[1, 2, 3], list(range(40, 60))], ids=["short", "longer_than_block"]
)
def test_greedy_equals_generate_and_the_old_decoder_across_the_window_fill(batch, prompt):
    model = tiny_model(block_size=16)
    new = 30  # 3 + 30 > 16: the window fills, then slides (and is recomputed) every token
    expected = model.generate(torch.tensor([prompt] * batch), new, top_k=1)[
        :, len(prompt) :
    ].tolist()
    assert len(set(expected[0])) > 5  # the path really varies, so a stale cache row would show
    assert old_decoder(model, prompt, new, batch, temperature=0) == expected
    assert generate(model, prompt, new, num_samples=batch, temperature=0, stop=None) == expected
    engine = inference._ENGINES[model]
    assert engine.path == "eager" and engine.caches[0].k.shape == (
        batch,
        2,
        16,
        16,
    )  # (slots, heads, block, head)
    # the kept engine again, its cache holding the last call's rows: nothing of them leaks into this
    # call
    assert generate(model, prompt, new, num_samples=batch, temperature=0, stop=None) == expected
    assert inference._ENGINES[model] is engine


def test_seeded_sampling_repeats():
    model = tiny_model()
    a = generate(model, [5, 6], 40, num_samples=3, seed=123, stop=None)
    assert a == generate(model, [5, 6], 40, num_samples=3, seed=123, stop=None)
    assert a != generate(model, [5, 6], 40, num_samples=3, seed=124, stop=None)
    # one request at a time: the eager step's arithmetic, so the same draws as before from the same
    # generator
    assert a == old_decoder(model, [5, 6], 40, 3, generator=torch.Generator().manual_seed(123))


def test_the_cache_is_allocated_once_for_a_slot_count():
    model = tiny_model()
    generate(model, [1, 2], 20, temperature=0)
    engine = inference._ENGINES[model]
    k = engine.caches[0].k
    generate(model, [3], 20, temperature=0)
    assert inference._ENGINES[model] is engine and engine.caches[0].k is k
    generate(
        model, [3], 20, temperature=0, num_samples=2
    )  # another slot count: a new engine, which is kept
    assert (
        inference._ENGINES[model] is not engine
        and inference._ENGINES[model].caches[0].k.size(0) == 2
    )
    model.to(
        torch.float64
    )  # weights somewhere else: a graph captured over the old ones would read freed memory
    generate(model, [3], 5, temperature=0, num_samples=2)
    assert inference._ENGINES[model].caches[0].k.dtype == torch.float64


def test_two_open_streams_each_get_an_engine():
    model = tiny_model()
    first = [t.tolist() for t in generate_stream(model, [1, 2, 3], 20, temperature=0, stop=None)]
    second = [t.tolist() for t in generate_stream(model, [9, 8], 20, top_k=0, seed=5, stop=None)]
    a = generate_stream(model, [1, 2, 3], 20, temperature=0, stop=None)
    b = generate_stream(model, [9, 8], 20, top_k=0, seed=5, stop=None)
    together = [(x.tolist(), y.tolist()) for x, y in zip(a, b)]  # interleaved, token by token
    assert [x for x, _ in together] == first and [y for _, y in together] == second
    a.close()
    b.close()
    assert inference._ENGINES[model].lock.acquire(
        blocking=False
    )  # a closed stream gives its engine back


def collect(engine, requests):
    """Each request's new tokens, a list per sample, stepping the engine until all have ended;
    requests: (step at which it is submitted, Sequences arguments)."""
    made = {}
    seqs = []
    step = 0
    for i, (_, args, kwargs) in enumerate(requests):
        made[i] = []
        seqs.append(Sequences(*args, on_token=lambda t, i=i: made[i].append(t.tolist()), **kwargs))
    while step == 0 or engine.running or engine.waiting or any(not s.ended for s in seqs):
        for (at, _, _), seq in zip(requests, seqs):
            if at == step:
                engine.submit(seq)
        engine.step()
        step += 1
    return [[list(row) for row in zip(*made[i])] for i in range(len(requests))]


@pytest.mark.parametrize("width", [4, 64], ids=["widths_vary", "block_size_wide"])
def test_a_requests_tokens_are_the_same_alone_and_in_any_company(width, monkeypatch):
    """Twelve requests on 8 slots, greedy and seeded, of different prompts and lengths, some sharing
    the start of a prompt, joining while others are mid-way or waiting for a slot, one past the
    window: each gets the tokens it gets alone on the same engine, exactly, and greedy ones
    GPT.generate's. With a WIDTH of 4 the step attends to 4, 8, 12 or 16 positions of every slot, as
    far as the furthest running row: a request alone steps at widths of its own, in company at the
    widths its company sets."""
    monkeypatch.setattr(inference, "WIDTH", width)
    widths = set()
    fixed_step = Engine.fixed_step
    monkeypatch.setattr(
        Engine, "fixed_step", lambda self: widths.add(self.width) or fixed_step(self)
    )
    model = tiny_model(block_size=16)
    requests = []
    for i in range(12):
        prompt = [1 + i, 7, 2 * i + 3][: 1 + i % 3] if i != 5 else list(range(20, 40))
        sampling = dict(temperature=0) if i % 2 else dict(temperature=0.9, top_p=0.9, seed=100 + i)
        requests.append(
            (0 if i < 6 else 3 * i - 12, (prompt, 5 + 3 * i), dict(stop=None, **sampling))
        )
    together = collect(Engine(model, 8), requests)
    for (at, args, kwargs), got in zip(requests, together):
        alone = collect(Engine(model, 8), [(0, args, kwargs)])[0]
        assert got == alone and len(got[0]) == args[1]
        if kwargs.get("temperature") == 0:
            prompt = torch.tensor([args[0]])
            assert got[0] == model.generate(prompt, args[1], top_k=1)[0, prompt.size(1) :].tolist()
    assert len({tuple(t[0]) for t in together}) == 12
    assert widths == ({4, 8, 12, 16} if width == 4 else {16})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_rows_step_is_the_same_at_every_width_that_covers_it(dtype):
    """The bits under the width rule: a row's logits, at heads of GPT-2's width (64), do not change
    when the step attends to more positions than the row has written (masked), whoever sets the
    width."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=256, vocab_size=64, n_layer=2, n_head=2, n_embd=128)
    model = inference.hold_for_inference(GPT(config), getattr(torch, dtype))
    engine = Engine(model, 8)
    at = torch.tensor([3, 40, 63, 64, 100, 130, 200, 255])
    with torch.no_grad():
        for slot, n in enumerate(at.tolist()):
            engine.prefill(torch.randint(0, 64, (1, n)), slot)
        engine.tok.copy_(torch.randint(0, 64, (8, 1)))
        engine.at.copy_(at)
        engine.width = 256
        widest = engine.fixed_step()  # rewrites the same keys and values at each width
        for width in (64, 128, 192):
            engine.width = width
            rows = at < width
            assert torch.equal(engine.fixed_step()[rows], widest[rows])


def test_samples_of_one_prompt_draw_together_from_its_generator():
    model = tiny_model()
    engine = Engine(model, 4)
    a = collect(
        engine,
        [(0, ([5, 6], 30, 3), dict(seed=1, stop=None)), (2, ([9], 10), dict(seed=2, stop=None))],
    )
    assert a[0] == generate(model, [5, 6], 30, num_samples=3, seed=1, stop=None)
    assert len({tuple(row) for row in a[0]}) == 3


def test_an_ended_request_frees_its_slot_for_the_next_step():
    model = tiny_model()
    engine = Engine(model, 2)
    stopped = []
    long = [Sequences([i + 1], 50, stop=None, temperature=0) for i in range(2)]
    short = Sequences(
        [9], 3, stop=None, temperature=0, on_token=lambda t: stopped.append(t.item()) or True
    )
    waiting = Sequences([7], 5, stop=None, temperature=0)
    for seq in long:
        engine.submit(seq)
    engine.step()
    engine.submit(short)
    engine.submit(waiting)
    engine.step()
    assert engine.load() == (2, 2) and not short.slots  # both wait: every slot runs
    long[
        0
    # a client that left: its slot is free at the next step, which prefills the next request
    ].cancel()
    engine.step()
    assert (
        long[0].ended and short.slots == [0] and stopped and short.ended
    )  # on_token ended it at once
    engine.step()
    assert waiting.slots == [0] and engine.load() == (2, 0)


def test_jobs_run_between_steps_and_a_failing_step_ends_its_requests():
    model = tiny_model()
    engine = Engine(model, 2)
    seq = engine.submit(Sequences([1, 2], 100, stop=None, temperature=0))
    engine.step()
    seen = []
    job = engine.call(lambda: seen.append(seq.made) or "scored")
    engine.step()
    assert job.result(timeout=0) == "scored" and seen == [1]  # before this step's token
    errors = []
    seq.on_end = errors.append
    engine.caches[0].k = engine.caches[0].k[:, :, :3]  # a broken cache: the step fails
    with pytest.raises(IndexError):
        engine.step()
    assert seq.ended and isinstance(errors[0], IndexError) and engine.load() == (0, 0)


def test_the_fixed_step_has_no_host_sync_nor_python_branch_on_a_tensor():
    """What a CUDA graph capture forbids, checked without CUDA: the step traces as one graph
    (dynamo's fullgraph breaks at any .item(), bool(tensor) or data-dependent branch), its inputs
    being the tensors tok and at that each step rewrites."""
    model = tiny_model()
    engine = Engine(model, 2)
    with torch.no_grad():
        engine.prefill(torch.tensor([[1, 2, 3]]), 0)
        engine.prefill(torch.tensor([[4, 5]]), 1)
        engine.tok.fill_(4)
        engine.at.copy_(torch.tensor([3, 2]))  # each row at its own position
        torch._dynamo.reset()
        traced = torch.compile(engine.fixed_step, fullgraph=True, backend="eager")()
        engine.caches[0].k[
            0, :, 3
        ].zero_()  # the rows the step writes, so that the second run must write them again
        engine.caches[0].k[1, :, 2].zero_()
        assert torch.equal(traced, engine.fixed_step())
    torch._dynamo.reset()


def test_cuda_graphs_are_chosen_only_where_cuda_is(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [decode_path(d) for d in ("cuda", "cuda:0", "cpu", "mps")] == ["fixed"] * 4
    assert [decode_path(d, shared=False) for d in ("cuda", "cpu")] == ["eager"] * 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [decode_path(d) for d in ("cuda", torch.device("cuda", 1), "cpu", "mps")] == [
        "graph",
        "graph",
        "fixed",
        "fixed",
    ]
    assert decode_path("cuda", shared=False) == "graph"
    monkeypatch.setattr(inference, "CUDA_GRAPHS", False)
    assert decode_path("cuda:0") == "fixed"
    monkeypatch.setattr(inference, "CUDA_GRAPHS", True)
    model = (
        tiny_model()
    )  # on the CPU, where CUDA is said to be there: still the eager step, and no CUDA call
    assert generate(model, [1, 2], 20, temperature=0, stop=None) == old_decoder(
        model, [1, 2], 20, 1, temperature=0
    )
    assert inference._ENGINES[model].path == "eager"
    assert Engine(model, 2).path == "fixed" and Engine(model, 1).path == "eager"


def test_a_compiled_wrapper_is_unwrapped(monkeypatch):
    from train_gpt2 import CompiledOrEager

    model = tiny_model()
    assert inference.inference_model(CompiledOrEager(model, print)) is model
    assert inference.inference_model(torch.compile(model)) is model
    assert inference.inference_model(model) is model


def test_greedy_check_prints_a_line_per_weights_and_mode(capsys):
    """bench/greedy_check.py, the greedy report's setting step by step, on a 2-layer model: it runs,
    and greedy issues fewer ops a step than top-k, with no read of a device value (a GPU wait) where
    top-k's CPU sampling has some."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import greedy_check

    greedy_check.main(["--tiny", "--device=cpu", "--new_tokens=3"])
    rows = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines()[3:]]
    assert [(r[0].strip(), r[1].strip(), r[2].strip()) for r in rows] == [
        (w, m, "3")
        for w in ("fp32 under bf16 autocast", "bf16 held")
        for m in ("greedy", "top-k 50")
    ]
    ops = [float(r[5]) for r in rows]
    assert ops[0] < ops[1] and ops[2] < ops[3] and [r[6].strip() for r in rows][::2] == ["0", "0"]
    assert all(r[7].strip() == "0" for r in rows)  # nothing compiled
