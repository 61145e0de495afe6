"""The tensors that make up one adapter version, and their PEFT file format.

The student weights are written exactly as PEFT saves them (`adapter_config.json` +
`adapter_model.safetensors`), so vLLM and PEFT load a version folder directly. The EMA teacher and the
AdamW moments sit beside them as safetensors too: nothing in a version is a pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from claas_ray.config import LoraConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TEACHER_WEIGHTS = "teacher.safetensors"
OPTIMIZER_STATE = "optimizer.safetensors"
LEARNED_FEEDBACK = "learned_feedback.json"
PEFT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)


def peft_adapter_config(lora: LoraConfig, base_model: str) -> dict:
    """The `adapter_config.json` PEFT and vLLM expect for a plain LoRA."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(lora.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }


@dataclass
class AdapterState:
    """Student weights (PEFT keys), EMA teacher weights and optimizer moments of one adapter version, and the
    feedback texts it was taught (oldest first), which the teacher keeps in view when it teaches the next."""

    lora: LoraConfig
    base_model: str
    student: dict[str, torch.Tensor]
    teacher: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)
    learned_feedback: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.student:
            raise ValueError("an adapter state needs student weights")
        if self.teacher and self.teacher.keys() != self.student.keys():
            raise ValueError("teacher and student weights must have the same keys")

    def peft_files(self, dtype: torch.dtype | None = None) -> dict[str, bytes]:
        """Just what a loader needs (vLLM, PEFT, an export): config and student weights, in `dtype` if given (what
        the engine computes in: it would cast them on load anyway, so a broadcast can carry half the bytes)."""
        student = _contiguous(self.student)
        if dtype is not None:
            student = {name: tensor.to(dtype) for name, tensor in student.items()}
        return {
            ADAPTER_CONFIG: json.dumps(peft_adapter_config(self.lora, self.base_model), indent=2).encode(),
            ADAPTER_WEIGHTS: save_safetensors(student),
        }

    def to_files(self) -> dict[str, bytes]:
        files = self.peft_files()
        if self.teacher:
            files[TEACHER_WEIGHTS] = save_safetensors(_contiguous(self.teacher))
        if self.optimizer:
            files[OPTIMIZER_STATE] = save_safetensors(_contiguous(self.optimizer))
        if self.learned_feedback:
            files[LEARNED_FEEDBACK] = json.dumps(self.learned_feedback, ensure_ascii=False).encode()
        return files

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> AdapterState:
        config = json.loads(files[ADAPTER_CONFIG])
        lora = LoraConfig(
            rank=config["r"],
            alpha=config["lora_alpha"],
            dropout=config.get("lora_dropout", 0.0),
            target_modules=list(config["target_modules"]),
        )
        return cls(
            lora=lora,
            base_model=config.get("base_model_name_or_path", ""),
            student=load_safetensors(files[ADAPTER_WEIGHTS]),
            teacher=load_safetensors(files[TEACHER_WEIGHTS]) if TEACHER_WEIGHTS in files else {},
            optimizer=load_safetensors(files[OPTIMIZER_STATE]) if OPTIMIZER_STATE in files else {},
            learned_feedback=[str(text) for text in json.loads(files[LEARNED_FEEDBACK])] if LEARNED_FEEDBACK in files else [],
        )


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
