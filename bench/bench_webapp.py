"""Web page timings over real HTTP: time to first result for one image, and a 4096×4096 tile scan.

Starts ``emassist web`` as a process on 127.0.0.1 with a model of the configured architecture
(``train.model`` at ``train.image_size``, classes from params.yaml; an untrained copy unless ``--model`` names a
``.keras`` file or a ``models:/`` URI: the weights do not change the timings), then measures:

* server start until the page answers (model load included);
* the first upload → result JSON after start (cold), and the median of ``--repeats`` more (warm), for a
  1024×768 demo PNG with a data bar;
* Grad-CAM for one image (first call builds the gradient model; median of the rest);
* a tile scan of a 4096×4096 PNG (``--tile`` / ``--stride``), upload → heat map JSON, median of ``--scan-repeats``
  (upload, PNG decode, scan, heat map and JSON: what the page waits for);

and first, in this process with the same model, the scan itself (``tilescan.scan``) against its floor, the compiled
forward pass on tiles already cut at the same batch size (``--floor-only`` for that table alone).

Start-up (``--startup-only`` for these tables alone; docs/startup.md): the model is registered as champion in a
temporary sqlite MLflow store, then ``--startup-runs`` times each (min / median / max): ``emassist web`` process start
→ /api/health answers (any status) → the page's HTML served → the model ready (the first classify answered), and
``mlflow models serve`` of the same pyfunc → /ping answers; then an import-time table (``python -X importtime``,
top cumulative imports) of what the web process imports before its health check answers, and of the pyfunc's load,
and a breakdown of the model load in a fresh process (MLflow, TensorFlow, download, Keras load, trace).
``--code DIR`` times another checkout's ``emassist`` (e.g. ``git archive HEAD~5 | tar -x -C DIR``: before/after).

    python bench/bench_webapp.py [--repeats 10] [--scan-repeats 3] [--tile 256] [--stride 128]
    python bench/bench_webapp.py --startup-only [--startup-runs 3] [--code DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emassist.config.settings import load_params  # noqa: E402
from tests.servers import free_port, server_env, stop_process, wait_http  # noqa: E402


def demo_png(path: Path, width: int, height: int, index: int = 0, databar: bool = True) -> Path:
    from PIL import Image

    from emassist.config.classes import CLASSES
    from emassist.data.demo.generate import Job, render_image

    img, _ = render_image(Job("", CLASSES.index("Particles"), index, "x.png", databar, width, height, 42))
    Image.fromarray((img * 255.0 + 0.5).astype(np.uint8)).save(path, format="PNG")
    return path


def overview_png(path: Path, side: int = 4096, block: int = 1024) -> Path:
    """A ``side``² overview made of demo images of several classes (rendering one huge scene would be slow)."""
    from PIL import Image

    from emassist.config.classes import CLASSES
    from emassist.data.demo.generate import Job, render_image

    n = side // block
    canvas = np.zeros((side, side), dtype=np.uint8)
    for r in range(n):
        for c in range(n):
            cls = CLASSES[(r * n + c) % len(CLASSES)]
            img, _ = render_image(Job("", CLASSES.index(cls), r * n + c, "x.png", False, block, block, 42))
            canvas[r * block : (r + 1) * block, c * block : (c + 1) * block] = (img * 255.0 + 0.5).astype(np.uint8)
    Image.fromarray(canvas).save(path, format="PNG")
    return path


def untrained_model(params_file: Path, path: Path) -> Path:
    from emassist.model.builders import build_model
    from emassist.model.saving import save_serving_copy

    params = load_params(params_file)
    model = build_model(params.train.model, num_classes=len(params.data.classes), image_size=params.train.image_size)
    return save_serving_copy(model, path)


def timed_post(url: str, data: bytes, **query: str) -> tuple[float, dict]:
    started = time.perf_counter()
    resp = requests.post(url, params=query, data=data, timeout=600)
    elapsed = time.perf_counter() - started
    resp.raise_for_status()
    return elapsed, resp.json()


def scan_vs_forward(
    model: str, params_file: Path, overview: bytes, *, tile: int, stride: int, batch: int, runs: int
) -> dict[str, list[float]]:
    """In-process: the tile scan's throughput against its floor, the compiled forward pass of the same model at the
    same batch size on tiles already cut (``SemClassifier._forward``: the model-input resize and the network, the
    tf.function the scan itself calls). Runs interleaved, ``runs`` each; tiles/s and images/s per run."""
    from emassist.serve import tilescan
    from emassist.serve.predict import load_predictor

    params = load_params(params_file)
    predictor = load_predictor(model, params)
    pre = predictor.preprocessor
    gray = pre.decode(overview).gray
    cropped, _ = pre.crop(gray)
    ys = tilescan.positions(cropped.shape[0], tile, stride)
    xs = tilescan.positions(cropped.shape[1], tile, stride)
    corners = [(y, x) for y in ys for x in xs]
    batches = [pre.tiles(cropped, corners[i : i + batch], tile)[..., None] for i in range(0, len(corners), batch)]
    predictor._forward(batches[0])  # traced at load; one call more so both start warm
    out: dict[str, list[float]] = {"forward": [], "scan": [], "ratio": []}
    for _ in range(runs):
        t0 = time.perf_counter()
        for b in batches:
            predictor._forward(b)
        forward = len(corners) / (time.perf_counter() - t0)
        result = tilescan.scan(gray, predictor.probabilities, predictor.classes, tile=tile, stride=stride,
                               preprocessor=pre, batch_size=batch)  # fmt: skip
        scan = result.n_tiles / result.seconds
        out["forward"].append(forward)
        out["scan"].append(scan)
        out["ratio"].append(scan / forward)
    out["n_tiles"] = [float(len(corners))]
    return out


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


# ------------------------------------------------------------------------------------------------ start-up


def code_env(code: Path | None, **extra: str) -> dict[str, str]:
    """The servers' environment; ``code``: that checkout's ``emassist`` and ``serving`` first on the path."""
    env = server_env(**extra)
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def register_champion(params_file: Path, model_file: Path, tmp: Path) -> tuple[str, str]:
    """``model_file`` logged and registered in a fresh sqlite store under ``tmp``, made champion: (tracking URI,
    ``models:/NAME@champion``)."""
    import mlflow

    from emassist.model.registry import log_and_register, promote

    params = load_params(params_file)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri  # wins over mlflow.tracking_uri, here and in the servers
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment(params.mlflow.experiment, artifact_location=(tmp / "artifacts").as_uri())
    mlflow.set_experiment(params.mlflow.experiment)
    with mlflow.start_run() as run:
        mlflow.set_tags({"data_version": "bench", "model": params.train.model})
    mv = log_and_register(params, run.info.run_id, model_file=model_file)
    promote(params.mlflow.registered_model, mv.version, client=mlflow.MlflowClient())
    return uri, f"models:/{params.mlflow.registered_model}@champion"


def _poll(fn: Any, proc: subprocess.Popen[bytes], log_file: Path, timeout: float = 600.0) -> float:
    """Seconds (perf_counter) when ``fn()`` first returns true; polls every 20 ms."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log_file.read_text()[-3000:]}")
        with contextlib.suppress(requests.RequestException):
            if fn():
                return time.perf_counter()
        time.sleep(0.02)
    raise RuntimeError(f"not ready after {timeout:.0f} s:\n{log_file.read_text()[-3000:]}")


