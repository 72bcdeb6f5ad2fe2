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

    python bench/bench_webapp.py [--repeats 10] [--scan-repeats 3] [--tile 256] [--stride 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    args = ap.parse_args()
    params = load_params(args.params)

    with tempfile.TemporaryDirectory(prefix="bench-webapp-") as tmp_name:
        tmp = Path(tmp_name)
        model = args.model or str(untrained_model(args.params, tmp / "model.keras"))
        one = demo_png(tmp / "one.png", 1024, 768).read_bytes()
        others = [demo_png(tmp / f"img{i}.png", 1024, 768, index=i + 1).read_bytes() for i in range(args.repeats)]
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
        print(f"| scan / floor, per run | {spread(floor['ratio'], '{:.2f}')} × (goal ≥ 0.9×) |\n")
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
