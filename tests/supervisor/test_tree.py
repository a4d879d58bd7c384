"""The supervisor with real processes and real signals (fake children, see fake_child.py)."""

from __future__ import annotations

import json
import signal
import time

import pytest
import trio

from tests.support.procs import PYTHON, Proc, alive, descendants


def child(name, layer, *args, **extra):
    return {"name": name, "layer": layer, "args": list(args), **extra}


@pytest.fixture
def tree(tmp_path):
    started: list[Proc] = []

    def start(children, **config):
        config = {
            "runtime_dir": str(tmp_path / "run"),
            "timeout": 3.0,
            "reserve": 1.0,
            "children": children,
            **config,
        }
        proc = Proc(
            [PYTHON, "-m", "tests.supervisor.tree_main", json.dumps(config)],
            tmp_path / f"tree-{len(started)}.log",
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()


def lines(path):
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


async def test_layers_start_outer_first_and_stop_inner_first(tree, tmp_path):
    log = tmp_path / "order.log"
    proc = tree(
        [
            child("db", "infra", "--ready-after", "0.3", "--log", str(log)),
            child("model", "model", "--ready-after", "0.2", "--log", str(log)),
            child("worker", "work", "--log", str(log), drain=True),
            child("web", "edge", "--log", str(log), "--stop-delay", "0.2", drain=True),
        ]
    )
    await proc.wait_event("tree_ready")
    proc.signal(signal.SIGTERM)
    assert await proc.wait(5) == 0
    events = [(e, n) for e, n, *_ in lines(log)]
    order = ["db", "model", "worker", "web"]
    starts = [n for e, n in events if e == "start"]
    assert starts == order
    for outer, inner in zip(order, order[1:], strict=False):
        assert events.index(("ready", outer)) < events.index(("start", inner))
    stops = [n for e, n in events if e == "stopped"]
    # The drain children stop first (web waits 0.2 s longer than worker), then model, then db.
    assert stops[-2:] == ["model", "db"]
    assert set(stops[:2]) == {"worker", "web"}
    summary = proc.events()[-1]
    assert summary["event"] == "shutdown_complete"
    assert summary["killed"] == [] and summary["exit_status"] == 0


async def test_child_that_never_becomes_ready_fails_the_start_with_a_clear_error(tree):
    proc = tree([child("db", "infra"), child("stuck", "work", "--never-ready", start_timeout=1.0)])
    assert await proc.wait(10) != 0
    timeout = proc.find("child_start_timeout", child="stuck")
    assert timeout and timeout[0]["timeout_s"] == 1.0
    assert "stuck failed to start: not ready within 1 s" in proc.text()
    assert not proc.find("tree_ready")


async def test_watchdog_kills_a_blocked_child_with_a_stack_dump_and_restarts_it(tree, tmp_path):
    log = tmp_path / "wd.log"
    proc = tree([child("blocky", "work", "--block-after", "0.5", "--log", str(log), watchdog=1.0)])
    await proc.wait_event("tree_ready")
    await proc.wait_event("child_watchdog_timeout", timeout=10, child="blocky")
    await proc.wait_event("child_restarting", timeout=10, child="blocky")
    with trio.fail_after(10):
        while len([n for e, n, *_ in lines(log) if e == "start"]) < 2:
            await trio.sleep(0.05)
    text = proc.text()
    assert "Fatal Python error: Aborted" in text
    assert "fake_child.py" in text  # the blocked frame is in the dump
    proc.signal(signal.SIGTERM)
    assert await proc.wait(5) == 0


async def test_crash_loop_escalates_to_a_clean_stop_and_non_zero_exit(tree):
    proc = tree(
        [child("db", "infra"), child("crashy", "work", "--exit-after", "0.05")],
        max_restarts=2,
        period=30,
    )
    assert await proc.wait(20) != 0
    assert proc.find("restart_intensity_exceeded")
    restarts = proc.find("child_restarting", child="crashy")
    assert [r["delay_s"] for r in restarts] == [0.5, 1.0]  # exponential backoff
    summary = proc.events()[-1]
    assert summary["event"] == "shutdown_complete" and summary["exit_status"] != 0
    assert summary["children"]["db"] == "exited 0"  # the rest of the tree stopped cleanly


async def test_sigterm_with_a_child_that_ignores_it_kills_it_at_the_deadline(tree):
    proc = tree(
        [child("db", "infra"), child("deaf", "edge", "--ignore-term", drain=True)],
        timeout=2.0,
        reserve=0.8,
    )
    await proc.wait_event("tree_ready")
    began = time.monotonic()
    proc.signal(signal.SIGTERM)
    code = await proc.wait(10)
    elapsed = time.monotonic() - began
    assert code != 0
    assert elapsed <= 2.0 + 1.0
    assert proc.find("child_killed", child="deaf")
    assert proc.events()[-1]["killed"] == ["deaf"]


async def test_a_child_blocked_in_c_code_cannot_hold_the_shutdown_open(tree):
    proc = tree(
        [child("blocky", "edge", "--block-after", "0.3", drain=True)], timeout=2.0, reserve=0.8
    )
    await proc.wait_event("tree_ready")
    await trio.sleep(0.5)
    began = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert await proc.wait(10) != 0
    assert time.monotonic() - began <= 3.0


async def test_sigkill_of_the_supervisor_leaves_no_process_behind(tree):
    proc = tree(
        [
            child("db", "infra"),
            child("m", "model"),
            child("w", "work", "--ignore-term"),
            child("web", "edge"),
        ]
    )
    await proc.wait_event("tree_ready")
    pids = [p.pid for p in descendants(proc.pid)]
    assert len(pids) == 4
    proc.signal(signal.SIGKILL)
    await proc.wait(5)
    with trio.fail_after(2):
        while alive(pids):
            await trio.sleep(0.05)


async def test_sighup_does_not_stop_the_tree(tree):
    proc = tree([child("db", "infra"), child("web", "edge", drain=True)])
    await proc.wait_event("tree_ready")
    pids = [p.pid for p in descendants(proc.pid)]
    proc.signal(signal.SIGHUP)
    await proc.wait_event("sighup_ignored")
    await trio.sleep(0.3)
    assert proc.popen.poll() is None and alive(pids) == pids
    proc.signal(signal.SIGTERM)
    assert await proc.wait(5) == 0


async def test_an_exited_child_is_restarted_and_the_tree_recovers(tree, tmp_path):
    log = tmp_path / "r.log"
    proc = tree([child("w", "work", "--log", str(log))])
    await proc.wait_event("tree_ready")
    first = descendants(proc.pid)[0]
    first.kill()
    await proc.wait_event("child_restarting", child="w")
    with trio.fail_after(5):
        while len([n for e, n, *_ in lines(log) if e == "ready"]) < 2:
            await trio.sleep(0.05)
    proc.signal(signal.SIGTERM)
    assert await proc.wait(5) == 0


async def test_children_outlive_the_threads_trio_retires(tree, tmp_path):
    """PR_SET_PDEATHSIG follows the forking *thread*: forking from trio's worker threads
    (retired after 10 s idle) would SIGKILL every child ten seconds after it started."""
    proc = tree([child("db", "infra"), child("web", "edge", drain=True)])
    await proc.wait_event("tree_ready")
    pids = [p.pid for p in descendants(proc.pid)]
    await trio.sleep(12)
    assert alive(pids) == pids
    assert not proc.find("child_exited")
    proc.signal(signal.SIGTERM)
    assert await proc.wait(5) == 0
