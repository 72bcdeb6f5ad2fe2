"""register: log the serving pyfunc into the training run, register it (challenger) and gate it against the champion."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from emassist.config.settings import Params
from emassist.core.atomic import atomic_open
from emassist.pipeline.stagerun import StageError, run_stage

REPORT = Path("reports/registry.json")


def main(params: Params) -> None:
    from emassist.model.registry import RegistryError, register_and_gate

    try:
        mv, decision = register_and_gate(params)
    except RegistryError as exc:
        raise StageError(str(exc)) from exc
    report = {
        "name": mv.name,
        "version": str(mv.version),
        "aliases": sorted(mv.aliases or []),
        "run_id": mv.run_id,
        **decision.as_dict(),
    }
    with atomic_open(REPORT) as fh:
        json.dump(report, fh, indent=2)
    print(decision)
    print(f"serve it with: mlflow models serve -m models:/{mv.name}@champion --env-manager local")


if __name__ == "__main__":
    sys.exit(run_stage("register", __doc__ or "", main))
