"""`claas-ray serve` (the README's main command) brings the app up in a fresh local cluster and stops cleanly."""

from __future__ import annotations

import pytest
from conftest import ROOT, claas_ray_serve, free_port, write_serve_config

pytestmark = pytest.mark.slow


def test_claas_ray_serve_runs_the_local_config(tmp_path):
    port = free_port()
    config = write_serve_config(
        ROOT / "configs" / "local.yaml", tmp_path / "serve.yaml", port,
        {"store": {"root": str(tmp_path / "adapters")}, "state_dir": str(tmp_path / "state")},
    )
    with claas_ray_serve(config, tmp_path / "serve.log", port) as process:
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
        )
        assert reply.choices[0].message.content
        assert f"http://127.0.0.1:{port}/v1" in (tmp_path / "serve.log").read_text()
    assert process.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
