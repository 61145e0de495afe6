"""Where SDPO steps run: here (`local`), on Modal GPUs (`modal`) or on Tinker (`tinker`).

Each is a `StepBackend` (`step_backend.py`); `open_step_backend` is the one place that knows them all, so
the trainer loop and the adapter store know none.
"""

from __future__ import annotations

from claas_ray.adapters.store import AdapterStore
from claas_ray.backends.step_backend import PublishedVersion, StepBackend, StepOutcome, WeightsTrainer
from claas_ray.config import ClaasConfig

__all__ = ["PublishedVersion", "StepBackend", "StepOutcome", "WeightsTrainer", "open_step_backend"]


def open_step_backend(config: ClaasConfig, store: AdapterStore) -> StepBackend:
    """The backend `trainer.backend` names, over the store `store.kind` names."""
    backend = config.trainer.backend
    if backend == "tinker":
        from claas_ray.backends.tinker.trainer import TinkerSDPO  # needs the `tinker` extra

        return TinkerSDPO.from_config(config, store)
    from claas_ray.backends.weights import WeightsStepBackend

    trainer: WeightsTrainer
    if backend == "local":
        from claas_ray.training.step import SDPOTrainer

        trainer = SDPOTrainer(config.model)
    else:
        from claas_ray.backends.modal.client import ModalTrainingBackend

        trainer = ModalTrainingBackend(config)
    import torch

    wire = config.serving.lora_wire_dtype()
    return WeightsStepBackend(trainer, store, config.model.base_model, config.lora.target_modules,
                              colocated=backend == "local", cached_states=config.trainer.max_cached_states,
                              wire_dtype=None if wire is None else getattr(torch, wire))
