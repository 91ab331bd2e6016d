"""LoRA (--lora_rank): step 0 is the base model's bit for bit, a step changes the adapters alone, a
run resumes bit-identically after SIGKILL and on 2 gloo ranks gives 1 process's losses, a checkpoint
holds the adapters and the base's fingerprint (a changed base is refused), and both exports (merged,
and peft's adapter) give our logits in transformers and peft."""
import dataclasses
import json
import os
import shutil
import signal
import sys

import pytest
import torch
from conftest import ROOT, TINY, TORCHRUN, hf_gpt2, read_log, run, train, train_losses, write_shards

import export_hf
import train_gpt2 as tg

FAULTY = os.path.join(ROOT, "tests", "faulty_run.py")
# TINY without the model's shape, which init_from sets
SHAPE = ("--n_layer", "--n_head", "--n_embd", "--vocab_size", "--block_size")
RUN = [a for a in TINY if a.split("=")[0] not in SHAPE]
LORA = ["--lora_rank=4", "--max_lr=3e-3", "--min_lr=3e-3", "--dropout=0.1", "--block_size=64"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random GPT-2 saved by transformers (the base), shards, and a finished 8-step LoRA run on it
    (dropout on the base and the adapters, 2 micro-steps a step, checkpoints at 4 and 8)."""
    root = tmp_path_factory.mktemp("lora")
    hf_gpt2(str(root / "hf"))
    write_shards(str(root / "data"), [4000, 20000], vocab=500)
    args = [*RUN, *LORA, f"--init_from={root / 'hf'}", f"--data_dir={root / 'data'}"]
    r = train([*args, f"--log_dir={root / 'straight'}"], timeout=300)
    assert r.returncode == 0, r.stderr
    return root, args


def base_and_batch(root, chat=False):
    model = tg.GPT.from_pretrained(str(root / "hf"), vocab_size=50304)
    model.config.chat = chat
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (2, 32), generator=gen)
    y = torch.randint(0, 50257, (2, 32), generator=gen)
    return model, x, y


def settings(**changes):
    return dataclasses.asdict(tg.Settings(lora_rank=4, **changes))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_step_0_is_the_base_and_a_step_changes_the_adapters_alone(setup, dtype):
    root, _ = setup
    model, x, y = base_and_batch(root)
    autocast = tg.autocast_context("cpu", dtype)
    torch.manual_seed(0)
    with autocast:
        base_loss = model.train()(x, y)[1]
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tg.apply_lora(model, settings())
    if dtype == "bfloat16":  # as build_model holds them: the blocks' matrices in bf16
        tg.hold_base_in_bf16(model)
        assert model.transformer.h[0].mlp.c_fc.weight.dtype == torch.bfloat16
    torch.manual_seed(0)
    with autocast:
        loss = model(x, y)[1]
    assert torch.equal(loss, base_loss)  # bit for bit, dropout on the adapters included
    optimizer = tg.build_optimizer(model, tg.Settings(lora_rank=4, max_lr=1e-2), "cpu")
    for _ in range(2):  # B moves at the first step, A from the second
        optimizer.zero_grad()
        with autocast:
            model(x, y)[1].backward()
        optimizer.step()
    after = model.state_dict()
    adapters = {k for k in after if ".lora_" in k}
    assert len(adapters) == 2 * 4 * 2  # A and B on 4 weights in 2 layers
    assert set(after) - adapters == set(base)
    for k in base:
        assert torch.equal(after[k], base[k].to(after[k].dtype)), k  # the base's bytes
    assert all(after[k].abs().sum() > 0 for k in adapters if "lora_B" in k)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == adapters
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trained)


def test_a_chat_run_trains_the_template_rows_too(setup):
    root, _ = setup
    model, x, y = base_and_batch(root, chat=True)
    y[:, ::3] = 50260  # <|end|>, a row the base never trained
    base = model.lm_head.weight.detach().clone()
    tg.apply_lora(model, settings(chat=True))
    optimizer = tg.build_optimizer(model, tg.Settings(lora_rank=4, max_lr=1e-2), "cpu")
    model(x, y)[1].backward()
    assert model.lm_head.weight.grad is None  # frozen: no (vocab, n_embd) gradient
    assert model.chat_delta.grad.shape == (4, 40) and model.chat_delta.grad[3].abs().sum() > 0
    optimizer.step()
    assert torch.equal(model.lm_head.weight, base)
    model.eval()
    with torch.no_grad():
        before = model(x)[0]
        tg.merge_lora(model)
        merged = model(x)[0]
    assert model.chat_delta is None and not any(".lora_" in k for k in model.state_dict())
    assert not torch.equal(model.lm_head.weight[50260], base[50260])
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=0)


def test_the_checkpoint_holds_the_adapters_and_the_base_it_needs(setup):
    root, _ = setup
    ckpt = tg.load_checkpoint(str(root / "straight" / "model_000008.pt"))
    assert set(ckpt["model"]) == {f"transformer.h.{i}.{p}.lora_{m}" for i in range(2)
                                  for p in tg.LORA_PATHS.values() for m in "AB"}
    model = tg.GPT(tg.model_config(ckpt["config"]))  # block_size 64: cropped as the run did
    tg.load_pretrained(model, str(root / "hf"), lambda line: None)
    want = {"init_from": str(root / "hf"), "sha256": tg.base_fingerprint(model)}
    assert ckpt["lora_base"] == want
    assert os.path.getsize(root / "straight" / "model_000008.pt") < 200_000  # the base is 13 MB
    record, _ = read_log(str(root / "straight"))
    assert record["settings"]["lora_rank"] == 4


def test_step_0_val_loss_is_the_base_models(setup, tmp_path):
    root, args = setup
    base_args = [a for a in args if not a.startswith("--lora_rank")]
    r = train([*base_args, "--max_steps=0", f"--log_dir={tmp_path}"], timeout=300)
    assert r.returncode == 0, r.stderr
    assert train_losses(str(tmp_path), "val")[0] == train_losses(str(root / "straight"), "val")[0]


def test_sigkill_then_resume_gives_the_same_losses(setup, tmp_path):
    root, args = setup
    args = [*args, f"--log_dir={tmp_path}", "--resume=auto"]
    r = run([sys.executable, FAULTY, *args], env={"FAULT_AT": "train-batch@13"},  # at step 6
            timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert [n for n in sorted(os.listdir(tmp_path)) if n.endswith(".pt")] == ["model_000004.pt"]
    r = train(args, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "at step 4" in r.stdout
    assert train_losses(str(tmp_path)) == train_losses(str(root / "straight"))  # bit for bit


def test_two_gloo_ranks_with_recompute_give_one_process_losses(setup, tmp_path):
    root, args = setup
    args = [*args, "--dropout=0.0", "--lora_dropout=0.0", "--max_steps=4"]  # ranks draw other masks
    single = train([*args, f"--log_dir={tmp_path / 'single'}"], timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = run([*TORCHRUN, "--nproc_per_node=2",
               os.path.join(ROOT, "train_gpt2.py"), *args, "--recompute=True",
               f"--log_dir={tmp_path / 'ddp'}"], timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "world size 2, grad accum steps 1" in ddp.stdout
    a, b = train_losses(str(tmp_path / "single")), train_losses(str(tmp_path / "ddp"))
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    assert all(abs(a[s] - b[s]) <= 1e-5 for s in a), (a, b)


def test_a_changed_base_is_refused(setup, tmp_path):
    root, args = setup
    changed = tmp_path / "hf"
    shutil.copytree(root / "hf", changed)
    hf = hf_gpt2(str(changed), seed=1)  # another base of the same shape, in the same place
    assert hf.config.n_embd == 40
    log_dir = tmp_path / "log"
    os.makedirs(log_dir)
    ckpt = torch.load(root / "straight" / "model_000004.pt", weights_only=True)
    ckpt["lora_base"]["init_from"] = str(changed)
    torch.save(ckpt, log_dir / "model_000004.pt")
    want = (f"{log_dir / 'model_000004.pt'}: its adapters were trained on the base {changed} of "
            f"sha256 {ckpt['lora_base']['sha256'][:16]}..., which is now ")
    r = train([*args, f"--log_dir={log_dir}", "--resume=auto"], timeout=300)
    assert r.returncode == 1 and r.stderr.startswith(f"error: {want}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(tg.UserError, match="its adapters were trained on the base"):
        tg.load_model(str(log_dir / "model_000004.pt"))


def test_exports_give_our_logits_in_transformers_and_peft(setup, tmp_path, monkeypatch):
    root, _ = setup
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import peft
    from transformers import GPT2LMHeadModel
    run_dir = str(root / "straight")
    export_hf.main([f"--model={run_dir}", f"--out={tmp_path / 'merged'}"])
    export_hf.main([f"--model={run_dir}", "--adapter", f"--out={tmp_path / 'adapter'}"])
    config = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] and config["r"] == 4
    ours = tg.load_model(run_dir)  # merged
    merged = GPT2LMHeadModel.from_pretrained(str(tmp_path / "merged")).eval()
    adapted = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(root / "hf")),
                                             str(tmp_path / "adapter")).eval()
    assert adapted.peft_config["default"].lora_alpha == 16.0
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = ours(idx)[0][..., :50257]
        base = GPT2LMHeadModel.from_pretrained(str(root / "hf")).eval()(idx).logits
        assert (mine - base).abs().max() > 1e-3  # the adapters changed something
        torch.testing.assert_close(merged(idx).logits, mine, atol=1e-5, rtol=0)
        torch.testing.assert_close(adapted(idx).logits, mine, atol=1e-5, rtol=0)


@pytest.mark.parametrize("args, message", [
    (["--lora_rank=8"],
     "--lora_rank=8 trains adapters beside a pretrained model's frozen weights; name that model "
     "with --init_from (gpt2, a Hugging Face directory or a checkpoint)"),
    (["--lora_rank=8", "--init_from=gpt2", "--lora_targets=c_attn,wte"],
     "--lora_targets=c_attn,wte: expected a comma list of some of c_attn, attn.c_proj, c_fc, "
     "mlp.c_proj"),
    (["--lora_rank=8", "--init_from=gpt2", "--optimizer=muon"],
     "--optimizer=muon does not go with --lora_rank=8: Muon orthogonalizes each matrix's update, "
     "and an adapter's update B A is a product whose factors it would orthogonalize apart; use "
     "--optimizer=adamw"),
    (["--lora_rank=8", "--init_from=gpt2", "--fsdp=True"],
     "--fsdp=True does not go with --lora_rank=8: sharding would save little, as a LoRA run holds "
     "2 bytes a frozen weight (gpt2-xl: 3.1 GB, which one GPU holds) and trains a fraction of a "
     "percent; use DDP (--fsdp=False)"),
    (["--lora_dropout=1.0"], "--lora_dropout=1.0: must be in [0, 1)"),
    (["--lora_alpha=0"], "--lora_alpha=0.0: must be positive")])
def test_settings_that_cannot_go_with_lora_are_refused(setup, args, message):
    root, _ = setup
    args = [a.replace("--init_from=gpt2", f"--init_from={root / 'hf'}") for a in args]
    with pytest.raises(tg.UserError) as e:
        tg.parse_args(args)
    assert str(e.value) == message


def test_presets_take_loras_learning_rate(setup):
    hf = [f"--init_from={setup[0] / 'hf'}", "--T=32"]
    assert tg.parse_args(["--preset=lora", *hf]).max_lr == tg.LORA_LR
    for preset in ("finetune", "sft"):
        cfg = tg.parse_args([f"--preset={preset}", *hf, "--lora_rank=16"])
        assert cfg.max_lr == cfg.min_lr == tg.LORA_LR
        assert tg.parse_args([f"--preset={preset}", *hf]).max_lr == 3e-5
    assert tg.parse_args(["--preset=sft", *hf, "--lora_rank=16", "--max_lr=1e-4"]).max_lr == 1e-4


def test_adapter_export_refusals(setup, tmp_path):
    root, _ = setup
    full = str(root / "full.pt")
    ckpt = tg.load_checkpoint(str(root / "straight" / "model_000008.pt"))
    torch.save({**ckpt, "config": {**ckpt["config"], "lora_rank": 0}}, full)
    with pytest.raises(SystemExit) as e:
        export_hf.main([f"--model={full}", "--adapter", f"--out={tmp_path / 'a'}"])
    assert str(e.value) == (f"error: --model={full} was trained without adapters (--lora_rank=0), "
                            f"so it has none to export; drop --adapter to export the whole model")
    chat = str(root / "chat.pt")
    torch.save({**ckpt, "config": {**ckpt["config"], "chat": True}}, chat)
    with pytest.raises(SystemExit) as e:
        export_hf.main([f"--model={chat}", "--adapter", f"--out={tmp_path / 'b'}"])
    assert "also trains the chat template's 4 token rows" in str(e.value)
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_the_bench_runs():
    r = run([sys.executable, os.path.join(ROOT, "bench", "lora.py"), "--dry-run"], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| LoRA r=8 | " in r.stdout and "| full | " in r.stdout
