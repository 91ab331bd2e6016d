"""Sample from a train_gpt2.py checkpoint, a Hugging Face directory or a hub name.

    python sample.py --model=log/model_019073.pt --prompt="Hello, I'm a language model,"
    python sample.py --model=hf_out --num_samples=4 --temperature=0.8 --top_p=0.95 --seed=1
    python sample.py --model=log                  # a run directory: its newest readable checkpoint
    python sample.py --model=log --prompt=""      # unconditioned: starts at <|endoftext|>
    python sample.py --model=log --prompt=FILE:prompt.txt     # the prompt is the file's text
    python sample.py --model=log_sft --chat --system="Be brief."   # a chat model (--preset=sft)

One sample streams token by token; several are printed in turn once all are done. Each stops at
<|endoftext|> or after max_new_tokens. --chat reads a message a line and streams the reply, which
ends at <|end|>; the next message carries the whole conversation. /clear starts over; /quit, Ctrl-D
or Ctrl-C ends it.
"""
import argparse
import math
import sys

import torch

from inference import (
    SAMPLING,
    encode,
    generate,
    load_for_inference,
    not_chat,
    seed_ok,
    stream_reply,
    stream_text,
)
from train_gpt2 import DTYPES, EOT, UserError, get_tokenizer, pick_device, resolve_dtype


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True,
                   help="checkpoint file (model_NNNNNN.pt), run directory (its newest), "
                        "HF directory or hub name")
    p.add_argument("--prompt", default="Hello, I'm a language model,",
                   help='text to continue ("" for none; FILE:path reads it from a file)')
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=SAMPLING["temperature"], help="0 is greedy")
    p.add_argument("--top_k", type=int, default=SAMPLING["top_k"], help="0 keeps every token")
    p.add_argument("--top_p", type=float, default=SAMPLING["top_p"],
                   help="nucleus: the fewest tokens holding this probability")
    p.add_argument("--seed", type=int, default=None, help="makes the samples repeatable")
    p.add_argument("--device", default="auto",
                   help="auto picks cuda, then mps, then cpu; or name one")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="the weights' dtype; auto: bfloat16, or float16 on a GPU without native "
                        "bf16 (docs/precision.md)")
    p.add_argument("--chat", action="store_true",
                   help="talk to a chat model: a message a line, replies stream")
    p.add_argument("--system", default="",
                   help="--chat: a system message that starts the conversation")
    args = p.parse_args(argv)
    if args.chat and args.num_samples != 1:
        sys.exit(f"error: --num_samples={args.num_samples} with --chat; "
                 f"a conversation has one reply a turn")
    checks = (("num_samples", args.num_samples >= 1, "1 or more"),
              ("max_new_tokens", args.max_new_tokens >= 1, "1 or more"),
              ("temperature", 0 <= args.temperature < math.inf, "0 (greedy) or more, e.g. 0.8"),
              ("top_k", args.top_k >= 0, "0 (every token) or more, e.g. 50"),
              ("top_p", 0 < args.top_p <= 1, "above 0 and at most 1, e.g. 0.95"),
              ("seed", args.seed is None or seed_ok(args.seed), "a 64-bit integer"))
    for name, ok, want in checks:
        if not ok:  # written so that nan fails too
            sys.exit(f"error: --{name}={getattr(args, name)} is out of range; "
                     f"--{name} must be {want}")
    # FILE:path is nanoGPT's convention, for prompts too long or odd for a shell
    if args.prompt.startswith("FILE:"):
        path = args.prompt[len("FILE:"):]
        try:
            with open(path, encoding="utf-8") as f:
                args.prompt = f.read()
        except OSError as e:
            sys.exit(f"error: --prompt=FILE:{path}: cannot read the prompt file ({e.strerror})")
        except UnicodeDecodeError:
            sys.exit(f"error: --prompt=FILE:{path}: not UTF-8 text; save the prompt as UTF-8")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        dtype = resolve_dtype(args.dtype, torch.device(device).type, None, job="decode")
        model = load_for_inference(args.model, device, dtype)
        sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed)
        if args.chat:
            refusal = not_chat(model, args.model)
            if refusal:
                raise UserError(refusal)
            converse(model, args.system, args.max_new_tokens, sampling)
            return
        enc = get_tokenizer()
        prompt = encode(model, args.prompt) or [EOT]
        if args.num_samples == 1:
            stream(model, enc, prompt, args.max_new_tokens, sampling)
        else:
            samples = generate(model, prompt, args.max_new_tokens, num_samples=args.num_samples,
                               **sampling)
            for i, tokens in enumerate(samples):
                print(f"--- sample {i}\n{enc.decode(prompt + tokens)}")
    except UserError as e:
        sys.exit(f"error: {e}")


def stream(model, enc, prompt, max_new_tokens, sampling):
    """Prints each token as it comes; a character split across tokens waits for its last byte."""
    print(enc.decode(prompt), end="", flush=True)
    for text, _ in stream_text(model, prompt, max_new_tokens, **sampling):
        print(text, end="", flush=True)
    print()


def converse(model, system, max_new_tokens, sampling):
    """The terminal chat: reads a message a line from stdin, streams the reply, keeps the
    conversation. A seed makes the whole conversation repeatable: each reply draws from the
    generator the earlier ones left."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    if sampling["seed"] is not None:
        generator = torch.Generator(model.lm_head.weight.device).manual_seed(sampling["seed"])
        sampling = {**sampling, "seed": None, "generator": generator}
    print("A message a line; /clear starts over, /quit or Ctrl-D ends.", file=sys.stderr)
    try:
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                print()
                return
            if line in ("/quit", "/exit"):
                return
            if line == "/clear":
                messages = list(start)
                continue
            if not line:
                continue
            messages.append({"role": "user", "content": line})
            reply = ""
            for text, _ in stream_reply(model, messages, max_new_tokens, **sampling):
                print(text, end="", flush=True)
                reply += text
            print()
            messages.append({"role": "assistant", "content": reply})
    except KeyboardInterrupt:
        print()


if __name__ == "__main__":
    main()
