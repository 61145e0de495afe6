"""CLaaS's names for an adapter (its vLLM name and `-latest` alias) resolve to the adapter's id."""

from __future__ import annotations

import pytest

from claas_ray.adapters.names import AmbiguousAdapterName, claas_name, resolve_adapter_name


def resolver(*adapters: str):
    listed: list[int] = []

    def visible():
        listed.append(1)
        return list(adapters)

    return (lambda name: resolve_adapter_name(name, adapters.__contains__, visible)), listed


def test_claas_name_is_claas_sanitisation():
    assert claas_name("alice/assistant") == "alice-assistant"
    assert claas_name("/a/b/") == "a-b" and claas_name("a b!c") == "a-b-c" and claas_name("///") == "lora"


def test_ids_aliases_and_claas_names():
    resolve, listed = resolver("alice/assistant", "bob/x-latest", "solo")
    assert resolve("alice/assistant") == "alice/assistant" and not listed  # an id never lists the store
    assert resolve("alice/assistant-latest") == "alice/assistant"
    assert resolve("alice-assistant") == "alice/assistant"
    assert resolve("alice-assistant-latest") == "alice/assistant"
    assert resolve("bob/x-latest") == "bob/x-latest"  # an id that ends in -latest is itself first
    assert resolve("solo-latest") == "solo"
    assert resolve("carol-assistant") is None and resolve("../etc") is None and resolve("a/b/c") is None


def test_one_claas_name_for_two_adapters_is_ambiguous():
    resolve, _ = resolver("amb/x-y", "amb-x/y")
    with pytest.raises(AmbiguousAdapterName) as caught:
        resolve("amb-x-y")
    assert caught.value.candidates == ["amb-x/y", "amb/x-y"]
    assert resolve("amb/x-y") == "amb/x-y"  # the id itself is never ambiguous
