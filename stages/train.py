"""train: fit the model named in params (simple_cnn | compact_cnn | xception) on the augmented train list, tracked
in MLflow; writes models/."""

import sys

from emassist.pipeline.stagerun import run_stage
from emassist.pipeline.train import main

if __name__ == "__main__":
    sys.exit(run_stage("train", __doc__ or "", main))
