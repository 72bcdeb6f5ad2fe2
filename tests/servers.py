"""Real server processes for tests, all on 127.0.0.1: start, wait until healthy, stop the whole process group.

Shared by every test that talks to a real server (MLflow tracking server, ``mlflow models serve``, Prefect, moto).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

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


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Stop the process and its whole process group (uvicorn workers, job runners)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
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
def mlflow_tracking_server(tmp: Path, artifacts: str | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """A real ``mlflow server``: sqlite backend, proxied artifacts in ``artifacts`` (default under ``tmp``)."""
    port = free_port()
    cmd = [
        str(VENV_BIN / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
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
