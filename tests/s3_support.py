"""Helpers for the S3 tests: a real moto S3 server process on 127.0.0.1 and a fault-injecting HTTP proxy in front of
it (503s, truncated and corrupted bodies), plus fake credentials for the AWS chain.

The proxy is a real HTTP hop: boto3 talks to it over TCP exactly as to any S3 endpoint, so retries, size and
checksum checks are exercised on real transfers.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import subprocess
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import requests

from tests.servers import VENV_BIN, free_port, server_env, start_process, stop_process, wait_http


def fake_secret() -> str:
    """A secret nobody would write by accident: if it shows up in a file, it leaked from the environment."""
    return f"emassist-fake-secret-{uuid.uuid4().hex}"


def aws_env(secret: str, home: Path, **extra: str) -> dict[str, str]:
    """Fake credentials through the standard AWS chain (environment variables) and nothing else: the config and
    credentials files point at empty files under ``home`` so that a developer's ~/.aws cannot interfere."""
    home.mkdir(parents=True, exist_ok=True)
    for name in ("config", "credentials"):
        (home / name).touch()
    return {
        "AWS_ACCESS_KEY_ID": "AKIAEMASSISTTEST0000",
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(home / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        **extra,
    }


@contextlib.contextmanager
def patched_environ(
    values: dict[str, str], remove: tuple[str, ...] = ("AWS_PROFILE", "AWS_SESSION_TOKEN")
) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in (*values, *remove)}
    for k in remove:
        os.environ.pop(k, None)
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Moto:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log_file: Path


def start_moto(tmp: Path, env: dict[str, str], port: int | None = None, recording: Path | None = None) -> Moto:
    """``moto_server -H 127.0.0.1 -p PORT`` as a process. With ``recording``, every request is appended to that file
    (moto's recorder) so that a restarted server can replay them: a stand-in for a store that keeps its data."""
    port = port or free_port()
    extra = dict(env)
    if recording is not None:
        extra.update({"MOTO_ENABLE_RECORDING": "true", "MOTO_RECORDER_FILEPATH": str(recording)})
    log_file = tmp / f"moto-{port}-{uuid.uuid4().hex[:6]}.log"
    proc = start_process([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log_file,
                         server_env(**extra))  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/moto-api/", proc, log_file, timeout=60)
    except BaseException:
        stop_process(proc)
        raise
    return Moto(url, port, proc, log_file)


def repair_recording(path: Path) -> int:
    """moto's recorder appends from several threads: two entries can share a line (one written before the other's
    newline), and a kill can cut the last one short. Rewrite one entry per line; return how many were unreadable."""
    decoder = json.JSONDecoder()
    entries, broken = [], 0
    for line in path.read_text().splitlines():
        pos = 0
        while pos < len(line):
            try:
                entry, end = decoder.raw_decode(line, pos)
            except json.JSONDecodeError:
                broken += 1
                break
            entries.append(entry)
            pos = end
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return broken


def replay_recording(moto: Moto, recording: Path) -> int:
    """Give a restarted moto back what it had stored: replay the repaired request recording."""
    broken = repair_recording(recording)
    requests.post(f"{moto.url}/moto-api/recorder/replay-recording", timeout=300).raise_for_status()
    return broken


@contextlib.contextmanager
def moto_server(tmp: Path, env: dict[str, str], recording: Path | None = None) -> Iterator[Moto]:
    moto = start_moto(tmp, env, recording=recording)
    try:
        yield moto
    finally:
        stop_process(moto.proc)


# --------------------------------------------------------------------------------------------------- fault proxy


@dataclass
class Faults:
    """Per-key queues of faults for GET requests of objects: '503', 'truncate', 'corrupt'; a key in ``always``
    gets its fault on every GET."""

    queued: dict[str, list[str]] = field(default_factory=dict)
    always: dict[str, str] = field(default_factory=dict)
    gets: Counter[str] = field(default_factory=Counter)  # object GETs per key
    lists: int = 0  # ListObjectsV2 pages served
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, key: str) -> str | None:
        with self.lock:
            self.gets[key] += 1
            if key in self.always:
                return self.always[key]
            queue = self.queued.get(key)
            return queue.pop(0) if queue else None


def _handler(upstream: str, faults: Faults) -> type[http.server.BaseHTTPRequestHandler]:
    up = urlsplit(upstream)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            parts = urlsplit(self.path)
            segments = unquote(parts.path).lstrip("/").split("/", 1)
            key = segments[1] if len(segments) > 1 else ""
            is_object_get = self.command == "GET" and key != "" and "list-type" not in parts.query
            if self.command == "GET" and "list-type=2" in parts.query:
                with faults.lock:
                    faults.lists += 1
            fault = faults.take(key) if is_object_get else None
            if fault == "503":
                payload = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = up.netloc
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            if fault == "corrupt" and data:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            if fault == "truncate":
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data[: len(data) // 2] if fault == "truncate" else data)
            if fault == "truncate":
                self.close_connection = True

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler


@contextlib.contextmanager
def fault_proxy(upstream: str, faults: Faults) -> Iterator[str]:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` that injects ``faults``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(upstream, faults))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
