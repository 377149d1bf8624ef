"""Host reports for the hub: `resource_report` (CPU, RAM, VRAM) and `ollama_report`.

Host metrics come from psutil. VRAM is read from `nvidia-smi` when it is on
PATH (no NVIDIA library is imported); without a GPU the VRAM fields are
omitted, as the hub's schema allows.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import psutil

from . import procs
from .log import get_logger
from .messages import now_ms

log = get_logger("sidecar.reports")

# Marks the processes the resource report starts (nvidia-smi).
REPORT_MARKER = "sc-report"
FIRST_REPORT_DELAY_S = 5.0
REPORT_INTERVAL_S = 30.0


def prime_cpu_percent() -> None:
    """psutil's first cpu_percent() call has no baseline; make it early."""
    psutil.cpu_percent(interval=None)


async def read_vram(nvidia_smi: str | None = None) -> tuple[int, int] | None:
    """(used, total) VRAM bytes summed over NVIDIA GPUs, or None without one."""
    exe = nvidia_smi or shutil.which("nvidia-smi")
    if exe is None:
        return None
    argv = [exe, "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"]
    env = procs.child_env(os.environ, REPORT_MARKER)
    try:
        proc = await procs.capture(
            argv, cwd=Path("/"), env=env, marker=REPORT_MARKER, timeout_s=5, grace_s=1.0
        )
    except OSError:
        return None
    if proc.returncode != 0:
        return None
    used = total = 0
    for line in proc.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            used += int(parts[0]) * 1024 * 1024  # MiB
            total += int(parts[1]) * 1024 * 1024
    return (used, total) if total else None


async def resource_report(nvidia_smi: str | None = None, agent_id: str | None = None) -> dict[str, Any]:
    """The frame; with `agent_id`, as the original sidecar sends it."""
    mem = psutil.virtual_memory()
    frame: dict[str, Any] = {
        "type": "resource_report",
        **({"agent_id": agent_id} if agent_id else {}),
        "cpu_percent": float(psutil.cpu_percent(interval=None)),
        "ram_used_bytes": int(mem.total - mem.available),
        "ram_total_bytes": int(mem.total),
        "timestamp": now_ms(),
    }
    vram = await read_vram(nvidia_smi)
    if vram is not None:
        frame["vram_used_bytes"], frame["vram_total_bytes"] = vram
    return frame


async def probe_ollama(http: httpx.AsyncClient, url: str, timeout_s: float = 5.0) -> str | None:
    """Return Ollama's version if reachable at `url`, else None (logged either way)."""
    base = (url if "://" in url else f"http://{url}").rstrip("/")
    try:
        resp = await http.get(f"{base}/api/version", timeout=timeout_s)
        resp.raise_for_status()
        version = str(resp.json().get("version", "?"))
    except (httpx.HTTPError, ValueError) as exc:
        log.warning("ollama_unreachable", url=base, error=f"{type(exc).__name__}: {exc}"[:300])
        return None
    log.info("ollama_reachable", url=base, version=version)
    return version
