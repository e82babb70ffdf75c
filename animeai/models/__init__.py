"""Model registry and factory. Importing this package registers the built-in architectures."""

from animeai.models import backbones  # noqa: F401  (registers the backbones)
from animeai.models.registry import ModelSpec, PackageWeights, create_model, get_model_spec, list_models, register_model

__all__ = ["ModelSpec", "PackageWeights", "create_model", "get_model_spec", "list_models", "register_model"]
