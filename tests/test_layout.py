"""train_gpt2.py teaches first: its docstring says where the machinery starts, the lesson's sections
come in the order a run needs them, and hellaswag.py, which it imports, does not import it back."""

import ast
import os
import re

from conftest import ROOT

MARK = "# ==================== machinery below"


def source(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def test_the_docstring_gives_the_marked_line_where_it_is():
    text = source("train_gpt2.py")
    marked = [i for i, line in enumerate(text.splitlines(), 1) if line.startswith(MARK)]
    assert len(marked) == 1
    said = re.search(
        r"marked line \(line (\d+), \"machinery below\"\)", ast.get_docstring(ast.parse(text))
    )
    assert said and int(said[1]) == marked[0]


def test_the_lesson_comes_in_order_and_the_machinery_after_the_mark():
    text = source("train_gpt2.py")
    mark = text.index(MARK)
    lesson = [
        "# fmt: off",
        "class GPTConfig",
        "class CausalSelfAttention",
        "class MLP",
        "class Block",
        "class GPT(",
        "def get_tokenizer",
        "class DataLoaderLite",
        "def resolve_dtype",
        "class AdamW",
        "class Muon",
        "def get_lr",
        "def evaluate_loss",
        "def print_samples",
        "def train_step",
        "def train(",
    ]
    at = [text.index("\n" + name) for name in lesson]
    assert at == sorted(at) and at[-1] < mark
    for name in (
        "def save_checkpoint",
        "def load_checkpoint",
        "def log_dir_lock",
        "def shard_model",
        "def plan_memory",
        "class LogFile",
        "def distributed",
        "def load_model",
        "def parse_args",
        "def main",
    ):
        assert text.index("\n" + name) > mark, name
    assert text.rstrip().endswith('if __name__ == "__main__":\n    main()')


def test_train_gpt2_imports_hellaswag_and_not_the_other_way_at_module_level():
    def top_imports(name):
        tree = ast.parse(source(name))
        names = set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names.add(node.module)
        return names

    assert "hellaswag" in top_imports("train_gpt2.py")
    assert "train_gpt2" not in top_imports("hellaswag.py")


def test_hellaswag_scores_over_gpt2s_tokens_as_train_gpt2_counts_them():
    import hellaswag
    import train_gpt2

    assert hellaswag.GPT2_TOKENS == train_gpt2.EOT + 1
