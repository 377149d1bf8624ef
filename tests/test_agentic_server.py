"""Fidelity of the scripted tool server: the official `ollama` client parses its
replies, native `tool_calls` included, streamed and whole."""

from __future__ import annotations

import ollama
import pytest

from tests.fakes.ollama_tools import Step, call, open_tool_server

MESSAGES = [{"role": "user", "content": "fix the bug"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}},
                "required": ["path"],
            },
        },
    }
]


def steps() -> list[Step]:
    return [
        Step(
            "Let me look.",
            calls=[call("read_file", path="a.py")],
            calls_at=1,
            prompt_tokens=7,
            output_tokens=3,
        ),
        Step(calls=[call("write_file", path="b.py", content="x = {}\n")], calls_at=None),
        Step("All done, the bug is fixed."),
    ]


async def test_official_client_reads_a_streamed_conversation_with_tool_calls() -> None:
    async with open_tool_server(steps()) as srv:
        client = ollama.AsyncClient(host=srv.url)
        replies = []
        for _ in range(3):
            parts = [
                p
                async for p in await client.chat(
                    model="qwen3:8b", messages=MESSAGES, tools=TOOLS, stream=True
                )
            ]
            replies.append(parts)
    first = replies[0]
    assert "".join(p.message.content or "" for p in first) == "Let me look."
    with_calls = [p for p in first if p.message.tool_calls]
    assert len(with_calls) == 1 and not with_calls[0].done  # in a content chunk, not the last line
    tc = with_calls[0].message.tool_calls
    assert (
        tc is not None and tc[0].function.name == "read_file" and tc[0].function.arguments == {"path": "a.py"}
    )
    assert first[-1].done and first[-1].prompt_eval_count == 7 and first[-1].eval_count == 3
    second_calls = replies[1][-1].message.tool_calls  # in the done line this time
    assert second_calls is not None and second_calls[0].function.arguments == {
        "path": "b.py",
        "content": "x = {}\n",
    }
    assert "".join(p.message.content or "" for p in replies[2]) == "All done, the bug is fixed."
    assert all(p.message.tool_calls is None for p in replies[2])
    # The tools went out with each request.
    assert [r.json["tools"][0]["function"]["name"] for r in srv.chat_requests] == ["read_file"] * 3


@pytest.mark.parametrize("how", ["stream_false", "whole"])
async def test_official_client_reads_a_whole_reply_with_tool_calls(how: str) -> None:
    step = Step("Reading.", calls=[call("read_file", path="a.py")], whole=how == "whole")
    async with open_tool_server([step]) as srv:
        client = ollama.AsyncClient(host=srv.url)
        if how == "whole":
            # Asked to stream, answered with one object: the client still reads it.
            parts = [
                p
                async for p in await client.chat(
                    model="qwen3:8b", messages=MESSAGES, tools=TOOLS, stream=True
                )
            ]
            assert len(parts) == 1
            resp = parts[0]
        else:
            resp = await client.chat(model="qwen3:8b", messages=MESSAGES, tools=TOOLS, stream=False)
    assert resp.done and resp.message.content == "Reading."
    assert resp.message.tool_calls is not None
    assert resp.message.tool_calls[0].function.name == "read_file"


async def test_scripted_http_error_is_a_response_error() -> None:
    async with open_tool_server([Step(status=500)]) as srv:
        with pytest.raises(ollama.ResponseError) as info:
            await ollama.AsyncClient(host=srv.url).chat(model="qwen3:8b", messages=MESSAGES, tools=TOOLS)
    assert info.value.status_code == 500
