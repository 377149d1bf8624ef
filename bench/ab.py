"""Paired A/B of `bench/latency.py` between two checkouts: the only fair "before and after" here.

    .venv/bin/python bench/ab.py BASE_DIR [CUR_DIR] [--pairs 6] [--tasks 300] [--state-dir DIR]

BASE_DIR and CUR_DIR are checkouts of this repository (a `git worktree add
/tmp/base REV` for the old code; CUR_DIR defaults to this one). Each pair runs
CUR_DIR's `bench/latency.py` once against each checkout (`PYTHONPATH` set, so
the sidecar under test is that checkout's), in alternating order, and prints
both runs and their ratio. The summary gives, per figure, the median of the
per-pair ratios: the machine's drift between pairs cancels out, its noise
within a pair does not. On this project's VMs two checkouts of the same code
gave per-pair ratios of 0.78-1.05 for the complete median, so a median ratio
within a few percent of 1.0 over six pairs is no difference.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

FIGURES = {
    "accept": r"task_accepted: median\s+([\d.]+)",
    "complete": r"task_complete: median\s+([\d.]+)",
    "p99": r"task_complete: median\s+[\d.]+ ms\s+p99\s+([\d.]+)",
    "cpu": r"CPU per task: sidecar ([\d.]+) ms",
}


def run_once(bench: Path, checkout: Path, args: argparse.Namespace) -> dict[str, float]:
    argv = [sys.executable, str(bench), "--tasks", str(args.tasks), "--warmup", "20", "--floor", "50"]
    if args.state_dir:
        argv += ["--state-dir", args.state_dir]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    proc = subprocess.run(argv, cwd=checkout, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"bench failed in {checkout}:\n{proc.stdout}\n{proc.stderr}")
    out = {}
    for name, pattern in FIGURES.items():
        m = re.search(pattern, proc.stdout)
        if m is None:
            raise SystemExit(f"no {name} figure in the output of {checkout}:\n{proc.stdout}")
        out[name] = float(m.group(1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base", type=Path)
    ap.add_argument("cur", type=Path, nargs="?", default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--tasks", type=int, default=300)
    ap.add_argument("--state-dir", default=None, help="passed to latency.py")
    args = ap.parse_args()
    bench = Path(__file__).resolve().parent / "latency.py"
    pairs = []
    for i in range(args.pairs):
        order = [("base", args.base), ("cur", args.cur)]
        if i % 2:
            order.reverse()
        pair = {name: run_once(bench, checkout, args) for name, checkout in order}
        pairs.append(pair)
        b, c = pair["base"], pair["cur"]
        print(
            f"pair {i}: base "
            + " ".join(f"{k} {b[k]:.2f}" for k in FIGURES)
            + " | cur "
            + " ".join(f"{k} {c[k]:.2f}" for k in FIGURES)
            + f" | complete ratio {c['complete'] / b['complete']:.3f}",
            flush=True,
        )
    for name in FIGURES:
        ratios = [p["cur"][name] / p["base"][name] for p in pairs]
        base = statistics.median(p["base"][name] for p in pairs)
        cur = statistics.median(p["cur"][name] for p in pairs)
        print(
            f"{name:<8}: base median {base:.2f}, cur median {cur:.2f};"
            f" cur/base per pair: median {statistics.median(ratios):.3f}"
            f" (min {min(ratios):.3f}, max {max(ratios):.3f})"
        )


if __name__ == "__main__":
    main()
