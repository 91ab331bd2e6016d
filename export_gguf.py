"""Export a model to GGUF, the one file llama.cpp, llama-server, Ollama and LM Studio load.

    python export_gguf.py --model=log/model_019073.pt --out=gpt2.gguf                 # f16
    python export_gguf.py --model=log/model_019073.pt --out=gpt2-q8.gguf --outtype=q8_0

writes one file for llama.cpp's `gpt2` architecture, with no conversion step in between: the
weights under llama.cpp's tensor names, the hyperparameters its loader reads, and GPT-2's tokenizer
(the `gpt2` BPE with the `gpt-2` pre-tokenizer, its tokens, their types and merges, and the bos, eos
and eot ids). Only the real tokens are written, not the padded vocabulary's spare rows. lm_head is
tied to the token embedding, so, as in GPT-2's own GGUFs, there is no output.weight: llama.cpp
reuses token_embd.

A chat model (--preset=sft) keeps its 4 template tokens as control tokens, <|end|> its end-of-turn
and end-of-generation token, so that llama.cpp ends a reply there; tokenizer.chat_template holds
chat.JINJA (for llama-server --jinja), and FILE.Modelfile, written beside FILE.gguf, imports it
into Ollama: ollama create NAME -f FILE.Modelfile.

The file is written with llama.cpp's own gguf package (pip install gguf), q8_0 through its
gguf.quants, as llama.cpp's convert_hf_to_gguf.py writes it. docs/gguf.md has the details.
"""
import argparse
import json
import os
import sys

import chat
from export_hf import GPT2_VOCAB, check_gpt2_format, tokenizer_files
from train_gpt2 import CHAT_TOKENS, EOT, UserError, atomic_write, load_model, missing_parent

# --outtype -> (the weight matrices' type, the file type llama.cpp reports), by gguf's names. f16 is
# the default, as in llama.cpp's converter for float32 weights: half of f32's size, and on a CPU it
# decodes faster than f32 with next to no change in the logits.
OUTTYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"),
            "bf16": ("BF16", "MOSTLY_BF16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which our model uses
LAYER_TENSORS = {  # a block's modules -> llama.cpp's tensors, by gguf.MODEL_TENSOR's names
    "ln_1": "ATTN_NORM", "attn.c_attn": "ATTN_QKV", "attn.c_proj": "ATTN_OUT",
    "ln_2": "FFN_NORM", "mlp.c_fc": "FFN_UP", "mlp.c_proj": "FFN_DOWN"}
OLLAMA_TEMPLATE = (  # chat.prompt's format in Ollama's Go-template syntax
    "<|endoftext|>{{ range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{ end }}<|assistant|>")


def modelfile_path(out):
    """Where a chat model's Ollama Modelfile goes: beside out, named after it (chat.Modelfile)."""
    return os.path.splitext(out)[0] + ".Modelfile"


def check_out(out, outtype):
    """Refuses an unknown --outtype and an --out that exists or cannot be created."""
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype={outtype} is not one of {', '.join(OUTTYPES)}")
    if not out:
        raise UserError("--out is empty; name a new .gguf file to write")
    if os.path.exists(out):
        raise UserError(f"--out={out} exists; delete it or name another file")
    if missing_parent(out):
        raise UserError(f"--out={out}: {missing_parent(out)}; name a file in an existing directory")


def gguf_package():
    try:
        import gguf
    except ImportError:
        raise UserError("the GGUF writer is llama.cpp's gguf package: pip install gguf") from None
    return gguf


def gpt2_tokenizer():
    """(tokens, merges) of GPT-2's BPE as its own files hold them, the form llama.cpp's gpt2
    vocabulary reads: each token's bytes as GPT-2's printable characters (a space is "Ġ"), in id
    order, and the merges in rank order."""
    vocab_bpe, encoder_json = tokenizer_files()
    with open(encoder_json, encoding="utf-8") as f:
        encoder = json.load(f)
    tokens = sorted(encoder, key=encoder.get)
    assert [encoder[t] for t in tokens] == list(range(GPT2_VOCAB)), "not GPT-2's encoder.json"
    with open(vocab_bpe, encoding="utf-8") as f:
        merges = [line for line in f.read().split("\n")[1:] if line]  # after its #version line
    return tokens, merges


def tensors(gguf, model, vocab):
    """(llama.cpp's name, the float32 numpy array) of every weight the gpt2 architecture reads."""
    t = model.transformer

    def weight_and_bias(kind, module, bid=None):
        name = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)].format(bid=bid)
        return [(f"{name}.weight", module.weight), (f"{name}.bias", module.bias)]

    found = [("token_embd.weight", t.wte.weight[:vocab]), ("position_embd.weight", t.wpe.weight)]
    for i, block in enumerate(t.h):
        for ours, kind in LAYER_TENSORS.items():
            found += weight_and_bias(kind, block.get_submodule(ours), i)
    found += weight_and_bias("OUTPUT_NORM", t.ln_f)
    return [(name, w.detach().float().cpu().numpy()) for name, w in found]


