"""Host reports, the /metrics and /healthz endpoint, and task log context, against the dev hub."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar import reports
from sidecar.app import open_sidecar
from sidecar.devhub import open_dev_hub
from sidecar.devhub.schemas import validate_ws_message
from tests.conftest import Logs

TOKEN = "metrics-secret-token"
SIDECAR = {"target_type": "sidecar"}


def _fake_nvidia_smi(bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "nvidia-smi"
    # Two GPUs: used, total in MiB, as `--format=csv,noheader,nounits` prints them.
    exe.write_text("#!/bin/sh\nprintf '1024, 8192\\n512, 4096\\n'\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize("gpu", [True, False])
async def test_resource_report_accepted_by_dev_hub(
    make_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpu: bool
) -> None:
    monkeypatch.setattr(reports, "FIRST_REPORT_DELAY_S", 0.0)
    bin_dir = tmp_path / "bin"
    if gpu:
        _fake_nvidia_smi(bin_dir)
    # PATH without any real nvidia-smi, with the fake one when gpu.
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    async with open_dev_hub(tokens={"agent-1": TOKEN}) as hub:
        config = make_config(token=TOKEN, hub_url=hub.ws_url)
        async with open_sidecar(config):
            await hub.wait_until(lambda: hub.resource_reports, timeout=15)
        report = hub.resource_reports[0]
        assert hub.violations == []
        assert validate_ws_message(report) == [] or validate_ws_message(report) is None
        cpus = os.cpu_count() or 1
        assert isinstance(report["cpu_percent"], float) and 0.0 <= report["cpu_percent"] <= 100.0 * cpus
        for key in ("ram_used_bytes", "ram_total_bytes", "timestamp"):
            assert isinstance(report[key], int) and not isinstance(report[key], bool), key
        assert 0 < report["ram_used_bytes"] <= report["ram_total_bytes"]
        if gpu:
            assert report["vram_used_bytes"] == (1024 + 512) * 1024 * 1024
            assert report["vram_total_bytes"] == (8192 + 4096) * 1024 * 1024
        else:
            assert "vram_used_bytes" not in report and "vram_total_bytes" not in report


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(fams: dict[str, Any], name: str, sample: str | None = None, **labels: str) -> float:
    fam = fams[name]
    for s in fam.samples:
        if (sample is None or s.name == sample) and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise AssertionError(f"no sample {sample or name} {labels} in {fam.samples}")


async def test_metrics_and_healthz_scraped(make_config: Any, logs: Logs) -> None:
    async with open_dev_hub(tokens={"agent-1": TOKEN}, max_retries=0) as hub:
        config = make_config(token=TOKEN, hub_url=hub.ws_url, metrics_listen="127.0.0.1:0", capacity=2)
        async with open_sidecar(config) as sc, httpx.AsyncClient() as http:
            url = sc.metrics.bound_url
            assert url is not None and url.startswith("http://127.0.0.1:")
            await hub.wait_until(lambda: hub.connected("agent-1"))
            ok = hub.submit(
                {"description": "", "metadata": {"shell_command": "echo hello; echo world"}},
                routing_decision=SIDECAR,
            )
            bad = hub.submit(
                {"description": "", "metadata": {"shell_command": "exit 3"}}, routing_decision=SIDECAR
            )
            slow = hub.submit(
                {"description": "", "metadata": {"shell_command": "sleep 30", "timeout_ms": 300}},
                routing_decision=SIDECAR,
            )
            done = ("completed", "dead_letter")
            await hub.wait_until(lambda: all(hub.task(t).status in done for t in (ok, bad, slow)), timeout=30)
            await hub.wait_until(lambda: sc.outbox.depth == 0)

            resp = await http.get(f"{url}/healthz")
            assert resp.status_code == 200
            health = resp.json()
            assert health["connected"] is True and health["identified"] is True
            assert health["tasks_held"] == 0 and health["agent_id"] == "agent-1"
            assert isinstance(health["last_pong_age_s"], float) and health["last_pong_age_s"] >= 0

            resp = await http.get(f"{url}/metrics")
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/plain")
            fams = _families(resp.text)
            assert (
                _value(fams, "sidecar_tasks", "sidecar_tasks_total", outcome="success", executor="shell") == 1
            )
            assert (
                _value(fams, "sidecar_tasks", "sidecar_tasks_total", outcome="failure", executor="shell") == 1
            )
            assert (
                _value(fams, "sidecar_tasks", "sidecar_tasks_total", outcome="timeout", executor="shell") == 1
            )
            count = _value(
                fams, "sidecar_task_duration_seconds", "sidecar_task_duration_seconds_count", executor="shell"
            )
            assert count == 3
            assert _value(fams, "sidecar_hub_identified") == 1
            assert _value(fams, "sidecar_hub_connected") == 1
            assert _value(fams, "sidecar_outbox_depth") == 0
            assert _value(fams, "sidecar_progress_frames_sent", "sidecar_progress_frames_sent_total") >= 1
            for name in (
                "sidecar_progress_events_coalesced",
                "sidecar_progress_events_dropped",
                "sidecar_hub_reconnects",
                "sidecar_rate_limited",
                "sidecar_tokens",
                "sidecar_cost_usd",
            ):
                assert name in fams, name
            assert (await http.get(f"{url}/nope")).status_code == 404
            assert (await http.post(f"{url}/metrics")).status_code == 405

    # Every event a task logged while it ran carries task_id, generation and attempt.
    started: set[str] = set()
    checked = 0
    for fields in logs.entries:
        tid, event, name = fields.get("task_id"), fields["event"], fields["logger"]
        if event == "task_started":
            started.add(str(tid))
        if tid in started and event not in ("task_started",):
            # Outbox/accept delivery runs outside the task (after it ended): task_id and
            # generation only. The supervisor's inbound handlers run before any attempt.
            if name.startswith(("sidecar.delivery", "sidecar.app", "sidecar.link", "sidecar.batcher")):
                continue
            if name == "sidecar.supervisor" and event != "task_finished":
                continue
            assert isinstance(fields.get("generation"), int), (event, fields)
            assert isinstance(fields.get("attempt"), int), (event, fields)
            checked += 1
    assert started == {ok, bad, slow} and checked >= 3
    assert TOKEN not in logs.text


async def test_healthz_503_until_identified(make_config: Any) -> None:
    async with open_dev_hub(tokens={"agent-1": TOKEN}) as hub:
        config = make_config(token="wrong-token-xyz", hub_url=hub.ws_url, metrics_listen="127.0.0.1:0")
        async with open_sidecar(config) as sc, httpx.AsyncClient() as http:
            await hub.wait_until(lambda: hub.frames("agent-1", type="identify"))
            resp = await http.get(f"{sc.metrics.bound_url}/healthz")
            assert resp.status_code == 503
            assert resp.json()["identified"] is False and resp.json()["status"] == "unavailable"
            fams = _families((await http.get(f"{sc.metrics.bound_url}/metrics")).text)
            assert _value(fams, "sidecar_hub_identified") == 0


async def test_metrics_port_taken_is_not_fatal(make_config: Any) -> None:
    import trio

    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with open_dev_hub(tokens={"agent-1": TOKEN}) as hub:
        config = make_config(token=TOKEN, hub_url=hub.ws_url, metrics_listen=f"127.0.0.1:{port}")
        async with open_sidecar(config) as sc:
            await hub.wait_until(lambda: hub.connected("agent-1"))
            assert sc.metrics.bound_url is None
    await listener.aclose()


def test_a_cancelled_runs_spend_is_counted() -> None:
    """A task ended without a result (a cancel, its limit) still spent what its
    Claude session cost so far: the tokens and cost counters include it."""
    from sidecar.messages import parse_task
    from sidecar.promexport import Prometheus
    from sidecar.taskrun import Spend

    prom = Prometheus(observed=None)  # type: ignore[arg-type]  # only its task counters are read
    task = parse_task({"type": "task_assign", "task_id": "t", "routing_decision": {"target_type": "claude"}})
    prom.record_unfinished(task, "cancelled", 1.0, Spend("claude-x", 10, 5, 0.25))
    prom.record_unfinished(task, "timeout", 1.0, Spend())  # nothing seen: nothing counted

    def samples(metric: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (sm.name, tuple(sorted(sm.labels.items()))): sm.value
            for family in metric.collect()
            for sm in family.samples
            if sm.name.endswith("_total")
        }

    assert samples(prom.cost) == {("sidecar_cost_usd_total", (("model", "claude-x"),)): 0.25}
    assert samples(prom.tokens) == {
        ("sidecar_tokens_total", (("direction", "in"), ("model", "claude-x"))): 10.0,
        ("sidecar_tokens_total", (("direction", "out"), ("model", "claude-x"))): 5.0,
    }
