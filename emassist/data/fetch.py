"""Download, verify and safely extract the NFFA-EUROPE SEM dataset.

Aversa, R., Modarres, M. H., Cozzini, S., Ciancio, R., Chiusole, A. "The first annotated set of scanning
electron microscopy images for nanoscience." Sci Data 5, 180172 (2018), CC BY 4.0. Hosted on EUDAT B2SHARE,
record ``862nr-cn036``: one tar per class, each extracting to a folder named after the class.

For each class the tar is streamed to ``<download_dir>/<Class>.tar.part``. An interrupted transfer (connection
error, read timeout, fewer bytes than ``Content-Length``) is resumed with an HTTP ``Range: bytes=N-`` request,
with exponential backoff. A complete file is checked against the published MD5 before it is renamed to
``<Class>.tar``; a tar that is already present and verifies is not downloaded again. Extraction refuses absolute
paths, ``..``, links and device files, goes through a temporary folder and is renamed into ``<raw_dir>/<Class>``
in one step, so a killed run never leaves a half-extracted class behind.

Run by hand with ``python -m emassist.data.fetch`` (reads ``params.yaml``).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import sys
import tarfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import quote

import requests
import urllib3
from tqdm import tqdm

from emassist.config.settings import NffaParams, ParamsError, check_class_names, load_params
from emassist.core.atomic import atomic_path

log = logging.getLogger(__name__)

NFFA_RECORD = "https://b2share.eudat.eu/records/862nr-cn036"
NFFA_CITATION = (
    "Aversa, R., Modarres, M. H., Cozzini, S., Ciancio, R., Chiusole, A. The first annotated set of scanning "
    "electron microscopy images for nanoscience. Sci Data 5, 180172 (2018). https://doi.org/10.1038/sdata.2018.172"
)

# MD5 of each class tar as published in the B2SHARE record.
NFFA_MD5: dict[str, str] = {
    "Biological": "c3a20755e2d937d70dd7d5be18f6006e",
    "Fibres": "86fb065581eb3680f08ab2de9cea86eb",
    "Films_Coated_Surface": "feb2b098a150c2ba6b6b35f2f18a6e7c",
    "MEMS_devices_and_electrodes": "8bc4f788ec54de267a2b8cd0ac92066a",
    "Nanowires": "005ffe16579c6352d3d521f58de56e8d",
    "Particles": "6b73d88e65d3c00493076238c4230579",
    "Patterned_surface": "19c0417faa8f977fdbf13d9c91ac3be8",
    "Porous_Sponge": "851e6daf0e7ce45b68dbe9eb1338807e",
    "Powder": "82da8aeb4d7a79c53bc3fefe9770e757",
    "Tips": "0a85315213af1c32a14555d46e8f093a",
}

CHUNK_BYTES = 1 << 20
MAX_BACKOFF_S = 60.0
_MD5_RE = re.compile(r"^[0-9a-f]{32}$")
_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)


class FetchError(RuntimeError):
    """Downloading, verifying or extracting the dataset failed; the message says what to do."""


@dataclass(frozen=True)
class ClassFetch:
    """What :func:`fetch_nffa` did for one class."""

    name: str
    tar_path: Path
    bytes: int  # size of the verified tar
    transferred: int  # bytes received over the network in this run (0 when the tar was already there)
    files: int  # regular files extracted into raw_dir/<Class>
    resumed: bool  # at least one HTTP Range request was answered with 206 and appended to the partial file
    downloaded: bool  # False when a verified tar was already present and the network was not used
    md5: str


@dataclass
class FetchReport:
    classes: dict[str, ClassFetch] = field(default_factory=dict)

    @property
    def bytes(self) -> dict[str, int]:
        return {name: c.bytes for name, c in self.classes.items()}

    @property
    def files(self) -> dict[str, int]:
        return {name: c.files for name, c in self.classes.items()}

    @property
    def resumed(self) -> dict[str, bool]:
        return {name: c.resumed for name, c in self.classes.items()}

    @property
    def total_bytes(self) -> int:
        return sum(c.bytes for c in self.classes.values())

    @property
    def total_files(self) -> int:
        return sum(c.files for c in self.classes.values())

    def summary(self) -> str:
        lines = [f"{'class':<30} {'MB':>9} {'files':>6}  note"]
        for c in self.classes.values():
            note = "resumed" if c.resumed else ("downloaded" if c.downloaded else "already downloaded")
            lines.append(f"{c.name:<30} {c.bytes / 1e6:>9.1f} {c.files:>6}  {note}")
        lines.append(f"{'total':<30} {self.total_bytes / 1e6:>9.1f} {self.total_files:>6}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ public API


def fetch_nffa(
    raw_dir: Path,
    nffa: NffaParams,
    classes: Sequence[str],
    *,
    checksums: Mapping[str, str] = NFFA_MD5,
    progress: bool = True,
    backoff_s: float = 1.0,
    session: requests.Session | None = None,
) -> FetchReport:
    """Download (into ``nffa.download_dir``), MD5-verify and extract one tar per class into ``raw_dir/<Class>/``.

    ``nffa`` (base URL, retries, timeout) and ``classes`` (``data.classes``) were validated by ``load_params``.
    A failed attempt is retried up to ``nffa.retries`` times, with a backoff of ``backoff_s * 2**(n-1)`` seconds
    (capped at 60 s); an attempt that grew the partial file resets the count, so a long transfer that stalls
    now and then still completes.
    ``nffa.timeout_s`` is both the connect timeout and the longest silence tolerated while reading.
    Raises :class:`FetchError` with a message that says what to do.
    """
    raw_dir, download_dir = Path(raw_dir), Path(nffa.download_dir)
    base_url, retries, timeout_s = nffa.base_url, nffa.retries, nffa.timeout_s
    for name in classes:  # the checksums are this module's table (or a caller's), not a setting
        md5 = checksums.get(name)
        if md5 is None:
            raise FetchError(f"no MD5 checksum known for {name}.tar: add it to the checksums mapping")
        if not _MD5_RE.match(md5.lower()):
            raise FetchError(f"checksum for {name}.tar is not a 32-digit hex MD5: {md5!r}")

    download_dir.mkdir(parents=True, exist_ok=True)
    raw_dir.mkdir(parents=True, exist_ok=True)
    own_session = session is None
    sess = session or _new_session()
    report = FetchReport()
    try:
        for name in classes:
            url = f"{base_url.rstrip('/')}/{quote(name)}.tar/content"
            tar_path, transferred, resumed, downloaded = _ensure_tar(
                sess,
                url,
                name,
                download_dir,
                checksums[name].lower(),
                retries=retries,
                timeout_s=timeout_s,
                backoff_s=backoff_s,
                progress=progress,
            )
            n_files = extract_class_tar(tar_path, raw_dir, name)
            report.classes[name] = ClassFetch(
                name=name,
                tar_path=tar_path,
                bytes=tar_path.stat().st_size,
                transferred=transferred,
                files=n_files,
                resumed=resumed,
                downloaded=downloaded,
                md5=checksums[name].lower(),
            )
            log.info("%s: %d files extracted into %s", name, n_files, raw_dir / name)
    finally:
        if own_session:
            sess.close()
    return report


def md5_file(path: Path, chunk_bytes: int = CHUNK_BYTES) -> str:
    """MD5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------- download


