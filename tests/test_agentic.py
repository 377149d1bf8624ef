"""The agentic loop through the Ollama executor, against the scripted tool server.

Real parts: a loopback HTTP server speaking Ollama's wire format, httpx, a
workspace in tmp_path, real files and processes. Each stop reason, the three
parsing layers, token sums, progress events and the result fields.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from sidecar import procs
from sidecar.agentic import wants_agentic
from sidecar.agentic.loop import LENGTH_NOTICE
from sidecar.config import Config
from sidecar.cost import CostModel
from sidecar.dispatcher import Dispatcher
from sidecar.executors import ExecContext
from sidecar.executors.ollama import OllamaExecutor
from sidecar.messages import Outcome, ProgressEvent, Task, parse_task
from sidecar.progress import ProgressSender, open_progress
from tests.fakes.ollama_tools import Step, ToolServer, call, open_tool_server
from tests.fakes.proc_helpers import wait_marked

MakeConfig = Callable[..., Config]


def make_task(srv: ToolServer, *, metadata: dict[str, Any] | None = None, **rd: Any) -> Task:
    decision = {"target_type": "ollama", "selected_endpoint": srv.url.removeprefix("http://")}
    decision.update({"selected_model": "qwen3:8b"}, **rd)
    return parse_task(
        {
            "type": "task_assign",
            "task_id": "t-1",
            "description": "make the tests pass",
            "metadata": {"agentic": True, **(metadata or {})},
            "routing_decision": decision,
        }
    )


class Agent:
    """Runs the Ollama executor on one task and keeps every progress event."""

    def __init__(self, config: Config, http: httpx.AsyncClient, state_dir: Path) -> None:
        self.config = config
        self.ctx = ExecContext(config, http, state_dir)
        self.executor = OllamaExecutor(self.ctx)
        self.events: list[ProgressEvent] = []
        self.seen = trio.Event()
        self.marker = procs.task_marker(config.agent_id, "t-1")

    async def __call__(self, task: Task) -> Outcome:
        send, recv = open_progress(16)
        outcome: Outcome | None = None
        async with trio.open_nursery() as nursery:

            async def drain() -> None:
                async for ev in recv:
                    self.events.append(ev)
                    self.seen.set()
                    self.seen = trio.Event()

            nursery.start_soon(drain)
            async with send:
                run = self.ctx.new_run(task, ProgressSender(send, task.task_id), self.marker)
                outcome = await self.executor(run)
        assert outcome is not None
        return outcome

    def of(self, event_type: str) -> list[ProgressEvent]:
        return [e for e in self.events if e.event_type == event_type]


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "a.py").write_text("def f():\n    return 1\n")
    return ws


@pytest.fixture
def agent(make_config: MakeConfig, http: httpx.AsyncClient, tmp_path: Path, workspace: Path) -> Agent:
    return Agent(make_config(repo_dir=str(workspace)), http, tmp_path / "state")


def tool_messages(srv: ToolServer) -> list[dict[str, Any]]:
    """The envelopes we sent back, from the last request's conversation."""
    msgs = srv.chat_requests[-1].json["messages"]
    return [json.loads(m["content"]) for m in msgs if m["role"] == "tool"]


