"""`AdapterStore`: immutable, numbered adapter versions with a `latest` pointer.

The interface is written in terms of whole files (bytes), so an object store can implement it with the
same semantics: a version becomes visible only once complete, and `latest` moves only after that.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, Field

from claas_ray.adapters.ids import validate_adapter_id
from claas_ray.adapters.state import PEFT_FILES, AdapterState

META_FILE = "meta.json"
TOP_LEVEL = "@"
LATEST_FILE = "latest"


class AdapterExistsError(FileExistsError):
    """Creating an adapter (or a version) that is already there."""


class AdapterNotFoundError(FileNotFoundError):
    """An adapter id or version the store does not have."""


class AdapterVersionMeta(BaseModel):
    """What one version is and where it came from."""

    adapter_id: str
    version: int = Field(ge=0)
    parent_version: int | None = None
    base_model: str
    created_at: float = Field(default_factory=time.time)
    feedback_ids: list[str] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)
    note: str = ""


class AdapterStore(ABC):
    """Storage of adapter versions; subclasses provide the byte-level primitives."""

    # --- primitives -------------------------------------------------------------------------
    @abstractmethod
    def list_adapters(self, prefix: str = "") -> list[str]:
        """Ids of adapters with at least one complete version, sorted."""

    @abstractmethod
    def version_numbers(self, adapter_id: str) -> list[int]:
        """Complete versions of an adapter, ascending."""

    @abstractmethod
    def read_files(self, adapter_id: str, version: int, names: Iterable[str] | None = None) -> dict[str, bytes]:
        """Files of one version (all of them when `names` is None)."""

    @abstractmethod
    def _write_version(self, adapter_id: str, version: int, files: dict[str, bytes]) -> None:
        """Write every file of a new version so that it appears all at once, or raise AdapterExistsError."""

    @abstractmethod
    def _read_latest(self, adapter_id: str) -> int | None:
        """The `latest` pointer, or None if the adapter does not exist."""

    @abstractmethod
    def _write_latest(self, adapter_id: str, version: int) -> None:
        """Move the `latest` pointer atomically."""

    @abstractmethod
    def delete(self, adapter_id: str) -> bool:
        """Remove an adapter and all versions; False if it was not there."""

    @abstractmethod
    def peft_dir(self, adapter_id: str, version: int) -> Path:
        """A local folder holding the version's PEFT files, for loaders that need a path."""

    # --- semantics shared by every backend --------------------------------------------------
    def exists(self, adapter_id: str) -> bool:
        return self._read_latest(validate_adapter_id(adapter_id)) is not None

    def latest_version(self, adapter_id: str) -> int:
        version = self._read_latest(validate_adapter_id(adapter_id))
        if version is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} does not exist")
        return version

    def read_meta(self, adapter_id: str, version: int) -> AdapterVersionMeta:
        raw = self.read_files(validate_adapter_id(adapter_id), version, [META_FILE])[META_FILE]
        return AdapterVersionMeta.model_validate_json(raw)

    def list_versions(self, adapter_id: str) -> list[AdapterVersionMeta]:
        validate_adapter_id(adapter_id)
        return [self.read_meta(adapter_id, version) for version in self.version_numbers(adapter_id)]

    def create(self, adapter_id: str, state: AdapterState, note: str = "initial zero-effect adapter") -> AdapterVersionMeta:
        """Write version 0 of a new adapter; AdapterExistsError if the id is taken."""
        validate_adapter_id(adapter_id)
        if self.version_numbers(adapter_id):
            raise AdapterExistsError(f"adapter {adapter_id!r} already exists")
        meta = AdapterVersionMeta(adapter_id=adapter_id, version=0, base_model=state.base_model, note=note)
        return self._publish(meta, state)

    def next_version(self, adapter_id: str) -> int:
        """The number the next `publish` will use: one past the highest existing version."""
        existing = self.version_numbers(validate_adapter_id(adapter_id))
        if not existing:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} does not exist")
        return existing[-1] + 1

    def publish(
        self,
        adapter_id: str,
        state: AdapterState,
        parent_version: int,
        feedback_ids: list[str] | None = None,
        metrics: dict[str, float] | None = None,
        version: int | None = None,
        note: str = "",
    ) -> AdapterVersionMeta:
        """Write the next version and point `latest` at it.

        `version`, when given, must be the next number (as `next_version` said); a concurrent writer that
        took it first makes this raise AdapterExistsError instead of silently renumbering.
        """
        meta = AdapterVersionMeta(
            adapter_id=adapter_id,
            version=self.next_version(adapter_id) if version is None else version,
            parent_version=parent_version,
            base_model=state.base_model,
            feedback_ids=list(feedback_ids or []),
            metrics=dict(metrics or {}),
            note=note,
        )
        return self._publish(meta, state)

    def _publish(self, meta: AdapterVersionMeta, state: AdapterState) -> AdapterVersionMeta:
        return self.publish_files(meta, state.to_files())

    def publish_files(self, meta: AdapterVersionMeta, files: dict[str, bytes]) -> AdapterVersionMeta:
        """Write a version's files and its meta, then move `latest`: the commit order every backend keeps."""
        files = {**files, META_FILE: meta.model_dump_json(indent=2).encode()}
        self._write_version(meta.adapter_id, meta.version, files)
        self._write_latest(meta.adapter_id, meta.version)
        return meta

    def rollback(self, adapter_id: str, version: int) -> AdapterVersionMeta:
        """Point `latest` back at an existing version; later versions stay for the record."""
        if version not in self.version_numbers(validate_adapter_id(adapter_id)):
            raise AdapterNotFoundError(f"adapter {adapter_id!r} has no version {version}")
        self._write_latest(adapter_id, version)
        return self.read_meta(adapter_id, version)

    def load_state(self, adapter_id: str, version: int | None = None) -> tuple[AdapterState, AdapterVersionMeta]:
        version = self.latest_version(adapter_id) if version is None else version
        files = self.read_files(adapter_id, version)
        meta = AdapterVersionMeta.model_validate_json(files.pop(META_FILE))
        return AdapterState.from_files(files), meta

    def export_files(self, adapter_id: str, version: int | None = None) -> dict[str, bytes]:
        """The PEFT files of a version (latest by default), as a client would download them."""
        version = self.latest_version(adapter_id) if version is None else version
        return self.read_files(adapter_id, version, PEFT_FILES)


