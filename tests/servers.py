"""Real server processes for tests, all on 127.0.0.1: start, wait until healthy, stop the whole process group.

Shared by every test that talks to a real server (MLflow tracking server, ``mlflow models serve``, Prefect, moto,
PostgreSQL).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.helpers import VENV_BIN, subprocess_env


@contextlib.contextmanager
def tracking_uri_env(uri: str) -> Iterator[None]:
    """Point this process's MLflow at ``uri`` for a while (env and the global), then restore both."""
    import mlflow

    old_env = os.environ.get("MLFLOW_TRACKING_URI")
    old_uri = mlflow.get_tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env
        mlflow.set_tracking_uri(old_uri)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(**extra: str) -> dict[str, str]:
    """:func:`tests.helpers.subprocess_env` (the venv's bin first on PATH: `mlflow models serve` starts uvicorn
    through `bash -c`) with MLflow's job runner off unless ``extra`` or the environment says otherwise."""
    env = subprocess_env()
    # `mlflow server` otherwise starts six huey job consumers (GenAI jobs we never use) that poll at ~5 % CPU each.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.update(extra)
    return env


def _default_signals() -> None:
    """In the child: SIGINT and SIGTERM act as in a terminal, also when the suite runs as a shell's background job
    (which starts it with SIGINT ignored; a Prefect worker then takes the whole stop timeout to die)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def start_process(cmd: list[str], log_file: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log_file, "wb") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=_default_signals)  # fmt: skip


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Stop the process and its whole process group (uvicorn workers, job runners)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
        # The parent may exit before its workers finish shutting down (their exit handlers flush, e.g. the
        # prediction log): give the group a moment to empty before killing what is left.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and _group_alive(proc.pid):
            time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers in the group
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def wait_http(url: str, proc: subprocess.Popen[bytes], log_file: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}:\n{log_file.read_text()[-3000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url} not up after {timeout:.0f} s:\n{log_file.read_text()[-3000:]}")


@contextlib.contextmanager
def mlflow_tracking_server(tmp: Path, artifacts: str | None = None, env: dict[str, str] | None = None,
                           backend_store_uri: str | None = None) -> Iterator[str]:  # fmt: skip
    """A real ``mlflow server``: proxied artifacts in ``artifacts`` (default under ``tmp``); runs and the registry in
    ``backend_store_uri`` (e.g. a :class:`PostgresServer` database; default an sqlite file under ``tmp``)."""
    port = free_port()
    cmd = [
        str(VENV_BIN / "mlflow"), "server",
        "--backend-store-uri", backend_store_uri or f"sqlite:///{tmp / 'mlflow.db'}",
        "--artifacts-destination", artifacts or str(tmp / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    log_file = tmp / "mlflow-server.log"
    proc = start_process(cmd, log_file, server_env(**(env or {})))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, log_file)
        yield url
    finally:
        stop_process(proc)


@contextlib.contextmanager
def model_server(model_uri: str, tracking_uri: str, tmp: Path) -> Iterator[str]:
    port = free_port()
    cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    log_file = tmp / f"models-serve-{port}.log"
    proc = start_process(cmd, log_file, server_env(MLFLOW_TRACKING_URI=tracking_uri))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/ping", proc, log_file)
        yield url
    finally:
        stop_process(proc)


# --------------------------------------------------------------------------------------------- PostgreSQL


def postgres_bin(name: str) -> str | None:
    """A PostgreSQL server binary (``initdb``, ``pg_ctl``, ``postgres``): on PATH, else under /usr/lib/postgresql."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: p.parts[-3])
    return str(candidates[-1]) if candidates else None


#: Test servers skip fsync: an operating-system crash could lose data, a crash of the server process still cannot
#: (a committed transaction is in the WAL, in the OS's cache). Saves seconds per migration and per shutdown.
POSTGRES_TEST_SETTINGS = {"fsync": "off"}