class _RetryableError(Exception):
    """An attempt failed in a way that is worth retrying (and resuming)."""


def _new_session() -> requests.Session:
    sess = requests.Session()
    # identity: byte counts and Range offsets must refer to the file itself, not a compressed stream
    sess.headers.update({"User-Agent": "emassist-fetch/0.1", "Accept-Encoding": "identity"})
    return sess


def _ensure_tar(
    sess: requests.Session,
    url: str,
    name: str,
    download_dir: Path,
    expected_md5: str,
    *,
    retries: int,
    timeout_s: float,
    backoff_s: float,
    progress: bool,
) -> tuple[Path, int, bool, bool]:
    """Return (tar path, bytes transferred, resumed, downloaded)."""
    final = download_dir / f"{name}.tar"
    part = download_dir / f"{name}.tar.part"
    if final.is_file():
        actual = md5_file(final)
        if actual == expected_md5:
            log.info("%s: %s already present and verified; not downloading", name, final)
            part.unlink(missing_ok=True)
            return final, 0, False, False
        log.warning("%s: %s has MD5 %s, expected %s; downloading it again", name, final, actual, expected_md5)
        final.unlink()

    transferred, resumed = _download(
        sess, url, part, name, retries=retries, timeout_s=timeout_s, backoff_s=backoff_s, progress=progress
    )
    actual = md5_file(part)
    if actual != expected_md5:
        size = part.stat().st_size
        part.unlink(missing_ok=True)
        raise FetchError(
            f"checksum mismatch for {name}.tar: expected MD5 {expected_md5}, got {actual} ({size} bytes from {url}). "
            "The corrupt download was deleted: re-run to download it again. If it fails the same way again, the "
            "record may have changed: check the file and its MD5 on the B2SHARE record page."
        )
    os.replace(part, final)
    return final, transferred, resumed, True