def tensor_type(gguf, name, array, outtype):
    """The type a tensor is stored in, as llama.cpp's converter chooses it: norms, biases and the
    position embedding in F32 (llama.cpp adds them in float32), the weight matrices in outtype."""
    if array.ndim == 1 or name.startswith("position_embd"):
        return gguf.GGMLQuantizationType.F32
    return getattr(gguf.GGMLQuantizationType, OUTTYPES[outtype][0])


def build_writer(model, outtype, name):
    """(a gguf.GGUFWriter holding the model's metadata, tokenizer and tensors, the names of the
    tensors that q8_0 could not take and that are stored in f16 instead)."""
    gguf = gguf_package()
    c = model.config
    vocab = c.real_tokens  # GPT-2's 50257 tokens, and a chat model's template tokens after them
    check_gpt2_format(c, "llama.cpp's gpt2 architecture needs")
    tokens, merges = gpt2_tokenizer()

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    writer.add_name(name)
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.n_embd)
    writer.add_feed_forward_length(4 * c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_head_count(c.n_head)
    writer.add_layer_norm_eps(LAYER_NORM_EPS)
    writer.add_file_type(getattr(gguf.LlamaFileType, OUTTYPES[outtype][1]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    specials = {"<|endoftext|>": EOT, **(CHAT_TOKENS if c.chat else {})}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's split of text into words, before the merges
    writer.add_token_list(tokens[:EOT] + list(specials))
    writer.add_token_types([gguf.TokenType.NORMAL] * EOT
                           + [gguf.TokenType.CONTROL] * len(specials))
    writer.add_token_merges(merges)
    end = CHAT_TOKENS["<|end|>"] if c.chat else EOT  # where a reply, or a document, ends
    writer.add_bos_token_id(EOT)
    writer.add_eos_token_id(end)
    writer.add_eot_token_id(end)
    writer.add_add_bos_token(False)  # as sample.py and GPT-2's tokenizer: a prompt is as it is
    if c.chat:
        writer.add_chat_template(chat.JINJA)

    in_f16 = []
    for tensor_name, array in tensors(gguf, model, vocab):
        qtype = tensor_type(gguf, tensor_name, array, outtype)
        try:
            data = gguf.quants.quantize(array, qtype)
        except gguf.QuantError:  # q8_0 takes rows of a multiple of 32: f16, as llama.cpp's does
            qtype = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(array, qtype)
            in_f16.append(tensor_name)
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    return writer, in_f16


def ollama_modelfile(gguf_name, block_size):
    """An Ollama Modelfile for the chat model in gguf_name (beside it): chat.prompt's template, the
    stops of chat.STOP, and no more context than the model has positions for."""
    return (f"FROM ./{gguf_name}\n"
            f'TEMPLATE """{OLLAMA_TEMPLATE}"""\n'
            f'PARAMETER stop "<|end|>"\n'
            f'PARAMETER stop "<|endoftext|>"\n'
            f"PARAMETER num_ctx {block_size}\n")


def export_gguf(model, out, outtype="f16"):
    """Writes model to the GGUF file out, and a chat model's Modelfile beside it, each whole or not
    at all (through train_gpt2.atomic_write's temp file); returns (the Modelfile's path or None,
    the tensors stored in f16 because q8_0 could not take them)."""
    check_out(out, outtype)
    modelfile = modelfile_path(out) if model.config.chat else None
    if modelfile and os.path.exists(modelfile):
        raise UserError(f"{modelfile}, the Modelfile a chat model's export writes beside --out, "
                        f"exists; delete it or name another --out")
    writer, in_f16 = build_writer(model, outtype, os.path.splitext(os.path.basename(out))[0])
    try:
        if modelfile:
            with atomic_write(modelfile) as f:
                f.write(ollama_modelfile(os.path.basename(out), model.config.block_size).encode())
        try:
            with atomic_write(out) as f:  # gguf's writer opens its file by name: the temp file's
                try:
                    writer.write_header_to_file(path=f.name)
                    writer.write_kv_data_to_file()
                    writer.write_tensors_to_file()
                finally:
                    writer.close()
        except BaseException:
            if modelfile:
                os.remove(modelfile)
            raise
    except OSError as e:  # a read-only or full disk
        raise UserError(f"cannot write --out={out} ({e.strerror}); name a writable place with "
                        f"room for it") from None
    return modelfile, in_f16


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True,
                   help="checkpoint file (model_NNNNNN.pt), run directory (its newest checkpoint), "
                        "HF directory or hub name")
    p.add_argument("--out", required=True, help="new .gguf file to write")
    p.add_argument("--outtype", default="f16",
                   help=f"the weight matrices' type: {', '.join(OUTTYPES)} (norms and biases are "
                        f"f32)")
    args = p.parse_args(argv)
    try:
        check_out(args.out, args.outtype)  # now, rather than after loading the model
        gguf_package()
        modelfile, in_f16 = export_gguf(load_model(args.model), args.out, args.outtype)
    except UserError as e:
        sys.exit(f"error: {e}")
    note = f" ({', '.join(in_f16)} in f16: q8_0 takes rows of a multiple of 32)" if in_f16 else ""
    print(f"wrote {args.out}{note}")
    if modelfile:
        print(f"wrote {modelfile}: ollama create NAME -f {modelfile}")


if __name__ == "__main__":
    main()
