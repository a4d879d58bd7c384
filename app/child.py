"""Entry point of every app child: ``python -m app.child ROLE``.

It names the process ``agentd: ROLE`` (what ``ps`` shows and operators grep for), loads the
same settings as the supervisor, sets up logging and runs the role's ``run``. Imports are
per role, so web and agent never import torch.
"""

from __future__ import annotations

import gc
import os
import sys

import trio
from setproctitle import setproctitle

from app import config
from app.logging import setup

ROLES = ("web", "agent", "embedding")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ROLES:
        print(f"usage: python -m app.child {{{'|'.join(ROLES)}}}", file=sys.stderr)
        sys.exit(2)
    role = args[0]
    setproctitle(f"agentd: {role}")
    try:
        settings = config.load(os.environ.get("AGENTD_CONFIG_FILE"))
    except config.ConfigError as e:
        print(f"agentd {role}: {e}", file=sys.stderr)
        sys.exit(2)
    setup(role, level=settings.log_level, fmt=settings.log_format)
    if role == "web":
        from app.web.main import run
    elif role == "agent":
        from app.agent.main import run
    else:
        from app.embedding.main import run
    code = trio.run(run, settings)
    # What is left is the interpreter tearing the heap down. After a busy shutdown (many
    # streams' worth of objects) its final garbage collection alone can take most of a
    # second on a small machine: time the shutdown budget does not have. A frozen heap is
    # skipped by that collection; memory goes back to the OS with the process anyway.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    main()