@dataclass
class _Transfer:
    received: int = 0  # bytes received over the network, all attempts together
    connected: bool = False  # at least one HTTP response arrived
    resumed: bool = False  # at least one 206 answer was appended to the partial file


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _download(
    sess: requests.Session,
    url: str,
    part: Path,
    name: str,
    *,
    retries: int,
    timeout_s: float,
    backoff_s: float,
    progress: bool,
) -> tuple[int, bool]:
    """Stream ``url`` into ``part``, resuming with Range requests. Return (bytes transferred, resumed).

    A failure that grew the partial file beyond its largest size so far resets the retry count; a server that
    keeps failing at the same point (or never answers) exhausts it.
    """
    xfer = _Transfer()
    failures = 0
    best = _size(part)
    last_error: _RetryableError | None = None
    while True:
        try:
            if _attempt(sess, url, part, name, xfer, timeout_s=timeout_s, progress=progress):
                return xfer.received, xfer.resumed
            last_error = _RetryableError("the partial file did not fit the server's answer; starting over")
        except _RetryableError as exc:
            last_error = exc
        now = _size(part)
        if now > best:
            best, failures = now, 0
        failures += 1
        if failures > retries:
            break
        delay = min(backoff_s * 2 ** (failures - 1), MAX_BACKOFF_S)
        log.warning("%s: %s; retry %d/%d in %.1f s (have %d bytes)", name, last_error, failures, retries, delay, now)
        time.sleep(delay)

    if not xfer.connected:
        raise FetchError(
            f"network unreachable: could not connect to {url} ({last_error}). Check the URL (nffa.base_url in "
            f"params.yaml) and your proxy settings (HTTPS_PROXY), or download {name}.tar by hand into "
            f"{part.parent} and re-run."
        )
    raise FetchError(
        f"download of {name}.tar from {url} kept failing (gave up after {retries} retries without progress; "
        f"last error: {last_error}); {_size(part)} bytes are kept in {part}: re-run to resume, or raise "
        "nffa.retries / nffa.timeout_s."
    )


