"""LinearCrossEntropy, the chunked loss GPT.forward trains with, against plain F.cross_entropy on
full logits."""

import pytest
import torch
import torch.nn.functional as F

import train_gpt2
from train_gpt2 import GPT, GPTConfig, LinearCrossEntropy


def reference(x, weight, targets, dtype):
    """The textbook loss: all logits at once, upcast to fp32, then F.cross_entropy."""
    logits = (x.to(dtype) @ weight.to(dtype).t()).float()
    return F.cross_entropy(logits, targets)


def loss_and_grads(fn, x, weight, targets, dtype, scale):
    """The loss and its x and weight gradients after backward of scale * loss (as of loss /
    grad_accum)."""
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(x, weight, targets, dtype)
    (scale * loss).backward()
    return loss.detach(), x.grad, weight.grad


CHUNK = train_gpt2.LOSS_CHUNK_ROWS


# fewer rows than, exactly, and not a multiple of a chunk
@pytest.mark.parametrize("rows", [1, CHUNK - 1, CHUNK, 2 * CHUNK + 188])
def test_fp32_matches_plain_cross_entropy(rows):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 48, generator=gen)
    weight = torch.randn(1000, 48, generator=gen) * 0.3
    targets = torch.randint(0, 1000, (rows,), generator=gen)
    got = loss_and_grads(LinearCrossEntropy.apply, x, weight, targets, torch.float32, 3.0)
    want = loss_and_grads(reference, x, weight, targets, torch.float32, 3.0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert got[1].dtype == got[2].dtype == torch.float32


def test_bf16_matches_plain_cross_entropy_and_gradients_stay_fp32():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2 * CHUNK + 88, 64, generator=gen)  # two whole chunks and a part
    weight = torch.randn(3000, 64, generator=gen) * 0.1
    targets = torch.randint(0, 3000, (x.size(0),), generator=gen)
    # 0.5 as with 2 micro-steps: a power of two scales bf16 exactly, whether before or after
    # rounding
    loss, gx, gw = loss_and_grads(LinearCrossEntropy.apply, x, weight, targets, torch.bfloat16, 0.5)
    ref_loss, ref_gx, ref_gw = loss_and_grads(reference, x, weight, targets, torch.bfloat16, 0.5)
    exact = loss_and_grads(reference, x, weight, targets, torch.float32, 0.5)
    assert gx.dtype == gw.dtype == torch.float32  # the parameters' and activations' own dtype
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    for g, r, e in ((gx, ref_gx, exact[1]), (gw, ref_gw, exact[2])):
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2 * r.abs().max().item())
        # fp32 summing of the chunks' weight gradient: no further from the fp32 truth than the plain
        # loss
        assert (g - e).norm() <= 1.05 * (r - e).norm()


def test_ignored_targets_take_no_loss_and_their_rows_no_gradient():
    """SFT's masked targets (IGNORE), which the eager loss skips before any logit: F.cross_entropy's
    ignore_index."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2 * CHUNK + 88, 48, generator=gen)
    weight = torch.randn(1000, 48, generator=gen) * 0.3
    targets = torch.randint(0, 1000, (x.size(0),), generator=gen)
    targets[torch.rand(x.size(0), generator=gen) < 0.7] = train_gpt2.IGNORE
    got = loss_and_grads(LinearCrossEntropy.apply, x, weight, targets, torch.float32, 3.0)
    want = loss_and_grads(reference, x, weight, targets, torch.float32, 3.0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert not got[1][targets < 0].any() and got[1][targets >= 0].abs().min() > 0


@pytest.mark.parametrize("rows", [CHUNK - 1, 2 * CHUNK + 188])
def test_padded_rows_take_no_probability_and_get_no_gradient(rows):
    """tokens < weight rows: the loss and gradients of F.cross_entropy over the real rows alone, and
    the padded rows' gradient exactly zero, even with padded rows whose logits would win every
    row."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 48, generator=gen)
    weight = torch.randn(1024, 48, generator=gen) * 0.3
    # logit 0 would already take probability; these would take nearly all of it
    weight[1000:] = x.mean(0) * 50
    targets = torch.randint(0, 1000, (rows,), generator=gen)
    loss, gx, gw = loss_and_grads(
        lambda *a: LinearCrossEntropy.apply(*a, 1000), x, weight, targets, torch.float32, 3.0
    )
    ref_loss, ref_gx, ref_gw = loss_and_grads(
        lambda x, w, t, d: reference(x, w[:1000], t, d), x, weight, targets, torch.float32, 3.0
    )
    for g, r in ((loss, ref_loss), (gx, ref_gx), (gw[:1000], ref_gw[:1000])):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    assert torch.equal(gw[1000:], torch.zeros_like(gw[1000:]))


def test_no_grad_gives_the_loss_only():
    x, weight = torch.randn(300, 16, requires_grad=True), torch.randn(100, 16, requires_grad=True)
    targets = torch.randint(0, 100, (300,))
    with torch.no_grad():
        loss = LinearCrossEntropy.apply(x, weight, targets, torch.float32)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference(x.detach(), weight.detach(), targets, torch.float32))


def tiny_pair():
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=32)
    model, ref = GPT(config), GPT(config)
    ref.load_state_dict(model.state_dict())
    return model, ref


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpt_training_gradients_match_plain_loss_through_the_tied_weight(dtype):
    model, ref = tiny_pair()
    idx, targets = torch.randint(0, 512, (4, 40)), torch.randint(0, 512, (4, 40))
    autocast = train_gpt2.autocast_context("cpu", dtype)
    with autocast:
        logits, loss = model(idx, targets)
        ref_logits, _ = ref(idx)
        ref_loss = F.cross_entropy(ref_logits.float().flatten(0, 1), targets.flatten())
    assert logits is None  # documented: with targets only the loss comes back
    loss.backward()
    ref_loss.backward()
    assert model.lm_head.weight is model.transformer.wte.weight
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(loss, ref_loss, **tol)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=lambda m: f"{name}: {m}")
    # the tied weight's gradient holds both uses: the lm_head's and the embedding lookup's rows
    assert model.transformer.wte.weight.grad[idx.flatten()].abs().sum() > 0


def test_gpt_logits_without_targets_are_unchanged():
    model, _ = tiny_pair()
    idx = torch.randint(0, 512, (2, 10))
    logits, loss = model(idx)
    assert loss is None and logits.shape == (2, 10, 512)
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(10))
    for block in model.transformer.h:
        x = block(x)
    torch.testing.assert_close(logits, model.transformer.ln_f(x) @ model.lm_head.weight.t())