# -- a whole conversation -----------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_tool_call_tool_call_final_answer(agent: Agent, workspace: Path, stream: bool) -> None:
    steps = [
        Step("Reading first.", calls=[call("read_file", path="a.py")], calls_at=1, whole=not stream),
        Step(
            calls=[call("write_file", path="src/b.py", content="x = {}\n# </tool_call>\n")],
            calls_at=None,
            whole=not stream,
        ),
        Step("Done: b.py written.", whole=not stream),
    ]
    async with open_tool_server(steps) as srv:
        out = await agent(make_task(srv))
    assert out.ok, out
    assert out.output == "Done: b.py written."
    assert (workspace / "src" / "b.py").read_text() == "x = {}\n# </tool_call>\n"
    assert out.fields == {
        "termination_reason": "final_answer",
        "iterations_used": 3,
        "files_written": ["src/b.py"],
    }
    # Every turn sent the tools and the conversation so far, tool results as envelopes.
    bodies = [r.json for r in srv.chat_requests]
    assert all(b["tools"] and b["stream"] is True for b in bodies)
    assert [len(b["messages"]) for b in bodies] == [2, 4, 6]
    read, wrote = tool_messages(srv)
    assert read == {"success": True, "tool": "read_file", "output": "def f():\n    return 1\n", "error": None}
    assert wrote["success"] and wrote["tool"] == "write_file" and wrote["error"] is None
    second = bodies[1]["messages"]
    assert second[2]["role"] == "assistant" and second[2]["tool_calls"] == steps[0].calls
    assert second[3]["role"] == "tool" and second[3]["tool_name"] == "read_file"
    # Progress: start/end status, content deltas as tokens, two tool_call events per call.
    status = [e.text for e in agent.of("status")]
    assert status[0] == "agentic loop started: up to 10 turns"
    assert status[-1] == "agentic loop ended: final_answer after 3 turns"
    tokens = agent.of("token")
    assert "".join(e.text for e in tokens) == "Reading first.Done: b.py written."
    assert [e.tokens_so_far for e in tokens] == list(range(1, len(tokens) + 1))
    calls = agent.of("tool_call")
    assert [e.extra for e in calls] == [
        {"tool_name": "read_file", "args_summary": '{"path": "a.py"}', "iteration": 0},
        {"tool_name": "read_file", "result_summary": "ok: def f(): return 1", "iteration": 0},
        {
            "tool_name": "write_file",
            "args_summary": '{"path": "src/b.py", "content": "x = {}\\n# </tool_call>\\n"}',
            "iteration": 1,
        },
        {"tool_name": "write_file", "result_summary": "ok: wrote 22 bytes to src/b.py", "iteration": 1},
    ]


async def test_json_in_content_after_think_with_braces(agent: Agent, workspace: Path) -> None:
    """Layer 2: a JSON call in the text (a <think> block before it holding a decoy)."""
    content = 'x = {"a": {"b": [1, 2]}}\nprint("}{")\n</tool_call>\n'
    text = (
        '<think>maybe {"name": "run_command", "arguments": {"command": "rm -rf /"}}</think>'
        "I will write it: "
        + json.dumps({"name": "write_file", "arguments": {"path": "c.py", "content": content}})
        + " and that is all."
    )
    async with open_tool_server([Step(text), Step("finished")]) as srv:
        out = await agent(make_task(srv))
    assert out.ok and out.fields is not None and out.fields["files_written"] == ["c.py"]
    assert (workspace / "c.py").read_text() == content
    assert [e["tool"] for e in tool_messages(srv)] == ["write_file"]  # the decoy in <think> never ran


async def test_tool_call_tags_with_closing_tag_inside_content(agent: Agent, workspace: Path) -> None:
    """Layer 3: <tool_call> blocks, `parameters` as a JSON text; `</tool_call>` inside a string."""
    content = "a = {}\n# ends with </tool_call> and {\n"
    block = json.dumps(
        {"name": "write_file", "parameters": json.dumps({"path": "d.txt", "content": content})}
    )
    read = json.dumps({"name": "read_file", "parameters": {"path": "d.txt"}})
    text = f"<tool_call>{block}</tool_call>\n<tool_call>{read}</tool_call>"
    async with open_tool_server([Step(text), Step("ok")]) as srv:
        out = await agent(make_task(srv))
    assert out.ok
    assert (workspace / "d.txt").read_text() == content
    answer = tool_messages(srv)[1]
    assert answer["success"] and answer["output"] == content


# -- stop reasons -------------------------------------------------------------------


async def test_max_iterations_is_a_failure_with_its_reason(agent: Agent) -> None:
    steps = [Step(calls=[call("list_directory", depth=i % 5 + 1)]) for i in range(3)]
    async with open_tool_server(steps) as srv:
        out = await agent(make_task(srv, metadata={"max_iterations": 3}))
    assert not out.ok and not out.transient
    assert out.reason == "agentic_max_iterations"
    assert out.fields is not None and out.fields["iterations_used"] == 3
    assert len(srv.chat_requests) == 3


