"""``emassist batch s3://bucket/prefix``: the S3 fallback of the Spark job, a local mirror read by Spark.

The pyspark wheel ships ``hadoop-client-api``/``-runtime`` 3.5.0 but neither ``hadoop-aws`` (the ``s3a://``
filesystem) nor the AWS SDK bundle it needs, and no package registry reachable here ships them (docs/batch.md). So an
``s3://`` source is copied with the project's boto3 code (:mod:`emassist.data.s3`: paginated listing, retries,
size/MD5/SHA-256 checks, unchanged objects skipped on a re-run) to ``OUT/.s3-mirror/<bucket>/<prefix>/`` and
Spark scores the mirror; the rows name the objects by their ``s3://`` URIs. Files of the mirror that are no longer
objects of the prefix (deleted from the bucket since the last run) are removed before scoring, so the rows are the
bucket's as it is now. Keys that cannot become a local file
safely (``..``, absolute, control characters, a key that is also a folder) are not downloaded: they get an error row
each. ``s3a://`` sources go to Spark unchanged, for clusters that supply the jars.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from emassist.config.settings import Params
from emassist.data.s3 import (
    S3Error,
    describe_endpoint,
    download_object,
    list_objects,
    local_matches,
    make_client,
    refuse_reason,
    with_retries,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

_ANY = "k"  # a stand-in first segment: refuse_reason's key checks without its class-folder rule


def is_s3(src: str) -> bool:
    return src.startswith("s3://")


def split_s3(src: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` → ``("bucket", "some/prefix")``."""
    rest = src[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise S3Error(f"{src}: no bucket (expected s3://bucket/prefix)")
    return bucket, prefix.strip("/")


@dataclass
class Mirror:
    """Where an ``s3://`` prefix was copied, and the keys that were not (with why)."""

    uri: str  # s3://bucket/prefix (no trailing slash)
    local: Path
    downloaded: int = 0
    unchanged: int = 0
    removed: int = 0  # mirror files whose objects are gone from the bucket
    refused: list[tuple[str, str]] = field(default_factory=list)  # (s3 uri, reason)


def mirror_prefix(params: Params, src: str, root: Path, *, progress: bool | None = None) -> Mirror:
    """Copy every object under ``src`` to ``root/<bucket>/<prefix>/`` (objects already there unchanged are kept);
    :class:`~emassist.data.s3.S3Error` naming the endpoint when the store cannot be read."""
    bucket, prefix = split_s3(src)
    s3 = dataclasses.replace(params.s3, bucket=bucket, prefix=prefix)
    client = make_client(s3)
    local = (root / bucket / prefix).resolve() if prefix else (root / bucket).resolve()
    uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    mirror = Mirror(uri, local)
    objects = [o for o in list_objects(client, bucket, prefix) if not (o.size == 0 and o.rel.endswith("/"))]
    if not objects:
        raise S3Error(f"no objects under {src} at {describe_endpoint(client)}")
    folders = {o.rel.rsplit("/", i)[0] for o in objects for i in range(1, o.rel.count("/") + 1)}
    todo = []
    for obj in objects:
        reason = refuse_reason(f"{_ANY}/{obj.rel}", {_ANY})
        if reason is None and obj.rel in folders:
            reason = "key is also a folder of other keys (file/folder clash)"
        if reason is not None:
            mirror.refused.append((f"s3://{bucket}/{obj.key}", f"not mirrored: {reason}"))
        else:
            todo.append((obj, local.joinpath(*obj.rel.split("/"))))
    mirror.removed = prune_mirror(local, {target for _, target in todo})
    counter, lock = [0], threading.Lock()

    def one(item: tuple[Any, Path]) -> bool:
        obj, target = item
        if local_matches(target, obj):
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        with_retries(f"s3://{bucket}/{obj.key}", s3.retries, lambda: download_object(client, bucket, obj, target),
                      counter, lock)  # fmt: skip
        return True

    failures: list[str] = []
    with (
        cf.ThreadPoolExecutor(max_workers=s3.workers, thread_name_prefix="batch-s3") as pool,
        tqdm(total=len(todo), unit="obj", desc="s3 mirror", disable=True if progress is False else None) as bar,
    ):
        futures = {pool.submit(one, item): item[0] for item in todo}
        for future in cf.as_completed(futures):
            try:
                if future.result():
                    mirror.downloaded += 1
                else:
                    mirror.unchanged += 1
            except Exception as exc:
                failures.append(f"{futures[future].key}: {exc}")
            bar.update(1)
    if failures:
        raise S3Error(f"{len(failures)} of {len(todo)} objects could not be mirrored from {src}: "
                      f"{'; '.join(sorted(failures)[:5])}. Run again to fetch the rest.")  # fmt: skip
    return mirror


def prune_mirror(local: Path, keep: set[Path]) -> int:
    """Delete the files under ``local`` that are not in ``keep`` (objects deleted from the bucket, keys now refused,
    a download's leftovers) and the folders that leaves empty; returns how many files. Links are removed, never
    followed."""
    wanted = {str(p) for p in keep}
    removed = 0
    if not local.is_dir():
        return 0
    for folder, dirs, files in os.walk(local, topdown=False, followlinks=False):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = os.path.join(folder, name)
            if path not in wanted:
                os.unlink(path)
                removed += 1
        if folder != str(local):
            with contextlib.suppress(OSError):  # only an empty folder goes
                os.rmdir(folder)
    return removed


def s3_uri(mirror: Mirror, path: str) -> str:
    """The ``s3://`` URI of a file of the mirror (its local path)."""
    local = str(mirror.local)
    return mirror.uri + path[len(local) :] if path.startswith(local) else path


def s3_paths(frame: DataFrame, mirror: Mirror, spark: SparkSession, columns: list[str]) -> DataFrame:
    """The scored mirror's rows named by their ``s3://`` URIs, plus one error row per key that was not mirrored."""
    from pyspark.sql import functions as F

    local = str(mirror.local)
    renamed = frame.withColumn("path", F.concat(F.lit(mirror.uri), F.expr(f"substring(path, {len(local) + 1})")))
    if not mirror.refused:
        return renamed
    types = dict(frame.dtypes)
    defaults: dict[str, Any] = {"label": "", "sha256": "", "review_reason": "image rejected", "needs_review": True,
                                "unfamiliar": False, "model_name": None, "model_version": None,
                                "pixel_size_nm": None, "model_pixel_size_nm": None,
                                "pixel_size_source": ""}  # fmt: skip
    first = frame.select("model_name", "model_version").limit(1).collect()
    name, version = (first[0][0], first[0][1]) if first else ("", "")
    rows = []
    for uri, reason in mirror.refused:
        row: dict[str, Any] = {}
        for c in columns:
            if c == "path":
                row[c] = uri
            elif c == "error":
                row[c] = reason
            elif c == "model_name":
                row[c] = name
            elif c == "model_version":
                row[c] = version
            elif c in defaults:
                row[c] = defaults[c]
            elif types[c] == "bigint":
                row[c] = 0
            else:
                row[c] = 0.0
        rows.append(row)
    schema = frame.select(*columns).schema
    extra = spark.createDataFrame(rows, schema=schema)
    return renamed.select(*columns).unionByName(extra)
