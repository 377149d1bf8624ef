"""A `claude` binary for the chaos suite: the CLI stand-in, its behaviour chosen per task.

The sidecar's config names one Claude binary for every task, so the chaos
schedule puts a word `chaos-claude=MODE` into the task's description (the
prompt arrives on stdin). This wrapper reads the prompt, maps MODE to
stand-in options, and execs the stand-in (same pid, so the sidecar's signals
reach it) with the prompt on a fresh pipe.

Modes: ok, slow, hang (result line, then waits forever), stubborn (hangs and
ignores SIGINT and SIGTERM), orphan (leaves a `sleep` in a session of its own).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
STANDIN = HERE.parent / "fakes" / "claude_standin.py"
RECORDINGS = HERE.parent / "fakes" / "claude_recordings"


def options(mode: str, prompt_dir: Path) -> list[str]:
    ok = ["--standin-replay", str(RECORDINGS / "success.jsonl")]
    if mode == "slow":
        return [*ok, "--standin-delay-ms", "80"]
    if mode == "hang":
        return [*ok, "--standin-hang"]
    if mode == "stubborn":
        return [*ok, "--standin-hang", "--standin-ignore-sigint", "--standin-ignore-sigterm"]
    if mode == "orphan":
        return [*ok, "--standin-orphan", str(prompt_dir / f"orphan-{os.getpid()}.pid")]
    return ok


def main() -> None:
    prompt = sys.stdin.buffer.read()
    m = re.search(rb"chaos-claude=(\w+)", prompt)
    mode = m.group(1).decode() if m else "ok"
    pid_dir = Path(os.environ.get("CHAOS_PID_DIR", "/tmp"))
    read_fd, write_fd = os.pipe()
    os.write(write_fd, prompt)  # prompts here are far below a pipe's buffer
    os.close(write_fd)
    os.dup2(read_fd, 0)
    os.close(read_fd)
    argv = [sys.executable, str(STANDIN), *sys.argv[1:], *options(mode, pid_dir)]
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    main()
