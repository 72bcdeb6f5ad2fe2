"""register: log the serving pyfunc into the training run, register it (challenger) and gate it against the champion."""

import sys

from emassist.pipeline.register import main
from emassist.pipeline.stagerun import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("register", __doc__ or "", main))
