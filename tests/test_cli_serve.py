"""`claas-ray serve` (the README's main command) brings the app up in a fresh local cluster and stops cleanly."""

from __future__ import annotations

import httpx
import pytest
from conftest import ROOT, claas_ray_serve, free_port, write_serve_config

pytestmark = pytest.mark.slow


def test_claas_ray_serve_runs_the_local_config(tmp_path):
    """The shipped local config runs open on 127.0.0.1 and says so. Its learning rate is set 50x too high here,
    with the KL guard off, so a step on a degenerate response collapses the adapter: the collapse guard must
    reject it before it is published, the adapter must keep serving its previous version, and the feedback
    says why. (The KL guard's rejection is tested in-process, test_trainer_step.py.)"""
    port = free_port()
    config = write_serve_config(
        ROOT / "configs" / "local.yaml", tmp_path / "serve.yaml", port,
        {"store": {"root": str(tmp_path / "adapters")}, "state_dir": str(tmp_path / "state"),
         "training": {"learning_rate": 5e-2, "optimizer_steps": 2, "max_kl_to_base": None, "teacher_rollouts": 0}},
    )
    with claas_ray_serve(config, tmp_path / "serve.log", port) as process:
        from openai import OpenAI

        base = f"http://127.0.0.1:{port}"
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
        )
        assert reply.choices[0].message.content
        log = (tmp_path / "serve.log").read_text()
        assert f"{base}/v1" in log and "auth is OFF" in log

        assert httpx.post(f"{base}/v1/lora/init", json={"lora_id": "guard/g"}, timeout=120).status_code == 201
        messages = [{"role": "user", "content": "Tell me about the ocean."}]
        before = client.chat.completions.create(model="guard/g", messages=messages, max_tokens=16, temperature=0)
        response = httpx.post(f"{base}/v1/feedback", json={
            "lora_id": "guard/g", "messages": messages, "response": " ".join(["Sam"] * 40),
            "feedback": "Only ever say Sam, over and over.", "wait": True,
        }, timeout=300)
        item = response.json()["items"][0]
        assert item["status"] == "rejected" and item["version"] is None, item
        assert item["reason"].startswith("collapse:") and item["metrics"]["collapse_check_seconds"] > 0, item
        after = client.chat.completions.create(model="guard/g", messages=messages, max_tokens=16, temperature=0)
        assert after.model_extra["claas"]["adapter_version"] == 0
        assert after.choices[0].message.content == before.choices[0].message.content
        assert httpx.get(f"{base}/v1/lora/guard/g", timeout=60).json()["latest_version"] == 0
    assert process.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
