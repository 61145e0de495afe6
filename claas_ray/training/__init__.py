"""SDPO training: the loss (pure math), the teacher's hindsight context, and one guarded step."""

from claas_ray.chat import ChatMessage
from claas_ray.training.example import TrainingExample
from claas_ray.training.sdpo_loss import TeacherTopK, generalized_jsd, sdpo_loss, teacher_topk
from claas_ray.training.step import SDPOTrainer, StepResult

__all__ = [
    "ChatMessage",
    "SDPOTrainer",
    "StepResult",
    "TeacherTopK",
    "TrainingExample",
    "generalized_jsd",
    "sdpo_loss",
    "teacher_topk",
]
