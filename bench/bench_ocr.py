"""What reading the pixel size off the data bar costs: OCR + scale-bar time per image, and ingest with and without it.

Generates ``--n`` demo images that all carry a data bar (256×256 by default, the demo's size), then measures, each
``--repeats`` times (min / median / max):

* per image, in this process: :func:`emassist.data.scalebar.read_databar` on the bar rows ingest cuts off (Tesseract
  through tesserocr, the scale-bar measurement and the parsing), as ingest calls it (the scale bar's label alone
  first) and with ``label_first=False`` (the whole bar first, the version before), and the share of readings within
  5 % of the generator's true pixel size;
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
from emassist.data.demo.generate import generate_demo, plan  # noqa: E402
from emassist.data.ingest import run_ingest  # noqa: E402
from emassist.data.preprocess import Preprocessor  # noqa: E402
from emassist.data.scalebar import engine_available, read_databar  # noqa: E402


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def bars(raw: Path, demo: DemoParams) -> list[tuple[object, int, float]]:
    """The data-bar rows (as ingest cuts them off), the image width and the true pixel size of every generated image."""
    counts = {c: len(list((raw / c).iterdir())) for c in CLASSES}
    truth = {
        f"{j.class_name}/{j.name}": j.pixel_size_nm
        for j in plan(
            raw,
            counts,
            width=demo.width,
            height=demo.height,
            seed=demo.seed,
            tif_fraction=demo.tif_fraction,
            databar_fraction=demo.databar_fraction,
        )
    }
    pre = Preprocessor(256, True, 10**8, 16)
    out = []
    for path in sorted(raw.rglob("*.*")):
        decoded = pre.decode(path)
        _, rows = pre.crop(decoded.gray)
        if rows:
            out.append((decoded.gray[decoded.height - rows :], decoded.width, truth[f"{path.parent.name}/{path.name}"]))
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
        found = bars(tmp / "raw", demo)
        per_image: dict[bool, list[float]] = {True: [], False: []}
        within: dict[bool, float] = {}
        for run in range(args.repeats):
            for label_first in (True, False) if run % 2 == 0 else (False, True):
                t0 = time.perf_counter()
                readings = [read_databar(bar, width, label_first=label_first) for bar, width, _ in found]  # type: ignore[arg-type]
                per_image[label_first].append(1000 * (time.perf_counter() - t0) / len(found))
                close = [r.pixel_size_nm is not None and abs(r.pixel_size_nm / t - 1) <= 0.05
                         for r, (_, _, t) in zip(readings, found, strict=True)]  # fmt: skip
                within[label_first] = 100 * sum(close) / len(close)
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
    print(f"| OCR + scale bar per image, 1 process (label first, as ingest) | {spread(per_image[True])} ms |")
    print(f"| OCR + scale bar per image, 1 process (whole bar first) | {spread(per_image[False])} ms |")
    print(
        f"| bars within 5 % of the true pixel size: label first / whole bar first | {within[True]:.1f} / "
        f"{within[False]:.1f} % |"
    )
    print(f"| ingest, `read_databar: false` | {spread(rates[False])} images/s |")
    print(f"| ingest, `read_databar: true` | {spread(rates[True])} images/s |")
    print(f"| ingest on / off, per run | {spread(ratio, '{:.2f}')} × |")
    share = [1 - r for r in ratio]
    print(f"| share of ingest time spent on the bar (1 - ratio) | {spread([100 * s for s in share], '{:.0f}')} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
