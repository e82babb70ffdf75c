"""Train the character detector on a Ray cluster (Ray Train workers running the Accelerate loop).

    ray job submit --working-dir . -- python jobs/train_detector.py --data data/all_characters --num-workers 2
    python jobs/train_detector.py --smoke-test          # local Ray, tiny generated data, about a minute
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shipped working dir holds the package

from animeai.distributed.jobs import train_job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_job_main("detector"))
