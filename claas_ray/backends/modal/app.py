"""The Modal app that runs SDPO steps on a GPU: `modal deploy -m claas_ray.backends.modal.app`.

Deploy-time settings come from the environment of `modal deploy`:
  CLAAS_RAY_MODAL_APP (default claas-ray-trainer), CLAAS_RAY_MODAL_GPU (default L40S),
  CLAAS_RAY_MODAL_VOLUME (default claas-ray-models, the base model cache).

The class loads the base model on the CPU inside a memory snapshot (so a cold container restores it in
seconds instead of reading it again), moves it to the GPU after the restore, and runs exactly the local
trainer's step (`claas_ray.backends.wire.run_step`) on a batch sent as plain data.
"""


# No `from __future__ import annotations`: Modal reads the class parameters' annotations as real types.
import os
from typing import Any

import modal

APP_NAME = os.environ.get("CLAAS_RAY_MODAL_APP", "claas-ray-trainer")
GPU = os.environ.get("CLAAS_RAY_MODAL_GPU", "L40S")
VOLUME_NAME = os.environ.get("CLAAS_RAY_MODAL_VOLUME", "claas-ray-models")
MODEL_DIR = "/models"

image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install(
        "torch>=2.5", "transformers>=4.46,<5.20", "peft>=0.13", "safetensors>=0.4", "pydantic>=2.6",
        "pyyaml>=6", "gguf>=0.10", "accelerate>=1.0",
    )
    .env({"HF_HOME": f"{MODEL_DIR}/hf", "CLAAS_RAY_HOME": f"{MODEL_DIR}/claas-ray"})
    .add_local_python_source("claas_ray")
)
models = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)
app = modal.App(APP_NAME)


@app.cls(
    image=image,
    gpu=GPU,
    volumes={MODEL_DIR: models},
    enable_memory_snapshot=True,
    timeout=900,
    scaledown_window=300,
)
class SDPOTrainerGPU:
    base_model: str = modal.parameter(default="smollm2-135m")
    max_model_len: int = modal.parameter(default=4096)

    @modal.enter(snap=True)
    def load(self) -> None:
        from claas_ray.config import ModelConfig
        from claas_ray.training.step import SDPOTrainer

        self.trainer = SDPOTrainer(
            ModelConfig(base_model=self.base_model, device="cpu", max_model_len=self.max_model_len)
        )

    @modal.enter(snap=False)
    def to_gpu(self) -> None:
        import torch

        if torch.cuda.is_available():
            self.trainer.to_device("cuda")

    @modal.method()
    def step(self, call: dict[str, Any]) -> dict[str, Any]:
        from claas_ray.backends.wire import run_step

        return run_step(self.trainer, call)

    @modal.method()
    def init_adapter(self, call: dict[str, Any]) -> dict[str, bytes]:
        from claas_ray.backends.wire import run_init

        return run_init(self.trainer, call)

    @modal.method()
    def check_compatible(self, state_files: dict[str, bytes]) -> str | None:
        from claas_ray.backends.wire import run_check

        return run_check(self.trainer, state_files)
