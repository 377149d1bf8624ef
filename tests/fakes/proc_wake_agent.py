"""A stand-in for an agent woken by the legacy wake path.

Usage: proc_wake_agent.py RESULTS_DIR MODE TASK_ID
MODE: success | fail | garbage | array | confirm-only | nothing | background | wait-go
(`wait-go`: confirm at once, then write a success only once RESULTS_DIR/<TASK_ID>.go
exists: a long-working agent whose end the test decides.)
It checks that TASK_ID arrived intact through the environment as well.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    results, mode, task_id = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    if os.environ.get("TASK_ID") != task_id:
        print("TASK_ID mismatch", file=sys.stderr)
        return 2
    started = results / f"{task_id}.started"
    result = results / f"{task_id}.json"
    if mode == "nothing":
        return 0
    started.write_text("")
    if mode == "confirm-only":
        return 0
    if mode == "wait-go":
        go = results / f"{task_id}.go"
        while not go.exists():
            time.sleep(0.01)
        mode = "success"
    if mode == "background":
        # A long-lived process the agent leaves behind (its stdout detached).
        child = subprocess.Popen(["sleep", "1000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (results / "bg.pid").write_text(str(child.pid))
        mode = "success"
    if mode == "success":
        body = json.dumps({"status": "success", "output": f"did {task_id}", "extra": 1})
    elif mode == "fail":
        body = json.dumps({"status": "failed", "reason": "tests_failed", "error": "3 tests failed"})
    elif mode == "array":
        body = "[1, 2]"
    else:
        body = '{"status": "succ'
    tmp = result.with_suffix(".tmp")
    tmp.write_text(body)
    tmp.rename(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
