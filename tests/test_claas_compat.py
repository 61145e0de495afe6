"""A CLaaS user switches without changing a line (issue 16), on the running app.

The request and response shapes are written from CLaaS's own source (github kfallah/CLaaS:
`claas/core/types.py` FeedbackBatchRequest/FeedbackResponse, `claas/eval/runner.py` `_submit_feedback`, which
reads `distill_result.metadata`, `claas/eval/metrics/logprob.py` `derive_model_name`, and
`plugins/claas-feedback/index.ts`, which sends `requests` with `prompt`/`response` text and the adapter id
`openclaw/assistant-latest`). Nothing of CLaaS's is imported: these are the bodies its clients send.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import TENANT_KEYS, engine_pids

from claas_ray.config import TrainingConfig

pytestmark = pytest.mark.slow

CLAAS_TRAINING = {"learning_rate": 3e-5, "alpha": 0.5, "is_clip": 5.0, "max_grad_norm": 1.0, "kl_reg_weight": 0.0,
                  "teacher_top_k": 100}  # CLaaS's TrainingConfig defaults: its clients always send the whole object
ORCHESTRATION = {"sleep_before": True, "wake_after": True, "wake_on_failure": True, "sleep_level": 1}


def init(app, lora_id: str, key: str | None = None) -> None:
    kwargs = {} if key is None else {"key": key}
    response = app.request("POST", "/v1/lora/init", json={"lora_id": lora_id}, **kwargs)
    assert response.status_code == 201, response.text


def test_concurrent_scores_and_chats_over_four_adapters_leave_the_engine_alive(app):
    """Prompt log-probs of several LoRA requests in one batch killed vLLM's CPU engine (the lm_head LoRA path
    indexed every prompt position with one adapter slot per request). Now sixteen at once all answer."""
    adapters = [f"compat/score-{i}" for i in range(4)]
    for lora_id in adapters:
        init(app, lora_id)
    before = engine_pids()
    assert len(before) == 2, before

    def call(index: int) -> httpx.Response:
        messages = [{"role": "user", "content": f"Name a colour you like ({index})."}]
        if index % 2 == 0:
            body = {"model": adapters[index % 4], "messages": messages, "completion": "Blue, because it is calm."}
            return app.request("POST", "/v1/score", json=body, timeout=300)
        body = {"model": adapters[index % 4], "messages": messages, "max_tokens": 16, "temperature": 0}
        return app.request("POST", "/v1/chat/completions", json=body, timeout=300)

    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(call, range(16)))
    assert [r.status_code for r in responses] == [200] * 16, [r.text[:300] for r in responses if r.status_code != 200]
    for response in responses[::2]:
        scored = response.json()
        assert scored["completion_tokens"] == len(scored["logprobs"]) > 0
        assert all(math.isfinite(lp) and lp <= 0 for lp in scored["logprobs"])
    assert engine_pids() == before  # the same engine processes: none died and was replaced


def test_claas_names_resolve_to_the_adapter(app):
    """CLaaS's vLLM name (`/` -> `-`) and its `-latest` alias name the adapter on chat, score and the lifecycle API."""
    init(app, "compat/sam")
    client = app.openai()
    messages = [{"role": "user", "content": "Say hello."}]
    direct = client.chat.completions.create(model="compat/sam", messages=messages, max_tokens=8, temperature=0)
    for name in ("compat-sam", "compat-sam-latest", "compat/sam-latest"):
        reply = client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0)
        assert reply.model == "compat/sam" and reply.model_extra["claas"]["adapter_version"] == 0
        assert reply.choices[0].message.content == direct.choices[0].message.content
        scored = app.request("POST", "/v1/score", json={"model": name, "messages": messages, "completion": "Hello!"})
        assert scored.status_code == 200, scored.text
        assert app.request("GET", f"/v1/lora/{name}").json()["lora_id"] == "compat/sam"
        assert app.request("GET", f"/v1/models/{name}").json()["id"] == "compat/sam"
    listed = [model.id for model in client.models.list()]
    assert "compat/sam" in listed and "compat-sam" not in listed  # the list names canonical ids only

    # A tenant's own adapter by its CLaaS name; another namespace's stays invisible.
    alice = TENANT_KEYS["alice"]
    init(app, "alice/assistant", key=alice)
    mine = app.request("POST", "/v1/chat/completions", key=alice,
                       json={"model": "alice-assistant-latest", "messages": messages, "max_tokens": 4})
    assert mine.status_code == 200 and mine.json()["model"] == "alice/assistant", mine.text
    theirs = app.request("POST", "/v1/chat/completions", key=alice,
                         json={"model": "compat-sam", "messages": messages, "max_tokens": 4})
    assert theirs.status_code in (403, 404) and "compat/sam" not in theirs.text

    # Two adapters with one CLaaS name: a 400 that lists both, never a guess.
    init(app, "amb/x-y")
    init(app, "amb-x/y")
    ambiguous = app.request("POST", "/v1/chat/completions", json={"model": "amb-x-y", "messages": messages})
    assert ambiguous.status_code == 400 and ambiguous.json()["error"]["code"] == "ambiguous_model"
    assert "amb/x-y" in ambiguous.json()["error"]["message"] and "amb-x/y" in ambiguous.json()["error"]["message"]
    assert app.request("GET", "/v1/lora/amb-x-y").json()["error"]["code"] == "ambiguous_lora_id"


