"""S3 (or any S3-compatible store) as a data source: ``s3://bucket/prefix/<Class>/...`` to and from ``data/raw``.

* Listing is paginated; every key is checked before anything is written: keys that would escape the data root
  (``..``, ``.``, absolute, empty segments, backslashes, control characters), keys outside a known class folder
  and file/folder clashes are refused and recorded with a reason in ``<raw_dir>/_rejected_upstream.csv``, which
  ingest folds into ``rejected.csv``. Objects that are not images are downloaded like any other and quarantined by
  ingest, which checks content, so nothing in the bucket is dropped silently.
* Downloads run on a thread pool; each object is retried with exponential backoff (on top of botocore's own
  retries) when the transfer fails, comes back short or does not match its checksum: the byte count must equal
  the listed size and ``ContentLength``, the MD5 must equal the ETag (single-part uploads; multipart ETags are
  recomputed for the usual 8 MiB parts) and the SHA-256 must equal ``ChecksumSHA256`` where the object has one.
  A file appears under its name only once it is complete and verified.
* Credentials come only from the standard AWS chain (environment, profile, instance role); nothing here reads,
  stores or prints them.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import csv
import hashlib
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from emassist.config.settings import S3Params
from emassist.core.atomic import atomic_open, atomic_path
from emassist.data.ingest import REJECTED_COLUMNS, UPSTREAM_REJECTED_FILE

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client  # type: ignore[import-not-found]
else:
    S3Client = Any

log = logging.getLogger(__name__)

MULTIPART_CHUNK = 8 * 1024 * 1024  # boto3's and the AWS CLI's default part size
_CHUNK = 1024 * 1024
_SIMPLE_ETAG = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART_ETAG = re.compile(r"^([0-9a-f]{32})-(\d+)$")
_NON_RETRYABLE = {"NoSuchBucket", "NoSuchKey", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                  "AllAccessDisabled", "InvalidBucketName", "403", "404"}  # fmt: skip


class S3Error(RuntimeError):
    """An S3 operation cannot be done; the message says why and what to do."""


class _Mismatch(Exception):
    """A transfer that came back short or with the wrong checksum (retried)."""


# --------------------------------------------------------------------------------------------------- client


def make_client(s3: S3Params, *, workers: int | None = None) -> S3Client:
    """A boto3 S3 client from params and the standard AWS credential chain (never credentials from params)."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(profile_name=s3.profile, region_name=s3.region)
    if session.get_credentials() is None:
        raise S3Error(
            "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE (or s3.profile), "
            "or run where an instance role is available"
        )
    endpoint = s3.resolved_endpoint_url()
    config = Config(
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=s3.timeout_s,
        read_timeout=s3.timeout_s,
        max_pool_connections=max(10, workers or s3.workers),
        s3={"addressing_style": "path"} if endpoint else {},
    )
    return session.client("s3", endpoint_url=endpoint, config=config)


def describe_endpoint(client: S3Client) -> str:
    return str(client.meta.endpoint_url)


def _explain(exc: Exception, client: S3Client, bucket: str) -> S3Error:
    """A one-line, actionable message for a failed S3 call (never including credentials)."""
    from botocore.exceptions import ClientError, EndpointConnectionError, FlexibleChecksumError, NoCredentialsError

    endpoint = describe_endpoint(client)
    if isinstance(exc, FlexibleChecksumError):
        return S3Error(f"checksum mismatch against the checksum the store keeps: {exc}")
    if isinstance(exc, EndpointConnectionError):
        return S3Error(f"cannot reach the S3 endpoint {endpoint}: {exc} (check s3.endpoint_url and the network)")
    if isinstance(exc, NoCredentialsError):
        return S3Error("no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "404"):
            return S3Error(f"bucket {bucket!r} does not exist at {endpoint} (s3.bucket)")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return S3Error(f"access to bucket {bucket!r} at {endpoint} denied ({code}): check the AWS credentials")
        return S3Error(f"S3 request to {endpoint} failed: {code}: {exc.response.get('Error', {}).get('Message', '')}")
    return S3Error(f"S3 request to {endpoint} failed: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------------------------------- keys


def refuse_reason(rel_key: str, classes: frozenset[str] | Sequence[str]) -> str | None:
    """Why the key (relative to the prefix) must not become a file under the data root, or None if it may."""
    if not rel_key:
        return "empty key (the prefix itself)"
    if "\\" in rel_key:
        return "backslash in key (a path separator on Windows)"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in rel_key):
        return "control character in key"
    if rel_key.startswith("/"):
        return "absolute key (leading '/'; would escape the data root)"
    parts = rel_key.split("/")
    if ".." in parts:
        return "'..' segment in key (would escape the data root)"
    if "" in parts:
        return "empty path segment in key ('//' or a trailing '/')"
    if "." in parts:
        return "'.' segment in key"
    if any(len(p.encode("utf-8")) > 255 for p in parts):
        return "path segment longer than 255 bytes"
    if len(parts) == 1:
        return "not inside a class folder"
    if parts[0] not in classes:
        return f"unknown class folder '{parts[0]}' (known: {', '.join(sorted(classes))})"
    return None


def _printable(text: str) -> str:
    return text.encode("unicode_escape").decode("ascii") if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text) else text


