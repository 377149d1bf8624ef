"""The ReAct loop: the model calls tools on the workspace until it answers.

Each turn is one chat request with the tool schemas and the conversation so
far; each tool call's envelope goes back as a `tool` message. The loop stops
for one of `STOP_REASONS`; which of those count as a task success is in
`SUCCESS_REASONS` (docs/agentic.md says why).

Everything runs inside the caller's cancel scope: a cancelled task closes the
HTTP stream of the turn in progress and kills a running command's tree.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from ..log import get_logger
from ..progress import ProgressSender
from .chat import ModelError, Reply
from .parse import ToolCall, parse_calls, strip_think
from .tools import WRITE_TOOLS, ToolContext, args_summary, run_tool

log = get_logger(__name__)

FINAL_ANSWER = "final_answer"
MAX_ITERATIONS = "max_iterations"
REPETITION = "repetition"
STALL = "stall"
NUDGE_EXHAUSTED = "nudge_exhausted"
ERROR = "error"
STOP_REASONS = (FINAL_ANSWER, MAX_ITERATIONS, REPETITION, STALL, NUDGE_EXHAUSTED, ERROR)
# A stall means files were written and then the model only looked around:
# the work is there to judge. The others mean the model never finished.
SUCCESS_REASONS = frozenset({FINAL_ANSWER, STALL})

TIER_MAX_ITERATIONS = {"trivial": 5, "standard": 10, "complex": 20}
REPEAT_TURNS = 3  # the same call list this many turns in a row
STALL_TURNS = 5  # turns without a successful write, once something was written
EMPTY_REPLIES = 2  # empty replies in a row (one nudge between them)

SYSTEM_PROMPT = """You work on a task inside a workspace directory, using tools.
Call the tools (read_file, write_file, list_directory, search_files, run_command) to look at and change \
files; paths are relative to the workspace root and cannot leave it. Each tool answers with a JSON \
envelope {success, tool, output, error}. When the task is done, reply with your final answer as plain \
text and no tool call."""

LENGTH_NOTICE = "the reply stopped at the model's length limit (done_reason length): it may be cut off"

NUDGE = "Your reply was empty. Call a tool to make progress, or give your final answer as plain text."

ChatFn = Callable[[list[dict[str, Any]], Callable[[str], Awaitable[None]]], Awaitable[Reply]]


@attrs.define
class LoopResult:
    reason: str
    iterations: int
    output: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    files_written: list[str] = attrs.field(factory=list)
    error: str | None = None
    error_reason: str | None = None
    transient: bool = False
    turns_cut: int = 0  # turns that stopped at the model's length limit

    @property
    def ok(self) -> bool:
        return self.reason in SUCCESS_REASONS


@attrs.define
class _State:
    result: LoopResult
    history: list[list[str]] = attrs.field(factory=list)
    empty: int = 0
    since_write: int = 0
    last_text: str = ""
    chunks: int = 0


def max_iterations_for(tier: str | None, metadata: dict[str, Any], configured: dict[str, int]) -> int:
    """Turn limit: `metadata.max_iterations`, else the config's for the tier, else the tier's default."""
    value = metadata.get("max_iterations")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return min(value, 100)
    tier = tier if tier in TIER_MAX_ITERATIONS else "standard"
    return configured.get(tier, TIER_MAX_ITERATIONS[tier])


def conversation(user_messages: list[dict[str, str]]) -> list[dict[str, Any]]:
    """The first messages: our system prompt (before the task's own), then the task."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, *user_messages]


async def run_loop(
    chat: ChatFn,
    messages: list[dict[str, Any]],
    tools: ToolContext,
    progress: ProgressSender,
    *,
    max_iterations: int,
    model: str,
) -> LoopResult:
    """Run turns until a stop reason; `messages` grows with the conversation.

    `chat(messages, on_token)` makes one model call (see `chat.chat_turn`); the
    working directory, marker and deadline come in `tools`.
    """
    st = _State(LoopResult(MAX_ITERATIONS, 0))
    res = st.result
    await progress.emit("status", f"agentic loop started: up to {max_iterations} turns", model=model)

    async def on_token(text: str) -> None:
        st.chunks += 1
        await progress.emit("token", text, tokens_so_far=st.chunks, model=model)

    for iteration in range(max_iterations):
        res.iterations = iteration + 1
        try:
            reply = await chat(messages, on_token)
        except ModelError as exc:
            res.reason, res.error, res.error_reason = ERROR, exc.error, exc.reason
            res.transient = exc.transient
            break
        res.tokens_in += reply.prompt_tokens
        res.tokens_out += reply.output_tokens
        if reply.done_reason == "length":
            res.turns_cut += 1
            await progress.emit("status", f"turn {iteration + 1}: {LENGTH_NOTICE}", model=model)
        messages.append(reply.message())
        calls = parse_calls(reply.tool_calls, reply.content)
        text = strip_think(reply.content).strip()
        if text:
            st.last_text = text
        if not calls:
            if text:
                res.reason = FINAL_ANSWER
                break
            st.empty += 1
            if st.empty >= EMPTY_REPLIES:
                res.reason = NUDGE_EXHAUSTED
                break
            messages.append({"role": "user", "content": NUDGE})
            continue
        st.empty = 0
        if _repeats(st, calls):
            res.reason = REPETITION
            break
        wrote = await _run_calls(calls, tools, progress, messages, iteration, res)
        if wrote:
            st.since_write = 0
        elif res.files_written:
            st.since_write += 1
            if st.since_write >= STALL_TURNS:
                res.reason = STALL
                break
    res.output = _output(st)
    log.info(
        "agentic_loop_ended",
        reason=res.reason,
        iterations=res.iterations,
        files_written=len(res.files_written),
        tokens_in=res.tokens_in,
        tokens_out=res.tokens_out,
    )
    ended = f"agentic loop ended: {res.reason} after {res.iterations} turns"
    await progress.emit("status", ended, model=model)
    return res


def _repeats(st: _State, calls: list[ToolCall]) -> bool:
    st.history.append([c.key() for c in calls])
    recent = st.history[-REPEAT_TURNS:]
    return len(recent) == REPEAT_TURNS and all(keys == recent[0] for keys in recent)


async def _run_calls(
    calls: list[ToolCall],
    tools: ToolContext,
    progress: ProgressSender,
    messages: list[dict[str, Any]],
    iteration: int,
    res: LoopResult,
) -> bool:
    """Run one turn's calls in order; True if any write succeeded."""
    wrote = False
    for call in calls:
        summary = args_summary(call)
        await progress.emit(
            "tool_call",
            f"{call.name} {summary}",
            extra={"tool_name": call.name, "args_summary": summary, "iteration": iteration},
        )
        result = await run_tool(tools, call)
        outcome = result.summary()
        await progress.emit(
            "tool_call",
            f"{call.name} → {outcome}",
            extra={"tool_name": call.name, "result_summary": outcome, "iteration": iteration},
        )
        messages.append(
            {
                "role": "tool",
                "tool_name": call.name,
                "content": json.dumps(result.envelope(), ensure_ascii=False, default=str),
            }
        )
        if result.success and call.name in WRITE_TOOLS:
            wrote = True
            path = str(call.arguments.get("path", ""))
            if path not in res.files_written:
                res.files_written.append(path)
    return wrote


def _output(st: _State) -> str:
    res = st.result
    if res.reason == FINAL_ANSWER:
        return st.last_text
    lines = [f"[agentic loop stopped: {res.reason} after {res.iterations} turns]"]
    if res.files_written:
        lines.append("files written: " + ", ".join(res.files_written))
    if st.last_text:
        lines.append(st.last_text)
    return "\n".join(lines)
