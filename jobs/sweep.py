"""Ray Tune sweep over any task's config, search space from YAML, ASHA early stopping.

    ray job submit --working-dir . -- python jobs/sweep.py --sweep animeai/configs/sweep_detector.yaml --data DIR
    python jobs/sweep.py --sweep animeai/configs/sweep_detector.yaml --smoke-test     # local Ray, tiny data
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shipped working dir holds the package

from animeai.distributed.jobs import sweep_job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(sweep_job_main())
