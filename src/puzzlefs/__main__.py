"""``python -m puzzlefs``, and the ``puzzlefs`` command (``puzzlefs.__main__:main``).

Ctrl-C is turned into ``Error: interrupted`` (exit 130) by the CLI once it runs, after
its cleanup. Before that (while Python imports the CLI) and after it (while Python
shuts down) there is nothing to clean up, and a KeyboardInterrupt raised there would
print a traceback: so in those moments SIGINT (and SIGTERM, SIGHUP) keep their default
action and end the process as they end any program, quietly, the shell reporting 130.
Only the interpreter's own start-up, before this module runs, is out of reach.
"""

# _signal, not signal: the C module is built in, while `signal` builds its enums at
# import (milliseconds, during which a Ctrl-C would still be a KeyboardInterrupt).
import _signal  # type: ignore[import-not-found]  # no stub; the same calls as signal
import sys


def main() -> int:
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    from puzzlefs.cli import main as cli_main

    code = cli_main()
    for signum in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
        _signal.signal(signum, _signal.SIG_DFL)
    return code


if __name__ == "__main__":
    sys.exit(main())
