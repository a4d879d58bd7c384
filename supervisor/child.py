"""One child's life: spawn (no orphans), wait until ready, watch, stop, restart.

`supervise` runs in its layer's nursery for as long as the layer lives. It returns through
``task_status.started()`` once the first incarnation is ready, so a layer is ready exactly
when each of its children is. When its layer is cancelled it stops the process inside a
shielded scope whose deadline is the layer's share of the shutdown budget: stopping a
process is releasing a resource that must not leak, so it may not be cut short by the very
cancellation that asked for it, but it is bounded.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import functools
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog
import trio

from supervisor.notify import NotifyListener
from supervisor.policy import Backoff
from supervisor.spec import ChildSpec, Restart

if TYPE_CHECKING:
    from collections.abc import Mapping

    from supervisor.run import Tree

log = structlog.get_logger("supervisor")

PR_SET_PDEATHSIG = 1
#: Environment a child must not inherit from the supervisor: these describe the supervisor's
#: own relation to systemd, not the child's.
_PRIVATE_ENV = (
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
)


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass
class ChildStatus:
    """What the supervisor knows of a child; also what `Tree.snapshot` reports."""

    spec: ChildSpec
    state: State = State.STARTING
    pid: int | None = None
    restarts: int = 0
    status: str = ""
    since: float = field(default_factory=time.time)
    #: How the last incarnation ended: "exited 0", "killed by SIGKILL", "watchdog", ...
    outcome: str = ""
    killed: bool = False

    def set(self, state: State) -> None:
        self.state = state
        self.since = time.time()


def _die_with_parent(parent: int) -> None:
    """Runs in the forked child before exec: SIGKILL us when the supervisor dies.

    `PR_SET_PDEATHSIG` survives exec (of a non-setuid binary) and is set after the uid change
    that `Popen(user=...)` does, so it holds for PostgreSQL run as another user too. If the
    supervisor already died between fork and here, the signal would never come: exit now.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def child_env(spec: ChildSpec, notify_path: str, extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}
    env.update(extra)
    env.update(spec.env)
    env["NOTIFY_SOCKET"] = notify_path
    env["AGENTD_LAYER"] = spec.layer.name.lower()
    if spec.watchdog is not None:
        env["WATCHDOG_USEC"] = str(int(spec.watchdog * 1_000_000))
    return env


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited {returncode}"


