"""Where replicas run: the Serve deployment options for inference and the trainer.

Each replica gets a placement group of one bundle holding exactly its resources (STRICT_PACK), so Ray
reserves CPUs/GPUs atomically and never starts a replica it cannot fully place. Custom resources
(`serving.replica_resources`, `trainer.resources`, `router.resources`) pin deployments to the nodes that
offer them: a trainer and the replica it shares a GPU with, or one replica per node. On one shared GPU
(`trainer.colocation: sleep`) both sides ask for a fraction of the same device, vLLM is told to keep
only its share of memory, and the trainer puts vLLM to sleep (level 1: weights offloaded, KV cache
dropped) for the length of each step, then wakes it (see `deployments/trainer.py`).
"""

from __future__ import annotations

from typing import Any

from claas_ray.config import ClaasConfig

Device = tuple[str, frozenset[str]]
"""A Ray worker's GPUs: (node id, GPU ids on that node)."""


def this_device() -> Device | None:
    """The GPUs Ray gave this worker; None without one (the CPU build)."""
    import ray

    context = ray.get_runtime_context()
    gpus = context.get_accelerator_ids().get("GPU", [])
    return (context.get_node_id(), frozenset(gpus)) if gpus else None


def shares_device(a: Device | None, b: Device | None) -> bool:
    """Whether two workers use a GPU in common (same node, a GPU id in common)."""
    return a is not None and b is not None and a[0] == b[0] and bool(a[1] & b[1])


def _placed(cpus: float, gpus: float, resources: dict[str, float]) -> dict[str, Any]:
    """A replica's actor options and its one-bundle group, which holds exactly what the actor takes (custom
    resources included: those pin it to the nodes that offer them)."""
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **resources}
    return {
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus, **_custom(resources)},
        "placement_group_bundles": [bundle],
        "placement_group_strategy": "STRICT_PACK",
    }


def inference_options(config: ClaasConfig) -> dict[str, Any]:
    serving = config.serving
    return {"num_replicas": serving.num_replicas,
            **_placed(serving.replica_num_cpus, serving.replica_num_gpus, serving.replica_resources)}


def trainer_options(config: ClaasConfig) -> dict[str, Any]:
    trainer = config.trainer
    return _placed(trainer.num_cpus, trainer.num_gpus, trainer.resources)


def router_options(config: ClaasConfig) -> dict[str, Any]:
    """The router does no compute: it must never wait for a CPU on a two-core machine."""
    return {"ray_actor_options": {"num_cpus": 0, **_custom(config.router.resources)}}


def _custom(resources: dict[str, float]) -> dict[str, Any]:
    """Ray's `resources` actor option, given only when custom resources are configured."""
    return {"resources": resources} if resources else {}