async def test_tier_sets_the_turn_limit_and_config_overrides_it(
    make_config: MakeConfig, http: httpx.AsyncClient, tmp_path: Path, workspace: Path
) -> None:
    steps = [Step(calls=[call("read_file", path="a.py", start_line=i + 1)]) for i in range(7)]
    agent = Agent(make_config(repo_dir=str(workspace)), http, tmp_path / "state")
    async with open_tool_server(steps) as srv:
        out = await agent(make_task(srv, effective_tier="trivial"))
    assert out.reason == "agentic_max_iterations" and len(srv.chat_requests) == 5
    cfg = make_config(repo_dir=str(workspace), ollama={"agentic_max_iterations": {"trivial": 2}})
    agent = Agent(cfg, http, tmp_path / "state")
    async with open_tool_server(steps) as srv:
        out = await agent(make_task(srv, effective_tier="trivial"))
    assert len(srv.chat_requests) == 2
    assert agent.of("status")[0].text == "agentic loop started: up to 2 turns"


async def test_repetition_stops_before_the_third_identical_turn_runs(agent: Agent, workspace: Path) -> None:
    same = [call("run_command", command="sh -c 'echo run >> log.txt'")]
    steps = [Step(calls=same) for _ in range(4)]
    async with open_tool_server(steps) as srv:
        out = await agent(make_task(srv))
    assert not out.ok and out.reason == "agentic_repetition"
    assert out.fields is not None and out.fields["iterations_used"] == 3
    assert (workspace / "log.txt").read_text() == "run\nrun\n"  # the third turn's call never ran


async def test_stall_after_a_write_is_a_success(agent: Agent, workspace: Path) -> None:
    steps = [Step(calls=[call("write_file", path="out.txt", content="v1")])]
    steps += [Step(calls=[call("read_file", path="out.txt", start_line=1, end_line=i + 1)]) for i in range(6)]
    async with open_tool_server(steps) as srv:
        out = await agent(make_task(srv))
    assert out.ok, out
    assert out.fields == {"termination_reason": "stall", "iterations_used": 6, "files_written": ["out.txt"]}
    assert "[agentic loop stopped: stall after 6 turns]" in out.output
    assert (workspace / "out.txt").read_text() == "v1"


async def test_reads_without_any_write_never_stall(agent: Agent) -> None:
    steps = [Step(calls=[call("read_file", path="a.py", start_line=i + 1)]) for i in range(7)] + [
        Step("answer")
    ]
    async with open_tool_server(steps) as srv:
        out = await agent(make_task(srv))
    assert out.ok and out.fields is not None and out.fields["termination_reason"] == "final_answer"


async def test_nudge_once_then_nudge_exhausted(agent: Agent) -> None:
    steps = [Step(""), Step("<think>hmm</think>")]
    async with open_tool_server(steps) as srv:
        out = await agent(make_task(srv))
    assert not out.ok and out.reason == "agentic_nudge_exhausted"
    last = srv.chat_requests[1].json["messages"]
    assert last[-1]["role"] == "user" and "tool" in last[-1]["content"]  # the one nudge
    assert len(srv.chat_requests) == 2


async def test_nudge_then_real_work_continues(agent: Agent) -> None:
    async with open_tool_server([Step(""), Step("Here is the answer.")]) as srv:
        out = await agent(make_task(srv))
    assert out.ok and out.output == "Here is the answer."


async def test_a_turn_cut_at_the_length_limit_is_announced_and_counted(agent: Agent) -> None:
    steps = [
        Step(calls=[call("read_file", path="a.py")], done_reason="length"),
        Step("Done, but cut", done_reason="length"),
    ]
    async with open_tool_server(steps) as srv:
        out = await agent(make_task(srv))
    assert out.ok and out.output == "Done, but cut"
    assert out.fields is not None and out.fields["turns_cut_at_length"] == 2
    notices = [e.text for e in agent.of("status") if LENGTH_NOTICE in e.text]
    assert notices == [f"turn 1: {LENGTH_NOTICE}", f"turn 2: {LENGTH_NOTICE}"]


