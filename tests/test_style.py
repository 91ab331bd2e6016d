"""House style that ruff cannot hold, checked on every script's syntax tree.

ruff holds the line length and the blank lines (pyproject.toml). These tests hold the rest of
"lines a reader takes in at a glance": no nested conditional expression, no lambda given a name,
and no three or more names set from one literal tuple or list (`a, b, c = 1, 2, 3`); a pair like
`x, y = ...` and a function's results (`a, b, c = f()`) read as one idea and stay allowed.
"""
import ast
import glob
import os

import pytest
from conftest import ROOT

# the places scripts live; each failure names its file relative to ROOT
PLACES = ("*.py", "bench/*.py", "tests/*.py")


def all_scripts():
    paths = [p for place in PLACES for p in glob.glob(os.path.join(ROOT, place))]
    names = {os.path.relpath(p, ROOT) for p in paths}
    assert "train_gpt2.py" in names and "tests/test_style.py" in names  # the walk found the repo
    return sorted(names)


def nested_conditionals(tree):
    """Lines of conditional expressions with another one inside their test, body or else."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.IfExp):
            inside = (n for part in (node.test, node.body, node.orelse) for n in ast.walk(part))
            if any(isinstance(n, ast.IfExp) for n in inside):
                lines.append(node.lineno)
    return sorted(set(lines))


def named_lambdas(tree):
    """Lines where a lambda is assigned to a name or an attribute: that is a def."""
    return sorted(node.lineno for node in ast.walk(tree)
                  if isinstance(node, (ast.Assign, ast.AnnAssign))
                  and isinstance(node.value, ast.Lambda))


def many_names_from_a_literal(tree):
    """Lines setting three or more names from one literal tuple or list, as `a, b, c = 1, 2, 3`."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Tuple, ast.List)):
            if any(isinstance(t, (ast.Tuple, ast.List)) and len(t.elts) >= 3 for t in node.targets):
                lines.append(node.lineno)
    return sorted(set(lines))


def parse(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return ast.parse(f.read(), filename=name)


def violations(checker):
    return [f"{name}:{line}" for name in all_scripts() for line in checker(parse(name))]


def test_no_nested_conditional_expressions():
    found = violations(nested_conditionals)
    assert not found, ("a conditional expression inside another; write if/else statements or a "
                       "dict lookup: " + ", ".join(found))


def test_no_named_lambdas():
    found = violations(named_lambdas)
    assert not found, "a lambda given a name; write a def: " + ", ".join(found)


def test_no_three_names_from_one_literal():
    found = violations(many_names_from_a_literal)
    assert not found, ("three or more names set from one literal; one name per line: "
                       + ", ".join(found))


@pytest.mark.parametrize("checker, bad, good", [
    (nested_conditionals,
     "x = 1 if a else 2 if b else 3\n",
     "x = 1 if a else 2\ny = {'a': 1}.get(k, 3)\n"),
    (nested_conditionals,
     "x = (1 if b else 2) if a else 3\n",
     "if a:\n    x = 1 if b else 2\nelse:\n    x = 3\n"),
    (nested_conditionals,
     "x = 1 if (a if b else c) else 2\n",
     "x = [1 if a else 2 for a in b]\n"),
    (named_lambdas,
     "log = lambda *a: None\n",
     "def log(*a):\n    pass\n\n\nrows.sort(key=lambda r: r[0])\n"),
    (named_lambdas,
     "self.log: object = lambda *a: None\n",
     "f(on_done=lambda: None)\n"),
    (many_names_from_a_literal,
     "n, total, seen = 0, 0.0, set()\n",
     "x, y = 0, 1\na, b, c = f()\nfor a, b, c in rows:\n    pass\n"),
    (many_names_from_a_literal,
     "self.a, self.b, self.c = [1, None, []]\n",
     "a = 1\nb = None\nc = []\n"),
])
def test_each_checker_finds_what_it_names(checker, bad, good):
    assert checker(ast.parse(bad)) == [1]
    assert checker(ast.parse(good)) == []
