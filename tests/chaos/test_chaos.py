"""The chaos suite: randomized task lifecycles under injected faults, every invariant checked.

CI runs `CI_EPISODES` seeded episodes (a fresh base seed each run, printed);
`@pytest.mark.soak` runs many more. Replay one episode with its seed:

    CHAOS_SEED=<seed> .venv/bin/pytest tests/chaos/test_chaos.py -k replay -s
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from .driver import Episode, Report, run_episodes, summary

CI_EPISODES = int(os.environ.get("CHAOS_EPISODES", "8"))
CI_TASKS = int(os.environ.get("CHAOS_TASKS", "250"))
SOAK_EPISODES = int(os.environ.get("CHAOS_SOAK_EPISODES", "160"))
SOAK_TASKS = int(os.environ.get("CHAOS_SOAK_TASKS", "250"))
PARALLEL = int(os.environ.get("CHAOS_PARALLEL", "4"))


def _base_seed() -> int:
    env = os.environ.get("CHAOS_BASE_SEED")
    return int(env) if env else random.SystemRandom().randrange(10**9)


# Violations shown with their task's dossier in the failure message (all are in
# violations.txt and in the output printed as they happen).
FAIL_DOSSIERS = 3


def _fail_with_replay(rep: Report) -> None:
    seeds = sorted({int(v.split("]")[0].split()[-1]) for v in rep.violations})
    with_detail = [v for v in rep.violations if v in rep.details][:FAIL_DOSSIERS]
    lines = "\n".join(rep.text(v) if v in with_detail else v for v in rep.violations[:40])
    replay = "\n".join(
        f"  CHAOS_SEED={s} .venv/bin/pytest tests/chaos/test_chaos.py -k replay -s" for s in seeds
    )
    pytest.fail(f"{len(rep.violations)} invariant violations:\n{lines}\nReplay with:\n{replay}")


async def _run(episodes: int, tasks: int, tmp_path: Path) -> Report:
    base = _base_seed()
    print(f"chaos base seed {base}: CHAOS_BASE_SEED={base} reruns this whole set", flush=True)
    seeds = [base + i for i in range(episodes)]
    rep = await run_episodes(
        seeds, tmp_path, lambda s, root: Episode(s, root, tasks=tasks), parallel=PARALLEL
    )
    print(json.dumps({"total": summary(rep), "faults": dict(rep.faults), "outcomes": dict(rep.outcomes)}))
    # Every violation in full with its task's dossier, beside the episodes' state
    # dirs and logs (the failure shows 40; each episode dir has its own file too).
    (tmp_path / "violations.txt").write_text("".join(rep.text(v) + "\n" for v in rep.violations))
    return rep


async def test_chaos_ci(tmp_path: Path) -> None:
    rep = await _run(CI_EPISODES, CI_TASKS, tmp_path)
    if rep.violations:
        _fail_with_replay(rep)
    assert rep.lifecycles >= CI_EPISODES * CI_TASKS  # every planned task ran at least once


@pytest.mark.skipif("CHAOS_SEED" not in os.environ, reason="set CHAOS_SEED=<seed> to replay one episode")
async def test_chaos_replay(tmp_path: Path) -> None:
    seed = int(os.environ["CHAOS_SEED"])
    rep = await Episode(seed, tmp_path / f"ep{seed}", tasks=CI_TASKS).run()
    print(json.dumps(summary(rep)))
    if rep.violations:
        _fail_with_replay(rep)


@pytest.mark.soak
async def test_chaos_soak(tmp_path: Path) -> None:
    rep = await _run(SOAK_EPISODES, SOAK_TASKS, tmp_path)
    if rep.violations:
        _fail_with_replay(rep)
