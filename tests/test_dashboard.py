"""The dashboard in headless Chromium (Debian's package): adapters, feedback and eval plots, escaped."""

from __future__ import annotations

import shutil
import subprocess

import httpx
import pytest
from conftest import TENANT_KEYS

from claas_ray.eval.report import write_report
from claas_ray.eval.runner import Checkpoint, EvalConfig, EvalReport, PreferenceResult

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--virtual-time-budget=3000",
]


def chromium(tmp_path, *args: str) -> str:
    binary = shutil.which("chromium")
    assert binary, "scripts/test.sh installs Debian's chromium"
    result = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                            capture_output=True, text=True, timeout=120, check=True)
    return result.stdout


def test_dashboard_lists_adapter_feedback_and_eval(app, tmp_path):
    base = app.base_url
    assert app.request("POST", "/v1/lora/init", json={"lora_id": "dash/zoe"}).status_code == 201
    hostile = "<b>No emoji</b> please & thanks"
    response = app.request("POST", "/v1/feedback", json={"lora_id": "dash/zoe", "prompt": "Say hi.", "response": "Hi 😀",
                                                         "feedback": hostile, "wait": True})
    feedback_id = response.json()["items"][0]["id"]
    checkpoints = [Checkpoint(step=s, version=s, clean_compliance=c, compliance=c, margin=0.0, distinct_2=1, mean_words=10,
                              repetition=0, samples=[]) for s, c in [(0, 0.1), (2, 0.6)]]
    write_report(EvalReport(config=EvalConfig(preferences=["no_emoji"]), started_at=0, finished_at=1,
                            results=[PreferenceResult(preference="no_emoji", lora_id="eval/x", checkpoints=checkpoints)]),
                 app.state_dir / "eval" / "run-1")

    # A browser signs in with HTTP Basic, the API key as the password.
    signed_in = base.replace("http://", f"http://admin:{app.admin_key}@")
    dom = chromium(tmp_path, "--dump-dom", f"{signed_in}/dashboard")
    assert "data-adapter=\"dash/zoe\"" in dom and "1 (latest)" in dom
    assert f"data-feedback=\"{feedback_id}\"" in dom and ">applied<" in dom
    assert "&lt;b&gt;No emoji&lt;/b&gt; please &amp; thanks" in dom and "<b>No emoji</b>" not in dom  # escaped
    assert 'id="rendered"></span>' not in dom  # the page's script ran and filled in the time
    assert "/dashboard/eval/run-1/compliance.png" in dom and "| no_emoji | 0.10 / 0.60 |" in dom
    plot = app.request("GET", "/dashboard/eval/run-1/compliance.png")
    assert plot.status_code == 200 and plot.content[:4] == b"\x89PNG"
    assert app.request("GET", "/dashboard/eval/..%2F..%2Fetc/compliance.png").status_code == 404
    assert app.request("GET", "/v1/dashboard").status_code == 200
    assert httpx.get(f"{base}/dashboard").status_code == 401  # no key, no page
    assert app.request("GET", "/dashboard", key=TENANT_KEYS["alice"]).status_code == 403  # every tenant's data: admin only

    chromium(tmp_path, f"--screenshot={tmp_path / 'dashboard.png'}", "--window-size=1280,900", f"{signed_in}/dashboard")
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    shutil.copy(tmp_path / "dashboard.png", app.workdir / "dashboard.png")  # kept for a look by hand
