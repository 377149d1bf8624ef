"""A subreaper daemon finds a task's leftovers in its own tree, kills them and reaps them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.fakes.proc_helpers import alive

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import trio
    from sidecar import procs, proctree

    async def main():
        out = {"subreaper": procs.become_subreaper()}
        marker = "sc-test-subreaper-" + str(os.getpid())
        env = procs.child_env(os.environ, marker)
        # The shell starts a session of its own and exits: its child is orphaned (and
        # spared by run_child, as on the wake path, so that the sweep below finds it).
        got = []
        async def keep(line):
            got.append(line)
        res = await procs.run_child(
            ["/bin/sh", "-c", "setsid sleep 60 >/dev/null 2>&1 & echo $!"],
            cwd=Path("/"), env=env, marker=marker, on_stdout=keep, kill_leftovers=False,
        )
        orphan = int(got[0])
        out["returncode"] = res.returncode
        out["orphan"] = orphan
        def settled():
            # Re-parented (that follows the shell's exit), and past its exec of
            # sleep: in the middle of an exec its environment cannot be read, which
            # is the late sweep's case (supervisor), not this test's. On a busy
            # machine the shell could exit before its child had made the exec.
            try:
                comm = Path(f"/proc/{orphan}/comm").read_text().strip()
            except OSError:
                comm = ""
            return orphan in proctree._children(os.getpid()) and comm == "sleep"
        for _ in range(500):
            if settled():
                break
            await trio.sleep(0.01)
        out["reparented_to_us"] = orphan in proctree._children(os.getpid())
        out["found_in_tree"] = orphan in procs.find_marked(marker)
        out["killed"] = procs.kill_marked(marker)
        for _ in range(200):  # SIGKILL is asynchronous: reap once it is dead
            proctree.reap_orphans()
            if orphan not in proctree._children(os.getpid()):
                break
            await trio.sleep(0.01)
        out["left_as_child"] = proctree._children(os.getpid())
        print(json.dumps(out))

    trio.run(main)
    """
)


def test_orphans_of_a_task_are_found_below_us_killed_and_reaped() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["subreaper"] is True
    assert out["returncode"] == 0
    assert out["reparented_to_us"] and out["found_in_tree"]
    assert out["killed"] == 1
    assert out["left_as_child"] == []  # reaped: no zombie left behind
    assert not alive(out["orphan"])


def test_a_process_without_the_marker_is_never_signalled_even_when_named() -> None:
    """kill_marked re-checks the marker through a pidfd before it signals: a pid that
    was given to a stranger between the scan and the kill is left alone."""
    from sidecar import proctree

    stranger = subprocess.Popen(["sleep", "30"])
    try:
        needles = (proctree._needle("sc-not-this-one", prefix=False),)
        assert proctree._signal_if_marked(stranger.pid, needles, 9) is False
        assert stranger.poll() is None  # still running
    finally:
        stranger.kill()
        stranger.wait()


def test_a_process_with_no_child_finds_no_descendant_without_walking_proc() -> None:
    """The end of every task sweeps for its marker: with no child at all (the common
    case once the task's child is reaped) that costs one waitid, not a /proc walk;
    with a child, a zombie one included, the walk happens and finds it."""
    script = textwrap.dedent(
        """
        import os, subprocess
        from sidecar import proctree
        walked = []
        real = proctree._children
        proctree._children = lambda pid: walked.append(pid) or real(pid)
        assert proctree._descendants() == [] and walked == [], walked
        child = subprocess.Popen(["sleep", "30"])
        assert proctree._descendants() == [child.pid] and walked
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped: a zombie
        walked.clear()
        assert proctree._descendants() == [child.pid] and walked  # a zombie is still a child
        child.wait()
        walked.clear()
        assert proctree._descendants() == [] and walked == [], walked
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