async def test_no_turn_cut_means_no_count(agent: Agent) -> None:
    async with open_tool_server([Step("All done.")]) as srv:
        out = await agent(make_task(srv))
    assert out.ok and out.fields is not None and "turns_cut_at_length" not in out.fields


async def test_model_error_is_a_task_failure_with_the_tokens_so_far(agent: Agent) -> None:
    steps = [
        Step(calls=[call("read_file", path="a.py")], prompt_tokens=20, output_tokens=4),
        Step(status=500),
    ]
    async with open_tool_server(steps) as srv:
        out = await agent(make_task(srv))
    assert not out.ok and out.transient
    assert out.reason == "ollama_http_500"
    assert out.error is not None and out.error.startswith("agentic turn 2: ")
    assert (out.tokens_in, out.tokens_out) == (20, 4)
    assert out.fields is not None and out.fields["termination_reason"] == "error"


async def test_unknown_tool_and_bad_arguments_go_back_as_envelopes(agent: Agent) -> None:
    steps = [
        Step(calls=[call("delete_everything"), call("read_file", path="a.py", start_line="two")]),
        Step("giving up"),
    ]
    async with open_tool_server(steps) as srv:
        out = await agent(make_task(srv))
    assert out.ok
    unknown, bad = tool_messages(srv)
    assert unknown["error"]["code"] == "UNKNOWN_TOOL" and not unknown["success"]
    assert bad["error"]["code"] == "INVALID_ARGUMENTS" and "start_line" in bad["error"]["message"]


# -- tokens and cost ------------------------------------------------------------------


async def test_tokens_are_summed_over_turns_and_priced_once_by_the_dispatcher(
    agent: Agent, make_config: MakeConfig
) -> None:
    steps = [
        Step(calls=[call("read_file", path="a.py")], prompt_tokens=100, output_tokens=7),
        Step(calls=[call("list_directory")], prompt_tokens=150, output_tokens=11),
        Step("done", prompt_tokens=200, output_tokens=13),
    ]
    cost = CostModel(make_config())
    dispatcher = Dispatcher({"ollama": agent.executor}, cost)
    async with open_tool_server(steps) as srv:
        send, _recv = open_progress(1024)
        res = await dispatcher.run(
            agent.ctx.new_run(make_task(srv), ProgressSender(send, "t-1"), agent.marker)
        )
    assert res.ok and res.result is not None
    r = res.result
    assert (r["tokens_in"], r["tokens_out"]) == (450, 31)
    assert res.tokens_used == 481
    assert r["estimated_cost_usd"] == 0.0
    assert r["equivalent_claude_cost_usd"] == cost.equivalent_claude_cost(450, 31)
    assert r["termination_reason"] == "final_answer" and r["iterations_used"] == 3
    assert r["output"] == "done" and r["attempts"] == 1


# -- trigger and working directory ----------------------------------------------------


def test_trigger(tmp_path: Path) -> None:
    def task(metadata: dict[str, Any], rd: dict[str, Any]) -> Task:
        return parse_task(
            {"task_id": "x", "metadata": metadata, "routing_decision": {"target_type": "ollama", **rd}}
        )

    assert wants_agentic(task({"agentic": True}, {}), "on_request")
    assert wants_agentic(task({}, {"agentic": True}), "on_request")
    assert not wants_agentic(task({}, {}), "on_request")
    assert not wants_agentic(task({"agentic": "yes"}, {"agentic": False}), "on_request")
    assert wants_agentic(task({}, {}), "always")
    assert not wants_agentic(task({"agentic": True}, {}), "never")


