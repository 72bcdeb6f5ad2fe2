"""The register step: log the serving pyfunc into the training run, register it (challenger), gate it.

Writes ``reports/registry.json`` (version, aliases, the gate's decision).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from emassist.config.settings import Params
from emassist.core.atomic import atomic_open
from emassist.data.dataset import DatasetError
from emassist.model.registry import RegistryError, register_and_gate
from emassist.pipeline.stagerun import StageError

REPORT = Path("reports/registry.json")


def main(params: Params) -> dict[str, Any]:
    try:
        mv, decision = register_and_gate(params)
    except (RegistryError, DatasetError) as exc:
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
    return report
