"""`agentd serve`: turn the settings into the supervised tree and run it.

This is where the app meets the supervisor: the supervisor knows processes, this module
knows which processes agentd is made of, what each needs in its environment, and binds the
public listener once so that every web child shares it.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import trio

from supervisor.infra import infra_specs
from supervisor.run import Tree, serve_tree
from supervisor.spec import ChildSpec, Layer

if TYPE_CHECKING:
    from app.config import Settings

log = structlog.get_logger("serve")

SD_LISTEN_FDS_START = 3


def systemd_listener() -> socket.socket | None:
    """The socket systemd passed us (socket activation), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if int(os.environ.get("LISTEN_FDS", "0")) < 1:
        return None
    return socket.socket(fileno=SD_LISTEN_FDS_START)


def bind_listener(bind: str) -> socket.socket:
    """Bind the public listener once, in the supervisor; web children inherit the fd."""
    if bind.startswith("unix:"):
        path = bind[5:]
        Path(path).unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
    else:
        host, _, port = bind.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
    sock.listen(1024)
    return sock


def _forget_metrics(directory: str, pid: int) -> None:
    """An exited process's live gauges (open streams) must not linger in /metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def app_specs(settings: Settings, env: dict[str, str], listen_fd: int) -> list[ChildSpec]:
    def spec(role: str, layer: Layer, index: int, **kw: object) -> ChildSpec:
        name = role if index < 0 else f"{role}-{index}"
        return ChildSpec(
            name=name,
            layer=layer,
            argv=[sys.executable, "-m", "app.child", role],
            env={**env, "AGENTD_ROLE": role, "AGENTD_CHILD_NAME": name},
            watchdog=settings.watchdog_interval,
            **kw,  # type: ignore[arg-type]
        )

    specs = [spec("embedding", Layer.MODEL, -1, start_timeout=120.0)]
    specs += [spec("agent", Layer.WORK, i, drain=True) for i in range(settings.agent_workers)]
    specs += [
        spec("web", Layer.EDGE, i, drain=True, pass_fds=(listen_fd,),)
        for i in range(settings.web_workers)
    ]
    return specs


def serve(settings: Settings, config_file: str | None) -> int:
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    runtime_dir = data_dir / "run"
    runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(runtime_dir, 0o700)
    infra, database_url, redis_url = infra_specs(
        data_dir, runtime_dir, database_url=settings.database_url, redis_url=settings.redis_url
    )
    listener = systemd_listener()
    try:
        listener = listener or bind_listener(settings.bind)
    except OSError as e:
        print(f"agentd: cannot listen on AGENTD_BIND={settings.bind}: {e.strerror}",
              file=sys.stderr)
        return 2
    listener.set_inheritable(True)
    env = {
        "AGENTD_DATA_DIR": str(data_dir),
        "AGENTD_DATABASE_URL": database_url,
        "AGENTD_REDIS_URL": redis_url,
        "AGENTD_LISTEN_FD": str(listener.fileno()),
        "AGENTD_RUNTIME_DIR": str(runtime_dir),
        "PROMETHEUS_MULTIPROC_DIR": str(runtime_dir / "metrics"),
    }
    if config_file is not None:
        env["AGENTD_CONFIG_FILE"] = str(Path(config_file).resolve())
    (runtime_dir / "metrics").mkdir(exist_ok=True)
    for stale in (runtime_dir / "metrics").glob("*.db"):
        stale.unlink()
    tree = Tree(
        [*infra, *app_specs(settings, env, listener.fileno())],
        runtime_dir=runtime_dir,
        shutdown_timeout=settings.shutdown_timeout,
        shutdown_reserve=settings.reserve,
        # I5: the listener is closed in every process that holds it, the supervisor included,
        # the moment the drain starts.
        on_drain=listener.close,
        on_exit=functools.partial(_forget_metrics, str(runtime_dir / "metrics")),
    )
    log.info("starting", bind=settings.bind, data_dir=str(data_dir),
             embedded=[spec.name for spec in infra],
             llm=settings.llm_base_url or "local provider (no LLM configured)")
    return trio.run(serve_tree, tree)
