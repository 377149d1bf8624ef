"""The configuration reference and the systemd unit agree with the code."""

from __future__ import annotations

import configparser
import re
from pathlib import Path
from typing import Any

import attrs

from sidecar import configdoc
from sidecar.config import INTERNAL, Config

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_doc_lists_every_key_as_generated() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    block = re.search(r"<!-- BEGIN GENERATED[^>]*-->\n(.*)<!-- END GENERATED -->", text, re.S)
    assert block is not None
    assert block.group(1) == configdoc.render(), "regenerate with: python -m sidecar.configdoc"
    documented = {m for m in re.findall(r"^\| `([a-z_.]+)` \|", block.group(1), re.M)}
    keys = {name for name, _ in configdoc.fields()}
    assert {f.name for f in attrs.fields(Config) if not f.metadata.get(INTERNAL)} <= keys
    assert documented == keys
    assert "UNDOCUMENTED" not in block.group(1)
    assert all(f.metadata.get("doc") for _, f in configdoc.fields()), "every field carries its doc text"


def test_unit_stop_timeout_exceeds_the_sidecars_own_shutdown() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "deploy" / "sidecar.service")
    svc = unit["Service"]
    assert svc["KillMode"] == "mixed" and svc["KillSignal"] == "SIGTERM"
    assert svc["Restart"] == "always" and svc["RestartPreventExitStatus"] == "2"
    defaults: dict[str, Any] = {f.name: f.default for f in attrs.fields(Config)}
    # app.Sidecar.shutdown: supervisor within kill_grace_s + 5, then the flush within shutdown_grace_s.
    needed = defaults["kill_grace_s"] + 5 + defaults["shutdown_grace_s"]
    assert float(svc["TimeoutStopSec"]) > needed
    assert " run --config " in svc["ExecStart"]


def test_add_a_machine_is_three_commands_the_cli_accepts() -> None:
    import shlex

    from sidecar.cli import _parser

    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("## Add a machine to the fleet", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [c for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    assert len(commands) == 3
    parsed = []
    for command in commands:
        for part in command.split("&&"):
            words = shlex.split(part.replace('"$TOKEN"', "T"))
            words = words[1:] if words[0] == "sudo" else words
            if words[0].endswith("/sidecar"):
                parsed.append(_parser().parse_args(words[1:]).command)
    assert parsed == ["join", "submit"]
