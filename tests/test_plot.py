"""plot.py: log.txt files become a PNG of the expected size, with every run and the reference lines
drawn."""

import os
import shutil
import struct
import sys

import pytest
from conftest import ROOT, run

pytest.importorskip("matplotlib")
import plot  # noqa: E402

LOG = "".join(
    [f"{s} train {11 - s / 20:.4f}\n" for s in range(100)]
    + [f"{s} val {10.9 - s / 20:.4f}\n" for s in range(0, 101, 25)]
    + [f"{s} hella {0.25 + s / 2000:.4f}\n" for s in range(0, 101, 50)]
)


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_renders_a_png_of_the_expected_size(tmp_path):
    (tmp_path / "log.txt").write_text(LOG)
    out = tmp_path / "curves.png"
    result = run([sys.executable, f"{ROOT}/plot.py", str(tmp_path), f"--out={out}"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {out}\n"
    assert out.stat().st_size > 10_000
    assert png_size(out) == (1500, 450)


def test_overlays_runs_against_tokens_and_references(tmp_path, tiny_run):
    (tmp_path / "log.txt").write_text("# run a: a note, as resume keeps it\n\n" + LOG)
    ckpt_dir = tiny_run.checkpoint.rsplit("/", 1)[0]  # its checkpoints say 256 tokens per step
    plot.main([str(tmp_path), ckpt_dir, "--labels=a,b", f"--out={tmp_path / 'two.png'}"])
    fig = plot.plot(
        [("a", plot.read_log(str(tmp_path)), 1000)],
        str(tmp_path / "one.png"),
        smooth=0.0,
        refs=True,
    )
    by_step, by_tokens, hella = fig.axes
    assert [line.get_label() for line in by_step.lines] == ["a train", "a val", "GPT-2 124M val"]
    assert list(by_tokens.lines[1].get_xdata()) == [0, 25000, 50000, 75000, 100000]
    # smooth=0: the raw losses
    assert list(by_step.lines[0].get_ydata()) == [11 - s / 20 for s in range(100)]
    assert {
        line.get_label(): line.get_ydata()[0]
        for line in hella.lines
        if line.get_linestyle() == "--"
    } == {"GPT-2 124M": 0.2955, "GPT-3 124M": 0.337}
    assert png_size(tmp_path / "two.png") == (1500, 450)
    assert plot.tokens_per_step(ckpt_dir) == 256
    assert plot.tokens_per_step(str(tmp_path)) == 524288


def test_references_only_for_fineweb_runs_or_when_asked_no_empty_hellaswag_panel_logy(
    tmp_path, monkeypatch
):
    record = '# train_gpt2.py run {"settings": {"data_dir": "%s", "total_batch_size": 1000}}\n'
    for name, data_dir in (("fineweb", "data/edu_fineweb10B"), ("own", "my_text")):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "log.txt").write_text(record % data_dir + LOG.split("0 hella")[0])
    assert plot.on_fineweb(str(tmp_path / "fineweb")) and not plot.on_fineweb(str(tmp_path / "own"))
    for runs, extra, refs in (
        (["fineweb"], [], True),
        (["own"], [], False),
        (["fineweb", "own"], [], False),
        (["own"], ["--refs"], True),
    ):
        figs = []
        monkeypatch.setattr(
            plot, "plot", lambda *a, real=plot.plot, **k: figs.append(real(*a, **k))
        )
        plot.main(
            [str(tmp_path / r) for r in runs] + extra + ["--logy", f"--out={tmp_path / 'c.png'}"]
        )
        monkeypatch.undo()
        axes = figs[0].axes
        assert len(axes) == 2  # no HellaSwag lines, no HellaSwag panel
        assert ("GPT-2 124M val" in [line.get_label() for line in axes[0].lines]) == refs, (
            runs,
            extra,
        )
        assert axes[0].get_yscale() == "log"


def test_smoothing_is_an_exponential_moving_average():
    assert plot.ema([1.0, 3.0, 3.0], 0.5) == [1.0, 2.0, 2.5]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such log; pass a run's log_dir or its log.txt"),
        (
            "0 train 10.9\n1 tarin 10.8\n",
            "log.txt:2: '1 tarin 10.8' is not `step train|val|hella value`",
        ),
        (
            b"0 train 10.9\n\xff\xd8\x00\x10garbled",
            "log.txt: not a text log (it holds bytes that are not UTF-8); "
            "pass a run's log_dir or its log.txt",
        ),
        (
            "a note\nand another\n",
            "log.txt: not a train_gpt2.py log (no run record and no `step train|val|hella value` "
            "line); pass a run's log_dir or its log.txt",
        ),
    ],
    ids=["missing", "malformed", "binary", "not a log"],
)
def test_bad_logs_fail_with_one_line(tmp_path, content, message):
    if content is not None:
        log = tmp_path / "log.txt"
        log.write_bytes(content) if isinstance(content, bytes) else log.write_text(content)
    with pytest.raises(SystemExit) as exit:  # sys.exit(message) prints it to stderr and exits 1
        plot.main([str(tmp_path), f"--out={tmp_path / 'x.png'}"])
    assert exit.value.code.startswith(f"error: {tmp_path}") and exit.value.code.endswith(message)
    assert "\n" not in exit.value.code
    assert not (tmp_path / "x.png").exists()


