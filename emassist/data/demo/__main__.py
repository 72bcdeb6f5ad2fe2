"""``python -m emassist.data.demo --out DIR``: write a synthetic SEM dataset per the demo section of params.yaml."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from emassist.config.settings import ParamsError, load_params
from emassist.data.demo.generate import generate_demo

# command-line option dest -> demo.* key (an option left out takes the params file's value)
OVERRIDES = ("n_images", "width", "height", "seed", "min_per_class", "tif_fraction", "databar_fraction")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m emassist.data.demo",
        description=(
            "Generate deterministic synthetic SEM images of the 10 NFFA morphology classes into "
            "OUT/<Class>/L2_<hex>.{jpg,png,tif}. Class sizes follow the real dataset's ratios with a floor. "
            "OUT is replaced atomically and may only contain class folders from an earlier run. Every setting "
            "defaults to the demo section of the params file (--params, default params.yaml), as in `emassist demo` "
            "and the acquire stage; the options below override one value each."
        ),
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (created or replaced)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    p.add_argument("--n", type=int, dest="n_images", help="total number of images (default: demo.n_images)")
    p.add_argument("--width", type=int, help="image width in pixels (default: demo.width)")
    p.add_argument("--height", type=int, help="image height in pixels (default: demo.height)")
    p.add_argument("--seed", type=int, help="random seed, same seed → byte-identical files (default: demo.seed)")
    p.add_argument("--min-per-class", type=int, help="floor of images per class (default: demo.min_per_class)")
    p.add_argument("--tif-fraction", type=float, help="share written as 16-bit TIFF (default: demo.tif_fraction)")
    p.add_argument(
        "--databar-fraction", type=float, help="share with an instrument data bar (default: demo.databar_fraction)"
    )
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: 0, all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        params = load_params(args.params)
        overrides = {key: getattr(args, key) for key in OVERRIDES if getattr(args, key) is not None}
        demo = dataclasses.replace(params.demo, **overrides)
        demo.check()  # the command-line values go through the same validator as params.yaml's
        counts = generate_demo(args.out, demo, workers=args.workers, progress=not args.quiet)
    except (ParamsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    took = time.perf_counter() - start
    summary = ", ".join(f"{k}={v}" for k, v in counts.items())
    print(f"wrote {sum(counts.values())} images to {args.out} in {took:.1f} s ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
