"""The `sidecar` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import trio

from . import __version__
from .config import ConfigError, load_config
from .log import setup_logging

_EPILOG = """examples:
  sidecar demo                                 # dev hub + sidecar + a few shell tasks, live
  sidecar run --config /etc/sidecar/sidecar.toml
  sidecar run --config ~/agentcom/sidecar/config.json   # the Node sidecar's file, unchanged
  sidecar hub --port 4000 --token t0k --agent agent-1
  curl -XPOST localhost:4000/api/tasks -d '{"description":"hi","metadata":{"shell_command":"echo hi"},
       "routing_decision":{"target_type":"sidecar"}}'
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
        "plus an HTTP API: POST /api/tasks, GET /api/tasks/ID, POST /api/tasks/ID/cancel.",
        epilog="example:\n  sidecar hub --port 4000 --token t0k --agent agent-1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hub.add_argument("--host", default="127.0.0.1")
    hub.add_argument("--port", type=int, default=4000)
    hub.add_argument("--token", required=True)
    hub.add_argument("--agent", required=True)

    demo = sub.add_parser(
        "demo",
        help="dev hub + sidecar + demo tasks, shown live",
        description="Start the dev hub on 127.0.0.1, a sidecar connected to it, submit a few shell tasks "
        "(streaming, failing, timing out) and show their progress and results live.",
        epilog="example:\n  sidecar demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--state-dir", help="where the demo sidecar keeps its state (default: a temp dir)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    json_lines = {"auto": None, "json": True, "kv": False}[args.log_format]
    if args.command == "run":
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"sidecar: bad config: {exc}", file=sys.stderr)
            return 2
        setup_logging(args.log_level, json_lines=json_lines, log_file=config.log_file)
        from .app import run_sidecar

        return trio.run(run_sidecar, config)
    if args.command == "hub":
        setup_logging(args.log_level, json_lines=json_lines)
        from .devhub import run_hub_cli

        try:
            run_hub_cli(port=args.port, token=args.token, agent=args.agent, host=args.host)
        except KeyboardInterrupt:
            pass
        return 0
    if args.command == "demo":
        setup_logging("warning", json_lines=json_lines)
        from .demo import run_demo

        return trio.run(run_demo, args.state_dir)
    return 2  # pragma: no cover - argparse enforces the choices


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