def web_startup(params_file: Path, tmp: Path, image: bytes, code: Path | None) -> dict[str, float]:
    """One ``emassist web`` (registry champion): seconds from process start to health, page and first classify."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_file = tmp / f"web-{port}.log"
    cmd = [sys.executable, "-m", "emassist.cli.main", "--params", str(params_file), "web", "--host", "127.0.0.1",
           "--port", str(port)]  # fmt: skip
    started = time.perf_counter()
    with open(log_file, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=code_env(code), cwd=tmp,
                                start_new_session=True)  # fmt: skip
    try:
        health = _poll(lambda: requests.get(f"{url}/api/health", timeout=5) is not None, proc, log_file)
        page = _poll(lambda: "Electron Microscope Assistant" in requests.get(url, timeout=5).text, proc, log_file)

        def classified() -> bool:
            r = requests.post(f"{url}/api/classify", params={"filename": "one.png"}, data=image, timeout=120)
            if r.status_code == 503:
                time.sleep(0.1)  # loading: the page says so at once; ask again
                return False
            r.raise_for_status()
            return True

        ready = _poll(classified, proc, log_file)
    finally:
        stop_process(proc)
    return {"health": health - started, "page": page - started, "ready": ready - started}


def serve_startup(model_uri: str, tmp: Path, code: Path | None) -> float:
    """One ``mlflow models serve`` of our pyfunc: seconds from process start to /ping answering 200."""
    port = free_port()
    log_file = tmp / f"serve-{port}.log"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    started = time.perf_counter()
    with open(log_file, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=code_env(code), cwd=tmp,
                                start_new_session=True)  # fmt: skip
    try:
        ping = _poll(lambda: requests.get(f"http://127.0.0.1:{port}/ping", timeout=5).status_code == 200, proc,
                     log_file)  # fmt: skip
    finally:
        stop_process(proc)
    return ping - started


def importtime(code: str, env: dict[str, str], cwd: Path) -> tuple[float, list[tuple[str, float, float]]]:
    """(wall seconds, [(module, cumulative s, self s)]) of ``python -X importtime -c CODE``, top-level and their
    direct imports only (deeper ones are inside those)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, env=env,
                          cwd=cwd, check=True)  # fmt: skip
    wall = time.perf_counter() - started
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "| cumulative |" in line:
            continue
        own, cum, name = line[len("import time:") :].split("|", 2)
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        if depth <= 1:
            rows.append((("  " * depth) + name.strip(), int(cum) / 1e6, int(own) / 1e6))
    return wall, rows