def _safe_target(raw_dir: Path, rel_key: str) -> Path:
    """The local path of an accepted key, checked once more to lie inside raw_dir."""
    target = raw_dir.joinpath(*rel_key.split("/"))
    root = os.path.abspath(raw_dir)
    if os.path.commonpath([root, os.path.abspath(target)]) != root:  # pragma: no cover - refuse_reason stops these
        raise S3Error(f"key {rel_key!r} would be written outside {raw_dir}")
    return target


# --------------------------------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class S3Object:
    key: str
    rel: str  # relative to the prefix
    size: int
    etag: str  # without quotes


def list_objects(client: S3Client, bucket: str, prefix: str, *, page_size: int = 1000) -> Iterator[S3Object]:
    """Every object under ``prefix/`` (paginated)."""
    full = f"{prefix}/" if prefix else ""
    paginator = client.get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=full, PaginationConfig={"PageSize": page_size}):
            for obj in page.get("Contents", []) or []:
                key = obj["Key"]
                yield S3Object(key, key[len(full) :], int(obj.get("Size", 0)), str(obj.get("ETag", "")).strip('"'))
    except Exception as exc:
        if isinstance(exc, S3Error):
            raise
        raise _explain(exc, client, bucket) from exc


@dataclass
class Plan:
    accepted: list[tuple[S3Object, Path]] = field(default_factory=list)
    refused: list[dict[str, str]] = field(default_factory=list)  # rejected.csv rows
    folder_markers: int = 0  # zero-byte keys ending in '/' made by consoles (folders, not data)


def plan_download(
    objects: Iterable[S3Object], raw_dir: Path, classes: Sequence[str], *, bucket: str, prefix: str
) -> Plan:
    """Split the listing into objects to download (with their local paths) and refused keys (with reasons)."""
    class_set = frozenset(classes)
    plan = Plan()
    candidates: list[S3Object] = []
    for obj in objects:
        is_folder = obj.rel == "" or (obj.rel.endswith("/") and refuse_reason(f"{obj.rel}x", class_set) is None)
        if obj.size == 0 and is_folder:
            plan.folder_markers += 1
            continue
        reason = refuse_reason(obj.rel, class_set)
        if reason is None:
            candidates.append(obj)
        else:
            parts = obj.rel.split("/")
            label = parts[0] if len(parts) > 1 and parts[0] in class_set else ""
            plan.refused.append(
                {"source_path": _printable(f"s3://{bucket}/{obj.key}"), "label": label, "reason": reason}
            )
    # A key that is also a folder of other keys cannot be both a file and a folder on disk.
    folders = {rel.rsplit("/", i)[0] for rel in (o.rel for o in candidates) for i in range(1, rel.count("/"))}
    folders |= {o.rel.rsplit("/", 1)[0] for o in candidates}
    for obj in candidates:
        if obj.rel in folders:
            plan.refused.append(
                {"source_path": f"s3://{bucket}/{obj.key}", "label": obj.rel.split("/")[0],
                 "reason": "key is also a folder of other keys (file/folder clash)"}
            )  # fmt: skip
        else:
            plan.accepted.append((obj, _safe_target(raw_dir, obj.rel)))
    return plan


# --------------------------------------------------------------------------------------------------- download


