"""Which LoRA request serves which adapter version on one replica.

Every (adapter id, version) gets its own vLLM `lora_int_id` and name. vLLM keys its prefix cache and its
adapter cache by these, so a new version can never reuse KV blocks or weights of an older one, and a
request in flight keeps the version it started with while newer requests get the new one.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from vllm.lora.request import LoRARequest


class LoraVersions:
    """A bounded map (adapter id, version) -> LoRARequest, with paths from a resolver.

    `request_for` may resolve a path from the store (an S3 download), so the engine calls it in a thread
    while `cached` answers on the event loop: a lock keeps the map consistent between them.
    """

    def __init__(self, resolve_path: Callable[[str, int], Path], capacity: int = 1024):
        self._resolve_path = resolve_path
        self._capacity = capacity
        self._requests: OrderedDict[tuple[str, int], LoRARequest] = OrderedDict()
        self._ids = itertools.count(1)
        self._paths: dict[tuple[str, int], Path] = {}
        self._lock = threading.Lock()

    def register_path(self, adapter_id: str, version: int, path: Path) -> None:
        """Use a path the replica materialised itself (e.g. tensors from the object store)."""
        with self._lock:
            self._paths[(adapter_id, version)] = path
            self._requests.pop((adapter_id, version), None)

    def cached(self, adapter_id: str, version: int) -> LoRARequest | None:
        """The request if it needs no resolving (no I/O)."""
        with self._lock:
            key = (adapter_id, version)
            request = self._requests.get(key)
            if request is not None:
                self._requests.move_to_end(key)
            return request

    def request_for(self, adapter_id: str, version: int) -> LoRARequest:
        key = (adapter_id, version)
        request = self.cached(adapter_id, version)
        if request is not None:
            return request
        with self._lock:
            path = self._paths.get(key)
        if path is None:
            path = self._resolve_path(adapter_id, version)  # outside the lock: it may download
        with self._lock:
            request = self._requests.get(key)
            if request is None:
                request = LoRARequest(lora_name=f"{adapter_id}@{version}", lora_int_id=next(self._ids), lora_path=str(path))
                self._requests[key] = request
                while len(self._requests) > self._capacity:
                    old_key, _ = self._requests.popitem(last=False)
                    self._paths.pop(old_key, None)
            return request

    def forget(self, adapter_id: str, version: int) -> None:
        """Drop a materialised path; the version falls back to the store's copy if requested again."""
        with self._lock:
            self._paths.pop((adapter_id, version), None)
            self._requests.pop((adapter_id, version), None)