def test_without_matplotlib_says_how_to_install_it(tmp_path):
    (tmp_path / "log.txt").write_text(LOG)
    hide = (
        "import sys, runpy; sys.modules['matplotlib'] = None; "
        f"sys.argv = ['plot.py', {str(tmp_path)!r}]; runpy.run_path('plot.py', run_name='__main__')"
    )
    result = run([sys.executable, "-c", hide])
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == "error: plot.py needs matplotlib; install it with: pip install matplotlib"
    )


def test_an_unreadable_checkpoint_is_skipped_with_a_warning(tmp_path, tiny_run, capsys):
    (tmp_path / "log.txt").write_text(LOG)
    cut = tmp_path / "model_000009.pt"  # the newest, cut short as an interrupted copy leaves it
    cut.write_bytes(open(tiny_run.checkpoint, "rb").read(1 << 20))
    warning = (
        f"warning: skipping {cut}, not a readable checkpoint (RuntimeError); the tokens axis uses "
        "an older one, else 524288; --tokens_per_step sets it\n"
    )
    assert plot.tokens_per_step(str(tmp_path)) == 524288  # no other checkpoint: the default
    assert capsys.readouterr().err == warning
    shutil.copy(tiny_run.checkpoint.replace("08.pt", "04.pt"), tmp_path / "model_000004.pt")
    plot.main([str(tmp_path / "log.txt"), f"--out={tmp_path / 'c.png'}"])
    assert capsys.readouterr() == (f"wrote {tmp_path / 'c.png'}\n", warning)
    assert plot.tokens_per_step(str(tmp_path)) == 256  # the older checkpoint's


@pytest.mark.parametrize(
    "arg, message",
    [
        (
            "--out={tmp}/afile/x.png",
            "--out={tmp}/afile/x.png: {tmp}/afile is not a directory; "
            "name a file in an existing directory",
        ),
        (
            "--out={tmp}/nowhere/x.png",
            "--out={tmp}/nowhere/x.png: no directory {tmp}/nowhere; "
            "name a file in an existing directory",
        ),
        (
            "--out={tmp}/p.xyz",
            "--out={tmp}/p.xyz: matplotlib cannot write .xyz files; end the name with one of: ",
        ),
        (
            "--out={tmp}",
            "--out={tmp} is a directory; name a file in it, e.g. --out={tmp}/curves.png",
        ),
        ("--out=", "--out is empty; name the image to write, e.g. --out=curves.png"),
        (
            "--smooth=1.5",
            "--smooth=1.5 is out of range; --smooth must be at least 0 (no smoothing) and below 1",
        ),
        (
            "--smooth=-0.1",
            "--smooth=-0.1 is out of range; --smooth must be at least 0 (no smoothing) and below 1",
        ),
        (
            "--tokens_per_step=0",
            "--tokens_per_step=0 is not positive; pass the run's total_batch_size, or leave it "
            "out to read it from a checkpoint",
        ),
    ],
    ids=[
        "out under a file",
        "out in no directory",
        "out of unknown format",
        "out is a directory",
        "out empty",
        "smooth above 1",
        "smooth negative",
        "tokens_per_step",
    ],
)
def test_bad_arguments_are_refused_and_nothing_is_written(tmp_path, monkeypatch, arg, message):
    from matplotlib.backend_bases import FigureCanvasBase

    (tmp_path / "log.txt").write_text(LOG)
    (tmp_path / "afile").write_text("mine")
    monkeypatch.chdir(tmp_path)  # where an empty --out would have written
    if "matplotlib cannot write" in message:
        message += ", ".join(f".{f}" for f in sorted(FigureCanvasBase.get_supported_filetypes()))
    # sys.exit(message): the message on stderr, exit status 1
    with pytest.raises(SystemExit) as exit:
        plot.main([str(tmp_path), arg.format(tmp=tmp_path)])
    assert exit.value.code == "error: " + message.format(tmp=tmp_path)
    assert (
        sorted(os.listdir(tmp_path)) == ["afile", "log.txt"]
        and (tmp_path / "afile").read_text() == "mine"
    )


def test_a_name_without_extension_becomes_a_png_and_says_so(tmp_path, capsys):
    (tmp_path / "log.txt").write_text(LOG)
    plot.main([str(tmp_path), f"--out={tmp_path / 'curves'}", "--tokens_per_step=256"])
    assert capsys.readouterr().out == f"wrote {tmp_path / 'curves.png'}\n"
    assert png_size(tmp_path / "curves.png") == (1500, 450)
