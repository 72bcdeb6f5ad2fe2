"""evaluate: held-out test metrics, confusion matrix and most-confused pairs; reports/ and MLflow."""

from __future__ import annotations

import sys

from emassist.config.settings import Params
from emassist.pipeline.stagerun import run_stage


def main(params: Params) -> None:
    from emassist.model.heldout import evaluate

    evaluate(params)


if __name__ == "__main__":
    sys.exit(run_stage("evaluate", __doc__ or "", main))
