"""The names CLaaS clients use for an adapter, resolved to its id, so they switch without renaming anything.

CLaaS serves `alice/assistant` in vLLM as `alice-assistant` (every run of characters outside
[A-Za-z0-9._-] turned into `-`), and keeps a `<id>-latest` alias. A name is, in order: an adapter id
itself; an id with `-latest` dropped; the one visible adapter whose CLaaS name it is. Two adapters with the
same CLaaS name make it ambiguous: the caller must use an id.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from claas_ray.adapters.ids import AdapterIdError, validate_adapter_id

if TYPE_CHECKING:
    from claas_ray.adapters.store import AdapterStore

LATEST_SUFFIX = "-latest"


class AmbiguousAdapterName(ValueError):
    """A CLaaS name that more than one adapter answers to."""

    def __init__(self, name: str, candidates: list[str]):
        self.candidates = candidates
        super().__init__(f"'{name}' could mean any of {candidates}: use the adapter id")


def claas_name(adapter_id: str) -> str:
    """The name CLaaS gives an adapter in vLLM."""
    return re.sub(r"[^a-zA-Z0-9._-]+", "-", adapter_id.strip("/")).strip("-") or "lora"


def resolve_adapter_name(name: str, exists: Callable[[str], bool], visible: Callable[[], Iterable[str]]) -> str | None:
    """The adapter id that `name` means, or None when it means none.

    `exists` answers for one id (cheap); `visible` lists the adapters the caller may use, read only when
    the name is not an id, since listing a large store is not free.
    """
    base = name.removesuffix(LATEST_SUFFIX)
    for candidate in dict.fromkeys((name, base)):
        try:
            validate_adapter_id(candidate)
        except AdapterIdError:
            continue
        if exists(candidate):
            return candidate
    wanted = {name, base}
    matches = sorted(adapter_id for adapter_id in visible() if claas_name(adapter_id) in wanted)
    if len(matches) > 1:
        raise AmbiguousAdapterName(name, matches)
    return matches[0] if matches else None


def resolve_in_store(name: str, store: AdapterStore, may_use: Callable[[str], bool], namespace: str) -> str | None:
    """`resolve_adapter_name` over a store, seeing only what the caller may use (nothing else leaks)."""
    return resolve_adapter_name(
        name,
        exists=lambda adapter_id: may_use(adapter_id) and store.exists(adapter_id),
        visible=lambda: (adapter_id for adapter_id in store.list_adapters(namespace) if may_use(adapter_id)),
    )
