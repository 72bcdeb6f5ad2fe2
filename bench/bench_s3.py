"""Benchmark S3 transfers against a local moto S3 server: DVC push/pull per file vs one tar per class, and
``emassist s3 push/pull`` (the ingest-from-bucket path).

Creates ``--n`` files of ``--kb`` KB spread over the ten class folders (incompressible random bytes named ``.jpg``:
the size of the real SEM images; content does not matter for transfers, decoding is in bench_ingest.py), starts
``moto_server`` on 127.0.0.1 with fake credentials, and measures, each as the median of ``--repeats`` runs
(every run against a fresh remote prefix, so nothing is skipped as already there):

* ``emassist s3 push`` (seeding a bucket) and ``emassist s3 pull`` (what ``data.source: s3`` does) with each
  ``--workers`` setting;
* layout "per file" (``data/raw`` tracked as is): ``dvc add`` (hashing), ``dvc push -j J`` and ``dvc pull -j J``
  (empty cache and workspace) for each ``--jobs`` setting;
* layout "tar per class": the same folder packed as ten uncompressed tars (pack time), ``dvc add``/``push``/``pull``
  of the tars, and unpacking (unpack time);

and prints a Markdown table of seconds and images/s.

    python bench/bench_s3.py --n 2000 --repeats 3 --jobs 4 16 --workers 8 32
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from emassist.config.classes import CLASSES
from tests.s3_support import aws_env, patched_environ, start_moto
from tests.servers import stop_process

BUCKET = "bench"
VENV_BIN = Path(sys.executable).parent


def make_files(root: Path, n: int, kb: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / CLASSES[i % len(CLASSES)]
        folder.mkdir(parents=True, exist_ok=True)
        size = int(kb * 1024 * rng.uniform(0.8, 1.2))
        (folder / f"img_{i:06d}.jpg").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(size - 4))


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return time.perf_counter() - t0


def timed(func: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    func()
    return time.perf_counter() - t0


def dvc_repo(path: Path, env: dict[str, str]) -> None:
    path.mkdir(parents=True)
    sh(["git", "init", "-q"], path, env)
    sh([sys.executable, "-m", "dvc", "init", "-q"], path, env)
    sh([sys.executable, "-m", "dvc", "config", "--local", "core.site_cache_dir", str(path / ".dvc" / "site")], path,
       env)  # fmt: skip
    sh([sys.executable, "-m", "dvc", "config", "--local", "core.analytics", "false"], path, env)


def set_remote(repo: Path, env: dict[str, str], endpoint: str, prefix: str) -> None:
    dvc = [sys.executable, "-m", "dvc", "remote"]
    sh([*dvc, "add", "--local", "--force", "-d", "s3", f"s3://{BUCKET}/{prefix}"], repo, env)
    sh([*dvc, "modify", "--local", "s3", "endpointurl", endpoint], repo, env)


def pack(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        with tarfile.open(dst / f"{folder.name}.tar", "w") as tar:
            tar.add(folder, arcname=folder.name)


def unpack(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for archive in sorted(src.glob("*.tar")):
        with tarfile.open(archive) as tar:
            tar.extractall(dst, filter="data")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="number of files (the real dataset: about 21,000)")
    ap.add_argument("--kb", type=int, default=100, help="mean file size in KB (default 100)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--jobs", type=int, nargs="+", default=[4, 16], help="dvc push/pull -j settings")
    ap.add_argument("--workers", type=int, nargs="+", default=[8, 32], help="emassist s3 pull/push workers")
    ap.add_argument("--skip-tar", action="store_true")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    env_vals = aws_env("bench-fake-secret", tmp / "aws")
    rows: list[tuple[str, str, float]] = []  # (measurement, setting, median seconds)
    try:
        with patched_environ(env_vals):
            moto = start_moto(tmp, env_vals)
            try:
                env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
                import boto3

                boto3.client("s3", endpoint_url=moto.url).create_bucket(Bucket=BUCKET)
                run(args, tmp, env, moto.url, rows)
            finally:
                stop_process(moto.proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def run(args: argparse.Namespace, tmp: Path, env: dict[str, str], endpoint: str, rows: list) -> None:
    from emassist.config.settings import S3Params
    from emassist.data.s3 import pull, push

    n = args.n
    repo = tmp / "repo"
    dvc_repo(repo, env)
    raw = repo / "data" / "raw"
    t0 = time.perf_counter()
    make_files(raw, n, args.kb)
    size_mb = sum(p.stat().st_size for p in raw.rglob("*") if p.is_file()) / 1e6
    print(f"made {n} files, {size_mb:.0f} MB in {time.perf_counter() - t0:.0f} s; load {os.getloadavg()}",
          file=sys.stderr)  # fmt: skip

    def record(name: str, setting: str, times: list[float]) -> None:
        med = statistics.median(times)
        rows.append((name, setting, med))
        print(f"{name} [{setting}]: {', '.join(f'{t:.1f}' for t in times)} s -> median {med:.1f} s "
              f"({n / med:.0f} img/s); load {os.getloadavg()[0]:.1f}", file=sys.stderr)  # fmt: skip

    dvc = [sys.executable, "-m", "dvc"]
    counter = [0]

    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    used: list[str] = []

    def fresh(prefix: str) -> str:
        """A new, empty prefix; the previous ones are emptied to keep moto's memory in check."""
        for old in used:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{old}/"):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", []) or []]
                if keys:
                    client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys, "Quiet": True})
        used.clear()
        counter[0] += 1
        used.append(f"{prefix}-{counter[0]}")
        return used[-1]

    # --- emassist s3 push / pull (ingest from a bucket) ---
    for w in args.workers:
        push_times, pull_times = [], []
        for _ in range(args.repeats):
            s3 = S3Params(bucket=BUCKET, prefix=fresh("raw"), endpoint_url=endpoint, workers=w)
            push_times.append(timed(lambda s3=s3: push(s3, raw, progress=False)))
            out = tmp / "pulled"
            shutil.rmtree(out, ignore_errors=True)
            pull_times.append(timed(lambda s3=s3, out=out: pull(s3, out, CLASSES, progress=False)))
            shutil.rmtree(out, ignore_errors=True)
        record("`emassist s3 push`", f"{w} workers", push_times)
        record("`emassist s3 pull` (data.source: s3)", f"{w} workers", pull_times)

    # --- DVC, one object per file ---
    add_times = []
    for _ in range(args.repeats):
        shutil.rmtree(repo / ".dvc" / "cache", ignore_errors=True)
        (repo / "data" / "raw.dvc").unlink(missing_ok=True)
        shutil.rmtree(repo / ".dvc" / "site", ignore_errors=True)
        add_times.append(sh([*dvc, "add", "-q", "data/raw"], repo, env))
    record("per file: `dvc add data/raw`", "-", add_times)
    for j in args.jobs:
        push_times, pull_times = [], []
        for _ in range(args.repeats):
            set_remote(repo, env, endpoint, fresh("dvcstore"))
            push_times.append(sh([*dvc, "push", "-q", "-j", str(j)], repo, env))
            shutil.rmtree(repo / ".dvc" / "cache")
            shutil.rmtree(raw)
            pull_times.append(sh([*dvc, "pull", "-q", "-j", str(j)], repo, env))
        record("per file: `dvc push`", f"-j {j}", push_times)
        record("per file: `dvc pull` (empty cache)", f"-j {j}", pull_times)

    if args.skip_tar:
        print_table(args, size_mb, rows)
        return
    # --- DVC, one tar per class ---
    tars = repo / "data" / "tars"
    pack_times, unpack_times = [], []
    for _ in range(args.repeats):
        shutil.rmtree(tars, ignore_errors=True)
        pack_times.append(timed(lambda: pack(raw, tars)))
        shutil.rmtree(tmp / "unpacked", ignore_errors=True)
        unpack_times.append(timed(lambda: unpack(tars, tmp / "unpacked")))
    shutil.rmtree(tmp / "unpacked", ignore_errors=True)
    record("tar per class: pack 10 tars", "-", pack_times)
    sh([*dvc, "add", "-q", "data/tars"], repo, env)
    for j in args.jobs:
        push_times, pull_times = [], []
        for _ in range(args.repeats):
            set_remote(repo, env, endpoint, fresh("tarstore"))
            push_times.append(sh([*dvc, "push", "-q", "-j", str(j), "data/tars.dvc"], repo, env))
            shutil.rmtree(repo / ".dvc" / "cache")
            shutil.rmtree(tars)
            pull_times.append(sh([*dvc, "pull", "-q", "-j", str(j), "data/tars.dvc"], repo, env))
        record("tar per class: `dvc push`", f"-j {j}", push_times)
        record("tar per class: `dvc pull` (empty cache)", f"-j {j}", pull_times)
    record("tar per class: unpack 10 tars", "-", unpack_times)
    print_table(args, size_mb, rows)


def print_table(args: argparse.Namespace, size_mb: float, rows: list[tuple[str, str, float]]) -> None:
    n = args.n
    print(f"\n### S3 benchmark: {n} files of ~{args.kb} KB ({size_mb:.0f} MB), local moto_server, "
          f"median of {args.repeats}; load average at the end {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print("| measurement | setting | seconds | images / s | MB / s | 21,000 images, linear (s) |")
    print("|---|---|---:|---:|---:|---:|")
    for name, setting, sec in rows:
        print(f"| {name} | {setting} | {sec:.1f} | {n / sec:.0f} | {size_mb / sec:.1f} | {sec * 21000 / n:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
