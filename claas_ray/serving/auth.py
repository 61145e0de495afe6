"""Who is calling: bearer tokens to tenants, and what a tenant may touch.

A tenant owns the namespace `tenant/...` of adapter ids and nothing else; an admin key owns all of them.
Keys are compared by their SHA-256 digest, so a keys file may hold digests only. The keys file is
re-read when it changes, so a key is revoked without a restart.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import os
import threading
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from claas_ray.config import ApiKey, AuthConfig, ConfigError, describe_errors

logger = logging.getLogger(__name__)

KEYS_FILE_CHECK_S = 2.0


class Principal(BaseModel):
    """The caller of one request."""

    tenant: str | None = None
    admin: bool = False

    def may_use(self, adapter_id: str) -> bool:
        return self.admin or (self.tenant is not None and adapter_id.startswith(f"{self.tenant}/"))

    def namespace(self) -> str:
        """The adapter-id prefix this caller sees ('' for an admin)."""
        return "" if self.admin else f"{self.tenant}/"

    def describe(self) -> str:
        return "admin" if self.admin else f"tenant '{self.tenant}'"

    def refusal(self) -> str:
        """The 403 message for an adapter id outside this caller's namespace."""
        return f"this key ({self.describe()}) may only use adapters under '{self.namespace()}'"


OPEN_ACCESS = Principal(admin=True)
"""The caller when auth is off: everything is allowed (local use only)."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _read_keys_file(path: Path) -> list[ApiKey]:
    try:
        raw = yaml.safe_load(path.read_text()) or []
    except OSError as exc:
        raise ConfigError(f"invalid claas-ray config: auth.keys_file: cannot read {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid claas-ray config: auth.keys_file: {path} is not YAML: {exc}") from exc
    if not isinstance(raw, list):
        raise ConfigError(f"invalid claas-ray config: auth.keys_file: {path} must hold a YAML list of keys")
    keys = []
    for index, item in enumerate(raw):
        try:
            keys.append(ApiKey.model_validate(item))
        except ValidationError as exc:
            problems = describe_errors(exc, "<entry>")
            raise ConfigError(f"invalid claas-ray config: auth.keys_file: {path} entry {index}: {problems}") from exc
    return keys


class ApiKeys:
    """The key table; `authenticate` turns an Authorization header into a Principal, or None."""

    def __init__(self, config: AuthConfig):
        self.config = config
        self.enabled = config.enabled
        self._path = Path(os.path.expanduser(config.keys_file)) if config.keys_file else None
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._checked = 0.0
        self._table: dict[str, Principal] = {}
        if self.enabled:
            self._reload(force=True)
            if not self._table:
                raise ConfigError(
                    "invalid claas-ray config: auth.keys: auth is enabled but no key is configured; add auth.keys or "
                    "auth.keys_file (see `claas-ray keys new`), or set auth.enabled: false for local use"
                )

    def _reload(self, force: bool = False) -> None:
        keys = list(self.config.keys)
        mtime = None
        if self._path is not None:
            mtime = self._path.stat().st_mtime if self._path.exists() else None
            if not force and mtime == self._mtime:
                return
            if mtime is None and force:
                raise ConfigError(f"invalid claas-ray config: auth.keys_file: {self._path} does not exist")
            keys += _read_keys_file(self._path) if mtime is not None else []
        elif not force:
            return
        table = {key.key_sha256 or digest(key.key or ""): Principal(tenant=key.tenant, admin=key.admin) for key in keys}
        self._table, self._mtime = table, mtime

    async def refresh(self) -> None:
        """Re-read the keys file if it changed (checked every KEYS_FILE_CHECK_S), in a thread: a file read must
        not hold up the event loop; a revoked key stops working within seconds, with no restart."""
        now = time.monotonic()
        if self._path is None or now - self._checked <= KEYS_FILE_CHECK_S:
            return
        self._checked = now
        await asyncio.to_thread(self._reload_keeping_last_good)

    def _reload_keeping_last_good(self) -> None:
        with self._lock:
            try:
                self._reload()
            except (ConfigError, OSError) as exc:  # a half-written file: keep the last good table
                logger.warning("keys file not reloaded: %s", exc)

    def authenticate(self, authorization: str | None) -> Principal | None:
        """`Bearer <key>` (API clients), or `Basic` with the key as password or user (browsers, the dashboard)."""
        if not self.enabled:
            return OPEN_ACCESS
        token = bearer_or_basic_token(authorization)
        if token is None:
            return None
        return self._table.get(digest(token))


def bearer_or_basic_token(authorization: str | None) -> str | None:
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer":
        return credentials or None
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(credentials, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password or user or None
    return None
