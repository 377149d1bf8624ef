"""A stand-in for the `claude` CLI that replays recorded real stream-json output.

So that the executor's parsing and process handling are tested where the real
CLI cannot be installed. It takes the CLI's own arguments (and checks them as
the CLI does: `-p` needed, stream-json needs `--verbose`, stdin must hold a
prompt), reads stdin to EOF, prints a recording line by line, and exits with
the recorded exit code. Its own options, anywhere in argv:

  --standin-replay PATH        the .jsonl to print (a sibling .json gives the exit code)
  --standin-delay-ms N         pause between lines
  --standin-exit N             exit code (overrides the recording's)
  --standin-stderr TEXT        written to stderr before exiting
  --standin-hang               after the last line, wait forever
  --standin-ignore-sigterm     ignore SIGTERM
  --standin-ignore-sigint      ignore SIGINT (default: like the CLI, print the
                               `result` line of recordings/interrupted.jsonl, exit 0)
  --standin-record PATH        write {"argv", "stdin", "marker"} as JSON to PATH
  --standin-wait-file PATH     before answering, wait until PATH exists (a slow model,
                               released by the test when its clock says so)
  --standin-orphan PIDFILE     start `sleep` in a session of its own (as the CLI's
                               Bash tool does) and write its pid to PIDFILE

Only the standard library: the tests run it with the venv's python.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

RECORDINGS = Path(__file__).resolve().parent / "claude_recordings"
INTERRUPTED = RECORDINGS / "interrupted.jsonl"

_FLAGS = {"--standin-hang", "--standin-ignore-sigterm", "--standin-ignore-sigint"}
_VALUED = {
    "--standin-replay",
    "--standin-delay-ms",
    "--standin-exit",
    "--standin-stderr",
    "--standin-record",
    "--standin-orphan",
    "--standin-wait-file",
}


def _split(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """(the CLI's own arguments, our options)."""
    cli: list[str] = []
    ours: dict[str, str] = {}
    it = iter(argv)
    for arg in it:
        if arg in _FLAGS:
            ours[arg] = "1"
        elif arg in _VALUED:
            ours[arg] = next(it)
        else:
            cli.append(arg)
    return cli, ours


def _write(line: str) -> None:
    sys.stdout.write(line if line.endswith("\n") else line + "\n")
    sys.stdout.flush()


def _interrupted_result() -> str:
    lines = [ln for ln in INTERRUPTED.read_text().splitlines() if ln.strip()]
    for line in reversed(lines):
        if json.loads(line).get("type") == "result":
            return line
    raise SystemExit("no result line in " + str(INTERRUPTED))


def main() -> int:
    cli, opts = _split(sys.argv[1:])
    if "--standin-ignore-sigterm" in opts:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "--standin-ignore-sigint" in opts:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:

        def on_sigint(_sig: int, _frame: object) -> None:
            _write(_interrupted_result())
            os._exit(0)

        signal.signal(signal.SIGINT, on_sigint)

    # The real CLI's argument checks (messages as it prints them).
    if "-p" not in cli and "--print" not in cli:
        sys.stderr.write("stand-in: only -p mode is supported\n")
        return 2
    if "stream-json" in cli and "--verbose" not in cli:
        sys.stderr.write("Error: When using --print, --output-format=stream-json requires --verbose\n")
        return 1
    prompt = sys.stdin.buffer.read().decode("utf-8", "replace")
    if "--standin-record" in opts:
        Path(opts["--standin-record"]).write_text(
            json.dumps(
                {"argv": sys.argv[1:], "stdin": prompt, "marker": os.environ.get("SIDECAR_TASK_MARKER")}
            )
        )
    if not prompt.strip():
        sys.stderr.write(
            "Error: Input must be provided either through stdin or as a prompt argument when using --print\n"
        )
        return 1
    if "--standin-orphan" in opts:
        orphan = subprocess.Popen(
            ["sleep", "1000"],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        Path(opts["--standin-orphan"]).write_text(str(orphan.pid))

    if "--standin-wait-file" in opts:
        wait_for = Path(opts["--standin-wait-file"])
        while not wait_for.exists():
            time.sleep(0.01)
    code = 0
    replay = opts.get("--standin-replay")
    if replay:
        path = Path(replay)
        meta = path.with_suffix(".json")
        if meta.exists():
            code = int(json.loads(meta.read_text()).get("returncode") or 0)
        delay = float(opts.get("--standin-delay-ms", "0")) / 1000.0
        for line in path.read_text().splitlines(keepends=True):
            _write(line)
            if delay:
                time.sleep(delay)
    if "--standin-exit" in opts:
        code = int(opts["--standin-exit"])
    if "--standin-stderr" in opts:
        sys.stderr.write(opts["--standin-stderr"] + "\n")
        sys.stderr.flush()
    if "--standin-hang" in opts:
        while True:
            time.sleep(3600)
    return code


if __name__ == "__main__":
    sys.exit(main())
