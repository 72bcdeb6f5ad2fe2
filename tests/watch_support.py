"""The watcher's tests: ``emassist watch`` (and ``emassist web --watch``) as real processes against the session's
small champion (tests/webapp_support.py registers it), tiny demo PNGs, the results file read back, and a local HTTP
receiver for ``--alert-url``.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests import webapp_support as ws
from tests.helpers import REPO_ROOT, encode
from tests.servers import server_env, start_process

#: Fast knobs for tests: a file is complete after 0.6 s without change, a stuck one is reported after 4 s; a full
#: rescan every 3 s lands during the bursts (rescans once queued files in flight a second time).
FAST_WATCH = {"settle_s": 0.6, "incomplete_timeout_s": 4.0, "batch_size": 32, "max_wait_s": 0.1, "queue_size": 64,
              "poll_interval_s": 0.3, "min_confidence": 0.5, "rescan_s": 3.0}  # fmt: skip
SIDE = 64  # pixels of the test images (the small model's cache size)


def write_params(champion: ws.Champion, name: str = "params-watch.yaml", **watch: Any) -> Path:
    """The champion's params with the fast ``watch:`` knobs (and ``watch`` overrides)."""
    raw = ws.params_dict(champion.root, champion.tracking_uri)
    raw["watch"] = {**FAST_WATCH, **watch}
    path = champion.root / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def png_bytes(cls: str, index: int, side: int = SIDE) -> bytes:
    return encode(ws.demo_image(cls, index, side), "PNG")


def watch_cmd(params_file: Path, folder: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "emassist.cli.main", "--params", str(params_file), "watch", str(folder), *extra]


def watch_env(champion: ws.Champion) -> dict[str, str]:
    env = server_env(MLFLOW_TRACKING_URI=champion.tracking_uri, PYTHONPATH=str(REPO_ROOT))
    env.pop("EMASSIST_MONITORING_DB_URI", None)  # the params file's log (the champion's folder)
    return env


def start_watcher(champion: ws.Champion, params_file: Path, folder: Path, log_file: Path,
                  *extra: str) -> subprocess.Popen[bytes]:  # fmt: skip
    """``emassist watch`` as a process (its own group); returns once it says it is watching."""
    proc = start_process(watch_cmd(params_file, folder, "--no-progress", *extra), log_file, watch_env(champion))
    wait_for(lambda: "watching " in log_file.read_text(errors="replace"), 120, proc, log_file, "the start line")
    return proc


def wait_for(check: Any, timeout: float, proc: subprocess.Popen[bytes] | None = None, log_file: Path | None = None,
             what: str = "the condition") -> Any:  # fmt: skip
    """Poll ``check()`` until it is truthy; fail with the process's log when it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-3000:] if log_file else ""
            raise AssertionError(f"the watcher exited with {proc.returncode} waiting for {what}:\n{tail}")
        time.sleep(0.1)
    tail = log_file.read_text(errors="replace")[-3000:] if log_file else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{tail}")


def results(out: Path) -> list[dict[str, Any]]:
    """The complete lines of ``out/results.jsonl``."""
    path = out / "results.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


def rows_for(out: Path, relpath: str) -> list[dict[str, Any]]:
    return [r for r in results(out) if r["relpath"] == relpath]


class AlertReceiver:
    """A local HTTP server (a thread) that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        received = self.messages

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alert"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> AlertReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def web_with_watch(champion: ws.Champion, params_file: Path, folder: Path, *extra: str) -> Iterator[str]:
    """``emassist web --watch FOLDER`` as a process (see :func:`tests.webapp_support.web_server`)."""
    with ws.web_server(champion, params_file, "--watch", str(folder), *extra) as url:
        yield url