@dataclass
class PullReport:
    source: str
    target: str
    n_listed: int = 0
    n_downloaded: int = 0
    n_unchanged: int = 0  # already present locally with the same size and checksum
    n_refused: int = 0
    n_folder_markers: int = 0
    bytes: int = 0
    retries: int = 0
    seconds: float = 0.0
    unverified: int = 0  # objects checked by size only (e.g. SSE-KMS, unusual multipart part sizes)
    refused_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def objects_per_second(self) -> float:
        return self.n_downloaded / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        mb = self.bytes / 1e6
        lines = [
            f"s3 pull {self.source} -> {self.target}: {self.n_listed} objects listed, {self.n_downloaded} downloaded "
            f"({mb:.1f} MB, {self.objects_per_second:.0f} objects/s, {mb / self.seconds if self.seconds else 0:.1f} "
            f"MB/s), {self.n_unchanged} unchanged, {self.n_refused} refused, {self.retries} retries in "
            f"{self.seconds:.1f} s",
        ]
        if self.refused_reasons:
            kinds = ", ".join(f"{n} {k}" for k, n in self.refused_reasons.items())
            lines.append(f"  refused keys (in {UPSTREAM_REJECTED_FILE}, then rejected.csv): {kinds}")
        if self.unverified:
            lines.append(f"  {self.unverified} objects verified by size only (no usable ETag/ChecksumSHA256)")
        return "\n".join(lines)


class _Hashes:
    """MD5, SHA-256 and the multipart ETag (8 MiB parts) computed while streaming."""

    def __init__(self) -> None:
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.sha256 = hashlib.sha256()
        self.parts: list[bytes] = []
        self._part = hashlib.md5(usedforsecurity=False)
        self._in_part = 0
        self.n = 0

    def update(self, chunk: bytes) -> None:
        self.md5.update(chunk)
        self.sha256.update(chunk)
        self.n += len(chunk)
        view = memoryview(chunk)
        while view:
            take = min(len(view), MULTIPART_CHUNK - self._in_part)
            self._part.update(view[:take])
            self._in_part += take
            view = view[take:]
            if self._in_part == MULTIPART_CHUNK:
                self.parts.append(self._part.digest())
                self._part, self._in_part = hashlib.md5(usedforsecurity=False), 0

    def multipart_etag(self) -> str:
        parts = self.parts + ([self._part.digest()] if self._in_part or not self.parts else [])
        return f"{hashlib.md5(b''.join(parts), usedforsecurity=False).hexdigest()}-{len(parts)}"


def _verify(h: _Hashes, obj: S3Object, response: dict[str, Any]) -> bool:
    """Raise _Mismatch if size or a checksum disagrees; return False when only the size could be checked."""
    length = int(response.get("ContentLength", h.n))
    if h.n != obj.size or h.n != length:
        raise _Mismatch(f"size: got {h.n} bytes, listed {obj.size}, ContentLength {length}")
    verified = False
    sha_b64 = response.get("ChecksumSHA256")
    if sha_b64 and "-" not in sha_b64:
        got = base64.b64encode(h.sha256.digest()).decode("ascii")
        if got != sha_b64:
            raise _Mismatch(f"SHA-256: got {got}, object has {sha_b64}")
        verified = True
    encrypted = response.get("ServerSideEncryption") == "aws:kms" or response.get("SSECustomerAlgorithm")
    etag = str(response.get("ETag", obj.etag)).strip('"') or obj.etag
    if not encrypted and _SIMPLE_ETAG.match(etag):
        if h.md5.hexdigest() != etag:
            raise _Mismatch(f"MD5: got {h.md5.hexdigest()}, ETag {etag}")
        verified = True
    elif not encrypted and (m := _MULTIPART_ETAG.match(etag)) and int(m.group(2)) == max(1, -(-h.n // MULTIPART_CHUNK)):
        if h.multipart_etag() != etag:
            raise _Mismatch(f"multipart ETag: got {h.multipart_etag()}, object has {etag}")
        verified = True
    return verified


def local_matches(path: Path, obj: S3Object) -> bool:
    """An existing local file that equals the object (size, and MD5 where the ETag is one)."""
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size != obj.size:
            return False
    except OSError:
        return False
    if not _SIMPLE_ETAG.match(obj.etag):
        return False  # cannot tell cheaply: download again
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest() == obj.etag


def _retryable(exc: Exception) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        return code not in _NON_RETRYABLE
    return isinstance(exc, BotoCoreError | _Mismatch | ConnectionError | TimeoutError)


def backoff_delay(attempt: int, base: float = 0.2, cap: float = 10.0) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * 2**attempt))  # jitter, not cryptography


