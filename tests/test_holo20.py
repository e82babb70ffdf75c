"""Accuracy on real fan art (../shared/datasets/holo20): slow, skipped when the data is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from animeai.config import DetectorConfig, load_config
from animeai.engine import train
from animeai.inference import Classifier
from animeai.tasks.detector import DetectorTask

HOLO20 = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "holo20"
RECIPE = Path(__file__).resolve().parents[1] / "animeai" / "configs" / "holo20_lite0.yaml"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (HOLO20 / "train").is_dir(), reason=f"real data not found at {HOLO20}"),
]


def test_shipped_recipe_short_run_reaches_90_percent_on_holo20_val(tmp_path):
    # The shipped CPU recipe, shortened to 4 epochs (~3 min on 2 cores); the full run is the benchmark.
    cfg = load_config(DetectorConfig, RECIPE, {
        "data.root": str(HOLO20 / "train"), "data.val_root": str(HOLO20 / "val"), "run.epochs": 4,
        "run.out": str(tmp_path / "holo20.pth"), "run.run_dir": str(tmp_path / "run"), "run.progress": False,
    })
    result = train(cfg, DetectorTask(cfg))
    report = Classifier.from_file(result.model_path).evaluate_folder(HOLO20 / "val")
    assert report["num_images"] == 800
    assert report["top1"] == pytest.approx(result.best_metrics["val_top1"], abs=1e-6)
    assert report["top1"] >= 0.90, report["top1"]
