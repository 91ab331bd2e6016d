"""sample.py --prompt=FILE:path: the prompt is the file's text, and a file that cannot be read is
one line."""

import os
import sys

import pytest
from conftest import ROOT, run

import sample


def test_a_file_prompt_samples_as_the_same_text_given_inline(tiny_run, tmp_path):
    text = "Ünïcödé prompt\nover two lines, "
    (tmp_path / "prompt.txt").write_text(text, encoding="utf-8")
    args = [
        f"{ROOT}/sample.py",
        f"--model={tiny_run.checkpoint}",
        "--max_new_tokens=6",
        "--seed=3",
        "--dtype=float32",
        "--device=cpu",
    ]
    from_file = run([sys.executable, *args, f"--prompt=FILE:{tmp_path / 'prompt.txt'}"])
    inline = run([sys.executable, *args, f"--prompt={text}"])
    assert from_file.returncode == 0, from_file.stderr
    assert from_file.stdout == inline.stdout and from_file.stdout.startswith(text)


@pytest.mark.parametrize(
    "kind, reason",
    [("missing", "No such file or directory"), ("directory", "Is a directory"), ("binary", None)],
)
def test_an_unreadable_prompt_file_is_one_line(tmp_path, capsys, kind, reason):
    path = tmp_path / "p"
    if kind == "directory":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(b"\xff\xfe\x00bad")
    # refused before any model is loaded: --model need not exist
    with pytest.raises(SystemExit) as exit:
        sample.main(["--model=no_such_model.pt", f"--prompt=FILE:{path}"])
    assert exit.value.code == (
        f"error: --prompt=FILE:{path}: cannot read the prompt file ({reason})"
        if reason
        else f"error: --prompt=FILE:{path}: not UTF-8 text; save the prompt as UTF-8"
    )
    assert capsys.readouterr().out == ""
    assert os.path.exists(path) == (kind != "missing")


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--seed=18446744073709551616", "--seed must be a 64-bit integer"),
        ("--top_p=1.5", "--top_p must be above 0 and at most 1, e.g. 0.95"),
        ("--temperature=nan", "--temperature must be 0 (greedy) or more, e.g. 0.8"),
    ],
)
def test_a_setting_out_of_range_is_one_line(capsys, arg, message):
    # refused before any model is loaded: --model need not exist
    with pytest.raises(SystemExit) as exit:
        sample.main(["--model=no_such_model.pt", arg])
    assert exit.value.code == f"error: {arg} is out of range; {message}"
    assert capsys.readouterr().out == ""
