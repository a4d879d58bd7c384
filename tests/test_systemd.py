"""The systemd units in systemd/: what they must say, that systemd accepts them, and how
exposed `systemd-analyze security` finds the service.

The directive checks are plain parsing and always run. The `systemd-analyze` checks skip
where it is not installed; they work without systemd running as PID 1.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[1] / "systemd"
SERVICE = UNITS / "agentd.service"
SOCKET = UNITS / "agentd.socket"

#: API.md, Configuration: AGENTD_SHUTDOWN_TIMEOUT defaults to 30 s; agentd exits within it + 1 s.
SHUTDOWN_TIMEOUT_DEFAULT = 30
MAX_EXPOSURE = 2.0

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


# ---- parsing -------------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections → [(key, value), ...] in order, as systemd reads them (comments, `\\` lines)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def last(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str | None:
    found = values(unit, section, key)
    return found[-1] if found else None


_UNITS_S = {
    "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3,
    "": 1.0, "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
}  # fmt: skip


def timespan(value: str) -> float:
    """systemd time span (`40`, `40s`, `1min 10s`, `500ms`) → seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value.strip().lower())
    assert parts and re.fullmatch(r"(\s*\d+(\.\d+)?\s*[a-z]*)+\s*", value.lower()), value
    return sum(float(n) * _UNITS_S[unit] for n, unit in parts)


def test_timespan_parser():
    assert timespan("40") == 40
    assert timespan("40s") == 40
    assert timespan("1min 10s") == 70
    assert timespan("500ms") == 0.5


@pytest.fixture(scope="module")
def service() -> dict[str, list[tuple[str, str]]]:
    return parse_unit(SERVICE.read_text())


@pytest.fixture(scope="module")
def socket_unit() -> dict[str, list[tuple[str, str]]]:
    return parse_unit(SOCKET.read_text())


# ---- what the units must say -----------------------------------------------------------------


def test_service_lifecycle_directives(service):
    s = "Service"
    assert last(service, s, "Type") == "notify"
    assert last(service, s, "NotifyAccess") == "main"  # children notify the supervisor only
    assert last(service, s, "KillMode") == "mixed"
    assert last(service, s, "Restart") == "on-failure"
    watchdog = last(service, s, "WatchdogSec")
    assert watchdog is not None and timespan(watchdog) > 0
    stop = last(service, s, "TimeoutStopSec")
    assert stop is not None
    assert timespan(stop) >= SHUTDOWN_TIMEOUT_DEFAULT + 1
    exec_start = last(service, s, "ExecStart")
    assert exec_start is not None
    argv = exec_start.lstrip("-@:+!").split()
    assert Path(argv[0]).name == "agentd" and argv[1:] == ["serve"], exec_start


def test_service_data_dir_and_runtime(service):
    s = "Service"
    assert last(service, s, "StateDirectory") == "agentd"
    assert last(service, s, "RuntimeDirectory") == "agentd"
    assert last(service, s, "RuntimeDirectoryMode") == "0700"
    assert last(service, s, "WorkingDirectory") == "%S/agentd"
    assert "AGENTD_DATA_DIR=%S/agentd" in values(service, s, "Environment")
    assert "-/etc/agentd/agentd.env" in values(service, s, "EnvironmentFile")
    assert last(service, s, "User") == "agentd"


def test_service_credentials_are_optional(service):
    """Each secret agentd reads from $CREDENTIALS_DIRECTORY is passed, and none is required:
    an ID:/absolute/path whose file is missing would fail the start."""
    loaded = {
        v.partition(":")[0]: v.partition(":")[2]
        for v in values(service, "Service", "LoadCredential")
    }
    for name in ("AGENTD_API_KEYS", "AGENTD_JWT_SECRET", "AGENTD_LLM_API_KEY"):
        assert name in loaded, name
        assert not loaded[name].startswith("/"), f"{name}: an absolute path is not optional"


def test_service_hardening_choices(service):
    s = "Service"
    assert last(service, s, "NoNewPrivileges") == "yes"
    assert last(service, s, "CapabilityBoundingSet") == ""
    assert last(service, s, "ProtectSystem") == "strict"
    assert last(service, s, "UMask") == "0077"
    assert last(service, s, "LimitNOFILE") == "65536"
    # torch's oneDNN JIT needs W+X memory; ProcSubset=pid breaks psutil and torch's cpuinfo.
    assert last(service, s, "MemoryDenyWriteExecute") in (None, "no")
    assert last(service, s, "ProcSubset") in (None, "all")


