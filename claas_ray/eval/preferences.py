"""Preferences to teach (feedback text, prompts, a programmatic verifier), shipped as YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

DATA = Path(__file__).parent / "data"
SHIPPED = ("no_emoji", "concise", "identity", "language", "bullets", "formal")


class VerifierSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["no_emoji", "concise", "mentions", "language", "bullets", "no_contractions"]
    max_sentences: int = 2
    min_items: int = 2
    min_words: int = 1
    words: list[str] = Field(default_factory=list)
    language: str = "fr"


class References(BaseModel):
    """A compliant and a non-compliant answer to one prompt: their log-prob margin tracks learning."""

    prompt: str
    compliant: str
    non_compliant: str


class Preference(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    feedback: str
    system: str | None = Field(None, description="A system prompt for every conversation, e.g. a persona to correct.")
    history: list[dict[str, str]] = Field(
        default_factory=list, description="Earlier turns every conversation starts with (after the system prompt)."
    )
    training_prompts: list[str] = Field(min_length=1)
    heldout_prompts: list[str] = Field(min_length=1)
    verifier: VerifierSpec
    references: References
    about_length: bool = Field(False, description="The preference changes answer length, so length is not a capability.")

    def conversation(self, prompt: str) -> list[dict[str, str]]:
        """The messages a user sends for one prompt: the system prompt and earlier turns, if any, then the prompt."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history, {"role": "user", "content": prompt}]


def load_preference(name_or_path: str) -> Preference:
    """A shipped preference by name, or a YAML file of the same shape."""
    path = Path(name_or_path)
    if not path.exists():
        path = DATA / f"{name_or_path}.yaml"
    if not path.exists():
        raise ValueError(f"unknown preference {name_or_path!r}; shipped: {', '.join(SHIPPED)}")
    spec = yaml.safe_load(path.read_text())
    prompts = yaml.safe_load((path.parent / spec.pop("prompts")).read_text())
    training, heldout = prompts["training"], prompts["heldout"]
    if set(training) & set(heldout):
        raise ValueError(f"{path}: a held-out prompt is also a training prompt")
    return Preference(training_prompts=training, heldout_prompts=heldout, **spec)


class Capability(BaseModel):
    texts: list[dict[str, str]]
    questions: list[dict]


def load_capability() -> Capability:
    return Capability(**yaml.safe_load((DATA / "capability.yaml").read_text()))