class PostgresServer:
    """A throw-away PostgreSQL server on a free loopback port: ``initdb`` (trust auth), ``postgres`` as a process
    (log under ``tmp``), databases created on start; stopped with a fast shutdown (open clients are disconnected).

    As root (initdb and postgres refuse it) both run as ``nobody`` and the data folder is a fresh folder in the
    system's temp dir owned by ``nobody`` (pytest's ``tmp_path`` lies under a root-only folder); otherwise the data
    folder is under ``tmp``. :meth:`stop` then :meth:`start` restart it on the same port and data folder.
    ``settings``: ``-c`` server settings (default :data:`POSTGRES_TEST_SETTINGS`).
    """

    user = "postgres"

    def __init__(self, tmp: Path, databases: Sequence[str] = ("emassist",), *,
                 settings: Mapping[str, str] | None = None) -> None:  # fmt: skip
        missing = [b for b in ("initdb", "pg_ctl", "postgres") if postgres_bin(b) is None]
        if missing:
            pytest.skip(f"PostgreSQL server binaries not found ({', '.join(missing)}): install PostgreSQL 15")
        self.tmp = tmp
        self.databases = tuple(databases)
        self.settings = dict(POSTGRES_TEST_SETTINGS if settings is None else settings)
        self.port = free_port()
        self.as_nobody = os.geteuid() == 0
        if self.as_nobody:
            self._own_dir: Path | None = Path(tempfile.mkdtemp(prefix="emassist-pg-"))
            base = self._own_dir
        else:
            self._own_dir = None
            base = tmp / "postgres"
            base.mkdir(parents=True, exist_ok=True)
        self.data_dir = base / "data"
        self.socket_dir = base / "sock"  # short path: a unix socket's name is limited to ~107 bytes
        self.log_file = tmp / f"postgres-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._initdb(base)

    def _as_owner(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", "nobody", "--", *cmd] if self.as_nobody else cmd

    def _initdb(self, base: Path) -> None:
        self.socket_dir.mkdir()
        if self.as_nobody:
            for path in (base, self.socket_dir):
                shutil.chown(path, user="nobody")
        cmd = [str(postgres_bin("initdb")), "-D", str(self.data_dir), "-U", self.user, "--auth=trust",
               "--no-locale", "--encoding=UTF8", "--no-sync"]  # fmt: skip
        done = subprocess.run(self._as_owner(cmd), capture_output=True, text=True, env=_pg_env(), timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    def url(self, database: str | None = None) -> str:
        """The SQLAlchemy URL of ``database`` (default the first of :attr:`databases`). The driver is named:
        SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, and the lock installs psycopg2."""
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{database or self.databases[0]}"

    def start(self, timeout: float = 60.0) -> None:
        """Start the server, wait until it accepts connections, create the missing databases."""
        cmd = [str(postgres_bin("postgres")), "-D", str(self.data_dir), "-p", str(self.port),
               "-k", str(self.socket_dir), "-c", "listen_addresses=127.0.0.1"]  # fmt: skip
        for key, value in self.settings.items():
            cmd += ["-c", f"{key}={value}"]
        self.proc = start_process(self._as_owner(cmd), self.log_file, _pg_env())
        self._wait_ready(timeout)
        self._create_databases()

    def _connect(self, database: str = "postgres") -> Any:
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, dbname=database, connect_timeout=2)

    def _wait_ready(self, timeout: float) -> None:
        import psycopg2

        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{self.log_file.read_text()[-3000:]}")
            try:
                self._connect().close()
                return
            except psycopg2.OperationalError:
                time.sleep(0.2)
        raise RuntimeError(f"postgres not up after {timeout:.0f} s:\n{self.log_file.read_text()[-3000:]}")

    def _create_databases(self) -> None:
        conn = self._connect()
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute("SELECT datname FROM pg_database")
                present = {row[0] for row in cur.fetchall()}
                for name in self.databases:
                    if name not in present:
                        cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()

    def execute(self, sql: str, database: str | None = None) -> None:
        """Run one SQL statement as the superuser (autocommit), e.g. to create a role in a test."""
        conn = self._connect(database or self.databases[0])
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (``pg_ctl stop -m fast``: clients disconnected, a clean checkpoint); kill as a last resort."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            cmd = [str(postgres_bin("pg_ctl")), "stop", "-D", str(self.data_dir), "-m", "fast", "-w",
                   "-t", str(int(timeout))]  # fmt: skip
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(self._as_owner(cmd), capture_output=True, env=_pg_env(), timeout=timeout + 5)
        stop_process(self.proc, timeout=5)
        self.proc = None

    def cleanup(self) -> None:
        """Stop the server and remove a data folder made outside ``tmp``."""
        self.stop()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def _pg_env() -> dict[str, str]:
    """The environment for the PostgreSQL binaries: this one, less what points a client at another server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


@contextlib.contextmanager
def postgres_server(tmp: Path, databases: Sequence[str] = ("emassist",)) -> Iterator[str]:
    """A running :class:`PostgresServer` with ``databases``: yields the SQLAlchemy URL of the first one
    (``postgresql+psycopg2://postgres@127.0.0.1:PORT/DB``; the others differ only in the last part); stopped
    afterwards, also when the test fails. Skips the test where the PostgreSQL server binaries are missing."""
    with PostgresServer(tmp, databases) as server:
        yield server.url()
