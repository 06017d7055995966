"""Ctrl-C at any moment of a command's start-up or shut-down: never a traceback from
puzzlefs's code (issue 11, item 8). The interpreter's own start-up (site and its .pth
files, runpy) runs before any of our code and is out of reach: a traceback there
names none of our files, and is tolerated."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import puzzlefs

SRC = str(Path(puzzlefs.__file__).resolve().parent)
# What pip's console script for `puzzlefs = "puzzlefs.__main__:main"` does.
CONSOLE_SCRIPT = (
    "import re, sys\n"
    "from puzzlefs.__main__ import main\n"
    "sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
    "sys.exit(main())\n"
)


@pytest.mark.parametrize("how", ["python -m puzzlefs", "console script"])
def test_sigint_during_start_up_and_shut_down(tmp_path: Path, how: str) -> None:
    start = [sys.executable, "-m", "puzzlefs"] if how != "console script" else None
    args = start or [sys.executable, "-c", CONSOLE_SCRIPT]
    rng = random.Random(how)
    outcomes: dict[str, int] = {}
    for _ in range(40):
        proc = subprocess.Popen(
            [*args, "tags", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        text = err.decode()
        ours = "Traceback" in text and SRC in text
        assert not ours, text
        if proc.returncode == -signal.SIGINT:
            kind = "killed by SIGINT, quietly"  # before or after the CLI ran
        elif proc.returncode == 130:
            kind = "Error: interrupted"
            assert text.strip() == "Error: interrupted", text
        elif "Traceback" in text:
            kind = "interpreter start-up"
        else:
            kind = f"finished, exit {proc.returncode}"  # not an OCI layout: exit 1
            assert text.startswith("Error: ") and len(text.strip().splitlines()) == 1, text
        outcomes[kind] = outcomes.get(kind, 0) + 1
    print(outcomes)


# Ctrl-C while a command runs (cleanups, "Error: interrupted", exit 130): test_faults.py
# interrupts builds at random moments.
