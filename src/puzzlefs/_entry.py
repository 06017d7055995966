"""The ``puzzlefs`` command's entry point: Ctrl-C is quiet from the first instant.

Python turns SIGINT into KeyboardInterrupt, and one that arrives while the CLI's
modules are still being imported would print a traceback. So the handler is set
before anything else is imported; :func:`puzzlefs.cli.main` puts Python's own back
once it can report the interruption in one line.
"""

import signal
import sys


def _interrupted(signum: int, frame: object) -> None:
    sys.stderr.write("Error: interrupted\n")
    raise SystemExit(130)


signal.signal(signal.SIGINT, _interrupted)


def main() -> int:
    from puzzlefs.cli import main as cli_main

    return cli_main()
