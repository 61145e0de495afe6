"""`open_store`: the adapter store a config names.

It sits above `claas_ray/adapters/store.py` (the interface) and every implementation, so the interface
depends on none of them.
"""

from __future__ import annotations

from claas_ray.adapters.store import AdapterStore, LocalAdapterStore
from claas_ray.config import LocalStoreConfig, S3StoreConfig, StoreConfig


def open_store(config: StoreConfig) -> AdapterStore:
    if isinstance(config, LocalStoreConfig):
        return LocalAdapterStore(config.root_path())
    if isinstance(config, S3StoreConfig):
        from claas_ray.adapters.s3_store import S3AdapterStore  # needs the `s3` extra (boto3)

        return S3AdapterStore.from_config(config)
    from claas_ray.backends.tinker.store import TinkerAdapterStore

    return TinkerAdapterStore(config.root_path() / "tinker_adapters.json")
