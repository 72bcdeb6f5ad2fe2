"""The register step: log the serving pyfunc into the training run, register it (challenger), gate it, write its card.

Writes ``reports/registry.json`` (version, aliases, the gate's decision) and ``reports/model_card.md``, the new
version's model card (:mod:`emassist.model.card`), which also goes into the run's artifacts (``model_card.md``) and
the version's description.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from emassist.config.settings import Params
from emassist.core.atomic import atomic_open
from emassist.data.dataset import DatasetError
from emassist.model.card import CARD_ARTIFACT, build_card, description_text, gather_facts
from emassist.model.registry import Decision, RegistryError, register_and_gate
from emassist.model.tracking import tracking_client
from emassist.pipeline.stagerun import StageError

REPORT = Path("reports/registry.json")
CARD = Path("reports/model_card.md")


def write_card(params: Params, name: str, version: str, decision: Decision) -> str:
    """Build the card of ``name`` ``version`` from MLflow, write :data:`CARD`, log it to the version's run and put
    it in the version's description; returns the card."""
    from mlflow.exceptions import MlflowException  # lazy: MLflow takes seconds to import

    client = tracking_client(params)
    try:
        facts = gather_facts(client, name, version, decision)
        card = build_card(facts)
        with atomic_open(CARD, "w", encoding="utf-8") as fh:
            fh.write(card)
        if facts.run_id:
            client.log_text(facts.run_id, card, CARD_ARTIFACT)
        client.update_model_version(name, version, description=description_text(facts))
    except (MlflowException, RegistryError) as exc:
        message = getattr(exc, "message", None) or str(exc)
        stored = f"{name} v{version} is registered and gated, but its model card was not stored"
        raise StageError(f"{stored}: {message}") from exc
    return card


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
        "model_card": str(CARD),
    }
    with atomic_open(REPORT) as fh:
        json.dump(report, fh, indent=2)
    write_card(params, mv.name, str(mv.version), decision)
    print(decision)
    print(f"model card: {CARD} (also: emassist models card {mv.version})")
    print(f"serve it with: mlflow models serve -m models:/{mv.name}@champion --env-manager local")
    return report
