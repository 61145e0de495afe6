"""Base models: a small registry of names, and the pull that makes one loadable offline."""

from claas_ray.models.pull import pull_model
from claas_ray.models.registry import REGISTRY, RegisteredModel, resolve_model_path

__all__ = ["REGISTRY", "RegisteredModel", "pull_model", "resolve_model_path"]
