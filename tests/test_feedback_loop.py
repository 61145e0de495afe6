"""The product loop on the real app: feedback in, a new adapter version served on every replica, nothing lost."""

from __future__ import annotations

import io
import json
import os
import signal
import time
import zipfile

import httpx
import pytest
from conftest import VENV_BIN, replica_pids

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "Tell me about dogs."}]


def api(app, method: str, path: str, **kwargs) -> httpx.Response:
    return app.request(method, path, **kwargs)


def init(app, lora_id: str, **extra) -> dict:
    response = api(app, "POST", "/v1/lora/init", json={"lora_id": lora_id, **extra})
    assert response.status_code == 201, response.text
    return response.json()


def ask(client, model: str, **kwargs):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=PROMPT, max_tokens=24, temperature=0, **kwargs
    )
    return raw.parse(), raw.headers


def test_feedback_by_completion_id_is_served_by_every_replica(app):
    client = app.openai()
    init(app, "loop/alice")
    before, headers = ask(client, "loop/alice")
    assert before.model_extra["claas"]["adapter_version"] == 0

    response = api(app, "POST", "/v1/feedback", json={"completion_id": before.id, "feedback": "Answer only in French.", "wait": True})
    assert response.status_code == 200, response.text
    item = response.json()["items"][0]
    assert item["status"] == "applied" and item["version"] == 1, item
    assert item["metrics"]["replicas_acked"] == item["metrics"]["replicas_live"] == 2.0
    assert item["completion_id"] == before.id

    detail = api(app, "GET", "/v1/lora/loop/alice").json()
    assert detail["latest_version"] == 1 and detail["versions"][1]["feedback_ids"] == [item["id"]]
    assert detail["versions"][1]["parent_version"] == 0 and detail["versions"][1]["metrics"]["tokens"] > 0

    # Read-your-writes on both replicas: every answer after `applied` comes from version 1.
    seen: dict[str, str] = {}
    for _ in range(40):
        after, headers = ask(client, "loop/alice")
        assert after.model_extra["claas"]["adapter_version"] == 1
        seen[headers["x-claas-replica"]] = after.choices[0].message.content
        if len(seen) == 2:
            break
    assert len(seen) == 2, f"only replicas {list(seen)} answered"
    texts = set(seen.values())
    assert len(texts) == 1, seen  # the same weights everywhere
    assert texts.pop() != before.choices[0].message.content


def test_trainer_killed_mid_step_applies_acknowledged_feedback_exactly_once(app):
    client = app.openai()
    adapters = ["loop/carol", "loop/dave"]
    for lora_id in adapters:
        init(app, lora_id)
    ids = []
    for round_ in range(5):  # ten items over two adapters
        for lora_id in adapters:
            completion, _ = ask(client, lora_id, seed=round_)
            response = api(app, "POST", "/v1/feedback", json={"completion_id": completion.id, "feedback": f"Be brief ({round_})."})
            assert response.status_code == 202
            ids.append(response.json()["items"][0]["id"])
    # Kill the trainer's process while a step runs.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(api(app, "GET", f"/v1/feedback/{fid}").json()["status"] == "training" for fid in ids):
            break
        time.sleep(0.05)
    (pid,) = replica_pids("trainer")
    os.kill(pid, signal.SIGKILL)

    statuses = app.final_statuses(ids, timeout=420)
    assert all(s["status"] == "applied" for s in statuses), statuses
    assert replica_pids("trainer") and replica_pids("trainer") != [pid]  # Serve restarted it
    store = app.store()
    for lora_id in adapters:
        named = [fid for meta in store.list_versions(lora_id) for fid in meta.feedback_ids]
        mine = [s["id"] for s in statuses if s["lora_id"] == lora_id]
        assert sorted(named) == sorted(mine), (named, mine)  # each item in exactly one version
        assert len(named) == len(set(named))


