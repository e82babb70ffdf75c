"""Ray Tune sweep over the generator's loss weights, trials ranked by an independent judge classifier.

    ray job submit --working-dir . -- python jobs/sweep_generator.py --data /shared/all_characters \
        --detection_model /shared/models/character_classifier.pth --judge /shared/models/judge.pth \
        --target_class akari --num-samples 8 --cpus-per-trial 0.5 \
        --out /shared/sweep_generator.json --storage-path /shared/ray
    python jobs/sweep_generator.py --smoke-test      # local Ray, tiny data, detector and judge, 2 trials
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shipped working dir holds the package

from animeai.distributed.fanout import sweep_generator_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(sweep_generator_main())