def test_claas_feedback_waits_for_the_step_and_trains_on_the_served_completion(app):
    """CLaaS's plugin sends the user's text and the visible answer, never a completion id, and expects its
    synchronous answer. The server finds the completion it served and trains on its recorded tokens and
    sampling log-probs; text it never served is trained as text, and the item says which happened."""
    init(app, "openclaw/assistant")
    client = app.openai()
    messages = [{"role": "system", "content": "You are a cheerful assistant."},
                {"role": "user", "content": "Say hi to my cat."}]
    served = client.chat.completions.create(model="openclaw-assistant", messages=messages, max_tokens=24, temperature=0.7)
    answer = served.choices[0].message.content
    body = {"requests": [{"lora_id": "openclaw/assistant-latest", "prompt": "Say hi to my cat.", "response": answer,
                          "feedback": "Use no emoji.", "training": CLAAS_TRAINING}], "orchestration": ORCHESTRATION}
    response = app.request("POST", "/v1/feedback", json=body)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["status"] == "ok" and payload["lora_id"] == "openclaw/assistant" and payload["batch_size"] == 1
    metadata = payload["distill_result"]["metadata"]
    assert {"distill_loss", "kl_reg", "mean_is_ratio", "clip_fraction", "total_loss", "grad_norm", "tokens_processed"} <= metadata.keys()
    assert payload["timing_ms"]["total"] >= payload["timing_ms"]["distill"] > 0
    (item,) = payload["items"]
    assert item["status"] == "applied" and item["version"] == 1
    assert item["source"] == "completion_log" and item["completion_id"] == served.id
    # What the step trained on is the served completion: its tokens, its sampling log-probs, and the whole
    # conversation it was generated in (the system prompt too), as the journal holds it.
    journal = app.journal()  # PostgreSQL, as the router and the trainer reach it
    record = app.completions().get(served.id)
    trained = journal.get(item["id"]).example
    assert trained.response_token_ids == record.response_token_ids and len(trained.response_token_ids) == served.usage.completion_tokens
    assert trained.response_logprobs == record.response_logprobs
    assert [m.model_dump() for m in trained.messages] == messages
    assert item["metrics"]["is_ratio_mean"] != 1.0  # a ratio against the sampler (text has none: exactly 1)
    assert item["metrics"]["learning_rate"] == pytest.approx(TrainingConfig().learning_rate)  # `training` ignored
    after = client.chat.completions.create(model="openclaw-assistant-latest", messages=messages, max_tokens=4)
    assert after.model_extra["claas"]["adapter_version"] == 1  # the answer came after the step: no stale version

    unserved = {"requests": [{"lora_id": "openclaw-assistant", "prompt": "Say hi to my cat.",
                              "response": "Hello, cat! I never said this.", "feedback": "Use no emoji."}]}
    text = app.request("POST", "/v1/feedback", json=unserved).json()
    assert text["status"] == "ok" and text["items"][0]["source"] == "text" and text["items"][0]["completion_id"] is None
    assert text["items"][0]["metrics"]["is_ratio_mean"] == 1.0

    # Out of time: 504 with the ids, and the items stay queryable until they are applied.
    hurried = app.request("POST", "/v1/feedback", json={**unserved, "wait_timeout_s": 0.05})
    assert hurried.status_code == 504, hurried.text
    assert hurried.json()["error"]["code"] == "feedback_timeout"
    ids = [entry["id"] for entry in hurried.json()["items"]]
    assert ids[0] in hurried.json()["error"]["message"]
    (final,) = app.final_statuses(ids, timeout=420)
    assert final["status"] == "applied"


def test_root_says_what_this_server_is(app):
    """`GET /` is CLaaS's container health check: public, small, and useful."""
    response = httpx.get(f"{app.base_url}/", timeout=30)
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "claas-ray" and body["base_model"] == "smollm2-135m" and body["version"]
    assert body["links"]["openai"] == "/v1" and body["links"]["feedback"] == "/v1/feedback"
