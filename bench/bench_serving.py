"""Serving benchmark: `mlflow models serve` against the same model's in-process pyfunc predict (the floor).

    python bench/bench_serving.py            # models/model.keras if present, else a small stand-in CNN
    python bench/bench_serving.py --help

Registers the model in a throw-away MLflow store (sqlite in a temp folder; nothing is trained, the project's
tracking store is not touched), starts `mlflow models serve -m models:/bench@champion --env-manager local` on
127.0.0.1 and measures, on the same PNG images:

* single-image latency p50/p95 (one image per request / per predict call), and
* throughput (images/s) for batches of 1, 8 and 32 images per request,

each repeated ``--runs`` times, served and in-process calls taking turns (load from elsewhere hits both alike);
the table shows medians over the runs. Served latency includes the client's JSON encoding and the HTTP round
trip, as a real client sees it. The floor (issue 18): base64 decode, decode + standardize by the pyfunc's own
preprocessor, then the compiled forward pass (the pyfunc's tf.function), in the same process; goals: served p50
<= 1.5 x floor, batch-32 throughput >= 0.8 x floor.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
NAME = "bench"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- model + images


def stand_in_model(path: Path, image_size: int, n_classes: int, architecture: str = "simple_cnn") -> Path:
    """An untrained model of ``architecture`` (used when models/model.keras does not exist or does not fit)."""
    import keras

    try:
        from emassist.model.builders import build_model  # type: ignore[import-not-found]

        model = build_model(architecture, num_classes=n_classes, image_size=image_size, weights=None, dropout=0.3)
    except Exception:
        layers = keras.layers
        inp = keras.Input((image_size, image_size, 3))
        x = layers.Rescaling(1.0 / 255)(inp)
        for filters in (32, 64, 128):
            x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
            x = layers.BatchNormalization()(x)
            x = layers.MaxPooling2D()(x)
        x = layers.GlobalAveragePooling2D()(x)
        x = layers.Dropout(0.3)(x)
        model = keras.Model(inp, layers.Dense(n_classes, activation="softmax")(x))
    model.save(path)
    return path


def make_images(n: int, side: int, seed: int = 0) -> list[str]:
    """Base64 PNGs of SEM-like noise (grey texture plus a dark data bar at the bottom)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = rng.normal(120, 40, (side, side)).clip(0, 255).astype(np.uint8)
        bar = max(8, side // 12)
        img[-bar:] = 0
        img[-bar + 3 : -3, 10 : side // 3] = 255  # "text"
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


# --------------------------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ping(proc: subprocess.Popen[bytes], url: str, log_file: Path, deadline: float) -> None:
    """Until ``url``/ping answers 200; RuntimeError with the log's tail when the server exits or ``deadline``
    (a ``time.monotonic()`` value) passes."""
    import requests

    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited ({proc.returncode}):\n{log_file.read_text()[-2000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not up in time:\n{log_file.read_text()[-2000:]}")
        time.sleep(0.5)


@contextlib.contextmanager
def model_server(model_uri: str, tracking_uri: str, log_file: Path, workers: int) -> Iterator[str]:

    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, TF_CPP_MIN_LOG_LEVEL="2")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # mlflow starts uvicorn through bash
    cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)]  # fmt: skip
    with open(log_file, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ping(proc, url, log_file, time.monotonic() + 240)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------- measuring


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure_pair(
    served: Callable[[list[str]], Any],
    local: Callable[[list[str]], Any],
    images: list[str],
    *,
    latency_calls: int,
    batches: Sequence[int],
    images_per: int,
    floor: Callable[[list[str]], Any] | None = None,
    null: Callable[[list[str]], Any] | None = None,
) -> tuple[dict[str, float], ...]:
    """One run for every path, call by call in turns (so that load from elsewhere hits them alike).

    Returns (served, in-process[, floor][, null server]): single-image latency percentiles (ms) and throughput per
    batch size (img/s).
    """
    fns = {"served": served, "local": local}
    if floor is not None:
        fns["floor"] = floor
    if null is not None:
        fns["null"] = null
    lat: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(latency_calls):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn([images[i % len(images)]])
            lat[name].append(time.perf_counter() - t0)
    out = {k: {"p50_ms": 1000 * percentile(v, 50), "p95_ms": 1000 * percentile(v, 95)} for k, v in lat.items()}
    for b in batches:
        calls = max(2, images_per // b)
        spent = dict.fromkeys(fns, 0.0)
        for c in range(calls):
            batch = [images[(c * b + k) % len(images)] for k in range(b)]
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(batch)
                spent[name] += time.perf_counter() - t0
        for name in fns:
            out[name][f"tput_{b}"] = calls * b / spent[name]
    return tuple(out[name] for name in fns)


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def table(
    served: dict[str, float],
    local: dict[str, float],
    floor: dict[str, float],
    batches: Sequence[int],
    info: str,
    null: dict[str, float] | None = None,
) -> str:
    """Served, in-process pyfunc and the floor (base64 + decode + standardize, then the compiled forward pass)."""
    lines = [
        f"Serving benchmark ({info})",
        "",
        "| metric | `mlflow models serve` | in-process pyfunc | floor: decode + compiled forward | served / floor |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, name in (("p50_ms", "single image p50 (ms)"), ("p95_ms", "single image p95 (ms)")):
        lines.append(f"| {name} | {served[key]:.2f} | {local[key]:.2f} | {floor[key]:.2f} | "
                     f"{served[key] / floor[key]:.2f}x |")  # fmt: skip
    for b in batches:
        s, lo, fl = served[f"tput_{b}"], local[f"tput_{b}"], floor[f"tput_{b}"]
        lines.append(f"| throughput, batch {b} (img/s) | {s:.1f} | {lo:.1f} | {fl:.1f} | {s / fl:.2f}x |")
    lines.append(f"| floor parts, single image p50 (ms): decode + standardize / forward | | | "
                 f"{floor['decode_p50_ms']:.2f} / {floor['forward_p50_ms']:.2f} | |")  # fmt: skip
    if null is not None:
        lines.append(f"| MLflow's own cost: `mlflow models serve` of a do-nothing pyfunc, p50 (ms) "
                     f"| {null['p50_ms']:.2f} | | | {null['p50_ms'] / floor['p50_ms']:.2f}x |")  # fmt: skip
    ratio = served["p50_ms"] / floor["p50_ms"]
    tput = served[f"tput_{max(batches)}"] / floor[f"tput_{max(batches)}"]
    lines += [
        "",
        f"Goal served p50 <= 1.5 x floor: {'met' if ratio <= 1.5 else 'NOT met'} ({ratio:.2f}x); "
        f"batch-{max(batches)} throughput >= 0.8 x floor: {'met' if tput >= 0.8 else 'NOT met'} ({tput:.2f}x). "
        f"In-process pyfunc / floor p50: {local['p50_ms'] / floor['p50_ms']:.2f}x.",
    ]
    if null is not None:
        best = (floor["p50_ms"] + null["p50_ms"]) / floor["p50_ms"]
        lines.append(
            f"Lower bound of served / floor with `mlflow models serve` (floor + the do-nothing server's p50): "
            f"{best:.2f}x; ours above that bound: {served['p50_ms'] - floor['p50_ms'] - null['p50_ms']:.2f} ms."
        )
    return "\n".join(lines)


def null_model_uri(tmp: Path) -> str:
    """Log (in the active run) and register a pyfunc that answers ``{"label": "x"}`` per row without looking at the
    image, with the same input signature as ours (``image``: string): ``mlflow models serve`` of it costs what MLflow's
    scoring server costs (HTTP, JSON -> DataFrame, schema check, DataFrame -> JSON), with nothing of ours inside."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    class Null(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return pd.DataFrame({"label": ["x"] * len(model_input)})

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "image")]), outputs=Schema([ColSpec("string", "label")])
    )
    info = mlflow.pyfunc.log_model(
        name="null", python_model=Null(), signature=signature, registered_model_name=f"{NAME}-null"
    )
    return f"models:/{NAME}-null/{info.registered_model_version}"


def register_bench_model(
    base: Any, tmp: Path, model_file: Path, *, null_server: bool = False
) -> tuple[str, str, str | None]:
    """``model_file`` registered as ``models:/bench@champion`` in a sqlite store in ``tmp`` (``MLFLOW_TRACKING_URI``
    is set to it), with the classes, ingest settings and image size of ``base`` (the project's params); with
    ``null_server`` the do-nothing pyfunc too (:func:`null_model_uri`). Returns (tracking URI, the model's URI, the
    do-nothing model's URI or None)."""
    import mlflow

    from emassist.config.settings import params_from_dict
    from emassist.model import registry
    from emassist.model.tracking import setup_mlflow

    tracking_uri = os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    params = params_from_dict({
        "data": {"classes": list(base.data.classes), "splits_dir": str(tmp / "no-splits")},
        "ingest": {k: getattr(base.ingest, k) for k in ("cache_size", "max_pixels", "min_side", "crop_databar")},
        "train": {"image_size": base.train.image_size},
        "mlflow": {"experiment": NAME, "registered_model": NAME},
    })  # fmt: skip
    setup_mlflow(params)
    with mlflow.start_run() as run:
        mlflow.log_metric("test_macro_f1", 0.0)
        null_uri = null_model_uri(tmp) if null_server else None
    mv = registry.log_and_register(params, run.info.run_id, model_file=model_file)
    registry.promote(NAME, mv.version, client=mlflow.MlflowClient())
    return tracking_uri, f"models:/{NAME}@champion", null_uri


def floor_fn(python_model: Any) -> tuple[Callable[[list[str]], Any], Callable[[], dict[str, float]]]:
    """The floor of one request: base64 decode, decode + standardize each image (the pyfunc's own preprocessor),
    then the compiled forward pass (the tf.function the pyfunc calls) on the stacked batch; and a function giving
    the p50 of its two parts over the single-image calls so far."""
    from emassist.serve.pyfunc import decode_base64

    pre = python_model.preprocessor
    parts: dict[str, list[float]] = {"decode": [], "forward": []}

    def run(batch: list[str]) -> Any:
        t0 = time.perf_counter()
        gray = np.stack([pre.standardize(pre.decode(decode_base64(b)).gray)[0] for b in batch])[..., None]
        t1 = time.perf_counter()
        out = python_model._forward(gray)
        np.asarray(out[0])  # the answer on the host, as the pyfunc needs it
        if len(batch) == 1:
            parts["decode"].append(t1 - t0)
            parts["forward"].append(time.perf_counter() - t1)
        return out

    def p50s() -> dict[str, float]:
        got = {f"{k}_p50_ms": 1000 * statistics.median(v) for k, v in parts.items() if v}
        for v in parts.values():
            v.clear()
        return got

    return run, p50s


# --------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/bench_serving.py",
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Prints a Markdown table (stdout); progress goes to stderr.",
    )
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="params file (default: %(default)s)")
    parser.add_argument(
        "--model", type=Path, default=REPO / "models" / "model.keras",
        help="Keras serving copy to benchmark (default: %(default)s; a stand-in CNN when it does not exist)",
    )  # fmt: skip
    parser.add_argument("--runs", type=int, default=5, help="repetitions; medians are reported (default: 5)")
    parser.add_argument("--latency-calls", type=int, default=40, help="single-image calls per run (default: 40)")
    parser.add_argument("--batches", default="1,8,32", help="batch sizes for throughput (default: 1,8,32)")
    parser.add_argument("--images-per-batch-size", type=int, default=64, help="images sent per batch size and run")
    parser.add_argument("--side", type=int, default=256, help="side of the test PNGs in pixels (default: 256)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of the server (default: 1)")
    parser.add_argument("--json", type=Path, help="also write the raw medians here")
    parser.add_argument(
        "--no-null-server", dest="null_server", action="store_false",
        help="skip the row of MLflow's own fixed cost (`mlflow models serve` of a pyfunc that does nothing)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import mlflow
    import requests

    from emassist.config.settings import load_params, params_from_dict

    base = load_params(args.params) if args.params.is_file() else params_from_dict({})
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp_name:
        tmp = Path(tmp_name)
        fits = False
        if args.model.is_file():
            import keras

            fits = keras.models.load_model(args.model, compile=False).input_shape[1] == base.train.image_size
            if not fits:
                log(f"{args.model} does not take train.image_size {base.train.image_size} px: using a stand-in")
        if fits:
            model_file, what = args.model, f"{args.model.name}"
        else:
            model_file = stand_in_model(tmp / "model.keras", base.train.image_size, len(base.data.classes),
                                        base.train.model)  # fmt: skip
            what = f"untrained {base.train.model} (no usable models/model.keras)"
        log(f"registering {model_file} in a temporary store ...")
        tracking_uri, uri, null_uri = register_bench_model(base, tmp, model_file, null_server=args.null_server)
        images = make_images(64, args.side)
        local_model = mlflow.pyfunc.load_model(uri)

        def local_predict(batch: list[str]) -> Any:
            return local_model.predict(pd.DataFrame({"image": batch}))

        floor_predict, floor_parts = floor_fn(local_model.unwrap_python_model())

        log("starting mlflow models serve ...")
        null_ctx = (
            model_server(null_uri, tracking_uri, tmp / "null.log", args.workers)
            if null_uri
            else contextlib.nullcontext()
        )
        with (
            model_server(uri, tracking_uri, tmp / "serve.log", args.workers) as url,
            null_ctx as null_url,
            requests.Session() as session,
        ):

            def served_predict(batch: list[str]) -> Any:
                body = {"dataframe_split": {"columns": ["image"], "data": [[b] for b in batch]}}
                r = session.post(f"{url}/invocations", json=body, timeout=120)
                r.raise_for_status()
                return r.json()

            def null_predict(batch: list[str]) -> Any:
                body = {"dataframe_split": {"columns": ["image"], "data": [[b] for b in batch]}}
                r = session.post(f"{null_url}/invocations", json=body, timeout=120)
                r.raise_for_status()
                return r.json()

            for fn in (
                served_predict,
                local_predict,
                floor_predict,
                *((null_predict,) if null_url else ()),
            ):  # warm-up: first requests, every batch shape
                for b in (1, *batches):
                    fn(images[:b])
            floor_parts()
            served_runs, local_runs, floor_runs, null_runs = [], [], [], []
            for i in range(args.runs):
                log(f"run {i + 1}/{args.runs}")
                got = measure_pair(
                    served_predict,
                    local_predict,
                    images,
                    latency_calls=args.latency_calls,
                    batches=batches,
                    images_per=args.images_per_batch_size,
                    floor=floor_predict,
                    null=null_predict if null_url else None,
                )
                one_served, one_local, one_floor = got[:3]
                if null_url:
                    null_runs.append(got[3])
                one_floor.update(floor_parts())
                served_runs.append(one_served)
                local_runs.append(one_local)
                floor_runs.append(one_floor)
        served, local, floor = median_of(served_runs), median_of(local_runs), median_of(floor_runs)
        info = (
            f"{what}, input {base.train.image_size}px, {len(base.data.classes)} classes; {args.side}x{args.side} PNGs; "
            f"{os.cpu_count()} CPUs; median of {args.runs} runs"
        )
        null = median_of(null_runs) if null_runs else None
        print(table(served, local, floor, batches, info, null))
        if args.json:
            out = {"served": served, "in_process": local, "floor": floor, "null_server": null, "info": info}
            args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
