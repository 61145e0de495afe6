"""Adapters: ids, their immutable versions on disk, and the tensors a version holds."""

from claas_ray.adapters.ids import AdapterIdError, validate_adapter_id
from claas_ray.adapters.state import AdapterState
from claas_ray.adapters.store import AdapterStore, AdapterVersionMeta, LocalAdapterStore, open_store

__all__ = [
    "AdapterIdError",
    "AdapterState",
    "AdapterStore",
    "AdapterVersionMeta",
    "LocalAdapterStore",
    "open_store",
    "validate_adapter_id",
]
