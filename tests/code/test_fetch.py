"""emassist.data.fetch against a real local HTTP server that serves small class tars and supports Range requests."""

from __future__ import annotations

import hashlib
import io
import re
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from emassist.config.classes import CLASSES
from emassist.config.settings import NffaParams, ParamsError, check_class_names
from emassist.data.fetch import NFFA_MD5, FetchError, extract_class_tar, fetch_nffa, md5_file
from tests.conftest import REPO_ROOT
from tests.helpers import encode

FAST = {"retries": 3, "timeout_s": 5.0, "progress": False, "backoff_s": 0.01}


def _fetch(
    raw_dir: Path,
    *,
    base_url: str,
    download_dir: Path,
    classes: list[str],
    retries: int = 5,
    timeout_s: float = 60.0,
    **kwargs: Any,
) -> Any:
    """fetch_nffa with an ``nffa`` section built from these values and checked as load_params checks it."""
    nffa = NffaParams(base_url=base_url, download_dir=str(download_dir), retries=retries, timeout_s=timeout_s)
    nffa.check()
    return fetch_nffa(raw_dir, nffa, classes, **kwargs)


# ------------------------------------------------------------------------------------------ test server


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)  # "Fibres.tar" -> body
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (file name, Range header)
    truncate_first: dict[str, int] = field(default_factory=dict)  # close after N bytes on the first request
    truncate_all: dict[str, int] = field(default_factory=dict)  # close after N bytes on every request
    stall_first: dict[str, tuple[int, float]] = field(default_factory=dict)  # send N bytes, then sleep s
    ignore_range: bool = False
    fail_first: dict[str, int] = field(default_factory=dict)  # answer 503 this many times
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, name: str | None = None) -> int:
        return sum(1 for n, _ in self.requests if name is None or n == name)

    def ranges(self, name: str) -> list[str | None]:
        return [r for n, r in self.requests if n == name]


@dataclass
class Server:
    state: ServerState
    base_url: str