async def test_plain_ollama_task_without_trigger_is_unchanged(agent: Agent) -> None:
    async with open_tool_server([Step("plain text reply")]) as srv:
        task = make_task(srv)
        task = parse_task({**task.raw, "metadata": {}})
        out = await agent(task)
    assert out.ok and out.output == "plain text reply" and out.fields is None
    assert "tools" not in srv.chat_requests[0].json


async def test_without_repo_dir_it_works_in_a_scratch_dir_under_the_state_dir(
    make_config: MakeConfig, http: httpx.AsyncClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "sidecar-cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    agent = Agent(make_config(), http, tmp_path / "state")
    steps = [Step(calls=[call("write_file", path="note.txt", content="hi")]), Step("ok")]
    async with open_tool_server(steps) as srv:
        out = await agent(make_task(srv))
    assert out.ok
    assert (tmp_path / "state" / "agentic" / "t-1" / "note.txt").read_text() == "hi"
    assert list(cwd.iterdir()) == []


async def test_bwrap_required_but_missing_fails_clearly(
    make_config: MakeConfig,
    http: httpx.AsyncClient,
    tmp_path: Path,
    workspace: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    cfg = make_config(repo_dir=str(workspace), ollama={"agentic_sandbox": "bwrap"})
    agent = Agent(cfg, http, tmp_path / "state")
    async with open_tool_server([Step("never asked")]) as srv:
        out = await agent(make_task(srv))
    assert not out.ok and out.reason == "agentic_sandbox_unavailable" and "bwrap" in (out.error or "")
    assert srv.chat_requests == []


# -- cancellation ---------------------------------------------------------------------


async def test_cancel_mid_turn_closes_the_http_stream(agent: Agent) -> None:
    async with open_tool_server([Step("one two three four", stall_after=2)]) as srv:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(agent, make_task(srv))
                while len(agent.of("token")) < 2:
                    await agent.seen.wait()
                nursery.cancel_scope.cancel()
            await srv.chat_requests[0].client_gone.wait()
    assert [e.text for e in agent.of("token")] == ["one", " two"]


async def test_cancel_mid_run_command_through_the_loop_leaves_no_survivors(
    agent: Agent, workspace: Path
) -> None:
    import os

    import psutil

    os.mkfifo(workspace / "started")
    script = "sleep 600 & setsid sleep 600 & echo $$ $! > started; wait"
    steps = [Step(calls=[call("run_command", command=f"sh -c '{script}'", timeout_s=600)]), Step("never")]
    pids: list[int] = []

    def read_pids() -> None:
        with open(workspace / "started") as f:
            pids.extend(int(p) for p in f.read().split())

    marker = agent.marker
    async with open_tool_server(steps) as srv:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(agent, make_task(srv))
                await trio.to_thread.run_sync(read_pids)
                marked = await wait_marked(marker, pids, at_least=3)
                assert set(pids) <= set(marked) and len(marked) >= 3
                nursery.cancel_scope.cancel()
    assert procs.find_marked(marker) == []
    for pid in marked:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert len(srv.chat_requests) == 1  # no turn after the cancel


async def test_config_always_runs_the_loop_for_a_plain_task(
    make_config: MakeConfig, http: httpx.AsyncClient, tmp_path: Path, workspace: Path
) -> None:
    agent = Agent(
        make_config(repo_dir=str(workspace), ollama={"agentic": "always"}), http, tmp_path / "state"
    )
    async with open_tool_server([Step("nothing to do")]) as srv:
        task = parse_task({**make_task(srv).raw, "metadata": {}})
        out = await agent(task)
    assert out.ok and out.fields is not None and out.fields["termination_reason"] == "final_answer"
    assert srv.chat_requests[0].json["tools"]


async def test_missing_repo_dir_fails_clearly_before_any_turn(
    make_config: MakeConfig, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    agent = Agent(make_config(repo_dir=str(tmp_path / "gone")), http, tmp_path / "state")
    async with open_tool_server([Step("never asked")]) as srv:
        out = await agent(make_task(srv))
    assert not out.ok and out.reason == "no_workdir" and "gone" in (out.error or "")
    assert srv.chat_requests == []
