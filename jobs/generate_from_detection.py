"""Train the generator of one character, guided by the trained detector (local training by default).

    python jobs/generate_from_detection.py --target_class 0 --num_epochs 3000 \
        --detection_model models/character_classifier.pth --data data/all_characters
    python jobs/generate_from_detection.py --smoke-test      # tiny generated data and detector, about a minute
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shipped working dir holds the package

from animeai.generation import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main())
