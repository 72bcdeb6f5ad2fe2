"""Prediction-log benchmark: what logging costs the scoring server, and how fast the log takes rows.

    python bench/bench_predlog.py                    # both parts, SQLite in a temp folder
    python bench/bench_predlog.py --db-uri postgresql://user@127.0.0.1:5432/db --skip-serving

1. Serving overhead: the same pyfunc model (models/model.keras if present, else a small stand-in CNN; saved as a
   local MLflow model folder, no registry) served by two ``mlflow models serve`` processes on 127.0.0.1, one with
   ``EMASSIST_PREDICTION_LOG`` (SQLite), one without; single-image requests alternate between them; p50 per run,
   ``--runs`` runs, min/median/max, the ratio of the medians (goal <= 1.05x) and the paired overhead (median of
   with - without over adjacent requests: noise common to both servers cancels).
2. Write throughput: :func:`throughput` pushes ``--rows`` rows through a :class:`LogWriter` into ``--db-uri``
   (default: a fresh SQLite file) and reports rows/s from the first record to the last commit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from bench_serving import free_port, log, make_images, stand_in_model, wait_ping  # noqa: E402

from emassist.data.predlog import LogWriter, PredictionLog, PredictionRow  # noqa: E402

VENV_BIN = Path(sys.executable).parent


def throughput(db_uri: str, n_rows: int, *, batch_size: int = 64) -> float:
    """Rows per second through a LogWriter into ``db_uri`` (first record → last commit), ``batch_size`` a batch."""
    store = PredictionLog(db_uri)
    store.ensure_tables()
    before = store.count()
    writer = LogWriter(store, batch_size=batch_size, flush_interval_s=0.05, max_pending=n_rows + 1)
    probabilities = {f"class_{k}": 0.1 for k in range(10)}
    rows = [PredictionRow(source="server", sha256=f"{i:064x}", label="class_0", confidence=0.1,
                          probabilities=probabilities, needs_review=True, width=1024, height=768, format="TIFF",
                          brightness=120.0, contrast=30.0, model_name="bench", model_version="1")
            for i in range(n_rows)]  # fmt: skip
    t0 = time.perf_counter()
    for row in rows:
        writer.record(row)
    writer.close(close_timeout_s=600)
    seconds = time.perf_counter() - t0
    written = store.count() - before
    if written != n_rows or writer.stats["dropped"]:
        raise RuntimeError(f"{written} of {n_rows} rows written, {writer.stats['dropped']} dropped")
    store.dispose()
    return n_rows / seconds


def save_pyfunc(model_file: Path, folder: Path, tmp: Path) -> Path:
    """The serving pyfunc of ``model_file`` as a local MLflow model folder (the project's params for the rest)."""
    import mlflow

    import emassist
    from emassist.config.settings import load_params, params_from_dict
    from emassist.model.registry import model_signature, pip_requirements, pyfunc_code_path, serving_config

    params = load_params(REPO / "params.yaml") if (REPO / "params.yaml").is_file() else params_from_dict({})
    config_file = tmp / "serving_config.json"
    config = serving_config(params, model_file.parent / "calibration.json")
    import keras

    side = keras.models.load_model(model_file, compile=False).input_shape[1]
    if side != config["image_size"]:  # a models/ copy trained at another size than params.yaml says today
        log(f"{model_file.name} takes {side} px (params.yaml: {config['image_size']}): serving it at {side}")
        config["image_size"] = int(side)
    config_file.write_text(json.dumps(config))
    package = tmp / "code" / "emassist"
    shutil.copytree(Path(emassist.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    artifacts = {"keras_model": str(model_file), "config": str(config_file)}
    if (model_file.parent / "familiarity.npz").is_file():
        artifacts["familiarity"] = str(model_file.parent / "familiarity.npz")
    mlflow.pyfunc.save_model(str(folder), python_model=str(pyfunc_code_path()), artifacts=artifacts,
                             code_paths=[str(package)], signature=model_signature(params.data.classes),
                             pip_requirements=pip_requirements())  # fmt: skip
    return folder


@contextlib.contextmanager
def servers(model_dir: Path, tmp: Path, envs: dict[str, dict[str, str]]) -> Iterator[dict[str, str]]:
    """One ``mlflow models serve`` per entry of ``envs``, started together; their URLs by name."""
    import signal
    import subprocess

    procs: dict[str, tuple[Any, str, Path]] = {}
    try:
        for name, extra in envs.items():
            port = free_port()
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)
            env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
            cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", str(model_dir), "--env-manager", "local",
                   "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
            log_file = tmp / f"{name}.log"
            with open(log_file, "wb") as fh:
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            procs[name] = (proc, f"http://127.0.0.1:{port}", log_file)
        deadline = time.monotonic() + 240
        for proc, url, log_file in procs.values():
            wait_ping(proc, url, log_file, deadline)
        yield {name: url for name, (_, url, _) in procs.items()}
    finally:
        for proc, _, _ in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc, _, _ in procs.values():
            while time.monotonic() < deadline:  # uvicorn's own shutdown (the writer's last flush) outlives its parent
                proc.poll()
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def serving_overhead(model_file: Path, tmp: Path, *, runs: int, calls: int, side: int) -> dict[str, Any]:
    """p50 (ms) of single-image requests per run, with and without the prediction log; rows logged."""
    import requests

    model_dir = save_pyfunc(model_file, tmp / "model", tmp)
    db = tmp / "serving-log.db"
    envs = {"without": {}, "with": {"EMASSIST_PREDICTION_LOG": f"sqlite:///{db}", "EMASSIST_MODEL_NAME": "bench"}}
    images = make_images(64, side)
    p50: dict[str, list[float]] = {"with": [], "without": []}
    paired: list[float] = []  # per run: median over adjacent pairs of (with - without), ms
    with servers(model_dir, tmp, envs) as urls, requests.Session() as session:

        def call(name: str, image: str) -> float:
            body = {"dataframe_split": {"columns": ["image"], "data": [[image]]}}
            t0 = time.perf_counter()
            r = session.post(f"{urls[name]}/invocations", json=body, timeout=120)
            spent = time.perf_counter() - t0
            r.raise_for_status()
            return spent

        for image in images[:5]:  # warm-up
            call("with", image)
            call("without", image)
        sent = 5
        for run in range(runs):
            log(f"serving run {run + 1}/{runs}")
            lat: dict[str, list[float]] = {"with": [], "without": []}
            for i in range(calls):
                order = ("with", "without") if i % 2 else ("without", "with")  # interleaved, alternating first
                for name in order:
                    lat[name].append(call(name, images[i % len(images)]))
                sent += 1
            for name in lat:
                p50[name].append(1000 * statistics.median(lat[name]))
            paired.append(1000 * statistics.median(w - wo for w, wo in zip(lat["with"], lat["without"], strict=True)))
    logged = PredictionLog(f"sqlite:///{db}").count()
    return {"p50_ms": p50, "paired_overhead_ms": paired, "requests_with_log": sent, "rows_logged": logged}


def summary(values: Sequence[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/bench_predlog.py", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "model.keras",
                        help="Keras serving copy (default: %(default)s; a stand-in CNN when absent)")  # fmt: skip
    parser.add_argument("--runs", type=int, default=3, help="serving runs (default: 3)")
    parser.add_argument("--calls", type=int, default=200, help="single-image requests per server and run")
    parser.add_argument("--side", type=int, default=256, help="side of the test PNGs (default: 256)")
    parser.add_argument("--db-uri", help="store for the throughput part (default: a fresh SQLite file)")
    parser.add_argument("--rows", type=int, default=20000, help="rows for the throughput part (default: 20000)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per transaction (default: 64)")
    parser.add_argument("--skip-serving", action="store_true", help="only the throughput part")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    out: dict[str, Any] = {"cpus": os.cpu_count()}
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-predlog-") as tmp_name:
        tmp = Path(tmp_name)
        db_uri = args.db_uri or f"sqlite:///{tmp / 'throughput.db'}"
        rates = [throughput(db_uri, args.rows, batch_size=args.batch_size) for _ in range(3)]
        out["throughput_rows_per_s"] = rates
        kind = db_uri.split(":", 1)[0]
        lines += [f"Prediction log write throughput ({kind}, LogWriter, batch {args.batch_size}, {args.rows} rows, "
                  f"3 runs): min / median / max {summary(rates)} rows/s", ""]  # fmt: skip
        if not args.skip_serving:
            if args.model.is_file():
                model_file, what = args.model, args.model.name
            else:
                from emassist.config.settings import load_params

                p = load_params(REPO / "params.yaml")
                model_file = stand_in_model(tmp / "model.keras", p.train.image_size, len(p.data.classes))
                what = "stand-in CNN (no models/model.keras)"
            result = serving_overhead(model_file, tmp, runs=args.runs, calls=args.calls, side=args.side)
            out["serving"] = result
            with_, without = result["p50_ms"]["with"], result["p50_ms"]["without"]
            ratio = statistics.median(with_) / statistics.median(without)
            paired = result["paired_overhead_ms"]
            paired_ratio = 1 + statistics.median(paired) / statistics.median(without)
            lines += [
                f"Scoring-server overhead ({what}; {args.side}x{args.side} PNG, one image per request, {args.calls} "
                f"interleaved requests per server and run, {args.runs} runs; {os.cpu_count()} CPUs)",
                "",
                "| server | p50 ms (min / median / max over runs) |",
                "|---|---:|",
                f"| without prediction log | {summary(without)} |",
                f"| with EMASSIST_PREDICTION_LOG (SQLite) | {summary(with_)} |",
                "",
                f"Ratio of medians: {ratio:.3f}x (goal <= 1.05x: {'met' if ratio <= 1.05 else 'NOT met'}); "
                f"{result['rows_logged']} rows logged for {result['requests_with_log']} requests.",
                f"Paired: median over adjacent request pairs of (with - without), min / median / max over runs "
                f"{summary(paired)} ms, i.e. {paired_ratio:.3f}x of the median p50 without the log "
                "(noise common to both servers cancels in a pair).",
            ]
            out["ratio"] = ratio
            out["paired_ratio"] = paired_ratio
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
