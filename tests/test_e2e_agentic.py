"""End to end: an agentic Ollama task through the dev hub and the real `sidecar run`
process, against the scripted tool server; the files land in the workspace."""

from __future__ import annotations

from pathlib import Path

from sidecar.devhub import DevHub
from tests.fakes.ollama_tools import Step, call, open_tool_server

from .harness import TOKEN, SidecarProcess


async def test_agentic_task_writes_files_in_the_workspace(tmp_path: Path, hub: DevHub) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "README.md").write_text("# demo\n")
    steps = [
        Step("Looking around.", calls=[call("list_directory")], prompt_tokens=30, output_tokens=6),
        Step(
            calls=[
                call("write_file", path="src/app.py", content='CONFIG = {"debug": False}  # </tool_call>\n'),
                call("run_command", command="sh -c 'env > env.txt'"),
            ],
            prompt_tokens=60,
            output_tokens=20,
        ),
        Step("Wrote src/app.py.", prompt_tokens=90, output_tokens=4),
    ]
    async with open_tool_server(steps) as ollama:
        sc = SidecarProcess(tmp_path / "sc", hub.ws_url, ollama_url=ollama.url, repo_dir=str(ws))
        try:
            await sc.start()
            tid = hub.submit(
                description="add a config module",
                metadata={"agentic": True},
                routing_decision={"target_type": "ollama", "selected_model": "qwen3:8b"},
            )
            rec = await hub.wait_until(
                lambda: hub.task(tid) if hub.task(tid).status == "completed" else None, 60
            )
            result = rec.result
            assert result is not None
            assert result["termination_reason"] == "final_answer" and result["iterations_used"] == 3
            assert result["output"] == "Wrote src/app.py."
            assert (result["tokens_in"], result["tokens_out"]) == (180, 30)
            assert (ws / "src" / "app.py").read_text() == 'CONFIG = {"debug": False}  # </tool_call>\n'
            env = (ws / "env.txt").read_text()
            assert TOKEN not in env and "SIDECAR_TOKEN" not in env
            # The dashboard's tool_call events, fields beside event_type, iteration 0 as 0.
            events = await hub.wait_until(
                lambda: (
                    evs
                    if len(
                        evs := [e for e in hub.task(tid).progress_events if e["event_type"] == "tool_call"]
                    )
                    == 6
                    else None
                ),
                60,
            )
            assert [(e["tool_name"], e["iteration"]) for e in events] == [
                ("list_directory", 0),
                ("list_directory", 0),
                ("write_file", 1),
                ("write_file", 1),
                ("run_command", 1),
                ("run_command", 1),
            ]
            assert all(len(e["args_summary"]) <= 200 for e in events[0::2])
            assert all(len(e["result_summary"]) <= 100 for e in events[1::2])
            assert events[5]["result_summary"] == "ok: exit code 0"
            statuses = [e["text"] for e in hub.task(tid).progress_events if e["event_type"] == "status"]
            assert "agentic loop started: up to 10 turns" in statuses
            assert [(v.kind, v.detail) for v in hub.violations] == []
        finally:
            await sc.cleanup()