def _attempt(
    sess: requests.Session, url: str, part: Path, name: str, xfer: _Transfer, *, timeout_s: float, progress: bool
) -> bool:
    """One HTTP request from the current end of ``part``. Return True when ``part`` is complete.

    Return False when the partial file was dropped and the download should start over; raise
    ``_RetryableError`` for a transient failure (bytes received so far stay in ``part``) and ``FetchError``
    for a permanent one.
    """
    pos = _size(part)
    headers = {"Range": f"bytes={pos}-"} if pos > 0 else {}
    try:
        resp = sess.get(url, headers=headers, stream=True, timeout=(timeout_s, timeout_s))
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise _RetryableError(f"cannot connect: {exc}") from exc
    xfer.connected = True
    with resp:
        status = resp.status_code
        if status == 416:
            total = _parse_content_range(resp.headers.get("Content-Range", ""))[2]
            if total is not None and total == pos:
                return True  # the partial file already holds the whole tar
            log.warning("%s: server refused range bytes=%d- (size %s); starting over", name, pos, total)
            part.unlink(missing_ok=True)
            return False
        if status == 404:
            raise FetchError(
                f"{name}.tar not found at {url} (HTTP 404): check nffa.base_url in params.yaml; the B2SHARE "
                "record may have moved."
            )
        if status == 429 or status >= 500:
            raise _RetryableError(f"HTTP {status} {resp.reason}")
        if status not in (200, 206):
            raise FetchError(f"unexpected HTTP {status} {resp.reason} for {url}: check the URL and proxy settings.")

        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise FetchError(
                f"{url} was sent with Content-Encoding {encoding!r} although identity was asked for; byte offsets "
                "and the MD5 would not match. A proxy may be re-encoding it: bypass it (NO_PROXY) and re-run."
            )
        length = _int_header(resp.headers.get("Content-Length"))
        if status == 206:
            first, _, total = _parse_content_range(resp.headers.get("Content-Range", ""))
            if pos == 0 or first != pos:
                # a range we did not ask for: do not trust it; start over with a plain request
                log.warning("%s: unexpected Content-Range %r; starting over", name, resp.headers.get("Content-Range"))
                part.unlink(missing_ok=True)
                return False
            mode, start = "ab", pos
            xfer.resumed = True
            if total is None and length is not None:
                total = pos + length
        else:
            if pos > 0:
                log.info("%s: server ignored the Range request; downloading from the start", name)
            mode, start, total = "wb", 0, length
        expected_end = start + length if length is not None else total

        got = 0
        with (
            open(part, mode) as fh,
            tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"{name}.tar",
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            try:
                for chunk in _iter_body(resp):
                    try:
                        fh.write(chunk)
                    except OSError as exc:  # not a network problem: retrying would not help
                        raise FetchError(
                            f"cannot write {part}: {exc}. Free disk space (or point nffa.download_dir elsewhere) "
                            "and re-run; the download resumes where it stopped."
                        ) from exc
                    got += len(chunk)
                    xfer.received += len(chunk)
                    bar.update(len(chunk))
            except _TRANSFER_ERRORS as exc:
                raise _RetryableError(f"transfer interrupted after {start + got} bytes: {exc}") from exc
        if expected_end is not None and start + got < expected_end:
            raise _RetryableError(f"short read: {start + got} of {expected_end} bytes")
        if expected_end is not None and start + got > expected_end:
            part.unlink(missing_ok=True)
            raise _RetryableError(f"server sent more than announced ({start + got} > {expected_end} bytes)")
        return True


_TRANSFER_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,
    OSError,
)


def _iter_body(resp: requests.Response) -> Iterator[bytes]:
    """Yield the body as it arrives.

    ``read1`` hands over whatever one socket read returned, so the bytes received before a connection drops
    are written to the partial file (``iter_content`` would buffer up to a chunk and lose them).
    """
    read1 = getattr(resp.raw, "read1", None)
    if read1 is None:  # urllib3 < 2
        yield from resp.iter_content(64 * 1024)
        return
    while chunk := read1(CHUNK_BYTES, decode_content=False):
        yield chunk


def _parse_content_range(value: str) -> tuple[int | None, int | None, int | None]:
    m = _CONTENT_RANGE_RE.match(value or "")
    if not m:
        return None, None, None
    first, last, total = m.groups()
    return (
        int(first) if first is not None else None,
        int(last) if last is not None else None,
        int(total) if total not in (None, "*") else None,
    )


