"""Real mosquitto and PostgreSQL servers on free ports, for the test suite.

Tests never talk to the system services (which listen on 1883/5432): every server here runs
from a private directory on a port picked by the kernel, and is stopped when its context
manager exits, when its pytest fixture is finalised, or at the latest at interpreter exit.

Privilege traps handled here (tests and CI run as root):

* mosquitto started as root drops privileges to the ``mosquitto`` user *before* it opens its
  log file and writes its persistence database, so both live in a state directory owned by
  that user. Without that, persistence is silently off (the errors only go to stderr).
* ``initdb`` and ``postgres`` refuse to run as root, so as root they run through
  ``runuser -u postgres``; the cluster directory (data, socket directory, log) is owned by
  ``postgres``.
* pytest creates its tmp dirs with mode 0700, which the service users cannot traverse. The
  harness adds the search bit (``o+x``, never read) to the ancestors of a server directory
  that lack it. pytest re-tightens its own root on the next session, which is harmless.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import glob
import inspect
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

__all__ = [
    "HarnessError",
    "Mosquitto",
    "Postgres",
    "free_port",
    "leaked_tasks",
    "unique_name",
    "wait_until",
    "wait_until_async",
]

INSTALL_HINT = (
    "run `make test`, which installs mosquitto and postgresql "
    "(or run scripts/ensure-binaries.sh yourself)"
)
HOST = "127.0.0.1"

T = TypeVar("T")


class HarnessError(RuntimeError):
    """A test server could not be found, started or stopped."""


# --------------------------------------------------------------------------- generic helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def unique_name(prefix: str = "t") -> str:
    """A short unique identifier, safe as a database name, client id or topic level."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    *,
    interval: float = 0.02,
    message: str | Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Raises ``TimeoutError`` (with ``message``, which may be a callable built lazily, e.g. to
    include a server log) once ``timeout`` seconds have passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise TimeoutError(text or f"condition not met within {timeout:.1f}s: {predicate!r}")
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,  # noqa: ASYNC109 - a polling deadline with a useful message
    *,
    interval: float = 0.02,
    message: str | Callable[[], str] | None = None,
) -> T:
    """``wait_until`` for async tests; ``predicate`` may be sync or return an awaitable."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() >= deadline:
            text = message() if callable(message) else message
            raise TimeoutError(text or f"condition not met within {timeout:.1f}s: {predicate!r}")
        await asyncio.sleep(interval)


async def leaked_tasks(
    before: set[asyncio.Task[Any]], *, turns: int = 10
) -> list[asyncio.Task[Any]]:
    """Tasks of the running loop that were not in ``before`` and are still pending.

    Gives the loop up to ``turns`` turns (``asyncio.sleep(0)``) so tasks that were just
    cancelled or are just finishing get to complete first. The calling task is ignored.
    """
    current = asyncio.current_task()
    pending: list[asyncio.Task[Any]] = []
    for _ in range(turns + 1):
        pending = [
            t for t in asyncio.all_tasks() if t is not current and t not in before and not t.done()
        ]
        if not pending:
            break
        await asyncio.sleep(0)
    return pending


def describe_tasks(tasks: list[asyncio.Task[Any]]) -> str:
    lines = []
    for t in tasks:
        frames = t.get_stack(limit=1)
        where = f" at {frames[0].f_code.co_filename}:{frames[0].f_lineno}" if frames else ""
        lines.append(f"  - {t.get_name()}: {t.get_coro()!r}{where}")
    return "\n".join(lines)


def _port_accepts(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _is_root() -> bool:
    return os.geteuid() == 0


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def _chown(path: Path, user: str) -> None:
    shutil.chown(path, user=user, group=pwd.getpwnam(user).pw_gid)


def _make_traversable(path: Path) -> None:
    """Add the search bit for others on ``path``'s ancestors that lack it (root only).

    Needed because pytest's tmp dirs are 0700 root, and the service users must reach their
    own directory below them. Only ``x`` is added: nobody gains the right to list or read.
    """
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _service_dir(path: Path, user: str) -> None:
    """Create ``path`` for a service that drops to (or runs as) ``user`` when we are root."""
    path.mkdir(parents=True, exist_ok=True)
    if _is_root():
        if not _user_exists(user):
            raise HarnessError(f"system user {user!r} does not exist; {INSTALL_HINT}")
        _make_traversable(path)
        _chown(path, user)
        path.chmod(0o700)


# ------------------------------------------------------------------ process safety net at exit

_LIVE: dict[int, Mosquitto | Postgres] = {}


def _register(server: Mosquitto | Postgres) -> None:
    _LIVE[id(server)] = server


def _unregister(server: Mosquitto | Postgres) -> None:
    _LIVE.pop(id(server), None)


@atexit.register
def _kill_leftovers() -> None:  # pragma: no cover - only runs when a test run went wrong
    for server in list(_LIVE.values()):
        with contextlib.suppress(Exception):
            server.kill()


# ------------------------------------------------------------------------------- mosquitto

MOSQUITTO_FALLBACKS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str:
    # /usr/sbin is often missing from a non-root PATH, hence the fallbacks.
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in MOSQUITTO_FALLBACKS:
        if os.access(candidate, os.X_OK):
            return candidate
    raise HarnessError(f"mosquitto binary not found; {INSTALL_HINT}")


class Mosquitto:
    """A private mosquitto broker on 127.0.0.1, persistent across ``restart()``.

    ``stop()`` is graceful (SIGTERM: the broker saves its persistence database), ``kill()`` is
    SIGKILL (only what the last autosave, at most ~1 s old, wrote survives). ``restart()``
    keeps the port and the persistence database.
    """

    START_TIMEOUT = 10.0
    STOP_TIMEOUT = 10.0

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        extra_conf: str = "",
        config: Callable[[Mosquitto], str] | None = None,
    ) -> None:
        """``config``, when given, writes the whole config instead of the harness's own: it
        is called with the broker on every start, so it can put ``port`` (the listener the
        harness waits for) and ``state_dir`` (writable by the broker's user) into a shipped
        config; ``extra_conf`` is appended to what it returns."""
        self.workdir = Path(workdir)
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.extra_conf = extra_conf
        self._config = config
        self.conf_path = self.workdir / "mosquitto.conf"
        # Everything the broker writes after dropping privileges lives in state_dir.
        self.state_dir = self.workdir / "state"
        self.log_path = self.state_dir / "mosquitto.log"
        self.stderr_path = self.workdir / "mosquitto.stderr"
        self.db_path = self.state_dir / "mosquitto.db"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- info
    @property
    def host(self) -> str:
        return HOST

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """The broker's log file plus anything it printed on stderr."""
        return _read(self.log_path) + _read(self.stderr_path)

    @property
    def run_as(self) -> str | None:
        """The user the broker drops to when started as root (None when not root)."""
        if not _is_root():
            return None
        text = self.extra_conf if self._config is None else self._render_config()
        match = re.search(r"^\s*user\s+(\S+)\s*$", text, re.MULTILINE)
        return match.group(1) if match else "mosquitto"

    # -- lifecycle
    def _render_config(self) -> str:
        assert self._config is not None
        return f"{self._config(self)}\n{self.extra_conf}\n"

    def _write_config(self) -> None:
        if self._config is not None:
            self.conf_path.write_text(self._render_config())
            self.conf_path.chmod(0o644)
            return
        conf = f"""\
# written by tests/harness/servers.py
listener {self.port} {HOST}
allow_anonymous true
persistence true
persistence_location {self.state_dir}/
persistence_file mosquitto.db
autosave_interval 1
max_inflight_messages 4000
max_inflight_bytes 16777216
max_queued_messages 1000000
max_queued_bytes 0
set_tcp_nodelay true
log_dest file {self.log_path}
log_type error
log_type warning
log_type notice
log_type information
log_type subscribe
log_type unsubscribe
connection_messages true
log_timestamp true
log_timestamp_format %Y-%m-%dT%H:%M:%S
{self.extra_conf}
"""
        self.conf_path.write_text(conf)
        self.conf_path.chmod(0o644)  # re-read as the unprivileged user on SIGHUP

    def start(self) -> None:
        if self.running:
            raise HarnessError(f"mosquitto on port {self.port} is already running")
        binary = find_mosquitto()
        self.workdir.mkdir(parents=True, exist_ok=True)
        user = self.run_as
        if user is not None:
            _service_dir(self.state_dir, user)
        else:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            self._write_config()
            if self._spawn_and_wait(binary):
                _register(self)
                return
            if attempt + 1 < attempts and "in use" in self.log_text():
                self.port = free_port()  # someone took our port between pick and bind
                continue
            break
        raise HarnessError(
            f"mosquitto did not start on port {self.port}; log:\n{_tail(self.log_text())}"
        )

    def _spawn_and_wait(self, binary: str) -> bool:
        with self.stderr_path.open("ab") as err:
            self._proc = subprocess.Popen(
                [binary, "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=self.workdir,
                start_new_session=True,  # a Ctrl-C on pytest must not SIGINT the broker
            )
        proc = self._proc
        try:
            wait_until(
                lambda: proc.poll() is not None or _port_accepts(self.port),
                self.START_TIMEOUT,
            )
        except TimeoutError:
            self.kill()
            return False
        if proc.poll() is not None:
            self._proc = None
            return False
        return True

    def stop(self) -> None:
        """Graceful stop: SIGTERM, then wait; mosquitto saves its database on the way out."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
                raise HarnessError(
                    f"mosquitto on port {self.port} ignored SIGTERM for {self.STOP_TIMEOUT}s"
                ) from None
        self._proc = None
        _unregister(self)

    def kill(self) -> None:
        """SIGKILL: no final save, like a crash."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self._proc = None
        _unregister(self)

    def restart(self) -> None:
        """Graceful stop (if running), then start on the same port with the same database."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            self.kill()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Mosquitto {self.url} {state} in {self.workdir}>"


# ------------------------------------------------------------------------------- postgres

PG_USER = "postgres"  # the database superuser created by initdb, and the OS user as root
_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes, and ".s.PGSQL.NNNNN" is appended


def find_pg_bindir() -> Path:
    """The directory holding initdb, pg_ctl and postgres (newest installed major first)."""

    def ok(d: Path) -> bool:
        return all(os.access(d / b, os.X_OK) for b in ("initdb", "pg_ctl", "postgres"))

    def major(d: str) -> float:
        try:
            return float(Path(d).parent.name)
        except ValueError:
            return 0.0

    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True):
        if ok(Path(d)):
            return Path(d)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            if out and ok(Path(out)):
                return Path(out)
    initdb = shutil.which("initdb")
    if initdb and ok(Path(initdb).parent):
        return Path(initdb).parent
    raise HarnessError(f"PostgreSQL server binaries (initdb, pg_ctl) not found; {INSTALL_HINT}")


class Postgres:
    """A private PostgreSQL cluster on 127.0.0.1 with trust auth for user ``postgres``.

    ``start()`` runs initdb the first time only; later starts reuse the data directory.
    ``stop()`` is ``pg_ctl stop -m fast``; ``kill()`` is ``-m immediate`` (no shutdown
    checkpoint, crash recovery on the next start).

    ``fast=True`` sets ``fsync=off`` and ``full_page_writes=off``: those only risk data on an
    OS crash, never on a server crash, so ``kill()`` still loses no committed transaction.
    ``synchronous_commit`` is deliberately left on: with fsync off it costs next to nothing,
    while ``synchronous_commit=off`` would make ``kill()`` drop recently acknowledged commits,
    which would break exactly the ack-after-commit tests this harness exists for. Pass it in
    ``settings`` if a benchmark really wants it.
    """

    START_TIMEOUT = 60
    STOP_TIMEOUT = 60
    FAST_SETTINGS: Mapping[str, str] = {"fsync": "off", "full_page_writes": "off"}
    DEFAULT_SETTINGS: Mapping[str, str] = {"max_connections": "200"}

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        fast: bool = True,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.fast = fast
        self.settings: dict[str, str] = dict(self.DEFAULT_SETTINGS)
        if fast:
            self.settings.update(self.FAST_SETTINGS)
        self.settings.update(settings or {})
        # Everything postgres owns lives in cluster_dir (owned by the postgres user as root).
        self.cluster_dir = self.workdir / "cluster"
        self.data_dir = self.cluster_dir / "data"
        self.log_path = self.cluster_dir / "postgres.log"
        self.socket_dir = self.cluster_dir / "sock"
        self._short_socket_dir: str | None = None
        self._bindir: Path | None = None

    # -- info
    @property
    def host(self) -> str:
        return HOST

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_pg_bindir()
        return self._bindir

    @property
    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    @property
    def running(self) -> bool:
        if not self.initialized:
            return False
        return self._pg_ctl("status", check=False).returncode == 0

    def url(self, dbname: str = "postgres", *, driver: str | None = None) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/dbname`` (``driver="asyncpg"`` gives the
        ``postgresql+asyncpg://`` form SQLAlchemy wants)."""
        scheme = "postgresql" if driver is None else f"postgresql+{driver}"
        return f"{scheme}://{PG_USER}@{HOST}:{self.port}/{dbname}"

    def log_text(self) -> str:
        return _read(self.log_path)

    # -- commands
    def _as_postgres(self, argv: list[str]) -> list[str]:
        # initdb and postgres refuse to run as root.
        return ["runuser", "-u", PG_USER, "--", *argv] if _is_root() else argv

    def _run(
        self, argv: list[str], *, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", PGCONNECT_TIMEOUT="10")
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=env,
            cwd=self.cluster_dir if self.cluster_dir.exists() else None,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise HarnessError(
                f"{shlex.join(argv)} failed with exit code {result.returncode}:\n"
                f"{result.stdout}{result.stderr}\n--- server log tail ---\n"
                f"{_tail(self.log_text())}"
            )
        return result

    def _pg_ctl(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        argv = self._as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), *args])
        return self._run(argv, check=check, timeout=timeout)

    def _socket_dir(self) -> str:
        if len(str(self.socket_dir)) <= _MAX_SOCKET_PATH:
            _service_dir(self.socket_dir, PG_USER)
            return str(self.socket_dir)
        if self._short_socket_dir is None:  # deep tmp paths overflow sun_path
            short = Path(tempfile.mkdtemp(prefix="pgsock-"))
            _service_dir(short, PG_USER)
            self._short_socket_dir = str(short)
        return self._short_socket_dir

    def _initdb(self) -> None:
        self._run(
            self._as_postgres(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-A",
                    "trust",
                    "-U",
                    PG_USER,
                    "--no-sync",
                    "--locale=C",
                    "-E",
                    "UTF8",
                ]
            )
        )

    def _options(self) -> str:
        opts = ["-p", str(self.port), "-k", self._socket_dir(), "-c", f"listen_addresses={HOST}"]
        for key, value in self.settings.items():
            opts += ["-c", f"{key}={value}"]
        return shlex.join(opts)  # pg_ctl hands -o to a shell

    # -- lifecycle
    def start(self) -> None:
        """initdb on first use, then ``pg_ctl start -w``; raises if it does not come up."""
        _service_dir(self.cluster_dir, PG_USER)
        if not self.initialized:
            self._initdb()
        if self.running:
            raise HarnessError(f"postgres in {self.data_dir} is already running")
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            log_size = self.log_path.stat().st_size if self.log_path.exists() else 0
            result = self._pg_ctl(
                "-o",
                self._options(),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                str(self.START_TIMEOUT),
                "start",
                check=False,
                timeout=self.START_TIMEOUT + 30,
            )
            if result.returncode == 0:
                _register(self)
                return
            new_log = self.log_text()[log_size:]
            if attempt + 1 < attempts and "could not bind" in new_log:
                self.port = free_port()  # someone took our port between pick and bind
                continue
            raise HarnessError(
                f"postgres did not start on port {self.port}:\n{result.stdout}{result.stderr}"
                f"\n--- server log tail ---\n{_tail(new_log)}"
            )

    def ensure_running(self) -> None:
        """Start the server unless it is up (for shared servers a test may have stopped)."""
        if self.running:
            return
        try:
            self.start()
        except HarnessError:
            # `pg_ctl status` can fail transiently on a loaded machine: check once more.
            if not self.running:
                raise

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m MODE -w``: smart, fast (default) or immediate."""
        if self.initialized and self.running:
            self._pg_ctl(
                "-m", mode, "-w", "-t", str(self.STOP_TIMEOUT), "stop",
                timeout=self.STOP_TIMEOUT + 30,
            )  # fmt: skip
        _unregister(self)

    def kill(self) -> None:
        """Immediate shutdown (``pg_ctl stop -m immediate``): like a crash, recovery on start."""
        self.stop(mode="immediate")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    # -- SQL
    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL through psql as the superuser; returns unaligned, tuples-only output."""
        psql = self.bindir / "psql"
        binary = str(psql) if psql.exists() else shutil.which("psql")
        if binary is None:
            raise HarnessError(f"psql not found; {INSTALL_HINT}")
        argv = [
            binary, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", HOST, "-p", str(self.port), "-U", PG_USER, "-d", dbname, "-c", sql,
        ]  # fmt: skip
        return self._run(argv, timeout=60).stdout.strip()

    def create_database(self, name: str | None = None) -> str:
        """Create a database (a unique name if none given) and return its URL."""
        name = name or unique_name("test_")
        self._check_name(name)
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, terminating any connections a test left open."""
        self._check_name(name)
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    @staticmethod
    def _check_name(name: str) -> None:
        if not _DB_NAME.match(name):
            raise ValueError(f"not a plain database name: {name!r}")

    # -- context manager / cleanup
    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        except HarnessError:
            self.kill()
            raise
        finally:
            if self._short_socket_dir is not None:
                shutil.rmtree(self._short_socket_dir, ignore_errors=True)
                self._short_socket_dir = None

    def __repr__(self) -> str:
        return f"<Postgres {self.url()} in {self.workdir}>"
