"""The `agentd` command: serve, ingest, chat, status (API.md, Command line)."""

from __future__ import annotations

import argparse
import sys

from app import config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentd", description="A backend for AI agents.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the supervisor and the whole tree in the foreground")
    serve.add_argument("--config", metavar="FILE", help="a TOML file of settings")
    for name, text in (("chat", "a terminal client that streams answers"),
                       ("status", "what /api/status says, readable")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--url", help="agentd's base URL (default: from AGENTD_BIND)")
        p.add_argument("--config", metavar="FILE", help="a TOML file of settings")
        p.add_argument("--api-key", help="bearer token (default: the first of AGENTD_API_KEYS)")
    ingest = sub.add_parser("ingest", help="add files or folders to the knowledge base")
    ingest.add_argument("paths", nargs="+", metavar="PATH")
    ingest.add_argument("--url", help="agentd's base URL (default: from AGENTD_BIND)")
    ingest.add_argument("--config", metavar="FILE", help="a TOML file of settings")
    ingest.add_argument("--api-key", help="bearer token (default: the first of AGENTD_API_KEYS)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        settings = config.load(args.config)
    except config.ConfigError as e:
        print(f"agentd: {e}", file=sys.stderr)
        sys.exit(2)
    from app.logging import setup

    setup("supervisor" if args.command == "serve" else "cli", level=settings.log_level,
          fmt=settings.log_format)
    if args.command == "serve":
        from app.serve import serve

        sys.exit(serve(settings, args.config))
    from app import clients

    sys.exit(clients.run(args.command, args, settings))
