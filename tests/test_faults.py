"""Faults on the real app: backpressure, a dead Ray node, a whole-app restart, a dead vLLM engine.

(A trainer killed mid-step is in test_feedback_loop.py; a step rejected by the guards in test_cli_serve.py.)
"""

from __future__ import annotations

import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import MAX_PENDING_PER_ADAPTER, VENV_BIN, engine_pids, replica_pids, wait_for

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "Tell me about cats."}]


def item(lora_id: str, index: int) -> dict:
    return {"lora_id": lora_id, "prompt": f"Say hi to guest {index}.", "response": f"Hi guest {index}!!! 😀😀",
            "feedback": "No emoji, please."}


def applied_exactly_once(app, lora_id: str, ids: list[str]) -> None:
    named = [fid for meta in app.store().list_versions(lora_id) for fid in meta.feedback_ids]
    assert sorted(named) == sorted(ids) and len(named) == len(set(named)), (named, ids)


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


def test_a_replicas_node_dies_and_the_service_recovers_with_nothing_lost(app):
    """The session cluster has two Ray nodes (tests/conftest.py): router, trainer and one inference replica on the
    head, the other replica on the second node, S3 and PostgreSQL the only state they share. A version crosses to
    the second node through the object store. Then that node dies outright (every process SIGKILLed, as when its
    machine goes): the head's replica answers meanwhile, feedback acknowledged before and during the outage is
    applied exactly once, and once a node joins again Serve starts a replica there that serves the newest version."""
    node = app.cluster.nodes[-1]
    assert len(node.replica_pids("inference")) == 1 and not node.replica_pids("trainer") and not node.replica_pids("router")
    assert app.request("POST", "/v1/lora/init", json={"lora_id": "fault/node"}).status_code == 201
    first = app.request("POST", "/v1/feedback", json={**item("fault/node", 0), "wait": True}).json()["items"][0]
    assert first["status"] == "applied" and first["version"] == 1, first
    # Both replicas loaded version 1 from the trainer's feed: the second node's fetched it from the head's object store.
    assert first["metrics"]["replicas_acked"] == first["metrics"]["replicas_live"] == 2, first["metrics"]

    retrying = app.openai().with_options(max_retries=8)  # what a client does when a replica dies under it

    def ask() -> tuple[int, str, str]:
        raw = retrying.chat.completions.with_raw_response.create(model="fault/node", messages=PROMPT, max_tokens=8,
                                                                   temperature=0)
        reply = raw.parse()
        return reply.model_extra["claas"]["adapter_version"], raw.headers["x-claas-replica"], reply.choices[0].message.content

    def answered_by(version: int, done, timeout: float = 420) -> set[str]:
        """Ask, one request a second as a user types (back to back they kept a starting replica from the CPU),
        until the replicas that answered are `done`; every answer is from `version`, and the same greedy text from
        every replica (the same weights everywhere)."""
        texts: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while not done(set(texts)):
            assert time.monotonic() < deadline, (texts, app.diagnosis(), app.cluster.nodes[-1].worker_logs("inference"))
            served, replica, text = ask()
            assert served == version, (served, version)
            texts[replica] = text
            time.sleep(1.0)
        assert len(set(texts.values())) == 1, texts
        return set(texts)

    before = answered_by(1, lambda seen: len(seen) == 2)  # one replica on each node, both serving version 1
    scratch_before = {folder.name for folder in app.scratch.iterdir()}  # each replica wrote version 1 there
    pending = app.request("POST", "/v1/feedback", json={"items": [item("fault/node", i) for i in range(1, 4)]})
    assert pending.status_code == 202, pending.text
    ids = [status["id"] for status in pending.json()["items"]]
    node.kill()

    during = app.request("POST", "/v1/feedback", json=item("fault/node", 4))  # acknowledged during the outage
    assert during.status_code == 202, during.text
    ids.append(during.json()["items"][0]["id"])
    assert ask()[0] >= 1  # answered meanwhile (by the head's replica)
    replacement = app.cluster.add_node()  # a machine joins again: Serve places the missing replica on it

    statuses = app.final_statuses(ids, timeout=600)
    assert all(s["status"] == "applied" for s in statuses), statuses
    applied_exactly_once(app, "fault/node", [first["id"], *ids])
    latest = app.request("GET", "/v1/lora/fault/node").json()["latest_version"]
    # The dead replica's tmpfs folder (RAM) was removed by its reaper; the head replica's is still in use.
    def remaining() -> set[str]:
        return scratch_before & {folder.name for folder in app.scratch.iterdir()}

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(remaining()) > 1:
        time.sleep(0.5)
    assert len(remaining()) == 1, list(app.scratch.iterdir())

    after = answered_by(latest, lambda seen: bool(seen - before))  # the new replica serves the newest version
    assert len(replacement.replica_pids("inference")) == 1 and len(replica_pids("inference")) == 2, after


def test_node_local_state_is_refused_on_a_cluster_of_two_nodes(app):
    """`build_app` on the live two-node cluster: the shipped single-node config (adapters in a folder, the journal
    in SQLite) would split its state between the nodes, so it is refused, saying why and what to use."""
    script = ("import sys, ray\nray.init()\nfrom deployments.app import build_app\n"
              "try:\n    build_app({'auth': {'enabled': False}})\nexcept ValueError as error:\n    print(error)\n    sys.exit(3)\n")
    refused = app.cluster.run(sys.executable, "-c", script, check=False, timeout=120)
    assert refused.returncode == 3, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "this Ray cluster has 2 nodes" in refused.stdout and "store.kind: local" in refused.stdout, refused.stdout
    assert "journal.kind: sqlite" in refused.stdout and "configs/cluster.yaml" in refused.stdout, refused.stdout


def test_dead_engine_takes_its_replica_out_and_callers_get_503_with_retry_after(app):
    """vLLM's engine process killed under a live replica: the replica's health check fails at once (every 2 s),
    Serve starts a replacement, and meanwhile a request caught by the dead engine is a 503 with Retry-After, never
    a 500."""
    engines = engine_pids(timeout=240)
    assert len(engines) == 2, (engines, app.diagnosis())
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
    # Meanwhile every request is answered by the other replica. (That a replacement serves is shown after a node
    # dies, above; the next test redeploys the whole app, and waits for both replicas.)
    responses = [ask() for _ in range(4)]
    assert all(response.status_code == 200 for response in responses), [r.text for r in responses]
    print(f"statuses while the engine was dead: {statuses.count(200)} x 200, {statuses.count(503)} x 503")


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
    assert len(engine_pids(timeout=300)) == 2, app.diagnosis()  # both replicas back, one on each node

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
