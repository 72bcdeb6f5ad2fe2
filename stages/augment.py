"""augment: grow the rare classes of the train split with augmented copies into data.augmented_dir (val/test
untouched)."""

import sys

from emassist.pipeline.augment import main
from emassist.pipeline.stagerun import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("augment", __doc__ or "", main))
