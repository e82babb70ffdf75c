"""Train the multimodal fusion classifier (image + text about it) on a Ray cluster (Ray Train workers, the
Accelerate loop).

    ray job submit --working-dir . -- python jobs/multimodal_fusion.py --data /shared/captioned_characters \
        --text-encoder bert-base-uncased --num-workers 2 --out /shared/models/fusion.pth --storage-path /shared/ray
    python jobs/multimodal_fusion.py --smoke-test   # local Ray: tiny captioned characters, offline MiniLM
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shipped working dir holds the package

from animeai.distributed.jobs import train_job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_job_main("fusion"))