class ChildProcess:
    """A spawned process and an awaitable exit, through a pidfd.

    Why not `trio.lowlevel.open_process`: it forks from a worker thread, and
    `PR_SET_PDEATHSIG` fires when the *thread* that forked exits, not the process: trio
    retires idle worker threads after 10 s, and every child would be SIGKILLed with it.
    So we fork here, in the supervisor's main thread (a few milliseconds, once per start),
    and wait for the exit on a pidfd, which the event loop watches like any other fd.
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._pidfd = os.pidfd_open(popen.pid)

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    async def wait(self) -> int:
        """Wait for the exit. Any number of tasks may wait at once: each watches its own
        duplicate of the pidfd (trio allows one waiter per fd)."""
        if self._popen.returncode is None and self._popen.poll() is None:
            fd = os.dup(self._pidfd)
            try:
                await trio.lowlevel.wait_readable(fd)
            finally:
                os.close(fd)
            self._popen.wait()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        assert self._popen.returncode is not None
        return self._popen.returncode

    def send_signal(self, signum: int) -> None:
        if self._popen.returncode is None:
            self._popen.send_signal(signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def spawn(argv: list[str], *, env: dict[str, str], cwd: str | None, pass_fds: tuple[int, ...],
          user: str | None, group: str | None, log_file: str | None = None) -> ChildProcess:
    """Fork and exec a child in its own session that dies with the supervisor (I8).

    Its output goes to our stderr (journald), or to ``log_file`` for programs whose lines
    are not agentd's JSON events (PostgreSQL, Redis).
    """
    out = open(log_file, "ab") if log_file else None  # noqa: SIM115 - closed below
    try:
        popen = subprocess.Popen(
            argv, env=env, cwd=cwd, pass_fds=pass_fds, start_new_session=True,
            preexec_fn=functools.partial(_die_with_parent, os.getpid()), user=user,
            group=group, stdout=out, stderr=out,
        )
    finally:
        if out is not None:
            out.close()
    return ChildProcess(popen)


class _Incarnation:
    """One spawned process of a child, and what it has told us over the notify socket."""

    def __init__(self, process: ChildProcess, status: ChildStatus) -> None:
        self.process = process
        self.status = status
        self.ready = trio.Event()
        self.last_ping = trio.current_time()
        self.signalled = False
        self.watchdog_fired = False

    def signal(self, signum: int) -> None:
        if self.process.returncode is None:
            self.signalled = True
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    def kill_group(self) -> None:
        """SIGKILL the child and everything in its process group (PostgreSQL's backends)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            self.process.kill()

    def handle(self, message: Mapping[str, str]) -> None:
        if message.get("READY") == "1":
            self.ready.set()
        if message.get("WATCHDOG") == "1":
            self.last_ping = trio.current_time()
        if "STATUS" in message:
            self.status.status = message["STATUS"]


async def supervise(
    spec: ChildSpec,
    tree: Tree,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep one child running until its layer is cancelled, or give up and escalate."""
    status = tree.children[spec.name]
    backoff = Backoff()
    failures = 0
    reported = False
    notify_path = str(tree.runtime_dir / f"notify-{spec.name}.sock")
    while not tree.stopping.is_set():
        started_at = trio.current_time()
        outcome = await _run_once(
            spec, tree, status, notify_path, task_status if not reported else None
        )
        reported = True
        if outcome is None or tree.stopping.is_set():
            return
        returncode, _ = outcome
        if spec.restart is Restart.TRANSIENT and returncode == 0:
            status.set(State.STOPPED)
            return
        failures = 1 if trio.current_time() - started_at > backoff.reset_after else failures + 1
        if tree.intensity.record(trio.current_time()):
            status.set(State.FAILED)
            tree.escalate(f"{spec.name} restarted too often ({status.outcome})")
            return
        delay = backoff.delay(failures)
        status.set(State.BACKOFF)
        status.restarts += 1
        tree.restarted(spec)
        log.warning(
            "child_restarting",
            child=spec.name,
            after=status.outcome,
            delay_s=round(delay, 3),
            restarts=status.restarts,
        )
        await trio.sleep(delay)


async def _run_once(
    spec: ChildSpec,
    tree: Tree,
    status: ChildStatus,
    notify_path: str,
    task_status: trio.TaskStatus[None] | None,
) -> tuple[int, bool] | None:
    """Spawn, wait ready, watch until exit. None when cancelled (the process was stopped)."""
    if spec.prepare is not None:
        # In a thread: a first start's initdb takes a second or more.
        try:
            await trio.to_thread.run_sync(spec.prepare)
        except Exception as e:  # noqa: BLE001 - any failure here is a failed start, said once
            status.outcome = f"could not prepare: {e}"
            log.error("child_prepare_failed", child=spec.name, error=str(e))
            if task_status is not None:
                status.set(State.FAILED)
                tree.fail(f"{spec.name} failed to start: {status.outcome}")
                task_status.started()
                return None
            return (127, False)
    listener = NotifyListener(notify_path)
    status.set(State.STARTING)
    try:
        process = spawn(
            list(spec.argv),
            env=child_env(spec, notify_path, tree.child_env),
            cwd=spec.cwd,
            pass_fds=tuple(spec.pass_fds),
            user=spec.user,
            group=spec.group,
            log_file=spec.log_file,
        )
    except OSError as e:
        listener.close()
        status.outcome = f"could not start: {e}"
        log.error("child_spawn_failed", child=spec.name, argv=list(spec.argv), error=str(e))
        return (127, False)
    status.pid = process.pid
    incarnation = _Incarnation(process, status)
    log.info("child_started", child=spec.name, child_pid=process.pid, layer=spec.layer.name.lower())
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_receive, listener, incarnation)
            nursery.start_soon(_drain_on_shutdown, spec, tree, incarnation)
            was_ready = await _wait_ready(spec, tree, incarnation)
            if was_ready:
                status.set(State.READY)
                log.info("child_ready", child=spec.name, child_pid=process.pid)
                if spec.watchdog is not None:
                    nursery.start_soon(_watchdog, spec, incarnation)
            if task_status is not None:
                if not was_ready and not tree.stopping.is_set():
                    # The first start failed: the tree cannot come up. Say why, once, and
                    # stop it before the layers inside this one are started.
                    status.set(State.FAILED)
                    tree.fail(f"{spec.name} failed to start: {status.outcome}")
                task_status.started()
            tree.changed()
            if was_ready:
                await process.wait()
            nursery.cancel_scope.cancel()
        if was_ready:  # otherwise `_wait_ready` said why it never got there
            status.outcome = (
                "watchdog" if incarnation.watchdog_fired else describe_exit(process.returncode or 0)
            )
        return (process.returncode or 0, was_ready)
    finally:
        # Shielded: the stop must happen even though our layer is being cancelled; bounded:
        # `_stop` SIGKILLs at the layer's deadline, and this scope allows 2 s to reap.
        with trio.CancelScope(shield=True, deadline=tree.kill_deadline(spec.layer) + 2):
            await _stop(spec, tree, incarnation)
        for message in listener.pending():
            incarnation.handle(message)
        listener.close()
        if tree.on_exit is not None:
            tree.on_exit(process.pid)
        # Every path out of an incarnation (exit, crash, start failure, shutdown) ends here.
        log.log(20 if tree.stopping.is_set() else 40, "child_exited", child=spec.name,
                child_pid=process.pid, outcome=status.outcome)
        tree.changed()


async def _wait_ready(spec: ChildSpec, tree: Tree, incarnation: _Incarnation) -> bool:
    """Ready by notify (READY=1) or by probe; False when it exited, timed out or the tree
    began to stop first."""
    process = incarnation.process
    with trio.move_on_after(spec.start_timeout):
        async with trio.open_nursery() as nursery:

            async def exited() -> None:
                await process.wait()
                nursery.cancel_scope.cancel()

            async def stopping() -> None:
                await tree.stopping.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(exited)
            nursery.start_soon(stopping)
            if spec.ready_probe is None:
                await incarnation.ready.wait()
            else:
                # PostgreSQL and Redis cannot tell us they are ready: ask until they answer.
                while not await spec.ready_probe():  # noqa: ASYNC110
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
            return process.returncode is None
        if tree.stopping.is_set():
            incarnation.status.outcome = "stopped before it was ready"
            return False
    if process.returncode is None:
        incarnation.status.outcome = f"not ready within {spec.start_timeout:g} s"
        log.error("child_start_timeout", child=spec.name, timeout_s=spec.start_timeout)
        incarnation.kill_group()
        await process.wait()
    else:
        incarnation.status.outcome = describe_exit(process.returncode) + " before it was ready"
    return False


async def _receive(listener: NotifyListener, incarnation: _Incarnation) -> None:
    while True:
        incarnation.handle(await listener.receive())


async def _drain_on_shutdown(spec: ChildSpec, tree: Tree, incarnation: _Incarnation) -> None:
    """A drain child is told to stop taking work the moment the shutdown begins."""
    if spec.drain:
        await tree.stopping.wait()
        incarnation.status.set(State.STOPPING)
        incarnation.signal(spec.stop_signal)


async def _watchdog(spec: ChildSpec, incarnation: _Incarnation) -> None:
    """A child whose loop stops pinging gets SIGABRT: faulthandler dumps its stacks first."""
    assert spec.watchdog is not None
    while True:
        overdue_at = incarnation.last_ping + spec.watchdog
        if trio.current_time() >= overdue_at:
            break
        await trio.sleep_until(overdue_at)
    log.error(
        "child_watchdog_timeout",
        child=spec.name,
        pid=incarnation.process.pid,
        interval_s=spec.watchdog,
    )
    incarnation.watchdog_fired = True
    incarnation.signal(signal.SIGABRT)
    # A stopped child (SIGSTOP) would keep the SIGABRT pending until the SIGKILL below, and
    # never write its stack dump: let it run to take it.
    incarnation.signal(signal.SIGCONT)
    with trio.move_on_after(5):
        await incarnation.process.wait()
    incarnation.kill_group()


async def _stop(spec: ChildSpec, tree: Tree, incarnation: _Incarnation) -> None:
    """Ask the process to stop, wait until its layer's kill deadline, then SIGKILL its group."""
    process = incarnation.process
    if process.returncode is None:
        incarnation.status.set(State.STOPPING)
        if not incarnation.signalled:
            incarnation.signal(spec.stop_signal)
        with trio.move_on_at(tree.kill_deadline(spec.layer)):
            await process.wait()
    if process.returncode is None:
        log.error(
            "child_killed", child=spec.name, child_pid=process.pid, reason="stop deadline passed"
        )
        incarnation.kill_group()
        incarnation.status.killed = True
        tree.killed.append(spec.name)
        with trio.move_on_after(1):
            await process.wait()
    else:
        # Reap what is left of its group (e.g. a PostgreSQL backend that outlived postmaster).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    incarnation.status.set(State.STOPPED)
    if not incarnation.status.outcome or tree.stopping.is_set():
        incarnation.status.outcome = (
            "killed" if incarnation.status.killed else describe_exit(process.returncode or 0)
        )