def _make_handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            m = re.fullmatch(r"/api/records/test/files/([^/]+)/content", self.path)
            name = m.group(1) if m else ""
            range_header = self.headers.get("Range")
            with state.lock:
                state.requests.append((name, range_header))
                first = state.count(name) == 1
                fail = state.fail_first.get(name, 0)
                if fail:
                    state.fail_first[name] = fail - 1
            if name not in state.files:
                self.send_error(404)
                return
            if fail:
                self.send_error(503)
                return
            body = state.files[name]
            start = 0
            if range_header and not state.ignore_range:
                rm = re.fullmatch(r"bytes=(\d+)-", range_header)
                assert rm, range_header
                start = int(rm.group(1))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            payload = body[start:]
            cut = state.truncate_all.get(name, state.truncate_first.get(name) if first else None)
            if cut is not None:
                self.wfile.write(payload[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            if first and name in state.stall_first:
                n, sleep_s = state.stall_first[name]
                self.wfile.write(payload[:n])
                self.wfile.flush()
                time.sleep(sleep_s)
                self.close_connection = True
                return
            self.wfile.write(payload)

    return Handler


@pytest.fixture
def server() -> Iterator[Server]:
    state = ServerState()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    try:
        yield Server(state, f"http://{host}:{port}/api/records/test/files")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# ------------------------------------------------------------------------------------------ tar builders


def _png(seed: int) -> bytes:
    return encode(Image.new("L", (8, 6), color=seed % 256), "PNG")


def _file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    return info, data


def build_tar(cls: str, n: int = 3, *, flat: bool = False, extra: list[tarfile.TarInfo] | None = None) -> bytes:
    """A small tar like the real ones: ``<cls>/L2_<hex>.png`` members (or flat ones)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        if not flat:
            d = tarfile.TarInfo(cls)
            d.type = tarfile.DIRTYPE
            d.mode = 0o755
            tf.addfile(d)
        for i in range(n):
            data = _png(i + len(cls))
            stem = f"L2_{hashlib.md5(f'{cls}{i}'.encode()).hexdigest()}.png"
            info, payload = _file_member(stem if flat else f"{cls}/{stem}", data)
            tf.addfile(info, io.BytesIO(payload))
        for info in extra or []:
            tf.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return buf.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def serve(server: Server, tars: dict[str, bytes]) -> dict[str, str]:
    for cls, data in tars.items():
        server.state.files[f"{cls}.tar"] = data
    return {cls: md5(data) for cls, data in tars.items()}


def serve_class(server: Server, cls: str, n: int = 3, **tar_options: Any) -> tuple[bytes, dict[str, str]]:
    """``build_tar(cls, n, ...)`` served by ``server``: (the tar's bytes, its checksum as ``{cls: md5}``)."""
    data = build_tar(cls, n, **tar_options)
    return data, serve(server, {cls: data})


def files_under(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


def expected_names(data: bytes) -> set[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name.split("/", 1)[-1] for m in tf.getmembers() if m.isfile()}


def fetch_class(server: Server, tmp_path: Path, cls: str, checksums: dict[str, str], *, raw: Path | None = None,
                **options: Any) -> Any:  # fmt: skip
    """:func:`_fetch` of the one class ``cls`` from ``server``: into ``raw`` (default ``tmp_path/raw``), downloads in
    ``tmp_path/dl``, with :data:`FAST`'s options unless ``options`` say otherwise."""
    return _fetch(raw or tmp_path / "raw", base_url=server.base_url, download_dir=tmp_path / "dl", classes=[cls],
                  checksums=checksums, **{**FAST, **options})  # fmt: skip


# ------------------------------------------------------------------------------------------------ tests


def test_default_checksums_cover_every_class() -> None:
    assert set(NFFA_MD5) == set(CLASSES)
    assert all(re.fullmatch(r"[0-9a-f]{32}", v) for v in NFFA_MD5.values())


def test_download_verify_extract(server: Server, tmp_path: Path) -> None:
    tars = {"Fibres": build_tar("Fibres", 3), "Powder": build_tar("Powder", 2)}
    sums = serve(server, tars)
    raw, dl = tmp_path / "raw", tmp_path / "dl"

    report = _fetch(
        raw, base_url=server.base_url, download_dir=dl, classes=["Fibres", "Powder"], checksums=sums, **FAST
    )

    for cls, data in tars.items():
        assert files_under(raw / cls) == expected_names(data)  # top folder stripped: raw/Fibres/L2_*.png
        assert md5_file(dl / f"{cls}.tar") == sums[cls]
        assert not (dl / f"{cls}.tar.part").exists()
        c = report.classes[cls]
        assert (c.bytes, c.transferred, c.files, c.resumed, c.downloaded) == (
            len(data),
            len(data),
            len(expected_names(data)),
            False,
            True,
        )
    with Image.open(next((raw / "Fibres").iterdir())) as im:
        assert im.size == (8, 6)
    assert report.files == {"Fibres": 3, "Powder": 2}
    assert report.resumed == {"Fibres": False, "Powder": False}
    assert report.total_bytes == sum(map(len, tars.values()))
    assert sorted(p.name for p in raw.iterdir()) == ["Fibres", "Powder"]  # no temp folders left
    assert server.state.ranges("Fibres.tar") == [None]
    assert "Fibres" in report.summary()


def test_truncated_download_is_resumed_with_range(server: Server, tmp_path: Path) -> None:
    data, sums = serve_class(server, "Fibres", 4)
    server.state.truncate_first["Fibres.tar"] = 1000

    report = fetch_class(server, tmp_path, "Fibres", sums)

    assert server.state.ranges("Fibres.tar") == [None, "bytes=1000-"]
    c = report.classes["Fibres"]
    assert c.resumed and c.transferred == len(data) and c.bytes == len(data)
    assert md5_file(tmp_path / "dl" / "Fibres.tar") == sums["Fibres"]
    assert files_under(tmp_path / "raw" / "Fibres") == expected_names(data)


def test_stalled_download_times_out_and_resumes(server: Server, tmp_path: Path) -> None:
    data, sums = serve_class(server, "Tips", 3)
    server.state.stall_first["Tips.tar"] = (700, 1.5)

    report = fetch_class(server, tmp_path, "Tips", sums, timeout_s=0.3)

    assert server.state.ranges("Tips.tar") == [None, "bytes=700-"]
    assert report.classes["Tips"].resumed
    assert files_under(tmp_path / "raw" / "Tips") == expected_names(data)


def test_server_ignoring_range_restarts_from_zero(server: Server, tmp_path: Path) -> None:
    data, sums = serve_class(server, "Nanowires", 4)
    server.state.truncate_first["Nanowires.tar"] = 1500
    server.state.ignore_range = True

    report = fetch_class(server, tmp_path, "Nanowires", sums)

    assert server.state.ranges("Nanowires.tar") == [None, "bytes=1500-"]  # asked to resume, got the whole body
    c = report.classes["Nanowires"]
    assert not c.resumed and c.bytes == len(data) and c.transferred == 1500 + len(data)
    assert md5_file(tmp_path / "dl" / "Nanowires.tar") == sums["Nanowires"]
    assert files_under(tmp_path / "raw" / "Nanowires") == expected_names(data)


def test_server_failing_at_the_same_point_gives_up(server: Server, tmp_path: Path) -> None:
    _, sums = serve_class(server, "Nanowires", 4)
    server.state.truncate_all["Nanowires.tar"] = 1500
    server.state.ignore_range = True

    with pytest.raises(FetchError, match=r"kept failing .*re-run to resume"):
        fetch_class(server, tmp_path, "Nanowires", sums, retries=2)

    assert server.state.count() == 3  # the first attempt (progress), then 2 retries without progress
    assert not (tmp_path / "raw" / "Nanowires").exists()


def test_complete_partial_file_gets_416_and_is_verified(server: Server, tmp_path: Path) -> None:
    data, sums = serve_class(server, "Particles", 2)
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / "Particles.tar.part").write_bytes(data)  # a run killed after the last byte but before the rename

    report = fetch_class(server, tmp_path, "Particles", sums)

    assert server.state.ranges("Particles.tar") == [f"bytes={len(data)}-"]
    assert report.classes["Particles"].transferred == 0
    assert files_under(tmp_path / "raw" / "Particles") == expected_names(data)


def test_transient_server_errors_are_retried(server: Server, tmp_path: Path) -> None:
    _, sums = serve_class(server, "Biological", 2)
    server.state.fail_first["Biological.tar"] = 2

    report = fetch_class(server, tmp_path, "Biological", sums)

    assert server.state.count("Biological.tar") == 3
    assert report.classes["Biological"].files == 2


def test_checksum_mismatch(server: Server, tmp_path: Path) -> None:
    data, _ = serve_class(server, "Fibres", 2)
    raw, dl = tmp_path / "raw", tmp_path / "dl"
    wrong = "0" * 32

    with pytest.raises(FetchError) as err:
        fetch_class(server, tmp_path, "Fibres", {"Fibres": wrong})

    msg = str(err.value)
    assert "checksum mismatch for Fibres.tar" in msg and wrong in msg and md5(data) in msg and "re-run" in msg
    assert not (raw / "Fibres").exists()
    assert list(dl.iterdir()) == []  # neither Fibres.tar nor Fibres.tar.part is left


def test_already_downloaded_tar_skips_network(server: Server, tmp_path: Path) -> None:
    data, sums = serve_class(server, "Porous_Sponge", 3)
    raw, dl = tmp_path / "raw", tmp_path / "dl"
    kw = {"base_url": server.base_url, "download_dir": dl, "classes": ["Porous_Sponge"], "checksums": sums, **FAST}
    _fetch(raw, **kw)
    assert server.state.count() == 1
    (raw / "Porous_Sponge" / "stale.png").write_bytes(b"old")

    report = _fetch(raw, **kw)

    assert server.state.count() == 1  # no second request
    c = report.classes["Porous_Sponge"]
    assert not c.downloaded and c.transferred == 0 and c.bytes == len(data)
    assert files_under(raw / "Porous_Sponge") == expected_names(data)  # re-extracted, replacing the old folder


def test_corrupt_existing_tar_is_downloaded_again(server: Server, tmp_path: Path) -> None:
    data, sums = serve_class(server, "Powder", 2)
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / "Powder.tar").write_bytes(b"X" + data[1:])

    report = fetch_class(server, tmp_path, "Powder", sums)

    assert server.state.count() == 1 and report.classes["Powder"].downloaded
    assert md5_file(dl / "Powder.tar") == sums["Powder"]


def test_flat_tar_is_extracted_into_class_folder(server: Server, tmp_path: Path) -> None:
    data, sums = serve_class(server, "Patterned_surface", 3, flat=True)

    report = fetch_class(server, tmp_path, "Patterned_surface", sums)

    assert files_under(tmp_path / "raw" / "Patterned_surface") == expected_names(data)
    assert report.classes["Patterned_surface"].files == 3


def _evil_member(kind: str, tmp_path: Path) -> tarfile.TarInfo:
    if kind == "dotdot":
        info = tarfile.TarInfo("Fibres/../../evil.png")
        info.size = 4
    elif kind == "absolute":
        info = tarfile.TarInfo(str(tmp_path / "abs_evil.png"))
        info.size = 4
    elif kind == "symlink":
        info = tarfile.TarInfo("Fibres/link.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
    elif kind == "hardlink":
        info = tarfile.TarInfo("Fibres/hard.png")
        info.type = tarfile.LNKTYPE
        info.linkname = "Fibres/other.png"
    elif kind == "device":
        info = tarfile.TarInfo("Fibres/dev")
        info.type = tarfile.CHRTYPE
        info.devmajor, info.devminor = 1, 3
    else:
        raise AssertionError(kind)
    return info


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("dotdot", "contains '..'"),
        ("absolute", "absolute path"),
        ("symlink", "symbolic link"),
        ("hardlink", "hard link"),
        ("device", "device"),
    ],
)
def test_unsafe_members_are_refused(server: Server, tmp_path: Path, kind: str, why: str) -> None:
    evil = _evil_member(kind, tmp_path)
    _, sums = serve_class(server, "Fibres", 2, extra=[evil])
    raw = tmp_path / "work" / "raw"
    before = files_under(tmp_path)

    with pytest.raises(FetchError) as err:
        fetch_class(server, tmp_path, "Fibres", sums, raw=raw)

    msg = str(err.value)
    assert repr(evil.name) in msg and why in msg and "Fibres.tar" in msg
    assert list(raw.iterdir()) == []  # nothing extracted, no temp folder left
    assert files_under(tmp_path) - before == {"dl/Fibres.tar"}  # nothing written anywhere else
    assert not (tmp_path / "work" / "evil.png").exists() and not (tmp_path / "abs_evil.png").exists()


def test_extract_refuses_unsafe_member_directly(tmp_path: Path) -> None:
    tar = tmp_path / "Fibres.tar"
    tar.write_bytes(build_tar("Fibres", 1, extra=[_evil_member("dotdot", tmp_path)]))
    with pytest.raises(FetchError, match=re.escape("'Fibres/../../evil.png'")):
        extract_class_tar(tar, tmp_path / "raw", "Fibres")


def test_not_a_tar_is_a_clear_error(tmp_path: Path) -> None:
    tar = tmp_path / "Fibres.tar"
    tar.write_bytes(b"<html>not a tar</html>")
    with pytest.raises(FetchError, match=r"not a readable tar.*delete"):
        extract_class_tar(tar, tmp_path / "raw", "Fibres")


def test_missing_file_is_a_clear_error(server: Server, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"Tips\.tar not found .*HTTP 404.*base_url"):
        fetch_class(server, tmp_path, "Tips", {"Tips": "0" * 32})


def test_unreachable_network_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FetchError, match=r"network unreachable.*proxy"):
        _fetch(
            tmp_path / "raw",
            base_url=f"http://127.0.0.1:{port}/files",
            download_dir=tmp_path / "dl",
            classes=["Fibres"],
            **{**FAST, "retries": 1},
        )


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="no MD5 checksum"):
        _fetch(tmp_path, base_url="http://x", download_dir=tmp_path, classes=["Fibres"], checksums={})
    # The settings (class names, base URL, retries, timeout) are checked once, at load (emassist.config.settings).
    with pytest.raises(ParamsError, match="unknown class name"):
        check_class_names("data.classes", ["../x"])
    with pytest.raises(ParamsError, match="http"):
        _fetch(tmp_path, base_url="ftp://x", download_dir=tmp_path, classes=["Fibres"])
    with pytest.raises(ParamsError, match=r"nffa\.retries"):
        _fetch(tmp_path, base_url="http://x", download_dir=tmp_path, classes=["Fibres"], retries=-1)
    with pytest.raises(ParamsError, match=r"nffa\.timeout_s"):
        _fetch(tmp_path, base_url="http://x", download_dir=tmp_path, classes=["Fibres"], timeout_s=0)
    with pytest.raises(FetchError, match="invalid class name"):  # the tar extraction keeps its own path guard
        extract_class_tar(tmp_path / "x.tar", tmp_path / "raw", "../x")


def test_cli_checks_classes_with_the_settings_validator(capsys: pytest.CaptureFixture[str]) -> None:
    from emassist.data.fetch import main

    assert main(["--params", str(REPO_ROOT / "params.yaml"), "--classes", "../x", "--quiet"]) == 1
    assert "--classes: unknown class name '../x'" in capsys.readouterr().err
