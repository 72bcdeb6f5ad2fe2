"""What reading the pixel size off the data bar costs: OCR + scale-bar time per image, and ingest with and without it.

Generates ``--n`` demo images that all carry a data bar (256×256 by default, the demo's size), then measures, each
``--repeats`` times (min / median / max):

* per image, in this process: :func:`emassist.data.scalebar.read_databar` on the bar rows ingest cuts off (Tesseract
  through tesserocr, the scale-bar measurement and the parsing);
* ``run_ingest`` with all cores, ``read_databar`` off and on (runs alternating), images/s and the ratio on / off.

    python bench/bench_ocr.py --n 200 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from emassist.config.classes import CLASSES  # noqa: E402
from emassist.config.settings import DemoParams  # noqa: E402
from emassist.data.demo.generate import generate_demo  # noqa: E402
from emassist.data.ingest import run_ingest  # noqa: E402
from emassist.data.preprocess import Preprocessor  # noqa: E402
from emassist.data.scalebar import engine_available, read_databar  # noqa: E402


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def bars(raw: Path) -> list[tuple[object, int]]:
    """The data-bar rows (as ingest cuts them off) and the image width of every generated image."""
    pre = Preprocessor(256, True, 10**8, 16)
    out = []
    for path in sorted(raw.rglob("*.*")):
        decoded = pre.decode(path)
        _, rows = pre.crop(decoded.gray)
        if rows:
            out.append((decoded.gray[decoded.height - rows :], decoded.width))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="demo images, all with a data bar (default: 200)")
    ap.add_argument("--side", type=int, default=256, help="image side in pixels (default: 256)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    why = engine_available()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-ocr-") as tmp_name:
        tmp = Path(tmp_name)
        demo = DemoParams(n_images=args.n, width=args.side, height=args.side, seed=5, min_per_class=1,
                          tif_fraction=0.1, databar_fraction=1.0)  # fmt: skip
        generate_demo(tmp / "raw", demo, progress=False)
        found = bars(tmp / "raw")
        per_image: list[float] = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for bar, width in found:
                read_databar(bar, width)  # type: ignore[arg-type]
            per_image.append(1000 * (time.perf_counter() - t0) / len(found))
        rates: dict[bool, list[float]] = {False: [], True: []}
        for run in range(args.repeats):
            for on in (False, True) if run % 2 == 0 else (True, False):
                out = tmp / f"out-{run}-{on}"
                t0 = time.perf_counter()
                run_ingest(tmp / "raw", out, classes=CLASSES, cache_size=256, max_pixels=10**8, min_side=16,
                           crop_databar=True, progress=False, read_databar=on)  # fmt: skip
                rates[on].append(args.n / (time.perf_counter() - t0))
                shutil.rmtree(out)
    ratio = [on / off for on, off in zip(rates[True], rates[False], strict=True)]
    load = os.getloadavg()[0]
    print(f"{args.n} demo images {args.side}×{args.side}, every one with a data bar ({len(found)} bars found); "
          f"{os.cpu_count()} CPUs, load average {load:.1f}; min / median / max of {args.repeats} runs")  # fmt: skip
    print("| measurement | figure |\n|---|---:|")
    print(f"| OCR + scale bar per image, 1 process | {spread(per_image)} ms |")
    print(f"| ingest, `read_databar: false` | {spread(rates[False])} images/s |")
    print(f"| ingest, `read_databar: true` | {spread(rates[True])} images/s |")
    print(f"| ingest on / off, per run | {spread(ratio, '{:.2f}')} × |")
    share = [1 - r for r in ratio]
    print(f"| share of ingest time spent on the bar (1 - ratio) | {spread([100 * s for s in share], '{:.0f}')} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
