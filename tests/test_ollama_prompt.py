"""Prompts built from a task (sidecar/prompt.py), shared by the LLM executors."""

from __future__ import annotations

from typing import Any

from sidecar.messages import parse_task
from sidecar.prompt import build_prompt, system_text


def task(**fields: Any) -> Any:
    return parse_task({"type": "task_assign", "task_id": "t", **fields})


def test_description_only_has_no_system_text() -> None:
    p = build_prompt(task(description="Fix the bug"))
    assert p.system is None
    assert p.messages() == [{"role": "user", "content": "Fix the bug"}]
    assert p.combined() == "Fix the bug"


def test_context_goes_to_system_text_in_order() -> None:
    p = build_prompt(
        task(
            description="Add a test",
            repo="acme/app",
            branch="main",
            file_hints=["a.py", {"path": "b.py", "reason": "the parser"}, {"weird": 1}],
            success_criteria=["pytest passes", {"description": "no lint errors"}],
        )
    )
    assert p.system is not None
    s = p.system
    assert s.index("Repository: acme/app") < s.index("Branch: main") < s.index("- a.py")
    assert "- b.py (the parser)" in s and '- {"weird":1}' in s
    assert s.index("- a.py") < s.index("- pytest passes") and "- no lint errors" in s
    assert p.messages() == [{"role": "system", "content": s}, {"role": "user", "content": "Add a test"}]
    assert p.combined() == s + "\n\nAdd a test"


def test_empty_context_fields_are_left_out() -> None:
    assert system_text(task(repo="", branch=None, file_hints=[], success_criteria=["  "])) is None
    s = system_text(task(branch="dev"))
    assert s is not None and "Branch: dev" in s and "Repository" not in s and "Files" not in s


def test_empty_description_is_kept_verbatim() -> None:
    assert build_prompt(task()).user == ""
