"""The `sidecar` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial

import trio

from . import __version__
from .config import ConfigError, load_config
from .entry import release as release_signals
from .entry import take_pending as take_pending_signals
from .log import setup_logging

_EPILOG = """examples:
  sidecar demo                                 # dev hub + sidecar + a few shell tasks, live
  sidecar exec --shell 'make test'             # one task here, no hub; exit 0/1/124
  sidecar exec --ollama qwen3:8b --prompt 'Explain trio nurseries' --json
  sidecar check --config /etc/sidecar/sidecar.toml   # config, state dir, hub, Ollama, claude
  sidecar run --config /etc/sidecar/sidecar.toml
  sidecar run --config ~/agentcom/sidecar/config.json   # the Node sidecar's file, unchanged
  sidecar hub --port 4000 --token t0k --agent agent-1
  sidecar join --hub http://hub.example:4000 --service     # add this machine to the fleet
  sidecar submit --hub http://hub.example:4000 --token T --description hi --shell 'echo hi' --wait
  curl -XPOST localhost:4000/api/tasks -d '{"description":"hi","metadata":{"shell_command":"echo hi"},
       "routing_decision":{"target_type":"sidecar"}}'
"""

_EXEC_EPILOG = """examples:
  sidecar exec --shell 'for i in 1 2 3; do echo $i; sleep 1; done'
  sidecar exec --shell 'make test' --timeout 600
  sidecar exec --ollama qwen3:8b --prompt 'Write a haiku about queues'
  sidecar exec --ollama qwen3:8b --ollama-url http://gpu-box:11434 --prompt 'hi' --json | jq .
  sidecar exec --claude --prompt 'Summarise README.md' --config sidecar.toml

exit status: 0 success, 1 failure, 124 time-out, 130 interrupted (Ctrl-C).
--json prints one JSON object per line: {"event":"progress",...} for each progress event,
then {"event":"result","outcome":...,"exit_code":...,"result":{...}}.
"""

_CHECK_EPILOG = """examples:
  sidecar check --config /etc/sidecar/sidecar.toml
  SIDECAR_TOKEN=... sidecar check --config sidecar.toml
  sidecar check --config config.json --no-identify    # leave a running sidecar's session alone

