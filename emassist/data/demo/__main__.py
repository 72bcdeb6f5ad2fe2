"""``python -m emassist.data.demo --out DIR --n 100``: write a synthetic SEM dataset."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from emassist.data.demo.generate import generate_demo
from emassist.config.settings import DemoParams


def build_parser() -> argparse.ArgumentParser:
    d = DemoParams()
    p = argparse.ArgumentParser(
        prog="python -m emassist.data.demo",
        description=(
            "Generate deterministic synthetic SEM images of the 10 NFFA morphology classes into "
            "OUT/<Class>/L2_<hex>.{jpg,png,tif}. Class sizes follow the real dataset's ratios with a floor. "
            "OUT is replaced atomically and may only contain class folders from an earlier run."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (created or replaced)")
    p.add_argument("--n", type=int, default=d.n_images, dest="n_images", help="total number of images")
    p.add_argument("--width", type=int, default=d.width, help="image width in pixels")
    p.add_argument("--height", type=int, default=d.height, help="image height in pixels")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (same seed → byte-identical files)")
    p.add_argument("--min-per-class", type=int, default=d.min_per_class, help="floor of images per class")
    p.add_argument("--tif-fraction", type=float, default=d.tif_fraction, help="share written as 16-bit TIFF")
    p.add_argument(
        "--databar-fraction", type=float, default=d.databar_fraction, help="share with an instrument data bar"
    )
    p.add_argument("--workers", type=int, default=0, help="worker processes (0: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        counts = generate_demo(
            args.out,
            n_images=args.n_images,
            width=args.width,
            height=args.height,
            seed=args.seed,
            min_per_class=args.min_per_class,
            tif_fraction=args.tif_fraction,
            databar_fraction=args.databar_fraction,
            workers=args.workers,
            progress=not args.quiet,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    took = time.perf_counter() - start
    summary = ", ".join(f"{k}={v}" for k, v in counts.items())
    print(f"wrote {sum(counts.values())} images to {args.out} in {took:.1f} s ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
