"""`build_app`: a typed config in, the Serve application out. Serve YAMLs name it in `import_path`."""

from __future__ import annotations

import logging
from typing import Any

from ray.serve import Application

from claas_ray.config import ClaasConfig, load_config
from claas_ray.models.registry import resolve_model_path
from deployments.inference import InferenceDeployment
from deployments.router import Router

logger = logging.getLogger(__name__)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Validate the config (naming any bad key), make sure the base model is pulled, and wire the app."""
    config: ClaasConfig = load_config(args or {})
    resolve_model_path(config.model.base_model)  # pull once here, not concurrently in every replica
    plain = config.model_dump(mode="json")
    inference_options = {
        "num_replicas": config.serving.num_replicas,
        "ray_actor_options": {
            "num_cpus": config.serving.replica_num_cpus,
            "num_gpus": config.serving.replica_num_gpus,
        },
    }
    logger.info("claas-ray inference deployment options: %s", inference_options)
    inference = InferenceDeployment.options(**inference_options).bind(plain)
    return Router.options(ray_actor_options={"num_cpus": 0}).bind(plain, inference)