def print_imports(title: str, wall: float, rows: list[tuple[str, float, float]], top: int) -> None:
    print(f"{title}: {wall:.2f} s in all (the process, imports and the code after them)")
    print("| import (top-level, and what it imports directly) | cumulative | self |\n|---|---:|---:|")
    for name, cum, own in sorted(rows, key=lambda r: -r[1])[:top]:
        print(f"| `{name}` | {cum:.3f} s | {own:.3f} s |")
    print()


LOAD_STEPS = """
import json, sys, time
t = [time.perf_counter()]
def mark(name):
    t.append(time.perf_counter()); print(json.dumps([name, t[-1] - t[-2]]), flush=True)
import mlflow, mlflow.pyfunc
mark("import mlflow")
import tensorflow, keras
mark("import tensorflow + keras")
local = mlflow.artifacts.download_artifacts(artifact_uri=sys.argv[1])
mark("download the model's artifacts")
import glob
keras.models.load_model(glob.glob(local + "/artifacts/*.keras")[0], compile=False)
mark("keras.models.load_model alone")
mlflow.pyfunc.load_model(local)
mark("mlflow.pyfunc.load_model (model code, Keras load again, tf.function trace)")
"""


def startup(args: argparse.Namespace, params_file: Path, model_file: Path, tmp: Path, image: bytes) -> None:
    """The start-up tables (see the module's docstring)."""
    code = args.code.resolve() if args.code else None
    _, model_uri = register_champion(params_file, model_file, tmp)
    web: dict[str, list[float]] = {"health": [], "page": [], "ready": []}
    serve: list[float] = []
    for _ in range(args.startup_runs):  # interleaved: a noisy minute hits both alike
        for k, v in web_startup(params_file, tmp, image, code).items():
            web[k].append(v)
        serve.append(serve_startup(model_uri, tmp, code))
    load = os.getloadavg()
    print(f"Start-up, {args.startup_runs} runs each, min / median / max (s); model {model_uri} "
          f"({load_params(params_file).train.model}); code {code or ROOT}; cpus {os.cpu_count()}; "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")  # fmt: skip
    print("| from process start to | seconds |\n|---|---:|")
    print(f"| `emassist web`: /api/health answers (any status) | {spread(web['health'], '{:.1f}')} |")
    print(f"| `emassist web`: the page's HTML served | {spread(web['page'], '{:.1f}')} |")
    print(f"| `emassist web`: model ready (first classify answered) | {spread(web['ready'], '{:.1f}')} |")
    print(f"| `mlflow models serve` (our pyfunc): /ping answers | {spread(serve, '{:.1f}')} |\n")
    env = code_env(code)
    wall, rows = importtime("import emassist.cli.main, serving.webapp.app, uvicorn", env, tmp)
    print_imports("Imports of `emassist web` before its health check answers", wall, rows, args.import_top)
    wall, rows = importtime(f"import mlflow.pyfunc; mlflow.pyfunc.load_model({model_uri!r})", env, tmp)
    print_imports("Imports of the pyfunc's load (`mlflow.pyfunc.load_model`, what `mlflow models serve` does)", wall,
                  rows, args.import_top)  # fmt: skip
    done = subprocess.run([sys.executable, "-c", LOAD_STEPS, model_uri], capture_output=True, text=True, env=env,
                          cwd=tmp, check=True)  # fmt: skip
    print("The model's load step by step (a fresh process)\n| step | seconds |\n|---|---:|")
    for line in done.stdout.splitlines():
        if line.startswith("["):
            name, seconds = json.loads(line)
            print(f"| {name} | {seconds:.2f} |")
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--model", help="a .keras file or models:/ URI (default: an untrained train.model)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--scan-repeats", type=int, default=3)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--stride", type=int, default=128)
    ap.add_argument("--side", type=int, default=4096)
    ap.add_argument("--batch", type=int, help="tiles per forward pass (default: webapp.tile_batch)")
    ap.add_argument("--floor-runs", type=int, default=5, help="in-process scan vs forward-pass runs (default: 5)")
    ap.add_argument("--floor-only", action="store_true", help="only the in-process scan vs forward-pass table")
    ap.add_argument("--startup-only", action="store_true", help="only the start-up tables")
    ap.add_argument("--startup-runs", type=int, default=3, help="start-ups of each server (default: 3)")
    ap.add_argument("--import-top", type=int, default=12, help="rows of each import-time table (default: 12)")
    ap.add_argument("--code", type=Path, metavar="DIR",
                    help="time this checkout's servers (default: this one's), e.g. the commit before")  # fmt: skip
    args = ap.parse_args()
    params = load_params(args.params)

    with tempfile.TemporaryDirectory(prefix="bench-webapp-") as tmp_name:
        tmp = Path(tmp_name)
        model = args.model or str(untrained_model(args.params, tmp / "model.keras"))
        one = demo_png(tmp / "one.png", 1024, 768).read_bytes()
        others = [demo_png(tmp / f"img{i}.png", 1024, 768, index=i + 1).read_bytes() for i in range(args.repeats)]
        if args.startup_only or not args.floor_only:
            model_file = Path(model) if model.endswith(".keras") else untrained_model(args.params, tmp / "m.keras")
            startup(args, args.params.resolve(), model_file, tmp, one)
            if args.startup_only:
                return 0
        overview = overview_png(tmp / "overview.png", args.side).read_bytes()
        batch = args.batch or params.webapp.tile_batch
        floor = scan_vs_forward(model, args.params, overview, tile=args.tile, stride=args.stride, batch=batch,
                                runs=args.floor_runs)  # fmt: skip
        print(f"Tile scan vs its floor, in-process ({args.side}×{args.side} overview, tile {args.tile} stride "
              f"{args.stride}, {floor['n_tiles'][0]:.0f} tiles, batch {batch}; min / median / max of "
              f"{args.floor_runs} interleaved runs; load average {os.getloadavg()[0]:.1f})")  # fmt: skip
        print("| path | throughput |\n|---|---:|")
        print(f"| compiled forward pass on cut tiles (the floor) | {spread(floor['forward'])} images/s |")
        print(f"| `tilescan.scan` (crop, featureless check, cutting, forward, calibration) | "
              f"{spread(floor['scan'])} tiles/s |")  # fmt: skip
        print(f"| scan / floor, per run | {spread(floor['ratio'], '{:.2f}')} × (goal ≥ 0.9×) |")
        medians = statistics.median(floor["scan"]) / statistics.median(floor["forward"])
        best = max(floor["scan"]) / max(floor["forward"])
        print(f"| scan / floor, median over median · best over best | {medians:.2f} × · {best:.2f} × |\n")
        if args.floor_only:
            return 0
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_file = tmp / "web.log"
        cmd = [sys.executable, "-m", "emassist.cli.main", "--params", str(args.params.resolve()), "web", "--host",
               "127.0.0.1", "--port", str(port), "--model", model]  # fmt: skip
        started = time.perf_counter()
        with open(log_file, "wb") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=server_env(), cwd=tmp,
                                    start_new_session=True)  # fmt: skip
        try:
            wait_http(f"{url}/api/health", proc, log_file, timeout=600)
            start_s = time.perf_counter() - started
            cold, first = timed_post(f"{url}/api/classify", one, filename="one.png")
            warm = [timed_post(f"{url}/api/classify", data, filename=f"img{i}.png")[0] for i, data in enumerate(others)]
            cams = []
            for _ in range(min(args.repeats, 5) + 1):
                t0 = time.perf_counter()
                requests.get(f"{url}/api/gradcam/{first['id']}", timeout=120).raise_for_status()
                cams.append(time.perf_counter() - t0)
            scans = []
            n_tiles = 0
            for _ in range(args.scan_repeats):
                elapsed, body = timed_post(f"{url}/api/scan", overview, filename="overview.png", tile=str(args.tile),
                                           stride=str(args.stride), **{"class": params.data.classes[0]})  # fmt: skip
                scans.append(elapsed)
                n_tiles = body["n_tiles"]
        finally:
            stop_process(proc)

    ms = 1000.0
    scan_med = statistics.median(scans)
    rows = [
        ("server start → page answers (model load)", f"{start_s:.1f} s", ""),
        ("first image after start (cold), 1024×768 PNG", f"{cold * ms:.0f} ms", "upload → result JSON"),
        (f"one image, warm (median of {len(warm)})", f"{statistics.median(warm) * ms:.0f} ms",
         f"p95 {np.percentile(warm, 95) * ms:.0f} ms"),
        ("Grad-CAM, first call", f"{cams[0] * ms:.0f} ms", "builds the gradient model"),
        (f"Grad-CAM, warm (median of {len(cams) - 1})", f"{statistics.median(cams[1:]) * ms:.0f} ms", ""),
        (f"tile scan {args.side}×{args.side}, tile {args.tile} stride {args.stride} (median of {len(scans)})",
         f"{scan_med:.1f} s", f"{n_tiles} tiles, {n_tiles / scan_med:.0f} tiles/s"),
    ]  # fmt: skip
    load = os.getloadavg()
    which = model if args.model else "untrained"
    print(f"model: {params.train.model} {params.train.image_size} px ({which}); cpus {os.cpu_count()}; "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")  # fmt: skip
    width = max(len(r[0]) for r in rows)
    print(f"| {'measurement':<{width}} | {'time':>9} | note |")
    print(f"|{'-' * (width + 2)}|{'-' * 10}:|------|")
    for name, value, note in rows:
        print(f"| {name:<{width}} | {value:>9} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
