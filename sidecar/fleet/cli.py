"""The `join`, `leave` and `submit` subcommands of `sidecar` (parsers and runners)."""

from __future__ import annotations

import argparse
import sys
from functools import partial

import trio

_RAW = argparse.RawDescriptionHelpFormatter

_JOIN_EPILOG = """examples:
  sidecar join --hub http://hub.example:4000
  sidecar join --hub http://hub.example:4000 --name gpu-box-1 --service
  sidecar join --hub http://hub.example:4000 --name gpu-box-1 --rejoin --token T   # after a 409

The steps print numbered lines; a rerun of the same command resumes where the last one stopped.
exit status: 0 joined, 1 a step failed (rerun to resume), 2 bad usage.
"""

_LEAVE_EPILOG = """examples:
  sidecar leave --name gpu-box-1
  sidecar leave --name gpu-box-1 --hub http://hub.example:4000 --token T

Only a directory that `sidecar join` made (it holds join's marker) is removed.
exit status: 0 every step ok, 1 a step failed (the others still ran), 2 bad usage.
"""

_SUBMIT_EPILOG = """examples:
  sidecar submit --hub http://hub:4000 --token T --description 'run the tests' --shell 'make test' --wait
  sidecar submit --hub http://hub:4000 --token T --description 'Fix the flaky test' \\
      --verify test_passes:tests/test_x.py --verify git_clean --priority urgent
  sidecar submit ... --wait --json | jq .

exit status: 0 submitted (with --wait: completed), 1 failed or refused, 124 not finished within --timeout.
"""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    join = sub.add_parser(
        "join",
        help="make this machine an agent of the fleet",
        description="Preflight, register on the hub, clone its default repository, write the config "
        "and token file, optionally install the systemd service, and run a smoke test.",
        epilog=_JOIN_EPILOG,
        formatter_class=_RAW,
    )
    join.add_argument("--hub", required=True, help="the hub's HTTP address, e.g. http://HOST:4000")
    join.add_argument("--name", help="agent name (default: <hostname>-<hex>, free on the hub)")
    join.add_argument("--rejoin", action="store_true", help="join with an existing registration (--token)")
    join.add_argument("--token", help="the agent's existing token (with --rejoin)")
    join.add_argument("--dir", help="the agent's directory (default: ~/.local/share/sidecar/agents/NAME)")
    join.add_argument("--service", action="store_true", help="install, enable and start a systemd unit")
    join.add_argument("--no-smoke", action="store_true", help="skip the smoke test")
    join.add_argument(
        "--unit-dir",
        help="where the unit goes (default: /etc/systemd/system as root, else ~/.config/systemd/user)",
    )
    join.add_argument("--ollama-url", default="http://127.0.0.1:11434", help="the Ollama server to check")
    join.add_argument("--clone-timeout", type=float, default=600.0, metavar="S")
    join.add_argument("--smoke-timeout", type=float, default=120.0, metavar="S")

    leave = sub.add_parser(
        "leave",
        help="take an agent out of the fleet",
        description="Stop and disable its service, revoke its token on the hub, remove its directory.",
        epilog=_LEAVE_EPILOG,
        formatter_class=_RAW,
    )
    leave.add_argument("--name", required=True)
    leave.add_argument("--hub", help="the hub's HTTP address (default: from the agent's config)")
    leave.add_argument("--token", help="a token the hub accepts (default: the agent's own)")
    leave.add_argument("--dir", help="the agent's directory (default: ~/.local/share/sidecar/agents/NAME)")
    leave.add_argument("--unit-dir", help="where join put the unit (see join --unit-dir)")

    sm = sub.add_parser(
        "submit",
        help="submit a task to the hub (and follow it)",
        description="POST a task to the hub's /api/tasks; with --wait, follow it to its end.",
        epilog=_SUBMIT_EPILOG,
        formatter_class=_RAW,
    )
    sm.add_argument("--hub", required=True, help="the hub's HTTP address, e.g. http://HOST:4000")
    sm.add_argument("--token", required=True, help="a token the hub accepts as Bearer")
    sm.add_argument("--description", required=True)
    sm.add_argument("--priority", default="normal", choices=["low", "normal", "urgent", "critical"])
    sm.add_argument("--shell", metavar="CMD", help="run CMD on the agent (metadata.shell_command)")
    sm.add_argument("--metadata", metavar="JSON", help="a JSON object merged into metadata")
    sm.add_argument("--target", metavar="AGENT", help="only AGENT may take it (metadata.assign_to)")
    sm.add_argument(
        "--verify",
        action="append",
        default=[],
        metavar="TYPE:TARGET",
        help="a verification step (file_exists, test_passes, git_clean, command_succeeds)",
    )
    sm.add_argument("--tier", choices=["trivial", "standard", "complex"], help="complexity_tier")
    sm.add_argument("--max-retries", type=int, metavar="N")
    sm.add_argument("--wait", action="store_true", help="follow the task to its end")
    sm.add_argument("--timeout", type=float, default=3600.0, metavar="S", help="with --wait (default 3600)")
    sm.add_argument("--json", action="store_true", help="JSON lines on stdout")


def run(args: argparse.Namespace) -> int:
    if args.command == "join":
        from .join import JoinRequest, run_join

        req = JoinRequest(
            hub=args.hub,
            name=args.name,
            rejoin=args.rejoin,
            token=args.token,
            dir=args.dir,
            service=args.service,
            smoke=not args.no_smoke,
            unit_dir=args.unit_dir,
            clone_timeout_s=args.clone_timeout,
            smoke_timeout_s=args.smoke_timeout,
            ollama_url=args.ollama_url,
        )
        return trio.run(run_join, req, sys.stdout)
    if args.command == "leave":
        from .leave import LeaveRequest, run_leave

        lreq = LeaveRequest(
            name=args.name, hub=args.hub, token=args.token, dir=args.dir, unit_dir=args.unit_dir
        )
        return trio.run(run_leave, lreq, sys.stdout)
    from .submit import SubmitRequest, run_submit

    if args.timeout <= 0:
        print("sidecar submit: --timeout must be positive", file=sys.stderr)
        return 2
    sreq = SubmitRequest(
        hub=args.hub,
        token=args.token,
        description=args.description,
        priority=args.priority,
        shell=args.shell,
        metadata=args.metadata,
        target=args.target,
        verify=tuple(args.verify),
        tier=args.tier,
        max_retries=args.max_retries,
        wait=args.wait,
        timeout_s=args.timeout,
        json=args.json,
    )
    return trio.run(partial(run_submit, sreq, sys.stdout))
