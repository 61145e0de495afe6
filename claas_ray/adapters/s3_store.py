"""`S3AdapterStore`: the adapter store on S3 (or any S3-compatible server), through boto3.

Layout under `s3://<bucket>/<prefix>/`, mirroring the local store:

    <namespace or @>/<name>/versions/<n>/<upload>/<file>  the version's files, under one upload's own key
    <namespace or @>/<name>/versions/<n>/manifest.json     written last: each file's key, size and SHA-256
    <namespace or @>/<name>/latest                      the current version number

S3 has no rename, so a version is made visible by its manifest instead: objects first, then the manifest
(only if none exists yet: versions are immutable), then `latest`. Each publish writes its objects under a
fresh upload key, so two writers racing for one number cannot overwrite each other's objects: the manifest
that lands first names its own. A publish interrupted before its manifest leaves objects nobody lists or
reads. Reads check every file against the manifest, so a torn or tampered object is an error, not a bad
adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from claas_ray.adapters.ids import validate_adapter_id
from claas_ray.adapters.state import PEFT_FILES
from claas_ray.adapters.store import (
    LATEST_FILE,
    TOP_LEVEL,
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterStore,
)
from claas_ray.config import S3StoreConfig

MANIFEST_FILE = "manifest.json"


class AdapterStoreCorruptError(RuntimeError):
    """An object does not match its version's manifest."""


class S3AdapterStore(AdapterStore):
    """Adapter versions as S3 objects; see the module docstring for the layout and publish order."""

    def __init__(self, bucket: str, prefix: str = "", client=None, cache_dir: str | Path | None = None, **client_args):
        if client is None:
            import boto3

            client = boto3.client("s3", **{k: v for k, v in client_args.items() if v is not None})
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.cache_dir = Path(cache_dir or tempfile.gettempdir()) / "claas-ray-s3" / bucket

    @classmethod
    def from_config(cls, config: S3StoreConfig) -> S3AdapterStore:
        return cls(
            config.bucket, config.prefix, endpoint_url=config.endpoint_url, region_name=config.region,
            cache_dir=config.root_path(),
        )

    # --- keys -------------------------------------------------------------------------------
    def _adapter_key(self, adapter_id: str) -> str:
        namespace, _, name = validate_adapter_id(adapter_id).rpartition("/")
        return f"{self.prefix}{namespace or TOP_LEVEL}/{name}/"

    def _version_key(self, adapter_id: str, version: int) -> str:
        return f"{self._adapter_key(adapter_id)}versions/{int(version)}/"

    def _keys(self, prefix: str) -> Iterator[str]:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"]

    def _get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def _put(self, key: str, data: bytes, only_if_absent: bool = False) -> None:
        extra = {"IfNoneMatch": "*"} if only_if_absent else {}
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **extra)

    # --- primitives -------------------------------------------------------------------------
    def list_adapters(self, prefix: str = "") -> list[str]:
        found = []
        for key in self._keys(self.prefix):
            parts = key[len(self.prefix):].split("/")
            if len(parts) == 3 and parts[2] == LATEST_FILE:
                namespace, name = parts[0], parts[1]
                found.append(name if namespace == TOP_LEVEL else f"{namespace}/{name}")
        return sorted(adapter for adapter in found if adapter.startswith(prefix))

    def version_numbers(self, adapter_id: str) -> list[int]:
        versions = f"{self._adapter_key(adapter_id)}versions/"
        complete = []
        for key in self._keys(versions):
            number, _, name = key[len(versions):].partition("/")
            if name == MANIFEST_FILE and number.isdigit():
                complete.append(int(number))
        return sorted(complete)

    def _manifest(self, adapter_id: str, version: int) -> dict[str, dict]:
        raw = self._get(self._version_key(adapter_id, version) + MANIFEST_FILE)
        if raw is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} has no version {version}")
        return json.loads(raw)["files"]

    def read_files(self, adapter_id: str, version: int, names: Iterable[str] | None = None) -> dict[str, bytes]:
        manifest = self._manifest(adapter_id, version)
        wanted = sorted(manifest) if names is None else list(names)
        missing = [name for name in wanted if name not in manifest]
        if missing:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} version {version} lacks {missing}")
        files = {}
        for name in wanted:
            data = self._get(manifest[name]["key"])
            if data is None or hashlib.sha256(data).hexdigest() != manifest[name]["sha256"]:
                raise AdapterStoreCorruptError(
                    f"adapter {adapter_id!r} version {version}: {name} is missing or does not match its manifest"
                )
            files[name] = data
        return files

    def _write_version(self, adapter_id: str, version: int, files: dict[str, bytes]) -> None:
        key = self._version_key(adapter_id, version)
        if self._get(key + MANIFEST_FILE) is not None:
            raise AdapterExistsError(f"adapter {adapter_id!r} version {version} already exists")
        upload = f"{key}{uuid.uuid4().hex}/"
        manifest = {}
        for name, data in files.items():
            self._put(upload + name, data)
            manifest[name] = {"key": upload + name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        try:
            self._put(key + MANIFEST_FILE, json.dumps({"files": manifest}, indent=2).encode(), only_if_absent=True)
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise AdapterExistsError(f"adapter {adapter_id!r} version {version} already exists") from exc
            raise

    def _read_latest(self, adapter_id: str) -> int | None:
        raw = self._get(self._adapter_key(adapter_id) + LATEST_FILE)
        return None if raw is None else int(raw.decode().strip())

    def _write_latest(self, adapter_id: str, version: int) -> None:
        self._put(self._adapter_key(adapter_id) + LATEST_FILE, str(int(version)).encode())

    def delete(self, adapter_id: str) -> bool:
        prefix = self._adapter_key(adapter_id)
        if self._get(prefix + LATEST_FILE) is None and not any(True for _ in self._keys(prefix)):
            return False
        # The pointer goes first, so the adapter disappears at once even if removing its objects is slow.
        self.client.delete_object(Bucket=self.bucket, Key=prefix + LATEST_FILE)
        keys = list(self._keys(prefix))
        for start in range(0, len(keys), 1000):
            self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in keys[start:start + 1000]], "Quiet": True}
            )
        return True

    def peft_dir(self, adapter_id: str, version: int) -> Path:
        """A local copy of the version's PEFT files (versions are immutable, so a cached copy stays valid)."""
        folder = self.cache_dir / self._version_key(adapter_id, version).rstrip("/")
        if all((folder / name).is_file() for name in PEFT_FILES):
            return folder
        files = self.read_files(adapter_id, version, PEFT_FILES)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder.parent))
        for name, data in files.items():
            (staging / name).write_bytes(data)
        try:
            os.rename(staging, folder)
        except OSError:  # another reader cached it first; theirs is the same bytes
            for name in files:
                (staging / name).unlink()
            staging.rmdir()
        return folder
