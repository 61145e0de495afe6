"""`TinkerAdapterStore`: adapter ids and versions -> Tinker checkpoint paths, in one local JSON file.

The weights stay on Tinker; a version here is its `tinker.json` (the training-state path, to resume with
the Adam moments, and the sampler path, to serve) and its `meta.json`. It is an `AdapterStore`, so the
router's lifecycle API (list, versions, rollback, delete) works unchanged. The file is replaced atomically
on every change, under a lock file, so the router, the trainer and the replicas may share it.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel

from claas_ray.adapters.ids import validate_adapter_id
from claas_ray.adapters.store import AdapterExistsError, AdapterNotFoundError, AdapterStore

CHECKPOINT_FILE = "tinker.json"


class TinkerCheckpoint(BaseModel):
    state_path: str
    sampler_path: str


class TinkerAdapterStore(AdapterStore):
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    # --- the JSON file ----------------------------------------------------------------------
    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

    @contextmanager
    def _editing(self) -> Iterator[dict]:
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            adapters = self._read()
            yield adapters
            temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            with open(temp, "w") as handle:
                json.dump(adapters, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.path)

    # --- AdapterStore primitives ------------------------------------------------------------
    def list_adapters(self, prefix: str = "") -> list[str]:
        return sorted(k for k, v in self._read().items() if v["latest"] is not None and k.startswith(prefix))

    def version_numbers(self, adapter_id: str) -> list[int]:
        adapter = self._read().get(validate_adapter_id(adapter_id))
        return sorted(int(v) for v in adapter["versions"]) if adapter else []

    def read_files(self, adapter_id: str, version: int, names: Iterable[str] | None = None) -> dict[str, bytes]:
        adapter = self._read().get(validate_adapter_id(adapter_id))
        files = None if adapter is None else adapter["versions"].get(str(int(version)))
        if files is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} has no version {version}")
        wanted = sorted(files) if names is None else list(names)
        missing = [name for name in wanted if name not in files]
        if missing:
            raise AdapterNotFoundError(
                f"adapter {adapter_id!r} lives on Tinker: version {version} has no {', '.join(missing)} here"
            )
        return {name: files[name].encode() for name in wanted}

    def _write_version(self, adapter_id: str, version: int, files: dict[str, bytes]) -> None:
        with self._editing() as adapters:
            adapter = adapters.setdefault(adapter_id, {"latest": None, "versions": {}})
            if str(version) in adapter["versions"]:
                raise AdapterExistsError(f"adapter {adapter_id!r} version {version} already exists")
            adapter["versions"][str(version)] = {name: data.decode() for name, data in files.items()}

    def _read_latest(self, adapter_id: str) -> int | None:
        adapter = self._read().get(adapter_id)
        return None if adapter is None else adapter["latest"]

    def _write_latest(self, adapter_id: str, version: int) -> None:
        with self._editing() as adapters:
            adapters[adapter_id]["latest"] = int(version)

    def delete(self, adapter_id: str) -> bool:
        with self._editing() as adapters:
            return adapters.pop(validate_adapter_id(adapter_id), None) is not None

    def peft_dir(self, adapter_id: str, version: int) -> Path:
        raise AdapterNotFoundError(f"adapter {adapter_id!r} lives on Tinker: there are no weights here to load")

    # --- Tinker checkpoints -----------------------------------------------------------------
    def checkpoint(self, adapter_id: str, version: int) -> TinkerCheckpoint:
        return TinkerCheckpoint.model_validate_json(self.read_files(adapter_id, version, [CHECKPOINT_FILE])[CHECKPOINT_FILE])

    @staticmethod
    def checkpoint_files(checkpoint: TinkerCheckpoint) -> dict[str, bytes]:
        return {CHECKPOINT_FILE: checkpoint.model_dump_json().encode()}
