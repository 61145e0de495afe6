"""Faults on the real app: backpressure, a killed inference replica, a whole-app restart.

(A trainer killed mid-step is in test_feedback_loop.py; a step rejected by the guards in test_cli_serve.py.)
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from conftest import MAX_PENDING_PER_ADAPTER, VENV_BIN, engine_pids, wait_for

from claas_ray.adapters import LocalAdapterStore

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "Tell me about cats."}]


def item(lora_id: str, index: int) -> dict:
    return {"lora_id": lora_id, "prompt": f"Say hi to guest {index}.", "response": f"Hi guest {index}!!! 😀😀",
            "feedback": "No emoji, please."}


def applied_exactly_once(app, lora_id: str, ids: list[str]) -> None:
    named = [fid for meta in LocalAdapterStore(app.store_root).list_versions(lora_id) for fid in meta.feedback_ids]
    assert sorted(named) == sorted(ids) and len(named) == len(set(named)), (named, ids)


def replica_pids(deployment: str) -> list[int]:
    marker = f"ServeReplica:claas-ray:{deployment}"
    return sorted(p.pid for p in psutil.process_iter(["cmdline"]) if any(marker in part for part in (p.info["cmdline"] or [])))


def test_full_queue_is_429_with_retry_after_and_chat_is_not_blocked(app):
    for lora_id in ("fault/queue", "fault/other"):
        assert app.request("POST", "/v1/lora/init", json={"lora_id": lora_id}).status_code == 201
    accepted = app.request("POST", "/v1/feedback", json={"items": [item("fault/queue", i) for i in range(MAX_PENDING_PER_ADAPTER)]})
    assert accepted.status_code == 202, accepted.text
    ids = [status["id"] for status in accepted.json()["items"]]

    refused = app.request("POST", "/v1/feedback", json=item("fault/queue", 99))
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "queue_full" and "retry in" in error["message"]
    other = app.request("POST", "/v1/feedback", json=item("fault/other", 0))  # the limit is per adapter
    assert other.status_code == 202, other.text

    # Training never blocks inference: chats are answered while the queue drains. One a second, as a user types:
    # back to back, they kept the CPU from the trainer (it steps at a lower priority than serving), and its
    # three steps took minutes.
    client = app.openai()
    answered_while_training = 0
    while any(app.request("GET", f"/v1/feedback/{fid}").json()["status"] not in ("applied", "rejected") for fid in ids[-1:]):
        reply = client.chat.completions.create(model="fault/other", messages=PROMPT, max_tokens=8, temperature=0)
        assert reply.choices[0].message.content
        answered_while_training += 1
        time.sleep(1.0)
    assert answered_while_training >= 1
    statuses = app.final_statuses([*ids, other.json()["items"][0]["id"]], timeout=600)
    assert all(s["status"] == "applied" for s in statuses), statuses
    applied_exactly_once(app, "fault/queue", ids)
    # The queue has room again.
    assert app.request("POST", "/v1/feedback", json=item("fault/queue", 100)).status_code == 202


def test_killed_inference_replica_restarts_and_serves_the_latest_versions(app):
    assert app.request("POST", "/v1/lora/init", json={"lora_id": "fault/replica"}).status_code == 201
    trained = app.request("POST", "/v1/feedback", json={**item("fault/replica", 0), "wait": True}).json()["items"][0]
    assert trained["status"] == "applied" and trained["version"] == 1

    client = app.openai()
    retrying = client.with_options(max_retries=6)  # what a client does when a replica dies under it

    def ask(using=client):
        raw = using.chat.completions.with_raw_response.create(model="fault/replica", messages=PROMPT, max_tokens=12, temperature=0)
        return raw.parse(), raw.headers["x-claas-replica"]

    reference, _ = ask()
    before = replica_pids("inference")
    assert len(before) == 2, before
    scratch_before = {folder.name for folder in app.scratch.iterdir()}  # each replica wrote version 1 there
    assert len(scratch_before) == 2, scratch_before
    os.kill(before[0], signal.SIGKILL)

    # Every request, retried by the client, succeeds and is served by version 1 (the other replica meanwhile).
    seen_replicas: set[str] = set()
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline:
        reply, replica = ask(retrying)
        assert reply.model_extra["claas"]["adapter_version"] == 1
        assert reply.choices[0].message.content == reference.choices[0].message.content
        seen_replicas.add(replica)
        now = replica_pids("inference")
        if len(now) == 2 and before[0] not in now and len(seen_replicas) >= 2:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"Serve did not restart the replica: pids {replica_pids('inference')}, seen {seen_replicas}")
    # The restarted replica loaded version 1 from the store: both replicas give the same answer.
    assert len(seen_replicas) >= 2
    # The killed replica's tmpfs folder (RAM) went with it; the survivor's is still in use.
    def remaining() -> set[str]:
        return scratch_before & {folder.name for folder in app.scratch.iterdir()}

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(remaining()) > 1:
        time.sleep(0.5)
    assert len(remaining()) == 1, list(app.scratch.iterdir())


def test_whole_app_restart_keeps_adapters_pending_feedback_and_completions(app):
    client = app.openai()
    assert app.request("POST", "/v1/lora/init", json={"lora_id": "restart/r"}).status_code == 201
    chat = client.chat.completions.create(model="restart/r", messages=PROMPT, max_tokens=12, temperature=0)
    first = app.request("POST", "/v1/feedback", json={"completion_id": chat.id, "feedback": "Shorter.", "wait": True})
    assert first.json()["items"][0]["version"] == 1
    before = app.request("GET", "/v1/lora/restart/r").json()

    pending = app.request("POST", "/v1/feedback", json={"items": [item("restart/r", i) for i in range(MAX_PENDING_PER_ADAPTER)]})
    assert pending.status_code == 202
    ids = [status["id"] for status in pending.json()["items"]]
    # `serve shutdown` at once: most items are still queued or mid-step.
    app.cluster.run(str(VENV_BIN / "serve"), "shutdown", "-y", "--address", app.cluster.dashboard, timeout=300)
    app.cluster.run(str(VENV_BIN / "serve"), "deploy", str(app.config_path), "--address", app.cluster.dashboard)
    wait_for(f"{app.base_url}/health", timeout=420)

    statuses = app.final_statuses(ids, timeout=600)
    assert all(s["status"] == "applied" for s in statuses), statuses
    applied_exactly_once(app, "restart/r", [first.json()["items"][0]["id"], *ids])
    after = app.request("GET", "/v1/lora/restart/r").json()
    assert after["versions"][: len(before["versions"])] == before["versions"]  # old versions untouched
    assert after["latest_version"] > before["latest_version"]
    # The completion record survived too: feedback can still name it.
    again = app.request("POST", "/v1/feedback", json={"completion_id": chat.id, "feedback": "Even shorter.", "wait": True})
    assert again.status_code == 200 and again.json()["items"][0]["status"] == "applied", again.text
    served = client.chat.completions.create(model="restart/r", messages=PROMPT, max_tokens=8, temperature=0)
    assert served.model_extra["claas"]["adapter_version"] == again.json()["items"][0]["version"]


def test_dead_engine_takes_its_replica_out_and_callers_get_503_with_retry_after(app):
    """vLLM's engine process killed under a live replica: the replica's health check fails at once (every 2 s),
    Serve replaces it, and meanwhile a request caught by the dead engine is a 503 with Retry-After, never a 500."""
    engines = engine_pids()
    assert len(engines) == 2, engines
    replicas_before = replica_pids("inference")
    os.kill(min(engines), signal.SIGKILL)

    def ask() -> httpx.Response:
        body = {"model": "smollm2-135m", "messages": PROMPT, "max_tokens": 4, "temperature": 0}
        return app.request("POST", "/v1/chat/completions", json=body, timeout=120)

    statuses: list[int] = []
    deadline = time.monotonic() + 420
    with ThreadPoolExecutor(max_workers=4) as pool:
        while time.monotonic() < deadline:
            for response in pool.map(lambda _: ask(), range(4)):
                statuses.append(response.status_code)
                assert response.status_code in (200, 503), response.text
                if response.status_code == 503:
                    assert int(response.headers["retry-after"]) >= 1
                    assert response.json()["error"]["type"] == "service_unavailable_error"
            now = replica_pids("inference")
            if len(now) == 2 and set(now) != set(replicas_before):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"the replica with the dead engine was not replaced: {replica_pids('inference')}")
    # The new replica serves: every request answers again, and both replicas answer (the next test's steps then
    # reach two live replicas, not one and a dead one still within the feed's liveness window).
    answered_by: set[str] = set()
    deadline = time.monotonic() + 300
    while len(answered_by) < 2 and time.monotonic() < deadline:
        responses = [ask() for _ in range(4)]
        assert all(response.status_code == 200 for response in responses), [r.text for r in responses]
        answered_by |= {response.headers["x-claas-replica"] for response in responses}
    assert len(answered_by) == 2, answered_by
    print(f"statuses while the engine was dead: {statuses.count(200)} x 200, {statuses.count(503)} x 503")
