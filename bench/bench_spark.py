"""``emassist batch`` (Spark, local[2]) against ``emassist predict`` on the same 2,000 demo images, and the Spark
job's fixed start-up cost.

    python bench/bench_spark.py [--runs 3] [--n 2000] [--side 256] [--master 'local[2]']

Model: ``train.model`` at ``train.image_size`` of params.yaml (the demo champion's architecture), untrained (the
weights do not change the timings); registered as champion in a temporary sqlite MLflow store, so both commands load
``models:/<name>@champion`` exactly as a user's would. Images: ``emassist demo`` PNGs
(``--side`` px, data bars included), written once.

Every figure is a whole command as a process (``--no-log``; wall time from start to exit), ``--runs`` runs,
min / median / max:

* ``emassist predict DIR``: images/s = files / wall time (its own start-up included);
* ``emassist batch DIR --master M``: images/s the same way; the ratio batch / predict (expect <= 1 on one small
  machine: the point of Spark is that the same job scales out);
* the fixed cost: ``emassist batch`` on a folder of 2 images (JVM, SparkSession, Python workers importing
  TensorFlow, model downloads and loads), and the marginal rate of the batch job once that is paid:
  (files - 2) / (wall - fixed wall).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from emassist.config.settings import load_params, params_from_dict  # noqa: E402

VENV_BIN = Path(sys.executable).parent


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def register(root: Path, image_size: int) -> tuple[Path, str]:
    """An untrained ``train.model`` registered as champion in a fresh sqlite store under ``root``; returns
    (params file, tracking URI)."""
    import mlflow

    from emassist.model.builders import build_model
    from emassist.model.registry import log_and_register, promote

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    uri = f"sqlite:///{root / 'mlflow.db'}"
    raw["mlflow"] = {**raw["mlflow"], "tracking_uri": uri, "experiment": "bench-spark", "registered_model": "bench"}
    raw["monitoring"] = {**raw["monitoring"], "log_predictions": False}
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    params = params_from_dict(raw)
    model_file = root / "model.keras"
    build_model(params.train.model, num_classes=len(params.data.classes), image_size=image_size, weights=None,
                dropout=params.train.dropout).save(model_file)  # fmt: skip
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("bench-spark", artifact_location=(root / "artifacts").as_uri())
    mlflow.set_experiment("bench-spark")
    with mlflow.start_run() as run:
        mlflow.set_tags({"data_version": "bench", "model": params.train.model})
    mv = log_and_register(params, run.info.run_id, model_file=model_file)
    promote("bench", mv.version, client=mlflow.MlflowClient())
    return params_file, uri


def timed(cmd: Sequence[str], env: dict[str, str], log_file: Path) -> float:
    t0 = time.perf_counter()
    with open(log_file, "wb") as fh:
        proc = subprocess.run(list(cmd), stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; see {log_file}:\n"
                           + log_file.read_text(errors="replace")[-3000:])  # fmt: skip
    return seconds


def stats(values: Sequence[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--n", type=int, default=2000, help="images (default: 2000)")
    parser.add_argument("--side", type=int, default=256, help="image side in px (default: the demo's 256)")
    parser.add_argument("--master", default="local[2]")
    args = parser.parse_args(argv)

    from emassist.pipeline.acquire import generate

    root = Path(tempfile.mkdtemp(prefix="bench-spark-"))
    try:
        params = load_params(REPO / "params.yaml")
        log(f"registering the model and writing {args.n} demo images under {root}")
        params_file, uri = register(root, params.train.image_size)
        images = root / "images"
        generate(params, images, n_images=args.n, width=args.side, height=args.side, min_per_class=1)
        n = sum(1 for p in images.rglob("*") if p.is_file())
        tiny = root / "tiny"
        tiny.mkdir()
        for p in sorted(images.rglob("*.png"))[:2]:
            shutil.copy(p, tiny / p.name)
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
               "TF_CPP_MIN_LOG_LEVEL": "2", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # fmt: skip
        emassist = [sys.executable, "-m", "emassist.cli.main", "--params", str(params_file)]
        conf = ["--conf", "spark.ui.enabled=false", "--conf", "spark.driver.memory=2g"]
        predict, batch, fixed = [], [], []
        for run in range(args.runs):
            predict.append(timed([*emassist, "predict", str(images), "--out", str(root / "p.csv"), "--top-k", "0",
                                  "--no-log", "--no-progress"], env, root / f"predict-{run}.log"))  # fmt: skip
            batch.append(timed([*emassist, "batch", str(images), "--out", str(root / "out"), "--master", args.master,
                                "--no-log", *conf], env, root / f"batch-{run}.log"))  # fmt: skip
            fixed.append(timed([*emassist, "batch", str(tiny), "--out", str(root / "tiny-out"), "--master",
                                args.master, "--no-log", *conf], env, root / f"tiny-{run}.log"))  # fmt: skip
            log(f"run {run + 1}: predict {predict[-1]:.1f} s, batch {batch[-1]:.1f} s, batch on 2 files "
                f"{fixed[-1]:.1f} s")  # fmt: skip
        p_rate = [n / s for s in predict]
        b_rate = [n / s for s in batch]
        ratio = [b / p for b, p in zip(b_rate, p_rate, strict=True)]
        marginal = [(n - 2) / max(1e-9, b - f) for b, f in zip(batch, fixed, strict=True)]
        rows = [
            ("emassist predict, images/s", stats(p_rate)),
            (f"emassist batch --master {args.master}, images/s", stats(b_rate)),
            ("ratio batch / predict (same run)", stats(ratio)),
            ("batch fixed start-up (2 files), s", stats(fixed)),
            ("batch marginal rate after start-up, images/s", stats(marginal)),
            ("emassist predict wall, s", stats(predict)),
            ("emassist batch wall, s", stats(batch)),
        ]
        print(f"\n{n} demo PNGs of {args.side} px, {args.runs} runs, {os.cpu_count()} CPUs, model "
              f"{params.train.model} at {params.train.image_size} px\n")  # fmt: skip
        print("| measure | min | median | max |")
        print("|---|---:|---:|---:|")
        for name, (lo, mid, hi) in rows:
            print(f"| {name} | {lo:.2f} | {mid:.2f} | {hi:.2f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
