"""`claas-ray serve` (the README's main command) brings the app up in a fresh local cluster and stops cleanly."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from conftest import ROOT, VENV_BIN, free_port, wait_for, write_serve_config

pytestmark = pytest.mark.slow


def test_claas_ray_serve_runs_the_local_config(tmp_path):
    port = free_port()
    config = write_serve_config(
        ROOT / "configs" / "local.yaml", tmp_path / "serve.yaml", port,
        {"store": {"root": str(tmp_path / "adapters")}, "state_dir": str(tmp_path / "state")},
    )
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen(
        [str(VENV_BIN / "claas-ray"), "serve", "--config", str(config), "--address", "local"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/health", timeout=420, process=process)
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
        )
        assert reply.choices[0].message.content
        assert f"http://127.0.0.1:{port}/v1" in (tmp_path / "serve.log").read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
        log.close()
    assert process.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