def _int_header(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------- extract


def extract_class_tar(tar_path: Path, raw_dir: Path, name: str) -> int:
    """Safely extract ``tar_path`` into ``raw_dir/<name>/`` (atomically replacing it); return the file count.

    A tar whose members all sit under one top folder (the real layout, ``Fibres/xxx.jpg``) has that folder
    stripped; a tar with flat members is extracted as is.
    """
    _check_class_name(name)
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    for stale in raw_dir.glob(f".{name}.*.tmp"):  # left behind by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    try:
        with tarfile.open(tar_path, "r:") as tf:
            members = tf.getmembers()
            names = _check_members(members, tar_path.name, (raw_dir / name).resolve())
            if not any(m.isfile() for m in members):
                raise FetchError(f"{tar_path.name} holds no files: delete {tar_path} and re-run.")
            wrapper = _single_top_folder(members, names)
            with atomic_path(raw_dir / name) as tmp_target:
                stage = tmp_target.parent / ".stage"
                stage.mkdir()
                tf.extractall(stage, members=members, filter="data")
                os.replace(stage / wrapper if wrapper else stage, tmp_target)
                n_files = sum(1 for p in tmp_target.rglob("*") if p.is_file())
    except tarfile.FilterError as exc:
        raise FetchError(f"refusing to extract {tar_path.name}: unsafe member {exc.tarinfo.name!r} ({exc})") from exc
    except (tarfile.TarError, EOFError) as exc:
        raise FetchError(f"{tar_path.name} is not a readable tar ({exc}): delete {tar_path} and re-run.") from exc
    return n_files


def _check_members(members: Sequence[tarfile.TarInfo], tar_name: str, dest: Path) -> list[PurePosixPath]:
    """Refuse absolute, ``..``, link and device members; return the normalised member paths."""
    out: list[PurePosixPath] = []
    for m in members:
        raw = m.name

        def refuse(why: str, raw: str = raw) -> FetchError:
            return FetchError(
                f"refusing to extract {tar_name}: member {raw!r} {why}. The archive is unsafe or corrupt: "
                "nothing was extracted; delete the tar and re-run, or report it."
            )

        if raw.startswith(("/", "\\")) or PureWindowsPath(raw).drive or PureWindowsPath(raw).root:
            raise refuse("is an absolute path")
        if ".." in PurePosixPath(raw).parts or ".." in raw.split("\\"):
            raise refuse("contains '..'")
        if m.issym():
            raise refuse(f"is a symbolic link (to {m.linkname!r})")
        if m.islnk():
            raise refuse(f"is a hard link (to {m.linkname!r})")
        if m.ischr() or m.isblk() or m.isfifo():
            raise refuse("is a device or FIFO")
        if not (m.isfile() or m.isdir()):
            raise refuse(f"has unsupported type {m.type!r}")
        resolved = Path(os.path.normpath(dest / raw))
        if resolved != dest and dest not in resolved.parents:
            raise refuse("would be written outside the target folder")
        out.append(PurePosixPath(*[p for p in PurePosixPath(raw).parts if p != "."]))
    return out


def _single_top_folder(members: Sequence[tarfile.TarInfo], names: Sequence[PurePosixPath]) -> str | None:
    """The one top folder every member sits in (``Fibres/...``), or None for a flat tar."""
    tops = {n.parts[0] for n in names if n.parts}
    if len(tops) != 1:
        return None
    top = next(iter(tops))
    for m, n in zip(members, names, strict=True):
        if m.isfile() and len(n.parts) == 1:
            return None  # a file sits at the top level: flat layout
    return top


def _check_class_name(name: str) -> None:
    if not name or name.startswith(".") or any(c in name for c in "/\\\0") or name in ("..",):
        raise FetchError(f"invalid class name {name!r}: must be a plain folder name")


# --------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emassist.data.fetch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (nffa.* and data.raw_dir/classes)")
    parser.add_argument("--classes", nargs="+", help="only these classes (default: data.classes)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    try:
        params = load_params(args.params)
        if args.classes:
            check_class_names("--classes", args.classes)
        classes = tuple(args.classes or params.data.classes)
        report = fetch_nffa(Path(params.data.raw_dir), params.nffa, classes, progress=not args.quiet)
    except (FetchError, ParamsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    print(f"Data: {NFFA_CITATION} Licence CC BY 4.0.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
