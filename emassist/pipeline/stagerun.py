"""Shared entry-point plumbing for ``python -m stages.<name>``: params loading and readable failures.

A stage's body is a step of this package (``emassist.pipeline.<stage>.main``); the files in ``stages/`` only hand it
to :func:`run_stage`. A step turns the library errors a user can act on into :class:`StageError`, so this module
needs nothing from the layers below but the settings. :func:`error_exit` is the one way an entry point (a stage,
the ``emassist`` command, ``python -m pipelines.flows|deploy``) reports such an error: one line and an exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from emassist.config.settings import Params, ParamsError, load_params

log = logging.getLogger("emassist")


class StageError(RuntimeError):
    """A stage cannot do its job; the message says why and what to do."""


def error_exit(exc: Exception, params_path: Path | str, *, prefix: str = "") -> int:
    """Print the one-line message for an error a user can act on and return its exit code.

    A :class:`ParamsError` (a bad value in the params file) is ``error: bad parameter in <params_path>: ...``,
    exit 2; any other error is ``error: <prefix><message>``, exit 1.
    """
    if isinstance(exc, ParamsError):
        print(f"error: bad parameter in {params_path}: {exc}", file=sys.stderr)
        return 2
    print(f"error: {prefix}{exc}", file=sys.stderr)
    return 1


def run_stage(name: str, description: str, body: Callable[[Params], object], argv: list[str] | None = None) -> int:
    """Parse ``--params``, load them (failing before any work on a bad value) and run ``body``."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=description)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("EMASSIST_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        params = load_params(args.params)
        body(params)
    except (ParamsError, StageError, FileNotFoundError) as exc:
        return error_exit(exc, args.params, prefix=f"stage '{name}' failed: ")
    log.info("stage %s finished in %.1f s", name, time.perf_counter() - started)
    return 0
