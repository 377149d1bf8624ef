"""The `sidecar` command's entry point, light on purpose.

SIGTERM, SIGINT and SIGHUP are caught from the first lines of the process, before the
heavy imports and the config file: a stop request that arrives while the
daemon starts is kept and honoured as soon as `run` can act on it (a clean
exit 0, not death by the signal), and a signal that comes after the daemon's
own handling has ended (trio re-delivers one it caught but nobody read) is
ignored instead of killing the process at the last moment.

Commands other than `run` give the default handling back at once
(`release`), acting on a signal that came meanwhile.
"""

from __future__ import annotations

import signal
from types import FrameType

# SIGHUP too: a closed terminal or ssh session (or an operator's "reload") must
# not kill the daemon by the default action and orphan its tasks' processes.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_pending: list[int] = []
_catching = False


def _remember(signum: int, frame: FrameType | None) -> None:
    _pending.append(signum)


def catch_early() -> None:
    global _catching
    for sig in STOP_SIGNALS:
        signal.signal(sig, _remember)
    _catching = True


def take_pending() -> list[int]:
    """Stop signals that arrived before the daemon listened for them (and forget them)."""
    out = list(_pending)
    _pending.clear()
    return out


def release() -> None:
    """Default handling back (for commands other than `run`); act on what came meanwhile."""
    global _catching
    if not _catching:
        return
    _catching = False
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in take_pending():
        signal.raise_signal(sig)


def main() -> int:
    catch_early()
    from .cli import main as cli_main

    code = cli_main()
    if _catching:
        # `run` is over: a stop signal from here on is moot. Blocked, it cannot
        # kill the process while the interpreter shuts down (Python's handlers
        # are gone by then) and turn a clean exit into death by signal.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    return code
