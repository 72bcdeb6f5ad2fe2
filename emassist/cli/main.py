"""``emassist`` command line: the same library code the pipeline stages run, for people at a terminal."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from emassist import __version__
from emassist.cli import batch as cli_batch
from emassist.cli import feedback as cli_feedback
from emassist.cli import models as cli_models
from emassist.cli import monitor as cli_monitor
from emassist.cli import s3 as cli_s3
from emassist.cli import watch as cli_watch
from emassist.cli import web as cli_web
from emassist.config.settings import load_params
from emassist.pipeline.acquire import fetch, generate
from emassist.pipeline.ingest import ingest
from emassist.pipeline.stagerun import error_exit


def _cmd_demo(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    floor = args.min_per_class
    if floor is None and args.n is not None:
        # A smaller --n than the params' floor allows (floor × classes) lowers the floor to what fits, not an error.
        fits = max(1, args.n // len(params.data.classes))
        if params.demo.min_per_class > fits:
            floor = fits
            print(f"note: --n {args.n} is below demo.min_per_class × classes; using a floor of {floor} per class")
    counts = generate(params, args.out, n_images=args.n, width=args.width, height=args.height, seed=args.seed,
                      min_per_class=floor)  # fmt: skip
    print(f"wrote {sum(counts.values())} images to {args.out}")
    for name, n in counts.items():
        print(f"  {name:<30} {n:>6}")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    print(fetch(load_params(args.params), args.out, args.classes).summary())
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    print(ingest(load_params(args.params), args.raw, args.out))
    return 0


def _cmd_repro(args: argparse.Namespace) -> int:
    return subprocess.call([sys.executable, "-m", "dvc", "repro", *args.targets])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emassist",
        description="Electron Microscope Assistant: classify SEM images of nanomaterials by morphology.",
        epilog="Run `emassist COMMAND --help` for the options of a command. Knobs live in params.yaml.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "demo",
        help="generate synthetic SEM demo images in <out>/<Class>/",
        description="Generate deterministic synthetic SEM images for all 10 classes.",
    )
    p.add_argument("--out", type=Path, default=Path("data/raw"), help="output folder (default: data/raw)")
    p.add_argument("--n", type=int, help="number of images (default: demo.n_images)")
    p.add_argument("--width", type=int, help="image width (default: demo.width)")
    p.add_argument("--height", type=int, help="image height (default: demo.height)")
    p.add_argument("--seed", type=int, help="random seed (default: demo.seed)")
    p.add_argument(
        "--min-per-class",
        type=int,
        help="floor of images per class (default: demo.min_per_class, lowered to what fits a smaller --n)",
    )
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "fetch",
        help="download the real NFFA-EUROPE SEM dataset (checksummed, resumable)",
        description="Download, verify (MD5) and safely extract the NFFA-EUROPE SEM dataset tars.",
    )
    p.add_argument("--out", type=Path, default=Path("data/raw"), help="output folder (default: data/raw)")
    p.add_argument("--classes", nargs="+", metavar="CLASS", help="only these classes (default: data.classes)")
    p.set_defaults(func=_cmd_fetch)

    p = sub.add_parser(
        "ingest",
        help="decode, crop data bars and cache images; quarantine unreadable files",
        description="Ingest <raw>/<Class>/* into a manifest, cached PNGs and rejected.csv.",
    )
    p.add_argument("--raw", type=Path, default=Path("data/raw"), help="input folder (default: data/raw)")
    p.add_argument("--out", type=Path, default=Path("data/interim"), help="output folder (default: data/interim)")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser(
        "repro",
        help="rebuild the pipeline with DVC (dvc repro)",
        description="Run `dvc repro` (only stages whose inputs or params changed run).",
    )
    p.add_argument("targets", nargs="*", help="stages to rebuild (default: all)")
    p.set_defaults(func=_cmd_repro)

    cli_models.add_commands(sub)
    cli_s3.add_commands(sub)
    cli_web.add_commands(sub)
    cli_feedback.add_commands(sub)
    cli_monitor.add_commands(sub)
    cli_watch.add_commands(sub)
    cli_batch.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, OSError, RuntimeError) as exc:  # a ParamsError (a ValueError) exits 2, naming the key
        return error_exit(exc, args.params)


if __name__ == "__main__":
    sys.exit(main())