def with_retries(what: str, retries: int, func: Callable[[], Any], counter: list[int], lock: threading.Lock) -> Any:
    for attempt in range(retries + 1):
        try:
            return func()
        except Exception as exc:
            if not _retryable(exc) or attempt == retries:
                raise
            with lock:
                counter[0] += 1
            delay = backoff_delay(attempt)
            log.warning("%s: %s (attempt %d of %d), retrying in %.1f s", what, exc, attempt + 1, retries + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def download_object(client: S3Client, bucket: str, obj: S3Object, target: Path) -> tuple[int, bool]:
    """One attempt: stream to a temporary file beside target, verify, rename. Returns (bytes, verified)."""
    response = client.get_object(Bucket=bucket, Key=obj.key, ChecksumMode="ENABLED")
    body = response["Body"]
    h = _Hashes()
    try:
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as fh:
                for chunk in body.iter_chunks(_CHUNK):
                    h.update(chunk)
                    fh.write(chunk)
            verified = _verify(h, obj, response)  # raising here leaves no file behind
    finally:
        body.close()
    return h.n, verified


def pull(
    s3: S3Params,
    raw_dir: Path,
    classes: Sequence[str],
    *,
    client: S3Client | None = None,
    workers: int | None = None,
    skip_unchanged: bool = True,
    progress: bool = True,
    page_size: int = 1000,
) -> PullReport:
    """Download ``s3://bucket/prefix/<Class>/...`` into ``raw_dir/<Class>/...`` (see the module docstring)."""
    bucket = s3.require_bucket()  # optional in params in general, needed here (ParamsError naming s3.bucket)
    started = time.perf_counter()
    workers = workers or s3.workers
    client = client or make_client(s3, workers=workers)
    raw_dir = Path(raw_dir)
    prefix = s3.key_prefix
    source = f"s3://{bucket}/{prefix}" + ("/" if prefix else "")
    objects = list(list_objects(client, bucket, prefix, page_size=page_size))
    if not objects:
        raise S3Error(f"no objects under {source} at {describe_endpoint(client)} (bucket, s3.prefix)")
    plan = plan_download(objects, raw_dir, classes, bucket=bucket, prefix=prefix)
    report = PullReport(source=source, target=str(raw_dir), n_listed=len(objects), n_refused=len(plan.refused),
                        n_folder_markers=plan.folder_markers)  # fmt: skip
    for row in plan.refused:
        kind = re.split(r" \(| '", row["reason"], maxsplit=1)[0]
        report.refused_reasons[kind] = report.refused_reasons.get(kind, 0) + 1
    raw_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(raw_dir / UPSTREAM_REJECTED_FILE, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(REJECTED_COLUMNS))
        writer.writeheader()
        writer.writerows(sorted(plan.refused, key=lambda r: r["source_path"]))

    retries = [0]
    lock = threading.Lock()
    failures: list[tuple[str, str]] = []

    def one(item: tuple[S3Object, Path]) -> tuple[str, int, bool]:
        obj, target = item
        if skip_unchanged and local_matches(target, obj):
            return "unchanged", 0, True
        target.parent.mkdir(parents=True, exist_ok=True)
        n, verified = with_retries(
            f"s3://{bucket}/{obj.key}", s3.retries, lambda: download_object(client, bucket, obj, target), retries, lock
        )
        return "downloaded", n, verified

    with (
        cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3-pull") as pool,
        tqdm(total=len(plan.accepted), unit="obj", desc="s3 pull", disable=not progress, dynamic_ncols=True) as bar,
    ):
        futures = {pool.submit(one, item): item[0] for item in plan.accepted}
        for future in cf.as_completed(futures):
            obj = futures[future]
            try:
                status, n, verified = future.result()
            except cf.CancelledError:
                failures.append((obj.key, "not attempted (the endpoint stopped answering)"))
            except Exception as exc:
                why = (
                    f"{exc} (checked against the listing and ETag)"
                    if isinstance(exc, _Mismatch)
                    else str(_explain(exc, client, bucket))
                )
                failures.append((obj.key, f"{why}, after {s3.retries + 1} attempts" if _retryable(exc) else why))
                if len(failures) == 1 and _is_connection_error(exc):
                    for f in futures:
                        f.cancel()  # the endpoint is gone: do not wait for every object to time out
            else:
                if status == "unchanged":
                    report.n_unchanged += 1
                else:
                    report.n_downloaded += 1
                    report.bytes += n
                    report.unverified += 0 if verified else 1
            bar.update(1)
    report.retries = retries[0]
    report.seconds = time.perf_counter() - started
    if failures:
        shown = "; ".join(f"{k}: {why}" for k, why in sorted(failures)[:5])
        more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
        raise S3Error(
            f"{len(failures)} of {len(plan.accepted)} objects could not be downloaded from {source}: {shown}{more}. "
            "Completed files are kept; run the pull again to fetch the rest."
        )
    log.info("%s", report)
    return report


def _is_connection_error(exc: Exception) -> bool:
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError

    return isinstance(exc, EndpointConnectionError | ConnectionClosedError | ConnectionError)


# --------------------------------------------------------------------------------------------------- upload


@dataclass
class PushReport:
    target: str
    n_files: int = 0
    n_uploaded: int = 0
    n_unchanged: int = 0
    bytes: int = 0
    retries: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        rate = self.n_uploaded / self.seconds if self.seconds else 0.0
        return (
            f"s3 push -> {self.target}: {self.n_files} files, {self.n_uploaded} uploaded ({self.bytes / 1e6:.1f} MB, "
            f"{rate:.0f} objects/s), {self.n_unchanged} unchanged, {self.retries} retries in {self.seconds:.1f} s"
        )


def _local_files(src: Path) -> list[tuple[Path, str]]:
    """Regular, non-hidden files under src/<Class>/..., with their keys relative to the prefix."""
    out = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(src).as_posix()
            if name.startswith(".") or rel == UPSTREAM_REJECTED_FILE or path.is_symlink() or not path.is_file():
                continue
            out.append((path, rel))
    return out


def push(
    s3: S3Params,
    src: Path,
    *,
    client: S3Client | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> PushReport:
    """Upload ``src/<Class>/...`` to ``s3://bucket/prefix/<Class>/...``; objects already there with the same MD5 are
    skipped. Each PUT carries Content-MD5 (the store refuses a corrupted body) and a SHA-256 checksum."""
    bucket = s3.require_bucket()  # optional in params in general, needed here (ParamsError naming s3.bucket)
    started = time.perf_counter()
    workers = workers or s3.workers
    client = client or make_client(s3, workers=workers)
    prefix = s3.key_prefix
    full = f"{prefix}/" if prefix else ""
    report = PushReport(target=f"s3://{bucket}/{full}")
    files = _local_files(Path(src))
    if not files:
        raise S3Error(f"nothing to upload under {src}")
    existing = {o.rel: o for o in list_objects(client, bucket, prefix)}
    report.n_files = len(files)
    retries = [0]
    lock = threading.Lock()

    def one(item: tuple[Path, str]) -> int:
        path, rel = item
        data = path.read_bytes()
        md5 = hashlib.md5(data, usedforsecurity=False)
        if (old := existing.get(rel)) is not None and old.size == len(data) and old.etag == md5.hexdigest():
            return -1

        def put() -> None:
            client.put_object(
                Bucket=bucket, Key=f"{full}{rel}", Body=data,
                ContentMD5=base64.b64encode(md5.digest()).decode("ascii"), ChecksumAlgorithm="SHA256",
            )  # fmt: skip

        with_retries(f"s3://{bucket}/{full}{rel}", s3.retries, put, retries, lock)
        return len(data)

    with (
        cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3-push") as pool,
        tqdm(total=len(files), unit="obj", desc="s3 push", disable=not progress, dynamic_ncols=True) as bar,
    ):
        try:
            for n in pool.map(one, files):
                if n < 0:
                    report.n_unchanged += 1
                else:
                    report.n_uploaded += 1
                    report.bytes += n
                bar.update(1)
        except Exception as exc:
            raise (exc if isinstance(exc, S3Error) else _explain(exc, client, bucket)) from exc
    report.retries = retries[0]
    report.seconds = time.perf_counter() - started
    return report


def ensure_bucket(client: S3Client, bucket: str) -> bool:
    """Create the bucket if it does not exist (for local S3-compatible stores and tests). True if created."""
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
        return False
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise _explain(exc, client, bucket) from exc
    except Exception as exc:
        raise _explain(exc, client, bucket) from exc
    region = client.meta.region_name
    if region and region != "us-east-1":
        client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})
    else:
        client.create_bucket(Bucket=bucket)
    return True