def test_lifecycle_errors_export_import_rollback_delete(app):
    client = app.openai()
    init(app, "loop/erin", rank=8, alpha=16)
    # configs/local.yaml re-inits as CLaaS does (router.reinit: reset): a new zero-effect version, history kept.
    again = api(app, "POST", "/v1/lora/init", json={"lora_id": "loop/erin", "lora_r": 8, "lora_alpha": 16})
    assert again.status_code == 201 and again.json()["latest_version"] == 1, again.text
    assert [v["note"] for v in again.json()["versions"]] == ["initial zero-effect adapter", "reset: zero-effect adapter"]
    assert api(app, "POST", "/v1/lora/init", json={"lora_id": "../x"}).status_code == 400
    assert api(app, "POST", "/v1/lora/init", json={"lora_id": "loop/big", "lora_r": 512}).status_code == 400
    assert api(app, "POST", "/v1/lora/init", json={"lora_id": "loop/other", "base_model": "gpt-5"}).status_code == 400
    bad = api(app, "POST", "/v1/feedback", json={"completion_id": "chatcmpl-nope", "feedback": "x"})
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "completion_not_found"
    assert api(app, "POST", "/v1/feedback", json={"lora_id": "loop/none", "prompt": "a", "response": "b", "feedback": "c"}).status_code == 404
    assert api(app, "POST", "/v1/feedback", json={"lora_id": "loop/erin", "prompt": "a", "feedback": "c"}).status_code == 400
    assert api(app, "POST", "/v1/feedback", json={"lora_id": "loop/erin", "prompt": "a", "response": "b", "feedback": ""}).status_code == 400
    assert api(app, "GET", "/v1/feedback/fb-nope").status_code == 404

    response = api(app, "POST", "/v1/feedback", json={"lora_id": "loop/erin", "messages": PROMPT, "response": "Dogs are great pets. 🐶🐶🐶", "feedback": "No emoji.", "wait": True})
    assert response.json()["items"][0]["version"] == 2
    trained, _ = ask(client, "loop/erin")

    exported = api(app, "GET", "/v1/lora/loop/erin/export")
    assert exported.status_code == 200 and exported.headers["content-type"] == "application/zip"
    assert sorted(zipfile.ZipFile(io.BytesIO(exported.content)).namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert api(app, "GET", "/v1/lora/export", params={"lora_id": "loop/erin"}).content == exported.content

    imported = api(app, "POST", "/v1/lora/import", params={"lora_id": "loop/erin-copy"}, content=exported.content,
                   headers={"content-type": "application/zip"})
    assert imported.status_code == 201, imported.text
    copy, _ = ask(client, "loop/erin-copy")
    assert copy.choices[0].message.content == trained.choices[0].message.content

    junk = io.BytesIO()
    with zipfile.ZipFile(junk, "w") as archive:
        archive.writestr("adapter_config.json", exported.content[:0] + b"{}")
        archive.writestr("adapter_model.safetensors", b"not tensors")
        archive.writestr("evil.pkl", b"\x80\x04")
    assert api(app, "POST", "/v1/lora/import", params={"lora_id": "loop/junk"}, content=junk.getvalue()).status_code == 400
    assert api(app, "POST", "/v1/lora/import", params={"lora_id": "loop/junk"}, content=b"plain bytes").status_code == 400

    assert api(app, "POST", "/v1/lora/loop/erin/rollback", json={"version": 7}).status_code == 404
    rolled = api(app, "POST", "/v1/lora/loop/erin/rollback", json={"version": 0})
    assert rolled.status_code == 200 and rolled.json()["latest_version"] == 0
    base_like, headers = ask(client, "loop/erin")
    assert headers["x-claas-adapter-version"] == "0"
    assert base_like.choices[0].message.content == ask(client, "smollm2-135m")[0].choices[0].message.content

    listing = api(app, "GET", "/v1/lora", params={"prefix": "loop/erin"}).json()
    assert listing["loras"] == ["loop/erin", "loop/erin-copy"]
    assert api(app, "DELETE", "/v1/lora/loop/erin").json() == {"lora_id": "loop/erin", "deleted": True}
    assert api(app, "DELETE", "/v1/lora", params={"lora_id": "loop/erin"}).json()["deleted"] is False
    assert api(app, "GET", "/v1/lora/loop/erin").status_code == 404
    gone = api(app, "POST", "/v1/chat/completions", json={"model": "loop/erin", "messages": PROMPT})
    assert gone.status_code == 404


def test_replay_job_through_ray_job_submit(app, tmp_path):
    lines = [
        {"prompt": "Describe the sea.", "response": "The sea is big and blue 🌊🌊.", "feedback": "No emoji."},
        {"messages": PROMPT, "response": "Dogs!!! 🐕🐕", "feedback": "No emoji, fewer exclamation marks."},
    ]
    path = tmp_path / "feedback.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = app.cluster.run(
        str(VENV_BIN / "ray"), "job", "submit", "--address", app.cluster.dashboard, "--runtime-env-json", app.job_env(), "--",
        "claas-ray", "replay", str(path), "--lora-id", "loop/replayed", "--init", "--url", app.base_url,
        timeout=600, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    assert summary == {"items": 2, "outcomes": {"applied": 2}, "last_version": 2}
    assert api(app, "GET", "/v1/lora/loop/replayed").json()["latest_version"] == 2
