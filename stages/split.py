"""split: stratified train/val/test with exact and near duplicates kept in one split."""

import sys

from emassist.pipeline.split import main
from emassist.pipeline.stagerun import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("split", __doc__ or "", main))
