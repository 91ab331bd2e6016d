"""The chat template: a conversation as GPT-2 token ids, with four special tokens in the padded
vocabulary's spare rows (train_gpt2.CHAT_TOKENS: <|system|> 50257, <|user|> 50258, <|assistant|>
50259, <|end|> 50260).

    <|endoftext|><|system|>Be brief.<|end|><|user|>What is 3+4?<|end|><|assistant|>7<|end|>...

A conversation starts with <|endoftext|>, as every document in the shards does. Each message is its
role's token, its content's GPT-2 tokens and <|end|>. Content is encoded as it is, with no space or
newline added around it, and as text only: content that spells <|end|> stays those characters, so no
message can end a turn early. A system message is optional; turns may follow in any order and
number. render() marks the targets to train on: each assistant message's content tokens and its
<|end|>, so a model learns to write replies and to end them, never the user's words. prompt() ends
with <|assistant|>; the model's reply is what it writes before its <|end|> (reply_text).

export_hf.py writes JINJA as the exported tokenizer's chat_template, so that transformers'
apply_chat_template gives render's ids (and prompt's, with add_generation_prompt=True), except for
content that spells a special token, which transformers turns into that token.
"""
from train_gpt2 import CHAT_TOKENS, EOT, get_tokenizer

# role -> its token id
ROLES = {role: CHAT_TOKENS[f"<|{role}|>"] for role in ("system", "user", "assistant")}
END = CHAT_TOKENS["<|end|>"]  # ends every message; a chat model writes it when its reply is done
# the ids a reply ends at: <|end|>, or <|endoftext|> from a model that never learnt <|end|>
STOP = (END, EOT)

JINJA = ("{{ '<|endoftext|>' }}{% for message in messages %}"
         "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
         "{{ raise_exception('unknown role ' + message['role']"
         " + '; want system, user or assistant') }}"
         "{% endif %}"
         "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def short(value, width=40):
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def problem(messages):
    """Why `messages` is not a conversation render() takes, in one line; None if it is one: a
    non-empty list of {"role": "system"|"user"|"assistant", "content": str} (other keys are
    ignored)."""
    if not isinstance(messages, list) or not messages:
        return f"messages is {short(messages)}, not a non-empty list of {{role, content}} objects"
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            return f"message {i} is {short(message)}, not a {{role, content}} object"
        if message.get("role") not in ROLES:
            role = short(message.get("role"))
            return f"message {i} has role {role}; want system, user or assistant"
        if not isinstance(message.get("content"), str):
            return f"message {i}'s content is {short(message.get('content'))}, not a string"
    return None


def render(messages):
    """(ids, trained): the conversation's token ids, and for each id whether it is a target to train
    on (True for each assistant message's content tokens and its <|end|>). Raises ValueError with
    problem()'s reason."""
    reason = problem(messages)
    if reason:
        raise ValueError(reason)
    enc = get_tokenizer()
    ids, trained = [EOT], [False]
    for message in messages:
        content = enc.encode_ordinary(message["content"])
        ids += [ROLES[message["role"]], *content, END]
        trained += [False] + [message["role"] == "assistant"] * (len(content) + 1)
    return ids, trained


def prompt(messages):
    """render(messages)'s ids and <|assistant|>: what a chat model continues with its reply and
    <|end|>."""
    return render(messages)[0] + [ROLES["assistant"]]


def reply_text(ids):
    """The text of a reply's ids (those generated after prompt()), up to the first STOP id."""
    end = next((i for i, t in enumerate(ids) if t in STOP), len(ids))
    return get_tokenizer().decode(ids[:end])
