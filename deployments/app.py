"""`build_app`: a typed config in, the Serve application out. Serve YAMLs name it in `import_path`."""

from __future__ import annotations

import logging
from typing import Any

from ray.serve import Application

from claas_ray.config import ClaasConfig, load_config
from claas_ray.models.registry import resolve_model_path
from claas_ray.serving.auth import ApiKeys
from deployments.inference import InferenceDeployment
from deployments.placement import inference_options, router_options, trainer_options
from deployments.router import Router
from deployments.trainer import TrainerDeployment

logger = logging.getLogger(__name__)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Validate the config (naming any bad key), make sure the base model is pulled, and wire the app."""
    config: ClaasConfig = load_config(args or {})
    keys = ApiKeys(config.auth)  # no keys with auth on, or a bad keys file: refuse to start, naming the key
    if not keys.enabled:
        logger.warning("claas-ray auth is OFF (auth.enabled: false): for local use on 127.0.0.1 only")
    # Pull the local model once here, not concurrently in every replica; on Tinker there is none.
    if config.serving.engine == "vllm":
        resolve_model_path(config.model.base_model)
    plain = config.model_dump(mode="json")
    options = {"inference": inference_options(config), "trainer": trainer_options(config)}
    logger.info("claas-ray deployment options: %s", options)
    trainer = TrainerDeployment.options(**options["trainer"]).bind(plain)
    inference = InferenceDeployment.options(**options["inference"]).bind(plain, trainer)
    return Router.options(**router_options(config)).bind(plain, inference, trainer)
