"""The whole app on the Tinker backend (`configs/tinker.yaml`), with no local vLLM: chats are sampled and
adapters trained through the Tinker SDK interface, here against the named local stand-in for Tinker's
service (Tinker cannot be reached from here)."""

from __future__ import annotations

import httpx
import pytest
import yaml
from conftest import ROOT, claas_ray_serve, free_port, sha256_hex, write_serve_config

from claas_ray.models.registry import resolve_model_path

pytestmark = pytest.mark.slow

TINKER_KEY = "sk-claas-tinker-test-key-0123456789"
AUTH = {"authorization": f"Bearer {TINKER_KEY}"}


@pytest.fixture(scope="module")
def tinker_app(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tinker-app")
    port = free_port()
    (workdir / "keys.yaml").write_text(yaml.safe_dump([{"key_sha256": sha256_hex(TINKER_KEY), "tenant": "tk"}]))
    config = write_serve_config(
        ROOT / "configs" / "tinker.yaml", workdir / "serve.yaml", port,
        {
            "model": {"base_model": "smollm2-135m", "max_model_len": 1024},
            "tinker": {"service_factory": "tinker_standin:make_service"},  # tests/ is on the app's PYTHONPATH
            "training": {"learning_rate": 1e-3},
            "store": {"root": str(workdir / "tinker")},
            "state_dir": str(workdir / "state"),
            "auth": {"keys_file": str(workdir / "keys.yaml")},  # the shipped config's auth, with a test keys file
        },
    )
    resolve_model_path("smollm2-135m")  # the stand-in's model, pulled once before its processes start
    with claas_ray_serve(config, workdir / "serve.log", port):
        yield f"http://127.0.0.1:{port}", workdir


def test_chat_and_feedback_loop_on_tinker(tinker_app):
    base_url, workdir = tinker_app
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key=TINKER_KEY, max_retries=0, timeout=300)
    models = [m.id for m in client.models.list().data]
    assert "smollm2-135m" in models
    reply = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.content and reply.usage.completion_tokens <= 8

    created = httpx.post(f"{base_url}/v1/lora/init", json={"lora_id": "tk/sam"}, headers=AUTH, timeout=300)
    assert created.status_code == 201, created.text
    messages = [{"role": "user", "content": "Tell me about the ocean."}]
    first = client.chat.completions.create(model="tk/sam", messages=messages, max_tokens=24, temperature=1.0, seed=1)
    assert first.model_extra["claas"]["adapter_version"] == 0
    feedback = httpx.post(f"{base_url}/v1/feedback", json={
        "completion_id": first.id, "feedback": "Answer only in French.", "wait": True,
    }, headers=AUTH, timeout=600)
    assert feedback.status_code == 200, feedback.text
    item = feedback.json()["items"][0]
    assert item["status"] == "applied" and item["version"] == 1, item
    assert item["metrics"]["tokens"] > 0 and "teacher_minus_student_logprob" in item["metrics"]

    # The next request is served by the new version, through Tinker's sampler for it.
    after = client.chat.completions.create(model="tk/sam", messages=messages, max_tokens=24, temperature=0)
    assert after.model_extra["claas"]["adapter_version"] == 1
    stream = client.chat.completions.create(model="tk/sam", messages=messages, max_tokens=8, temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed

    detail = httpx.get(f"{base_url}/v1/lora/tk/sam", headers=AUTH, timeout=60).json()
    assert detail["latest_version"] == 1 and detail["versions"][1]["feedback_ids"] == [item["id"]]
    # The adapter's versions are Tinker checkpoint paths in the local JSON state file.
    state = (workdir / "tinker" / "tinker_adapters.json").read_text()
    assert "tinker://standin/" in state and '"latest": 1' in state
    # What cannot work on Tinker says so with a 4xx, not a 500.
    exported = httpx.get(f"{base_url}/v1/lora/tk/sam/export", headers=AUTH, timeout=60)
    assert 400 <= exported.status_code < 500 and "Tinker" in exported.text
