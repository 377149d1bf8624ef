"""Host figures from /proc (as psutil computes them) and the Ollama probe.

The frame itself against the dev hub's schema: tests/test_ops_metrics.py.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import psutil
import pytest
import trio

from sidecar import reports
from sidecar.reports import CpuMeter, memory, probe_ollama
from tests.conftest import Logs
from tests.fakes.ollama_server import VERSION, open_ollama_server

# user nice system idle iowait irq softirq steal guest guest_nice
STAT_1 = "cpu  100 20 30 1000 50 5 5 0 40 10\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 1 2\n"
STAT_2 = "cpu  160 25 45 1100 90 6 9 0 70 12\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 1 2\n"
# busy delta = (60+5+15+1+4+0) = 85; idle+iowait = 100+40 = 140; total 225 (guest left out)
MEMINFO = (
    "MemTotal:       16000000 kB\nMemFree:         2000000 kB\nMemAvailable:    9000000 kB\n"
    "Buffers:          300000 kB\nCached:          5000000 kB\nSReclaimable:     400000 kB\n"
    "Shmem:            100000 kB\nActive:          6000000 kB\nInactive:        4000000 kB\n"
    "HugePages_Total:       0\n"
)


@pytest.fixture
def procfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake procfs directory that psutil reads too (its PROCFS_PATH)."""
    monkeypatch.setattr(psutil, "PROCFS_PATH", str(tmp_path))
    return tmp_path


def test_cpu_percent_as_psutil_computes_it(procfs: Path) -> None:
    stat = procfs / "stat"
    stat.write_text(STAT_1)
    meter = CpuMeter(str(stat))
    assert meter.percent() == 0.0  # the baseline only
    psutil.cpu_percent(interval=None)  # psutil's baseline, from the same file
    stat.write_text(STAT_2)
    ours, theirs = meter.percent(), psutil.cpu_percent(interval=None)
    assert ours == round(100 * 85 / 225, 1) == 37.8
    assert ours == pytest.approx(theirs, abs=0.05)
    # No time passed: 0.0, not a division by zero.
    assert meter.percent() == 0.0
    # A counter that went back (seen on real kernels) counts 0, as in psutil.
    stat.write_text("cpu  150 25 45 1200 90 6 9 0 70 12\n")
    assert meter.percent() == pytest.approx(psutil.cpu_percent(interval=None), abs=0.05) == 0.0


def test_cpu_line_of_an_old_kernel_and_a_bad_file(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  10 0 10 80\n")  # 2.4: four fields
    meter = CpuMeter(str(stat))
    meter.percent()
    stat.write_text("cpu  20 0 20 140\n")
    assert meter.percent() == 25.0
    stat.write_text("intr 1 2 3\n")
    with pytest.raises(OSError, match="no aggregate cpu line"):
        meter.percent()


def test_memory_as_psutil_computes_it(procfs: Path) -> None:
    (procfs / "meminfo").write_text(MEMINFO)
    used, total = memory(str(procfs / "meminfo"))
    mem = psutil.virtual_memory()
    assert (used, total) == (mem.total - mem.available, mem.total) == (7_000_000 * 1024, 16_000_000 * 1024)


def test_memory_without_mem_available(tmp_path: Path) -> None:
    path = tmp_path / "meminfo"
    path.write_text(MEMINFO.replace("MemAvailable:    9000000 kB\n", ""))
    assert memory(str(path)) == ((16_000_000 - 2_000_000 - 300_000 - 5_000_000) * 1024, 16_000_000 * 1024)
    path.write_text("MemFree: 1 kB\n")
    with pytest.raises(OSError, match="no MemTotal"):
        memory(str(path))


def test_this_host_in_sane_ranges() -> None:
    used, total = memory()
    assert total == psutil.virtual_memory().total
    assert 64 * 1024 * 1024 < total < 64 * 1024**4 and 0 < used < total
    # The two reads are a few microseconds apart: the same figure within 64 MiB.
    assert abs(used - (total - psutil.virtual_memory().available)) < 64 * 1024 * 1024


async def test_cpu_percent_rises_while_a_child_burns_cpu() -> None:
    """Over a window where a child spins, the host was busy at least the child's share."""
    meter = CpuMeter()
    meter.percent()
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    spin = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\n"
    await trio.run_process([sys.executable, "-c", spin])
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic() - start
    busy = meter.percent()
    child_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert child_cpu >= 0.6
    floor = 100 * child_cpu / (wall * (os.cpu_count() or 1))
    # Jiffies are 1-10 ms: allow a few of them over the window.
    assert floor * 0.9 - 2 <= busy <= 100.0
    assert busy > 5.0


def test_module_meter_is_primed_by_prime_cpu_percent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text(STAT_1)
    monkeypatch.setattr(reports, "_cpu", CpuMeter(str(stat)))
    reports.prime_cpu_percent()
    stat.write_text(STAT_2)
    assert reports.cpu_percent() == 37.8


# -- probe_ollama ------------------------------------------------------------------


async def test_probe_ollama_reads_the_version(logs: Logs) -> None:
    async with open_ollama_server() as server:
        version = await probe_ollama(server.url.removeprefix("http://"))  # host:port is taken too
    assert version == VERSION == logs.named("ollama_reachable")[0]["version"]


async def test_probe_ollama_unreachable_is_a_warning(logs: Logs) -> None:
    assert await probe_ollama("http://127.0.0.1:9", timeout_s=2) is None
    [entry] = logs.named("ollama_unreachable")
    assert entry["url"] == "http://127.0.0.1:9" and "refused" in entry["error"].lower()
