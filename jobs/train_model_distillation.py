"""Distil the character detector into a small student on a Ray cluster (Ray Train workers, the Accelerate loop).

    ray job submit --working-dir . -- python jobs/train_model_distillation.py --teacher /shared/models/teacher.pth \
        --student mobilenetv2_100 --data /shared/all_characters --num-workers 2 --out /shared/models/student.pth \
        --storage-path /shared/ray
    python jobs/train_model_distillation.py --smoke-test   # local Ray: tiny teacher + tiny generated data
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shipped working dir holds the package

from animeai.distributed.jobs import train_job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_job_main("distill"))
