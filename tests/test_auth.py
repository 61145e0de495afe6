"""API keys, tenants and namespaces: a tenant sees and uses only `tenant/...`; an admin manages all."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import TENANT_KEYS, sha256_hex

from claas_ray.chat import ChatMessage
from claas_ray.config import AuthConfig, ConfigError
from claas_ray.serving.auth import ApiKeys
from claas_ray.training.teacher import hindsight_messages

ALICE, BOB = TENANT_KEYS["alice"], TENANT_KEYS["bob"]
PROMPT = [{"role": "user", "content": "Name a colour."}]


# --- the key table, without the app --------------------------------------------------------------
def test_keys_map_to_tenants_and_admins(tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump([{"key_sha256": sha256_hex("k" * 20), "tenant": "kim"}]))
    keys = ApiKeys(AuthConfig(keys=[{"key": "a" * 20, "admin": True}], keys_file=str(keys_file)))
    assert keys.authenticate(f"Bearer {'a' * 20}").admin
    kim = keys.authenticate(f"Bearer {'k' * 20}")
    assert kim.tenant == "kim" and not kim.admin and kim.may_use("kim/x") and not kim.may_use("kimberly/x")
    basic = base64.b64encode(f"user:{'k' * 20}".encode()).decode()
    assert keys.authenticate(f"Basic {basic}").tenant == "kim"  # browsers: the key as the password
    for header in (None, "", "Bearer", "Bearer wrong-key-wrong-key", f"Token {'a' * 20}", "Basic !!!"):
        assert keys.authenticate(header) is None, header


def test_auth_on_without_keys_refuses_to_start_and_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"auth\.keys"):
        ApiKeys(AuthConfig())
    with pytest.raises(ConfigError, match=r"auth\.keys_file"):
        ApiKeys(AuthConfig(keys_file=str(tmp_path / "missing.yaml")))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump([{"key_sha256": "not-hex", "tenant": "x"}]))
    with pytest.raises(ConfigError, match=r"auth\.keys_file.*entry 0.*key_sha256"):
        ApiKeys(AuthConfig(keys_file=str(tmp_path / "bad.yaml")))
    assert ApiKeys(AuthConfig(enabled=False)).authenticate(None).admin  # explicitly open: local use


def test_feedback_text_only_reaches_the_teacher_context():
    """Braces, paths and 'settings' in feedback stay text: inserted by replace, never interpreted."""
    hostile = "{feedback} {0.__class__} ../../etc/passwd learning_rate=100 {{config}}"
    messages = [ChatMessage(role="system", content="Be nice."), ChatMessage(role="user", content="Hi")]
    teacher = hindsight_messages(messages, hostile, "\n[hindsight] {feedback}")
    assert teacher[0] == messages[0]
    assert teacher[1].content == "Hi\n[hindsight] " + hostile


# --- on the running app --------------------------------------------------------------------------
def test_requests_without_a_valid_key_are_401(app):
    for headers in ({}, {"authorization": "Bearer sk-nope-nope-nope-nope"}, {"authorization": "Basic Zm9v"}):
        response = httpx.post(f"{app.base_url}/v1/chat/completions", json={"model": "x", "messages": PROMPT},
                              headers=headers, timeout=30)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.headers["www-authenticate"].startswith("Bearer")
    # Unauthenticated requests are refused before their body is even parsed.
    assert httpx.post(f"{app.base_url}/v1/feedback", content=b"{broken", timeout=30).status_code == 401
    assert httpx.get(f"{app.base_url}/health", timeout=30).status_code == 200  # probes need no key


def test_tenants_see_and_use_only_their_namespace(app):
    assert app.request("POST", "/v1/lora/init", key=ALICE, json={"lora_id": "alice/notes"}).status_code == 201
    assert app.request("POST", "/v1/lora/init", key=BOB, json={"lora_id": "bob/notes"}).status_code == 201
    for lora_id in ("bob/mine-now", "notes", "alicex/notes"):
        denied = app.request("POST", "/v1/lora/init", key=ALICE, json={"lora_id": lora_id})
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "permission_denied", denied.text
        assert "alice/" in denied.json()["error"]["message"]

    alice = app.openai(ALICE)
    models = {m.id for m in alice.models.list().data}
    assert "alice/notes" in models and "smollm2-135m" in models and not any(m.startswith("bob/") for m in models)
    assert all(m.startswith("alice/") for m in app.request("GET", "/v1/lora", key=ALICE).json()["loras"])
    assert {"alice/notes", "bob/notes"} <= set(app.request("GET", "/v1/lora").json()["loras"])  # the admin sees all

    reply = alice.chat.completions.create(model="alice/notes", messages=PROMPT, max_tokens=8, temperature=0)
    assert reply.model_extra["claas"]["adapter_id"] == "alice/notes"
    for method, path, body in [
        ("POST", "/v1/chat/completions", {"model": "bob/notes", "messages": PROMPT, "max_tokens": 4}),
        ("POST", "/v1/completions", {"model": "bob/notes", "prompt": "Hi", "max_tokens": 4}),
        ("POST", "/v1/score", {"model": "bob/notes", "prompt": "Hi", "completion": "there"}),
        ("GET", "/v1/lora/bob/notes", None),
        ("GET", "/v1/lora/bob/notes/export", None),
        ("POST", "/v1/lora/bob/notes/rollback", {"version": 0}),
        ("DELETE", "/v1/lora/bob/notes", None),
        ("POST", "/v1/feedback", {"lora_id": "bob/notes", "prompt": "a", "response": "b", "feedback": "c"}),
    ]:
        response = app.request(method, path, key=ALICE, json=body)
        assert response.status_code == 403, (path, response.text)
    assert app.request("GET", "/v1/lora/bob/notes").json()["latest_version"] == 0  # untouched

    # Bob cannot train on, or read about, Alice's conversation.
    stolen = app.request("POST", "/v1/feedback", key=BOB,
                         json={"completion_id": reply.id, "lora_id": "bob/notes", "feedback": "Leak it."})
    assert stolen.status_code == 404 and stolen.json()["error"]["code"] == "completion_not_found"
    mine = app.request("POST", "/v1/feedback", key=ALICE, json={"completion_id": reply.id, "feedback": "Say blue."})
    assert mine.status_code in (200, 202), mine.text
    feedback_id = mine.json()["items"][0]["id"]
    assert app.request("GET", f"/v1/feedback/{feedback_id}", key=BOB).status_code == 404
    assert app.request("GET", f"/v1/feedback/{feedback_id}", key=ALICE).status_code == 200

    for path in ("/metrics", "/dashboard"):  # they name every tenant's adapters
        assert app.request("GET", path, key=ALICE).status_code == 403
        assert app.request("GET", path).status_code == 200


def test_hyperparameters_in_feedback_are_ignored(app):
    """Feedback can carry CLaaS's `training` overrides and setting-like text: the server config wins."""
    assert app.request("POST", "/v1/lora/init", key=ALICE, json={"lora_id": "alice/steady"}).status_code == 201
    hostile = "{feedback} learning_rate=100 store.root=/tmp/evil ../../../etc/passwd {{0.__class__}}"
    response = app.request("POST", "/v1/feedback", key=ALICE, json={
        "lora_id": "alice/steady", "prompt": "Say hi.", "response": "Hi!", "feedback": hostile,
        "training": {"learning_rate": 100.0, "max_kl_to_base": None, "hindsight_template": "{feedback}"}, "wait": True,
    })
    item = response.json()["items"][0]
    assert item["status"] == "applied", item
    config = yaml.safe_load(app.config_path.read_text())["applications"][0]["args"]
    assert item["metrics"]["learning_rate"] == pytest.approx(config.get("training", {}).get("learning_rate", 1e-3))
    assert not Path("/tmp/evil").exists()
    stored = app.store().list_adapters() + [str(path) for path in app.workdir.rglob("*")]  # S3 keys, local caches
    assert not any("evil" in name or "passwd" in name for name in stored), stored
    assert app.request("GET", "/v1/lora/alice/steady", key=ALICE).json()["latest_version"] == 1


def test_a_revoked_key_stops_working_without_a_restart(app):
    carol = "sk-claas-carol-0123456789abcdef"
    entries = yaml.safe_load(app.keys_file.read_text())
    app.keys_file.write_text(yaml.safe_dump([*entries, {"key_sha256": sha256_hex(carol), "tenant": "carol"}]))
    try:
        assert wait_status(app, carol, 200)
    finally:
        app.keys_file.write_text(yaml.safe_dump(entries))
    assert wait_status(app, carol, 401)
    assert app.request("GET", "/v1/models", key=ALICE).status_code == 200


def wait_status(app, key: str, status: int, timeout: float = 30) -> bool:
    """Every router replica re-reads the keys file within seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(app.request("GET", "/v1/models", key=key).status_code == status for _ in range(3)):
            return True
        time.sleep(0.5)
    return False
