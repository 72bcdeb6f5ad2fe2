"""The pipeline's stages in order, by name: what `dvc repro` runs (stages/<name>.py) and the Prefect flows call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from emassist.config.settings import Params
from emassist.pipeline import acquire, augment, evaluate, ingest, register, split, train, validate

#: ``name → step``: each takes the loaded params and does the stage's whole job (the same call ``python -m
#: stages.<name>`` makes through ``run_stage``).
STEPS: dict[str, Callable[[Params], Any]] = {
    "acquire": acquire.main,
    "ingest": ingest.main,
    "validate": validate.main,
    "split": split.main,
    "augment": augment.main,
    "train": train.main,
    "evaluate": evaluate.main,
    "register": register.main,
}
