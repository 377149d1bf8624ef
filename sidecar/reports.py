"""Host reports for the hub: `resource_report` (CPU, RAM, VRAM) and `ollama_report`.

CPU and RAM come from /proc/stat and /proc/meminfo (procfs, read directly on
the loop like proctree's scans; psutil would cost 1.3 MiB of RSS for two
numbers), computed as psutil does. VRAM is read from `nvidia-smi` when it is
on PATH (no NVIDIA library is imported); without a GPU the VRAM fields are
omitted, as the hub's schema allows. Ollama's `/api/version` is one `httpget`
(no httpx).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from . import procs
from .httpget import FetchError, get_json
from .log import get_logger
from .messages import now_ms

log = get_logger("sidecar.reports")

# Marks the processes the resource report starts (nvidia-smi).
REPORT_MARKER = "sc-report"
FIRST_REPORT_DELAY_S = 5.0
REPORT_INTERVAL_S = 30.0


class CpuMeter:
    """Host CPU use between two calls, from /proc/stat's aggregate `cpu` line.

    As psutil's `cpu_percent(interval=None)`: busy = total - idle - iowait,
    where total leaves out guest and guest_nice (already counted in user and
    nice); a counter that went back counts 0. The first call only takes the
    baseline and answers 0.0.
    """

    def __init__(self, stat_path: str = "/proc/stat") -> None:
        self._path = stat_path
        self._last: list[int] | None = None

    def _times(self) -> list[int]:
        with open(self._path, "rb") as f:
            fields = f.readline().split()
        if not fields or fields[0] != b"cpu":
            raise OSError(f"no aggregate cpu line in {self._path}")
        # user nice system idle iowait irq softirq steal (guest guest_nice: left out)
        return ([int(v) for v in fields[1:9]] + [0] * 8)[:8]

    def percent(self) -> float:
        now = self._times()
        last, self._last = self._last, now
        if last is None:
            return 0.0
        delta = [max(0, a - b) for a, b in zip(now, last, strict=True)]
        total = sum(delta)
        busy = total - delta[3] - delta[4]
        return round(100.0 * busy / total, 1) if total else 0.0


_cpu = CpuMeter()


def prime_cpu_percent() -> None:
    """The CPU figure is use since the previous call: take the first baseline early."""
    _cpu.percent()


def cpu_percent() -> float:
    """Host CPU use (0-100) since the previous call, as psutil.cpu_percent(interval=None)."""
    return _cpu.percent()


def memory(meminfo_path: str = "/proc/meminfo") -> tuple[int, int]:
    """(used, total) RAM bytes: MemTotal - MemAvailable, MemTotal.

    Kernels before 3.14 have no MemAvailable (and a buggy one may say 0):
    MemFree + Buffers + Cached then, as psutil did before kernel 4.4.
    """
    values: dict[bytes, int] = {}
    with open(meminfo_path, "rb") as f:
        for line in f:
            name, _, rest = line.partition(b":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[name] = int(parts[0]) * 1024  # kB
    total = values.get(b"MemTotal")
    if not total:
        raise OSError(f"no MemTotal in {meminfo_path}")
    available = values.get(b"MemAvailable")
    if not available:
        available = sum(values.get(k, 0) for k in (b"MemFree", b"Buffers", b"Cached"))
    return total - min(available, total), total


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
    ram_used, ram_total = memory()
    frame: dict[str, Any] = {
        "type": "resource_report",
        **({"agent_id": agent_id} if agent_id else {}),
        "cpu_percent": cpu_percent(),
        "ram_used_bytes": ram_used,
        "ram_total_bytes": ram_total,
        "timestamp": now_ms(),
    }
    vram = await read_vram(nvidia_smi)
    if vram is not None:
        frame["vram_used_bytes"], frame["vram_total_bytes"] = vram
    return frame


async def probe_ollama(url: str, timeout_s: float = 5.0) -> str | None:
    """Return Ollama's version if reachable at `url`, else None (logged either way)."""
    base = (url if "://" in url else f"http://{url}").rstrip("/")
    try:
        answer = await get_json(f"{base}/api/version", timeout_s=timeout_s, max_bytes=64 * 1024)
    except FetchError as exc:
        log.warning("ollama_unreachable", url=base, error=str(exc)[:300])
        return None
    version = str(answer.get("version", "?")) if isinstance(answer, dict) else "?"
    log.info("ollama_reachable", url=base, version=version)
    return version
