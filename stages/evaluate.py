"""evaluate: the trained model on the held-out test split: metrics, confusion matrix and most-confused pairs;
reports/ and MLflow."""

import sys

from emassist.pipeline.evaluate import main
from emassist.pipeline.stagerun import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("evaluate", __doc__ or "", main))
