"""`agentd serve` end to end, on the embedded defaults: PostgreSQL, Redis and the local LLM
provider, each test on a fresh data dir and a free loopback port.

Starting the whole tree takes seconds, so one life of it (start, answer, SIGHUP, SIGTERM)
is observed once by the module's `life` fixture and judged by several small tests; the
tests that need a restart, a crash or a killed child start their own.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from tests.support.procs import alive
from tests.support.tree import (
    AGENTD,
    APP_ROLES,
    Serve,
    TreeProcesses,
    clean_env,
    free_port,
    timestamp,
    watch_deaths,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

SHUTDOWN_TIMEOUT = 6.0
#: A cold start runs initdb; the first start of a test session also fills the page cache.
READY_TIMEOUT = 90.0
INFRA = ("postgres", "redis")

slow = pytest.mark.slow


def client(proc: Serve) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=proc.url, timeout=30)


async def stop(proc: Serve) -> int:
    proc.signal(signal.SIGTERM)
    return await proc.wait(proc.shutdown_timeout + 5)


async def chat(proc: Serve, message: str, **body: object) -> dict:
    async with client(proc) as http:
        response = await http.post("/api/chat", json={"message": message, **body})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["reason"] == "completed" and answer["response"], answer
    return answer


async def messages(proc: Serve, session_id: str) -> list[dict]:
    async with client(proc) as http:
        response = await http.get(f"/api/sessions/{session_id}/messages")
    assert response.status_code == 200, response.text
    return response.json()["messages"]


def assert_kept(stored: list[dict], question: str, answer: dict) -> None:
    """The user's message and the assistant's complete answer to it are both stored."""
    users = [m for m in stored if m["role"] == "user"]
    assistants = [m for m in stored if m["role"] == "assistant"]
    assert [m["content"] for m in users] == [question], stored
    assert [(m["message_id"], m["content"], m["status"]) for m in assistants] == [
        (answer["message_id"], answer["response"], "complete")
    ], stored


@pytest.fixture
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Serve]]:
    """Start `agentd serve`; by default every start of one test shares one fresh data dir.
    (tmp_path_factory, not tmp_path: unix socket paths under the data dir must stay short.)"""
    base = tmp_path_factory.mktemp("serve")
    started: list[Serve] = []

    def start(**kw: object) -> Serve:
        kw.setdefault("shutdown_timeout", SHUTDOWN_TIMEOUT)
        proc = Serve(base / "data", base / f"serve-{len(started)}.log", **kw)  # type: ignore[arg-type]
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()


# One life of the tree, observed once -----------------------------------------------------


@dataclass
class Life:
    log: str = ""
    answers: dict[str, tuple[int, object]] = field(default_factory=dict)
    tree: TreeProcesses | None = None
    maps: dict[str, str] = field(default_factory=dict)
    # SIGHUP
    after_hup: dict[str, tuple[int, object]] = field(default_factory=dict)
    alive_before_hup: list[int] = field(default_factory=list)
    alive_after_hup: list[int] = field(default_factory=list)
    running_after_hup: bool = False
    # SIGTERM
    exit_code: int | None = None
    stop_s: float = 0.0
    roles: dict[int, str] = field(default_factory=dict)
    deaths: dict[int, float] = field(default_factory=dict)
    left_alive: list[int] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)


async def _get(http: httpx.AsyncClient, path: str) -> tuple[int, object]:
    response = await http.get(path)
    return response.status_code, response.json()


async def _observe(proc: Serve, life: Life) -> None:
    await proc.ready(timeout=READY_TIMEOUT)
    async with client(proc) as http:
        for path in ("/ready", "/live", "/health"):
            life.answers[path] = await _get(http, path)
        life.tree = tree = proc.processes()
        for role in ("web", "agent"):
            life.maps[role] = Path(f"/proc/{tree.one(role).pid}/maps").read_text()

        life.alive_before_hup = sorted(p.pid for p in tree.all)
        proc.signal(signal.SIGHUP)
        await proc.wait_event("sighup_ignored", timeout=10)
        await trio.sleep(0.5)  # room for a wrongly handled SIGHUP to take effect
        life.after_hup["/ready"] = await _get(http, "/ready")
        response = await http.post("/api/chat", json={"message": "still there after SIGHUP?"})
        life.after_hup["/api/chat"] = (response.status_code, response.json())
        life.alive_after_hup = sorted(alive(life.alive_before_hup))
        life.running_after_hup = proc.popen.poll() is None

    procs = proc.processes()
    life.roles = {p.pid: role for role, group in procs.by_role.items() for p in group}
    # The postmaster stands for PostgreSQL (its backends end when web and agent hang up).
    life.roles[procs.postmaster().pid] = "postmaster"
    async with trio.open_nursery() as nursery:

        async def deaths(task_status: trio.TaskStatus[None]) -> None:
            life.deaths = await watch_deaths(
                procs.all, SHUTDOWN_TIMEOUT + 5, task_status=task_status
            )

        await nursery.start(deaths)
        began = time.monotonic()
        proc.signal(signal.SIGTERM)
        life.exit_code = await proc.wait(SHUTDOWN_TIMEOUT + 5)
        life.stop_s = time.monotonic() - began
    life.left_alive = alive([p.pid for p in procs.all])
    life.events = proc.events()


@pytest.fixture(scope="module")
def life(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Life]:
    base = tmp_path_factory.mktemp("life")
    proc = Serve(base / "data", base / "serve.log", shutdown_timeout=SHUTDOWN_TIMEOUT)
    observed = Life()
    try:
        trio.run(_observe, proc, observed)
        observed.log = proc.text()
        yield observed
    finally:
        proc.close()


def _died(life: Life, *roles: str) -> list[float]:
    return [at for pid, at in life.deaths.items() if life.roles.get(pid) in roles]


@slow
def test_ready_live_and_health_answer_once_tree_ready_is_logged(life: Life) -> None:
    assert life.answers["/ready"] == (200, {"status": "ready"})
    assert life.answers["/live"] == (200, {"status": "alive"})
    status, health = life.answers["/health"]
    assert status == 200 and isinstance(health, dict), health
    assert health["status"] == "healthy", health
    assert health["checks"]["database"] == "ok" and health["checks"]["redis"] == "ok", health


@slow
def test_every_process_of_the_tree_is_named_for_ps(life: Life) -> None:
    assert life.tree is not None
    cmdlines = list(life.tree.cmdlines.values())
    for role in APP_ROLES:
        assert sum(c.startswith(f"agentd: {role}") for c in cmdlines) == 1, cmdlines
    assert any(Path(c.split()[0]).name == "postgres" for c in cmdlines), cmdlines
    assert any(Path(c.split()[0]).name == "redis-server" for c in cmdlines), cmdlines
    assert "other" not in life.tree.by_role, cmdlines


@slow
def test_web_and_agent_processes_never_map_torch(life: Life) -> None:
    for role in ("web", "agent"):
        maps = life.maps[role]
        assert ".so" in maps  # we did read a live process's mappings
        torch = [line for line in maps.splitlines() if "torch" in line.lower()]
        assert torch == [], f"{role} maps torch: {torch[:3]}"


@slow
def test_sighup_leaves_the_tree_serving(life: Life) -> None:
    assert life.running_after_hup
    assert life.alive_after_hup == life.alive_before_hup
    assert life.after_hup["/ready"] == (200, {"status": "ready"})
    status, answer = life.after_hup["/api/chat"]
    assert status == 200 and isinstance(answer, dict) and answer["reason"] == "completed", answer


@slow
def test_sigterm_exits_0_within_the_timeout_with_every_child_exited_0(life: Life) -> None:
    assert life.exit_code == 0, life.log[-4000:]
    assert life.stop_s <= SHUTDOWN_TIMEOUT + 1
    summary = life.events[-1]
    assert summary["event"] == "shutdown_complete", summary
    assert summary["exit_status"] == 0 and summary["killed"] == [], summary
    children = summary["children"]
    assert {name.split("-")[0] for name in children} == {*APP_ROLES, *INFRA}, children
    assert set(children.values()) == {"exited 0"}, children
    assert summary["duration_s"] <= SHUTDOWN_TIMEOUT


@slow
def test_sigterm_stops_postgres_and_redis_only_after_the_app_children(life: Life) -> None:
    """Seen from outside: the moment each process ended, from its pidfd."""
    app, infra = _died(life, *APP_ROLES), _died(life, "postmaster", "redis")
    assert len(app) == len(APP_ROLES) and len(infra) == 2, (life.roles, life.deaths)
    assert max(app) <= min(infra)


@slow
def test_sigterm_leaves_no_descendant_alive(life: Life) -> None:
    assert len(life.roles) >= 5
    assert life.left_alive == []


@slow
def test_sigterm_logs_child_exited_for_every_child_and_infra_last(life: Life) -> None:
    began = timestamp(next(e for e in life.events if e["event"] == "shutdown_started"))
    exited = {
        e["child"]: timestamp(e)
        for e in life.events
        if e["event"] == "child_exited" and e.get("level") == "info" and timestamp(e) >= began
    }
    names = set(life.events[-1]["children"])
    assert set(exited) == names, exited
    app = [at for name, at in exited.items() if name not in INFRA]
    assert max(app) <= min(exited[name] for name in INFRA)


@slow
def test_every_line_serve_writes_is_a_json_event(life: Life) -> None:
    """stdout and stderr together: what a log shipper reading `agentd serve` gets."""
    bad = []
    for line in filter(str.strip, life.log.splitlines()):
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict) or not {"role", "pid", "event"} <= event.keys():
            bad.append(line)
    assert bad == [], bad[:5]


# Restarts, crashes, a killed child ----------------------------------------------------


@slow
async def test_a_chat_is_kept_across_a_restart_on_the_same_data_dir(serve) -> None:
    first = serve()
    await first.ready(timeout=READY_TIMEOUT)
    answer = await chat(first, "remember me")
    assert await stop(first) == 0, first.text()[-4000:]

    second = serve()  # same data dir
    await second.ready(timeout=READY_TIMEOUT)
    assert_kept(await messages(second, answer["session_id"]), "remember me", answer)
    assert await stop(second) == 0, second.text()[-4000:]


@slow
async def test_sigkill_of_the_supervisor_leaves_no_process_and_the_next_serve_recovers(
    serve,
) -> None:
    first = serve()
    await first.ready(timeout=READY_TIMEOUT)
    answer = await chat(first, "survive a crash")
    tree = first.processes()
    backends = [p for p in tree.by_role["postgres"] if "[local]" in tree.cmdlines[p.pid]]
    assert backends, tree.cmdlines  # the check below covers PostgreSQL's backends too
    pids = [p.pid for p in tree.all]
    first.signal(signal.SIGKILL)
    with trio.fail_after(2):
        while alive(pids):
            await trio.sleep(0.02)
    assert await first.wait(5) == -signal.SIGKILL

    # Left behind: postmaster.pid, the sockets, the notify sockets, tree.json ...
    second = serve()
    await second.ready(timeout=READY_TIMEOUT)
    async with client(second) as http:
        response = await http.get("/ready")
    assert response.status_code == 200, response.text
    assert_kept(await messages(second, answer["session_id"]), "survive a crash", answer)
    assert await stop(second) == 0, second.text()[-4000:]


@slow
async def test_a_killed_agent_is_replaced_and_chat_still_completes(serve) -> None:
    proc = serve()
    await proc.ready(timeout=READY_TIMEOUT)
    old = proc.processes().one("agent")
    name = proc.find("child_started", child_pid=old.pid)[0]["child"]
    old.kill()
    restarting = await proc.wait_event("child_restarting", timeout=10, child=name)
    assert "SIGKILL" in restarting["after"], restarting
    ready = await proc.wait_for(
        lambda e: e.get("event") == "child_ready"
        and e.get("child") == name
        and e.get("child_pid") != old.pid,
        timeout=30,
    )
    assert proc.processes().one("agent").pid == ready["child_pid"]
    with trio.fail_after(30):
        answer = await chat(proc, "are you back?")
    assert answer["session_id"]
    assert await stop(proc) == 0, proc.text()[-4000:]


# Bad settings ---------------------------------------------------------------------------

MISSING = "<no such file>"


@pytest.mark.parametrize(
    ("settings", "toml", "named"),
    [
        pytest.param(
            {"AGENTD_SHUTDOWN_TIMEOUT": "abc"}, None, "AGENTD_SHUTDOWN_TIMEOUT", id="not-a-number"
        ),
        pytest.param({"AGENTD_WEB_WORKERS": "0"}, None, "AGENTD_WEB_WORKERS", id="zero-workers"),
        pytest.param(
            {"AGENTD_BIND": "0.0.0.0:8000"}, None, "AGENTD_BIND", id="public-bind-without-auth"
        ),
        pytest.param({"AGENTD_LOG_LEVEL": "loud"}, None, "AGENTD_LOG_LEVEL", id="bad-choice"),
        pytest.param({}, "shutdown_timeout = = 3\n", "--config", id="config-invalid-toml"),
        pytest.param({}, MISSING, "--config", id="config-missing"),
    ],
)
async def test_a_bad_setting_stops_serve_with_one_line_naming_it_and_exit_2(
    tmp_path: Path, settings: dict[str, str], toml: str | None, named: str
) -> None:
    args = ["serve"]
    if toml is not None:
        path = tmp_path / "agentd.toml"
        if toml != MISSING:
            path.write_text(toml)
        args += ["--config", str(path)]
    env = clean_env(
        **{
            "AGENTD_DATA_DIR": str(tmp_path / "data"),
            "AGENTD_BIND": f"127.0.0.1:{free_port()}",
            **settings,
        }
    )
    with trio.fail_after(30):
        result = await trio.run_process(
            [AGENTD, *args], env=env, cwd=tmp_path, capture_stdout=True, capture_stderr=True,
            check=False,
        )
    stderr = result.stderr.decode(errors="replace")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    assert named in lines[0], lines[0]
    if toml is not None:
        assert "agentd.toml" in lines[0], lines[0]
    assert not (tmp_path / "data").exists()  # stopped before anything was started
