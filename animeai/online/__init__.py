"""Online learning: add characters to a trained classifier without retraining, backed by a FAISS role database.

``OnlineLearningSystem`` (:mod:`animeai.online.system`) and ``FeatureDB`` (:mod:`animeai.online.feature_db`)
need the ``online`` extra (``pip install -e ".[online]"``, faiss-cpu); importing this package does not.
"""

from __future__ import annotations

from animeai.online.errors import FeatureDBError, OnlineError

__all__ = ["FeatureDB", "FeatureDBError", "OnlineError", "OnlineLearningSystem"]


def __getattr__(name: str):
    if name == "OnlineLearningSystem":
        from animeai.online.system import OnlineLearningSystem

        return OnlineLearningSystem
    if name == "FeatureDB":
        from animeai.online.feature_db import FeatureDB

        return FeatureDB
    raise AttributeError(name)
