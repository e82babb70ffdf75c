"""Train one generator per character concurrently on a Ray cluster (one Ray task per character).

    ray job submit --working-dir . -- python jobs/train_generators.py --classes all \
        --detection_model /shared/models/character_classifier.pth --data /shared/all_characters \
        --out-dir /shared/models/generators --runs-dir /shared/runs/generators --samples-dir /shared/generated_images \
        --cpus-per-generator 0.5 --gpus-per-generator 0.25 --num_epochs 3000
    python jobs/train_generators.py --smoke-test      # local Ray, tiny data and detector, 3 characters
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shipped working dir holds the package

from animeai.distributed.fanout import train_generators_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_generators_main())
