"""Benchmark the prediction log's write throughput on PostgreSQL (and SQLite beside it, for the same rows).

Starts its own PostgreSQL server (``initdb`` + ``postgres`` on a free loopback port, default settings: fsync on, as a
team server runs; as root both run as ``nobody``, which initdb requires), unless ``--db-uri`` names one. Then, for each
store, ``--repeats`` runs (each into a fresh database or file) of:

* ``LogWriter`` (``--batch-size`` rows per transaction, the background thread the product uses): rows/s from the
  first ``record()`` until every row is committed (``close()``), and the p50 cost of one ``record()`` call (what a
  prediction pays);
* single-row transactions (``PredictionLog.write([row])`` per row, what logging without batching would cost);

and prints a Markdown table of rows/s (min / median / max over the runs) and a JSON line.

    python bench/bench_predlog_pg.py --rows 5000 --single-rows 1000 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from emassist.config.classes import CLASSES
from emassist.data.predlog import LogWriter, PredictionLog, PredictionRow


def pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
    if not found:
        raise SystemExit(f"{name} not found: install the PostgreSQL server (or pass --db-uri)")
    return str(found)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def postgres(databases: list[str]) -> Iterator[str]:
    """A throw-away server with ``databases``; yields ``postgresql+psycopg2://postgres@127.0.0.1:PORT/`` (append the
    database name). The same start/stop as tests/servers.py's PostgresServer, kept here: bench never imports tests."""
    import psycopg2

    base = Path(tempfile.mkdtemp(prefix="emassist-bench-pg-"))
    as_nobody = os.geteuid() == 0
    wrap = ["runuser", "-u", "nobody", "--"] if as_nobody else []
    data, sock, port = base / "data", base / "sock", free_port()
    sock.mkdir()
    if as_nobody:
        for path in (base, sock):
            shutil.chown(path, user="nobody")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"}
    subprocess.run([*wrap, pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-locale",
                    "--encoding=UTF8"], check=True, capture_output=True, env=env)  # fmt: skip
    log = open(base / "postgres.log", "wb")  # noqa: SIM115 - open for the server's whole life
    proc = subprocess.Popen([*wrap, pg_bin("postgres"), "-D", str(data), "-p", str(port), "-k", str(sock),
                             "-c", "listen_addresses=127.0.0.1"], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
                break
            except psycopg2.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = (base / "postgres.log").read_text()[-2000:]
                    raise SystemExit(f"postgres did not start:\n{tail}") from None
                time.sleep(0.2)
        conn.autocommit = True
        with conn.cursor() as cur:
            for name in databases:
                cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/"
    finally:
        subprocess.run([*wrap, pg_bin("pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w"], capture_output=True,
                       env=env)  # fmt: skip
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        if proc.poll() is None:
            proc.kill()
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def make_rows(n: int, seed: int = 0) -> list[PredictionRow]:
    """``n`` realistic rows: ten classes' probabilities, image size, statistics, model identity."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        p = rng.dirichlet(np.ones(len(CLASSES)))
        top = int(p.argmax())
        rows.append(PredictionRow(
            source="server", sha256=f"{i:064x}", label=CLASSES[top], confidence=float(p[top]),
            probabilities=dict(zip(CLASSES, p.tolist(), strict=True)), needs_review=bool(p[top] < 0.5),
            origin=f"upload_{i}.tif", width=1024, height=768, format="TIFF", brightness=float(rng.uniform(60, 190)),
            contrast=float(rng.uniform(20, 60)), model_name="sem-classifier", model_version="7",
            model_alias="champion", unfamiliar=False, unfamiliar_score=float(rng.uniform(0, 1)),
        ))  # fmt: skip
    return rows


def batched(uri: str, rows: list[PredictionRow], batch_size: int) -> tuple[float, float]:
    """(rows/s until all committed, p50 µs of one record() call) through a LogWriter."""
    store = PredictionLog(uri)
    store.ensure_tables()
    writer = LogWriter(store, batch_size=batch_size, flush_interval_s=0.05, max_pending=len(rows) + 1)
    costs = []
    t0 = time.perf_counter()
    for r in rows:
        c0 = time.perf_counter()
        writer.record(r)
        costs.append(time.perf_counter() - c0)
    writer.close(close_timeout_s=600)
    elapsed = time.perf_counter() - t0
    if store.count() != len(rows) or writer.stats["dropped"]:
        raise RuntimeError(f"{uri}: {store.count()} rows stored of {len(rows)} ({writer.stats})")
    store.dispose()
    return len(rows) / elapsed, float(np.median(costs)) * 1e6


def single(uri: str, rows: list[PredictionRow]) -> float:
    """rows/s with one transaction per row."""
    store = PredictionLog(uri)
    store.ensure_tables()
    t0 = time.perf_counter()
    for r in rows:
        store.write([r])
    elapsed = time.perf_counter() - t0
    if store.count() != len(rows):
        raise RuntimeError(f"{uri}: {store.count()} rows stored of {len(rows)}")
    store.dispose()
    return len(rows) / elapsed


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def measure(name: str, fresh_uri: Callable[[str], str], args: argparse.Namespace) -> dict[str, Any]:
    rows, single_rows = make_rows(args.rows), make_rows(args.single_rows, seed=1)
    batch_rates, record_us, single_rates = [], [], []
    for k in range(args.repeats):
        rate, cost = batched(fresh_uri(f"batched_{k}"), rows, args.batch_size)
        batch_rates.append(rate)
        record_us.append(cost)
        single_rates.append(single(fresh_uri(f"single_{k}"), single_rows))
    result = {"store": name, "batched": spread(batch_rates), "record_us_p50": spread(record_us),
              "single": spread(single_rates)}  # fmt: skip
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5000, help="rows per batched run")
    ap.add_argument("--single-rows", type=int, default=1000, help="rows per single-row-transaction run")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--db-uri", help="an existing PostgreSQL server's URL without the database (…:PORT/); the "
                    "runs create databases bench_* there")  # fmt: skip
    ap.add_argument("--no-sqlite", action="store_true", help="skip the SQLite comparison")
    args = ap.parse_args(argv)
    names = [f"{kind}_{k}" for kind in ("batched", "single") for k in range(args.repeats)]
    results = []
    if args.db_uri:
        results.append(measure("PostgreSQL (given)", lambda db: args.db_uri.rstrip("/") + f"/bench_{db}", args))
    else:
        with postgres([f"bench_{n}" for n in names]) as base:
            results.append(measure("PostgreSQL 15 (local, fsync on)", lambda db: f"{base}bench_{db}", args))
    if not args.no_sqlite:
        with tempfile.TemporaryDirectory(prefix="emassist-bench-sqlite-") as tmp:
            results.append(measure("SQLite file", lambda db: f"sqlite:///{Path(tmp) / db}.db", args))
    print(f"\n{args.rows} rows batched ({args.batch_size} per transaction), {args.single_rows} rows single; "
          f"rows/s over {args.repeats} runs, min / median / max\n")  # fmt: skip
    print("| store | LogWriter batches | single-row transactions | record() p50 |")
    print("|---|---|---|---|")
    for r in results:
        b, s, c = r["batched"], r["single"], r["record_us_p50"]
        print(f"| {r['store']} | {b['min']:,.0f} / {b['median']:,.0f} / {b['max']:,.0f} | "
              f"{s['min']:,.0f} / {s['median']:,.0f} / {s['max']:,.0f} | {c['median']:.1f} µs |")  # fmt: skip


if __name__ == "__main__":
    main()
