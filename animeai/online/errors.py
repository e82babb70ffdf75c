"""Error types of the online-learning system (all ``ValueError``: the CLI prints them as ``error: ...``)."""

from __future__ import annotations


class OnlineError(ValueError):
    """Bad input to the online-learning system (a role name, images, a model or database that does not fit).

    Raised before anything changes: the model and the database stay exactly as they were, in memory and on disk."""


class FeatureDBError(OnlineError):
    """A feature-database folder that cannot be used (damaged, other format version, built by another model)."""