class LocalAdapterStore(AdapterStore):
    """Adapters as folders: `<root>/<namespace>/<name>/versions/<n>/...` and `.../<name>/latest`.

    Ids without a namespace live under `@`, a character ids cannot contain, so `alice` and
    `alice/versions` can never share a folder.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)

    def _adapter_dir(self, adapter_id: str) -> Path:
        namespace, _, name = validate_adapter_id(adapter_id).rpartition("/")
        return self.root / (namespace or TOP_LEVEL) / name

    def _version_dir(self, adapter_id: str, version: int) -> Path:
        return self._adapter_dir(adapter_id) / "versions" / str(int(version))

    def list_adapters(self, prefix: str = "") -> list[str]:
        found = []
        for latest in self.root.glob(f"*/*/{LATEST_FILE}"):
            namespace, name = latest.parent.parent.name, latest.parent.name
            if namespace.startswith(".") or name.startswith("."):
                continue  # staging or deleted folders
            found.append(name if namespace == TOP_LEVEL else f"{namespace}/{name}")
        return sorted(adapter for adapter in found if adapter.startswith(prefix))

    def version_numbers(self, adapter_id: str) -> list[int]:
        versions = self._adapter_dir(adapter_id) / "versions"
        if not versions.is_dir():
            return []
        return sorted(int(entry.name) for entry in versions.iterdir() if entry.name.isdigit())

    def read_files(self, adapter_id: str, version: int, names: Iterable[str] | None = None) -> dict[str, bytes]:
        folder = self._version_dir(adapter_id, version)
        if not folder.is_dir():
            raise AdapterNotFoundError(f"adapter {adapter_id!r} has no version {version}")
        paths = [folder / name for name in names] if names is not None else sorted(folder.iterdir())
        missing = [path.name for path in paths if not path.is_file()]
        if missing:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} version {version} lacks {missing}")
        return {path.name: path.read_bytes() for path in paths}

    def _write_version(self, adapter_id: str, version: int, files: dict[str, bytes]) -> None:
        target = self._version_dir(adapter_id, version)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
        try:
            for name, data in files.items():
                with open(staging / name, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            os.chmod(staging, 0o755)
            try:
                os.rename(staging, target)  # fails if the version exists: versions are immutable
            except OSError as exc:
                raise AdapterExistsError(f"adapter {adapter_id!r} version {version} already exists") from exc
            _fsync_dir(target.parent)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _read_latest(self, adapter_id: str) -> int | None:
        try:
            return int((self._adapter_dir(adapter_id) / LATEST_FILE).read_text().strip())
        except FileNotFoundError:
            return None

    def _write_latest(self, adapter_id: str, version: int) -> None:
        folder = self._adapter_dir(adapter_id)
        temp = folder / f".{LATEST_FILE}.{uuid.uuid4().hex}"
        with open(temp, "w") as handle:
            handle.write(str(version))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, folder / LATEST_FILE)
        _fsync_dir(folder)

    def delete(self, adapter_id: str) -> bool:
        folder = self._adapter_dir(adapter_id)
        if not folder.exists():
            return False
        # Rename first so the adapter disappears at once, even if removing its files takes a while.
        trash = self.root / f".deleted-{uuid.uuid4().hex}"
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def peft_dir(self, adapter_id: str, version: int) -> Path:
        folder = self._version_dir(adapter_id, version)
        if not folder.is_dir():
            raise AdapterNotFoundError(f"adapter {adapter_id!r} has no version {version}")
        return folder


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

