"""Re-record the stream-json fixtures from the real Claude Code CLI against the fake API.

    .ci/install-claude.sh
    .venv/bin/python tests/fakes/claude_recordings/record.py

Each `<name>.jsonl` is the CLI's stdout, verbatim, for one scenario; `<name>.json`
says how it was made (argv, exit code, CLI version). `claude_standin.py`
replays them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from tests.fakes.anthropic_api import Scenario, serve_fake_anthropic  # noqa: E402

BIN = os.environ.get("SIDECAR_TEST_CLAUDE_BIN", str(ROOT / ".tools/claude/node_modules/.bin/claude"))
PARTIAL = ["-p", "--output-format", "stream-json", "--verbose", "--include-partial-messages"]
PLAIN = ["-p", "--output-format", "stream-json", "--verbose"]

# name: (scenario, CLI args, signal to send once the stream has started, or None)
CASES: dict[str, tuple[Scenario, list[str], int | None]] = {
    "success": (Scenario(text="Hello from the fake API. All done.", chunk=5), PARTIAL, None),
    "success_no_partial": (Scenario(text="Hello without partial messages."), PLAIN, None),
    "api_error_400": (Scenario(kind="error", status=400), PARTIAL, None),
    "api_error_529": (
        Scenario(kind="error", status=529, error_type="overloaded_error", message="Overloaded"),
        PARTIAL,
        None,
    ),
    "stream_error_fallback": (
        Scenario(
            kind="stream_error",
            deltas=3,
            text="Partial ",
            error_type="overloaded_error",
            message="Overloaded",
        ),
        PARTIAL,
        None,
    ),
    "interrupted": (Scenario(kind="slow", text="tick ", delay_s=0.05), PARTIAL, signal.SIGINT),
}


async def record(name: str, scenario: Scenario, args: list[str], sig: int | None, home: str) -> None:
    async with serve_fake_anthropic() as api:
        api.scenario = scenario
        env = dict(
            os.environ,
            ANTHROPIC_BASE_URL=api.base_url,
            ANTHROPIC_API_KEY="test",
            HOME=home,
            DISABLE_TELEMETRY="1",
            DISABLE_AUTOUPDATER="1",
            CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
            CLAUDE_CODE_MAX_RETRIES="0",
        )
        proc = await trio.lowlevel.open_process(
            [BIN, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=home,
            start_new_session=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        await proc.stdin.send_all(b"Say hello.")
        await proc.stdin.aclose()
        chunks: list[bytes] = []
        async with trio.open_nursery() as nursery:

            async def read_all() -> None:
                assert proc.stdout is not None
                while data := await proc.stdout.receive_some():
                    chunks.append(bytes(data))

            nursery.start_soon(read_all)
            if sig is not None:
                await api.stream_started.wait()
                await trio.sleep(0.3)
                os.killpg(proc.pid, sig)
            await proc.wait()
        await trio.Path(HERE / f"{name}.jsonl").write_bytes(b"".join(chunks))
        version = await trio.run_process([BIN, "--version"], capture_stdout=True)
        meta = {
            "args": args,
            "returncode": proc.returncode,
            "cli_version": version.stdout.decode().strip(),
            "signal": signal.Signals(sig).name if sig else None,
        }
        await trio.Path(HERE / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
        print(name, meta)


async def main() -> None:
    with tempfile.TemporaryDirectory() as home:
        for name, (scenario, args, sig) in CASES.items():
            await record(name, scenario, args, sig, home)


if __name__ == "__main__":
    trio.run(main)
