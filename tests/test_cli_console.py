"""The console of a long verb, as a user sees it: on a terminal a progress bar with an ETA and
log lines that do not break it; in a log file (not a terminal) no carriage returns; on stderr
every line in the one log format, MONAI's own log lines and Python warnings included."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from asa3d.console import LOG_FORMAT, OneFormat

SRC = str(Path(__file__).resolve().parents[1] / "src")
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
# a tqdm bar with its ETA: "caching phantom:  50%|#####     | 1/2 [00:01<00:01,  1.2scan/s]"
BAR_WITH_ETA = re.compile(r"\|\s*\d+/\d+ \[\d\d:\d\d<(\d\d:\d\d|\?)")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Runs a verb after MONAI's own loggers (which come with their own stdout handler and format) and a
# Python warning have spoken, all imported and emitted once the verb runs, as in a real command.
CHILD = """
import sys
import asa3d.data.commands as dc

real = dc._cmd_prepare


def verb(args):
    import warnings

    import monai.apps.utils as apps
    import monai.networks.utils as nets

    apps.logger.info("monai-apps-info")
    nets.logger.warning("monai-networks-warning")
    warnings.warn("a-captured-warning", stacklevel=1)
    return real(args)


dc._cmd_prepare = verb
from asa3d.cli import main

sys.exit(main(sys.argv[1:]))
"""


def _run(args: list[str], cwd: Path, tty: bool) -> tuple[int, str, str]:
    """Run ``CHILD args`` with stderr on a pseudo-terminal (``tty``) or a pipe; (rc, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    script = cwd / "child.py"
    script.write_text(CHILD)
    out_file = cwd / "stdout.txt"
    with open(out_file, "w") as out:
        if not tty:
            res = subprocess.run(
                [sys.executable, str(script), *args],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.PIPE,
                timeout=300,
            )
            return res.returncode, out_file.read_text(), res.stderr.decode()
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
        proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=slave,
            stdin=subprocess.DEVNULL,
        )
        os.close(slave)
        chunks = []
        while True:
            try:
                b = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not b:
                break
            chunks.append(b)
        os.close(master)
        rc = proc.wait(timeout=300)
    text = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")  # the terminal's newlines
    return rc, out_file.read_text(), text


def _segments(stderr: str) -> list[str]:
    """What a terminal shows: each line, and each redraw (``\\r``) within it, ANSI codes removed."""
    return [s for line in stderr.split("\n") for s in ANSI.sub("", line).split("\r") if s.strip()]


@pytest.fixture
def prepare_args(phantom_dataset: Path, tmp_path: Path) -> list[str]:
    return [
        "data",
        "prepare",
        str(phantom_dataset),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--spacing",
        "12",
        "12",
        "8",
        "--workers",
        "0",
    ]


def test_on_a_terminal_a_bar_with_eta_and_every_other_line_in_the_log_format(
    prepare_args: list[str], tmp_path: Path
) -> None:
    rc, out, err = _run(prepare_args, tmp_path, tty=True)
    assert rc == 0, err
    segments = _segments(err)
    bars = [s for s in segments if BAR_WITH_ETA.search(s)]
    assert bars and any("caching" in b for b in bars), err  # the bar, with its ETA, drawn
    others = [s for s in segments if s not in bars]
    assert others and all(LOG_LINE.match(s) for s in others), [s for s in others if not LOG_LINE.match(s)]
    # MONAI's loggers (their own stdout handler and format) and warnings come out in ours, on stderr
    assert any(re.match(r"^\d\d:\d\d:\d\d INFO monai\.apps: monai-apps-info$", s) for s in others), others
    assert any(
        re.match(r"^\d\d:\d\d:\d\d WARNING monai\.networks\.utils: monai-networks-warning$", s)
        for s in others
    )
    assert any(
        re.match(r"^\d\d:\d\d:\d\d WARNING py\.warnings: UserWarning: a-captured-warning ", s) for s in others
    )
    assert "monai-" not in out and "cache" in out  # the results on stdout, MONAI's lines not


def test_in_a_log_file_no_bar_and_no_carriage_return(prepare_args: list[str], tmp_path: Path) -> None:
    rc, out, err = _run(prepare_args, tmp_path, tty=False)
    assert rc == 0, err
    assert "\r" not in err and not BAR_WITH_ETA.search(err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and all(LOG_LINE.match(ln) for ln in lines), lines
    assert "monai-apps-info" in err and "monai-apps-info" not in out


def test_a_multi_line_record_keeps_the_prefix_on_every_line() -> None:
    rec = logging.LogRecord("asa3d.x", logging.WARNING, __file__, 1, "first\nsecond\n\nthird", None, None)
    lines = OneFormat(LOG_FORMAT, "%H:%M:%S").format(rec).splitlines()
    assert len(lines) == 3 and all(LOG_LINE.match(ln) for ln in lines)
    assert lines[0].endswith("first") and lines[2].endswith("third")


@pytest.mark.slow  # two subprocesses that import torch and MONAI: a 2-step fine-tune and a prediction
def test_finetune_and_predict_draw_their_bars_on_a_terminal(phantom_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "ft"
    ft = [
        "finetune",
        "--config",
        "finetune/phantom_tiny.yaml",
        "--out",
        str(run),
        f"data.root={phantom_dataset}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.preprocess.spacing=[12.0,12.0,8.0]",
        "train.iterations=2",
        "train.log_every=0",
        "train.num_threads=1",
        "eval.split=null",  # no scoring: the bars are the point here
    ]
    rc, _, err = _run(ft, tmp_path, tty=True)
    assert rc == 0, err
    segments = _segments(err)
    bars = {s.split(":")[0] for s in segments if BAR_WITH_ETA.search(s)}
    assert {"finetune"} <= bars and any(b.startswith("caching") for b in bars), bars
    assert all(LOG_LINE.match(s) for s in segments if not BAR_WITH_ETA.search(s))
    scan = sorted((phantom_dataset.parent / "imagesTr").glob("*.nii.gz"))[0]
    pred = ["predict", "--model", str(run), "--input", str(scan), "--out", str(tmp_path / "seg")]
    rc, _, err = _run(pred, tmp_path, tty=True)
    assert rc == 0, err
    segments = _segments(err)
    assert any(s.startswith("predict") and BAR_WITH_ETA.search(s) for s in segments), segments
    assert all(LOG_LINE.match(s) for s in segments if not BAR_WITH_ETA.search(s))
