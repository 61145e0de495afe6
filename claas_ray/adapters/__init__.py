"""Adapters: ids, their immutable versions on disk, and the tensors a version holds."""

from claas_ray.adapters.ids import AdapterIdError, validate_adapter_id
from claas_ray.adapters.state import AdapterState
from claas_ray.adapters.store import AdapterStore, AdapterVersionMeta, LocalAdapterStore

__all__ = [
    "AdapterIdError",
    "AdapterState",
    "AdapterStore",
    "AdapterVersionMeta",
    "LocalAdapterStore",
    "validate_adapter_id",
]
