"""Adapter ids are user input that becomes a storage path: validate them in exactly one place."""

from __future__ import annotations

import re

_SEGMENT = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_SEGMENTS = 2


class AdapterIdError(ValueError):
    """An adapter id that could escape its namespace or the store's root."""


def validate_adapter_id(adapter_id: str) -> str:
    """Return the id unchanged if it is `name` or `namespace/name` of safe segments, else raise."""
    if not isinstance(adapter_id, str) or not adapter_id:
        raise AdapterIdError("adapter id must be a non-empty string")
    segments = adapter_id.split("/")
    if len(segments) > MAX_SEGMENTS:
        raise AdapterIdError(f"adapter id {adapter_id!r} has more than {MAX_SEGMENTS} segments")
    for segment in segments:
        if not _SEGMENT.match(segment):
            raise AdapterIdError(
                f"adapter id {adapter_id!r}: each segment must be 1-64 characters of [A-Za-z0-9._-]"
            )
        if set(segment) == {"."}:
            raise AdapterIdError(f"adapter id {adapter_id!r}: '.' and '..' are not allowed as segments")
    return adapter_id
