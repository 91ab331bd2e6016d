"""The model against Hugging Face's GPT-2, its initialisation, and its optimizer."""

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import train_gpt2 as tg


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257)
    model = GPT2LMHeadModel(config).eval()
    # HF zero-inits biases and LayerNorms; randomise them so the mapping is tested
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1 if "bias" in name else 1.0)
    return model


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_from_pretrained_matches_hf_logits(hf_model, tmp_path, safe):
    hf_model.save_pretrained(tmp_path, safe_serialization=safe)
    ours = tg.GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(idx).logits
        logits, _ = ours(idx)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)

    padded = tg.GPT.from_pretrained(str(tmp_path), vocab_size=50304).eval()
    assert (
        padded.lm_head.weight.shape == (50304, 64)
        and padded.lm_head.weight is padded.transformer.wte.weight
    )
    with torch.no_grad():
        logits, _ = padded(idx)
    torch.testing.assert_close(logits[..., :50257], expected, atol=1e-5, rtol=0)


def test_from_pretrained_rejects_a_directory_without_weights(tmp_path, hf_model):
    hf_model.config.save_pretrained(tmp_path)
    with pytest.raises(tg.UserError, match="neither model.safetensors nor pytorch_model.bin"):
        tg.GPT.from_pretrained(str(tmp_path))


def test_parameter_names_are_gpt2s():
    model = tg.GPT(tg.GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=100, block_size=16))
    names = set(model.state_dict())
    for name in [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.1.ln_1.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_proj.bias",
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.0.mlp.c_proj.weight",
        "transformer.ln_f.bias",
        "lm_head.weight",
    ]:
        assert name in names


def test_init_is_gpt2s_and_weights_are_tied():
    torch.manual_seed(0)
    n_layer = 8
    model = tg.GPT(
        tg.GPTConfig(n_layer=n_layer, n_head=4, n_embd=256, vocab_size=5000, block_size=256)
    )
    assert model.lm_head.weight is model.transformer.wte.weight
    block = model.transformer.h[3]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.02)
    residual_std = 0.02 / math.sqrt(2 * n_layer)
    for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
        assert w.std().item() == pytest.approx(residual_std, rel=0.03)
    biases = [
        m.bias for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None
    ]
    assert all(b.abs().max() == 0 for b in biases)


def test_gpt2_presets_have_the_published_sizes():
    sizes = {"gpt2": 124.4e6, "gpt2-medium": 354.8e6, "gpt2-large": 774.0e6, "gpt2-xl": 1557.6e6}
    for name, params in sizes.items():
        c = tg.GPTConfig(vocab_size=50257, block_size=1024, **tg.SETTING_PRESETS[name])
        # parameters of wte + wpe + blocks + ln_f, counted without instantiating the model
        d, L = c.n_embd, c.n_layer
        n = c.vocab_size * d + c.block_size * d + L * (12 * d * d + 13 * d) + 2 * d
        assert n == pytest.approx(params, rel=1e-3), name
    small = tg.GPT(tg.GPTConfig(vocab_size=50257, block_size=1024, **tg.SETTING_PRESETS["gpt2"]))
    assert sum(p.numel() for p in small.parameters()) == 124_439_808


def test_optimizer_decays_only_matrices_and_is_fused_on_cpu():
    model = tg.GPT(tg.GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=100, block_size=16))
    opt = tg.build_optimizer(model, tg.parse_args(["--weight_decay=0.1", "--max_lr=6e-4"]), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(
        p.dim() < 2 for p in no_decay["params"]
    )
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decay["betas"] == (0.9, 0.95) and decay["eps"] == 1e-8
    assert opt.defaults["fused"] is True
    # and the fused CPU kernel really runs
    model(torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8)))[1].backward()
    opt.step()
