"""Command-line clients of a running agentd: status, chat and ingest."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    import argparse

    from app.config import Settings


def base_url(args: argparse.Namespace, settings: Settings) -> str:
    if getattr(args, "url", None):
        return str(args.url).rstrip("/")
    host, _, port = settings.bind.rpartition(":")
    if host in ("0.0.0.0", "", "::", "[::]"):
        host = "127.0.0.1"
    return f"http://{host}:{port}"


def headers(args: argparse.Namespace, settings: Settings) -> dict[str, str]:
    key = getattr(args, "api_key", None) or (settings.api_keys[0] if settings.api_keys else None)
    return {"Authorization": f"Bearer {key}"} if key else {}


def run(command: str, args: argparse.Namespace, settings: Settings) -> int:
    url = base_url(args, settings)
    try:
        if command == "status":
            return status(url, headers(args, settings))
        if command == "chat":
            from app.chat_client import chat

            return chat(url, headers(args, settings))
        if command == "ingest":
            from app import ingest

            return ingest.main(args, settings, url, headers(args, settings))
        print(f"agentd {command}: not available in this version yet", file=sys.stderr)
        return 2
    except httpx.HTTPError as e:
        print(f"agentd {command}: cannot reach agentd at {url}: {e}", file=sys.stderr)
        return 1


def status(url: str, auth: dict[str, str]) -> int:
    with httpx.Client(timeout=10, headers=auth) as client:
        ready = client.get(f"{url}/ready").json()
        health = client.get(f"{url}/health").json()
        answer = client.get(f"{url}/api/status")
        if answer.status_code == 401:
            print(f"agentd status: {url} refused the credentials: pass --api-key (or set "
                  "AGENTD_API_KEYS)", file=sys.stderr)
            return 1
        info = answer.json()
    print(f"agentd at {url}: {ready.get('status')}, {health.get('status')}, "
          f"up {info.get('uptime_s')} s")
    for name, value in health.get("checks", {}).items():
        print(f"  {name:<12} {value}")
    runs = ", ".join(f"{k} {v}" for k, v in sorted(info.get("runs", {}).items())) or "none"
    print(f"  runs         {runs}")
    print(f"  open streams {info.get('open_streams')} (this web process)")
    for p in info.get("processes", []):
        print(f"  {p['name']:<12} {p['state']:<9} pid {p['pid']}  restarts {p['restarts']}"
              f"  {p.get('status', '')}")
    return 0 if ready.get("status") == "ready" else 1