def test_socket_unit(socket_unit):
    assert values(socket_unit, "Socket", "ListenStream") == ["127.0.0.1:8000"]
    assert last(socket_unit, "Socket", "Accept") in ("no", "false")
    # Triggers agentd.service by name: no other Service= may be set.
    assert last(socket_unit, "Socket", "Service") in (None, "agentd.service")


# ---- systemd-analyze ---------------------------------------------------------------------------


def agentd_executable() -> str:
    found = shutil.which("agentd") or str(Path(sys.executable).parent / "agentd")
    return found if os.access(found, os.X_OK) else sys.executable


def name_or_id(lookup, ident: int) -> str:
    try:
        return lookup(ident)[0]
    except KeyError:
        return str(ident)


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """Copies of both units that this machine can verify: `verify` checks that ExecStart's
    binary exists, so it points at this environment's agentd; User=/Group=agentd becomes the
    current user where no such user exists. Nothing else changes."""
    service_text = SERVICE.read_text()
    service_text = re.sub(
        r"(?m)^ExecStart=\S+", lambda _: f"ExecStart={agentd_executable()}", service_text
    )
    try:
        pwd.getpwnam("agentd")
    except KeyError:
        user = name_or_id(pwd.getpwuid, os.getuid())
        group = name_or_id(grp.getgrgid, os.getgid())
        service_text = re.sub(r"(?m)^User=agentd$", f"User={user}", service_text)
        service_text = re.sub(r"(?m)^Group=agentd$", f"Group={group}", service_text)
    (tmp_path / "agentd.service").write_text(service_text)
    shutil.copy(SOCKET, tmp_path / "agentd.socket")
    return tmp_path


def analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    env = {
        **os.environ,
        "SYSTEMD_PAGER": "",
        "SYSTEMD_COLORS": "0",
        "SYSTEMD_LOG_COLOR": "0",
        "SYSTEMD_LOG_LEVEL": "notice",
    }
    return subprocess.run(
        [ANALYZE, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
        check=False,
    )


def analyze_help() -> str:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "--help"], capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, "SYSTEMD_PAGER": ""},
    )  # fmt: skip
    return result.stdout + result.stderr


def verify_problems(unit_dir: Path) -> list[str]:
    """Everything `systemd-analyze verify` says about our two units (empty: all accepted).

    verify exits 0 on an unknown key or a bad value ("..., ignoring."), so its messages are
    what counts: any line naming one of our files or units is a problem. Lines about units of
    the host (dependencies such as network-online.target) are not ours to judge.
    """
    options = []
    help_text = analyze_help()
    if "--man" in help_text:
        options.append("--man=no")
    if "--recursive-errors" in help_text:
        options.append("--recursive-errors=no")
    files = [str(unit_dir / "agentd.service"), str(unit_dir / "agentd.socket")]
    result = analyze("verify", *options, *files, cwd=unit_dir)
    ours = re.compile(re.escape(str(unit_dir)) + r"|agentd\.(service|socket)")
    problems = [line for line in (result.stdout + result.stderr).splitlines() if ours.search(line)]
    if result.returncode != 0:
        problems.append(f"exit status {result.returncode}: {result.stderr.strip()}")
    return problems


@needs_analyze
def test_units_verify(unit_dir):
    assert verify_problems(unit_dir) == []


@needs_analyze
@pytest.mark.parametrize(
    ("unit", "good", "bad"),
    [
        ("agentd.service", "KillMode=mixed", "KilMode=mixed"),  # unknown key
        ("agentd.service", "KillMode=mixed", "KillMode=mixd"),  # bad value
        ("agentd.socket", "Accept=no", "Acept=no"),
    ],
)
def test_verify_catches_a_typo(unit_dir, unit, good, bad):
    """The check above would notice a typo: it is not just `verify`'s exit status."""
    path = unit_dir / unit
    text = path.read_text()
    assert re.search(rf"(?m)^{re.escape(good)}$", text), good
    path.write_text(re.sub(rf"(?m)^{re.escape(good)}$", bad, text))
    assert verify_problems(unit_dir), f"verify accepted {bad!r}"


@needs_analyze
def test_security_exposure(unit_dir):
    if "--offline" not in analyze_help():
        pytest.skip("this systemd-analyze has no `security --offline`")
    result = analyze("security", "--offline=true", "--no-pager", "agentd.service", cwd=unit_dir)
    output = result.stdout + result.stderr
    found = re.search(
        r"Overall exposure level for agentd\.service:\s*([0-9]+(?:\.[0-9]+)?)", output
    )
    assert found, output
    exposure = float(found.group(1))
    assert exposure <= MAX_EXPOSURE, output