note: identify restarts this agent's session on the hub; a sidecar already running with the same
agent_id is disconnected (and the hub reclaims its task). Use --no-identify on a live agent.
exit status: 0 ready, 1 a config/state dir/state db/hub check failed, 2 the config is invalid.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidecar",
        description="trio-sidecar: the AgentCom hub worker (shell, Ollama and Claude Code tasks).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"trio-sidecar {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "json", "kv"],
        help="auto: key=value on a terminal, JSON lines otherwise",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the daemon",
        description="Connect to the hub and run tasks until SIGTERM/SIGINT.",
        epilog="example:\n  SIDECAR_TOKEN=... sidecar run --config sidecar.toml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--config", "-c", help="TOML config, or the original sidecar's config.json")

    hub = sub.add_parser(
        "hub",
        help="run the built-in dev hub",
        description="A small hub speaking the AgentCom protocol (with its validation and rate limits), "
        "plus the real hub's HTTP API (GET /health, GET /api/agents, POST /api/onboard/register, "
        "GET /api/config/default-repo, POST /api/tasks, GET /api/tasks/ID, DELETE /admin/tokens/NAME) "
        "and its own POST /api/tasks/ID/cancel.",
        epilog="examples:\n  sidecar hub --port 4000 --token t0k --agent agent-1\n"
        "  sidecar hub --port 4000 --default-repo https://example.com/repo.git --require-auth",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hub.add_argument("--host", default="127.0.0.1")
    hub.add_argument("--port", type=int, default=4000)
    hub.add_argument("--token", help="a token for --agent (else agents register: sidecar join)")
    hub.add_argument("--agent", help="an agent allowed in with --token")
    hub.add_argument("--default-repo", metavar="URL", help="what GET /api/config/default-repo names")
    hub.add_argument(
        "--require-auth", action="store_true", help="require a Bearer token on /api/tasks (as the real hub)"
    )
    hub.add_argument(
        "--newer",
        action="store_true",
        help="accept the newer frame types (state_report, wake_result, agent_restarting)",
    )

    demo = sub.add_parser(
        "demo",
        help="dev hub + sidecar + demo tasks, shown live",
        description="Start the dev hub on 127.0.0.1, a sidecar connected to it, submit a few shell tasks "
        "(streaming, failing, timing out) and show their progress and results live.",
        epilog="example:\n  sidecar demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--state-dir", help="where the demo sidecar keeps its state (default: a temp dir)")

    ex = sub.add_parser(
        "exec",
        help="run one task here, without a hub",
        description="Run one shell, Ollama or Claude task through the sidecar's own dispatcher and "
        "executors (retries, process-group kill, output cap, pricing), showing progress live.",
        epilog=_EXEC_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = ex.add_mutually_exclusive_group(required=True)
    what.add_argument("--shell", metavar="CMD", help="run CMD with /bin/sh -c in the current directory")
    what.add_argument("--ollama", metavar="MODEL", help="prompt an Ollama model")
    what.add_argument("--claude", action="store_true", help="run the Claude Code CLI on the prompt")
    ex.add_argument("--prompt", help="the prompt (--ollama, --claude)")
    ex.add_argument("--model", help="Claude model id for --claude (default: the CLI's default)")
    ex.add_argument("--ollama-url", help="Ollama server (default: config ollama_url, else 127.0.0.1:11434)")
    ex.add_argument("--timeout", type=float, metavar="S", help="time limit in seconds (default 60)")
    ex.add_argument("--json", action="store_true", help="JSON lines on stdout instead of the live view")
    ex.add_argument("--config", "-c", help="take executor settings from this config (no hub is contacted)")
    ex.add_argument(
        "--state-dir", help="where the task log goes (default: the config's state dir, else a temp dir)"
    )

    chk = sub.add_parser(
        "check",
        help="check config, state dir, hub, Ollama and claude",
        description="Validate the config, resolve the state dir, read its database (if any), "
        "probe the hub (TCP, WebSocket handshake, "
        "identify with the token, clean disconnect), Ollama (/api/version) and the claude binary "
        "(--version), and print what is ready and what is not.",
        epilog=_CHECK_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chk.add_argument("--config", "-c", help="TOML config, or the original sidecar's config.json")
    chk.add_argument("--no-identify", action="store_true", help="stop after the WebSocket handshake")
    chk.add_argument("--timeout", type=float, default=10.0, metavar="S", help="per probe (default 10)")

    from .fleet.cli import add_parsers as add_fleet_parsers

    add_fleet_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "run":
        release_signals()  # only `run` keeps the early stop-signal catching (entry.py)
    json_lines = {"auto": None, "json": True, "kv": False}[args.log_format]
    if args.command == "run":
        # Logging before the config: loading it may warn (ignored config.json keys).
        setup_logging(args.log_level, json_lines=json_lines)
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"sidecar: bad config: {exc}", file=sys.stderr)
            return 2
        try:
            setup_logging(args.log_level, json_lines=json_lines, log_file=config.log_file)
        except OSError as exc:
            print(
                f"sidecar: bad config: log_file {config.log_file!r} cannot be opened: {exc.strerror}",
                file=sys.stderr,
            )
            return 2
        from .statelock import StateDirError, lock_state_dir

        try:
            lock_state_dir(config.resolved_state_dir())  # held until the process ends
        except StateDirError as exc:
            print(f"sidecar: {exc}", file=sys.stderr)
            return 2
        from .app import run_sidecar
        from .storefaults import StoreCorruptError, StoreError

        try:
            return trio.run(run_sidecar, config, take_pending_signals)
        except StoreError as exc:
            # One line, no traceback. A corrupt database is exit 2 like a bad config:
            # restarting cannot fix it (the systemd unit does not restart on 2).
            print(f"sidecar: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, StoreCorruptError) else 1
    if args.command == "hub":
        setup_logging(args.log_level, json_lines=json_lines)
        from .devhub import run_hub_cli

        if (args.token is None) != (args.agent is None):
            print("sidecar hub: --token and --agent go together", file=sys.stderr)
            return 2
        try:
            run_hub_cli(
                port=args.port,
                token=args.token,
                agent=args.agent,
                host=args.host,
                default_repo=args.default_repo,
                require_auth=args.require_auth,
                knows_state_report=args.newer,
                knows_wake_result=args.newer,
                knows_agent_restarting=args.newer,
            )
        except KeyboardInterrupt:
            pass
        return 0
    if args.command == "demo":
        setup_logging("warning", json_lines=json_lines)
        from .demo import run_demo

        return trio.run(run_demo, args.state_dir)
    if args.command == "exec":
        return _exec(args, json_lines)
    if args.command == "check":
        setup_logging("error", json_lines=json_lines)
        from .check import run_check

        return trio.run(
            partial(run_check, args.config, sys.stdout, identify=not args.no_identify, timeout_s=args.timeout)
        )
    if args.command in ("join", "leave", "submit"):
        # Progress goes to stdout; the log (a smoke-test sidecar's too) only for problems.
        setup_logging("warning" if args.log_level == "info" else args.log_level, json_lines=json_lines)
        from .fleet.cli import run as run_fleet

        return run_fleet(args)
    return 2  # pragma: no cover - argparse enforces the choices


def _exec(args: argparse.Namespace, json_lines: bool | None) -> int:
    from .localexec import ExecRequest, run_exec

    if (args.ollama or args.claude) and not args.prompt:
        print("sidecar exec: --ollama and --claude need --prompt", file=sys.stderr)
        return 2
    if args.timeout is not None and args.timeout <= 0:
        print("sidecar exec: --timeout must be positive", file=sys.stderr)
        return 2
    kind = "shell" if args.shell is not None else "ollama" if args.ollama else "claude"
    req = ExecRequest(
        kind=kind,
        command=args.shell,
        prompt=args.prompt or "",
        model=args.ollama if kind == "ollama" else args.model,
        ollama_url=args.ollama_url,
        timeout_s=args.timeout,
        config_path=args.config,
        state_dir=args.state_dir,
    )
    # Logs to stderr (warnings only): stdout is the view or the JSON lines.
    setup_logging("warning" if args.log_level == "info" else args.log_level, json_lines=json_lines)
    try:
        return trio.run(partial(run_exec, req, sys.stdout, json_lines=args.json))
    except ConfigError as exc:
        print(f"sidecar: bad config: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
