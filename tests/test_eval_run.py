"""A reduced evaluation run, end to end, as a Ray job against the real app."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import ROOT, VENV_BIN, claas_ray_serve, free_port, write_serve_config

from claas_ray.eval.runner import EvalReport

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """`claas-ray serve` of configs/local.yaml as shipped (only its port and folders moved): the session app
    trains with a cheaper recipe, and this test is what asserts that the shipped one teaches."""
    workdir = tmp_path_factory.mktemp("shipped")
    port, dashboard_port = free_port(), free_port()
    config = write_serve_config(ROOT / "configs" / "local.yaml", workdir / "serve.yaml", port,
                                {"store": {"root": str(workdir / "adapters")}, "state_dir": str(workdir / "state")})
    with claas_ray_serve(config, workdir / "serve.log", port, dashboard_port=dashboard_port):
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}"


def test_eval_job_teaches_a_preference(shipped, tmp_path):
    """Reduced run with the shipped defaults, submitted as a Ray job to the cluster `claas-ray serve` started
    (the README's commands): `concise` on 8 held-out prompts, 4 feedback events."""
    base_url, dashboard = shipped
    output = tmp_path / "eval"
    result = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", dashboard, "--",
         "claas-ray", "eval", "--url", base_url, "--preference", "concise", "--steps", "4", "--eval-every", "4",
         "--heldout-limit", "8", "--output", str(output)],
        env=dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}"), cwd=ROOT, capture_output=True, text=True,
        timeout=900, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = EvalReport.model_validate_json((output / "report.json").read_text())
    (preference,) = report.results
    assert preference.preference == "concise" and preference.lora_id.startswith("eval/concise-")
    assert [c.step for c in preference.checkpoints] == [0, 4]
    start, end = preference.checkpoints
    assert start.version == 0 and end.version == 4 and preference.rejected_steps == 0
    assert len(preference.step_metrics) == 4 and all(m["examples"] == 1.0 for m in preference.step_metrics)
    assert all(m["teacher_rollouts"] >= 1 for m in preference.step_metrics)  # the shipped rollout mixture ran
    # Feedback teaches cleanly: held-out clean compliance (prompts never trained on, degenerate answers never
    # counted) rises above the base model's, and no answer set degenerates.
    assert end.clean_compliance >= start.clean_compliance + 0.25, (start.clean_compliance, end.clean_compliance, end.samples)
    assert end.margin > start.margin  # the compliant reference answer gained log-prob over the other
    for checkpoint in preference.checkpoints:
        assert checkpoint.degenerate <= start.degenerate + 0.125, (checkpoint.step, checkpoint.samples)  # at most 1 of 8 more
        assert checkpoint.distinct_2 >= 0.8 * start.distinct_2, (checkpoint.step, checkpoint.samples)
    (target,) = report.targets
    assert not target.collapsed and target.base_clean_compliance == start.clean_compliance
    # Version 0 is zero-effect: its capability equals the base model's.
    assert start.capability_nll_ratio == pytest.approx(1.0, abs=1e-3)
    assert start.capability_qa_accuracy == report.base_capability["qa_accuracy"]
    assert end.capability_nll_ratio != start.capability_nll_ratio  # the adapter changed
    assert len(start.samples) == 3
    assert "| concise |" in (output / "summary.md").read_text()
    assert (output / "compliance.png").stat().st_size > 1000
    paths = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    assert paths["json"].endswith("report.json")
