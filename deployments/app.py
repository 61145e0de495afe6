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


def refuse_node_local_state_on_a_cluster(config: ClaasConfig) -> None:
    """A cluster with several nodes may place the router, the trainer and the replicas on different ones: state in a
    node's files would then split (feedback never trained, adapters 404 off the trainer's node)."""
    import ray

    if config.multi_node or not ray.is_initialized():
        return
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) > 1 and config.node_local_state():
        raise ValueError(f"this Ray cluster has {len(nodes)} nodes, but {' and '.join(config.node_local_state())}: "
                         "deployments on different nodes would not see the same state. Use store.kind: s3, "
                         "journal.kind: postgres and multi_node: true (configs/cluster.yaml)")


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Validate the config (naming any bad key), make sure the base model is pulled, and wire the app."""
    config: ClaasConfig = load_config(args or {})
    refuse_node_local_state_on_a_cluster(config)
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
