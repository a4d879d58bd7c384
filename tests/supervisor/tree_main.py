"""Runs a supervisor tree described as JSON, the way `agentd serve` runs the real one.

    python -m tests.supervisor.tree_main '{"runtime_dir": ..., "timeout": 3, "children": [...]}'

Each child: {"name", "layer" (infra|model|work|edge), "args" (fake_child arguments),
"watchdog"?, "start_timeout"?, "drain"?}. Exit status: what serve_tree returns.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

from app.logging import setup
from supervisor.policy import RestartIntensity
from supervisor.run import Tree, serve_tree
from supervisor.spec import ChildSpec, Layer


def build(config: dict) -> Tree:
    specs = [
        ChildSpec(
            name=c["name"],
            layer=Layer[c["layer"].upper()],
            argv=[
                sys.executable,
                "-m",
                "tests.supervisor.fake_child",
                c["name"],
                *c.get("args", []),
            ],
            watchdog=c.get("watchdog"),
            start_timeout=c.get("start_timeout", 10.0),
            drain=c.get("drain", False),
        )
        for c in config["children"]
    ]
    return Tree(
        specs,
        runtime_dir=Path(config["runtime_dir"]),
        shutdown_timeout=config.get("timeout", 3.0),
        shutdown_reserve=config.get("reserve", 1.0),
        intensity=RestartIntensity(config.get("max_restarts", 5), config.get("period", 60.0)),
    )


def main() -> None:
    setup("supervisor", fmt="json")
    sys.exit(trio.run(serve_tree, build(json.loads(sys.argv[1]))))


if __name__ == "__main__":
    main()
