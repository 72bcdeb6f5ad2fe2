"""validate: Great Expectations suites on the ingest outputs; critical failures stop the pipeline."""

import sys

from emassist.pipeline.stagerun import run_stage
from emassist.pipeline.validate import main

if __name__ == "__main__":
    sys.exit(run_stage("validate", __doc__ or "", main))
