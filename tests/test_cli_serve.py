"""`claas-ray serve` (the README's main command) brings the app up in a fresh local cluster and stops cleanly."""

from __future__ import annotations

import re
import time

import httpx
import psutil
import pytest
from conftest import ROOT, claas_ray_serve, free_port, write_serve_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """configs/local.yaml through `claas-ray serve`, with a learning rate 50x too high and the KL guard and the
    unlikelihood on loops off (so a step on a degenerate response collapses the adapter), re-init as a conflict, per-request learning rate
    and KL weight allowed (auth is off: every caller is an admin), and serving and training on cores of their own."""
    tmp_path = tmp_path_factory.mktemp("cli-serve")
    port = free_port()
    config = write_serve_config(
        ROOT / "configs" / "local.yaml", tmp_path / "serve.yaml", port,
        {"store": {"root": str(tmp_path / "adapters")}, "state_dir": str(tmp_path / "state"),
         "training": {"learning_rate": 5e-2, "optimizer_steps": 2, "max_kl_to_base": None, "teacher_rollouts": 0,
                      "repetition_unlikelihood": 0.0},
         "serving": {"cpu_cores": "0"}, "trainer": {"cpu_cores": "1"},
         "router": {"reinit": "conflict", "request_training": ["learning_rate", "kl_weight"]}},
    )
    with claas_ray_serve(config, tmp_path / "serve.log", port) as process:
        yield f"http://127.0.0.1:{port}", tmp_path / "serve.log", process.pid
    assert process.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]


def test_claas_ray_serve_runs_the_local_config_and_the_collapse_guard_rejects(served):
    """The shipped local config runs open on 127.0.0.1 and says so. A step that collapses the adapter is rejected
    by the collapse guard before it is published; the adapter keeps serving its previous version, and the
    feedback says why. (The KL guard's rejection is tested in-process, test_trainer_step.py.)"""
    from openai import OpenAI

    base, log_path, _ = served
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    assert reply.choices[0].message.content
    log = log_path.read_text()
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


def test_reinit_conflict_and_per_request_training_settings_for_admins(served):
    """`router.reinit: conflict` keeps an existing adapter (409); `router.request_training` lets an admin's
    CLaaS-shaped feedback set the learning rate and KL weight of its own step, within bounds."""
    base, _, _ = served
    assert httpx.post(f"{base}/v1/lora/init", json={"lora_id": "sweep/s"}, timeout=120).status_code == 201
    again = httpx.post(f"{base}/v1/lora/init", json={"lora_id": "sweep/s"}, timeout=120)
    assert again.status_code == 409 and again.json()["error"]["code"] == "lora_exists"

    def feedback(training: dict) -> httpx.Response:
        return httpx.post(f"{base}/v1/feedback", timeout=300, json={"requests": [{
            "lora_id": "sweep-s", "prompt": "Tell me about the ocean.", "response": "The ocean is vast, deep and blue.",
            "feedback": "Be brief.", "training": training}]})

    tuned = feedback({"learning_rate": 1e-4, "alpha": 0.5, "is_clip": 5.0, "max_grad_norm": 1.0,
                      "kl_reg_weight": 0.05, "teacher_top_k": 100})
    assert tuned.status_code == 200, tuned.text
    (item,) = tuned.json()["items"]
    assert item["status"] == "applied" and item["metrics"]["learning_rate"] == pytest.approx(1e-4)  # not 5e-2
    assert tuned.json()["distill_result"]["metadata"]["total_loss"] > 0
    refused = feedback({"learning_rate": 1.0})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "items.0.training.learning_rate"


def test_serving_and_training_run_on_the_cores_the_config_gives_them(served):
    """`serving.cpu_cores: "0"` and `trainer.cpu_cores: "1"`: the engine's worker and the trainer are pinned; the
    replica and the engine's scheduler are not (a scheduler pinned beside the spinning worker starves)."""
    _, log_path, pid = served
    everywhere = tuple(sorted(psutil.Process().cpu_affinity()))
    expected = {"VLLM::EngineCore": everywhere, "VLLM::Worker": (0,),
                "ServeReplica:claas-ray:inference": everywhere, "ServeReplica:claas-ray:trainer": (1,)}
    # Twice (CI on 2026-12-02, and a local full run on 2026-12-03) the engine's processes were not found among
    # the app's processes by their titles while the serve log shows them alive and serving, so they are found by
    # the pids vLLM logs for them; the replicas by their titles. A failure shows every process under the app
    # and the serve log's errors.
    deadline = time.monotonic() + 180
    while True:
        pinned, processes = pinned_cores(pid, logged_engine_pids(log_path.read_text()))
        if pinned == expected or time.monotonic() > deadline:
            break
        time.sleep(5)
    errors = [line[-300:] for line in log_path.read_text().splitlines()
              if re.search(r"ERROR|unhealthy|died|Traceback|restart", line)]
    assert pinned == expected, (pinned, processes, errors[-20:])


def logged_engine_pids(log: str) -> dict[str, int]:
    """The pids of the inference replica's engine processes, from the prefixes vLLM gives its log lines."""
    found = {}
    for role, pattern in (("VLLM::EngineCore", r"\(EngineCore pid=(\d+)\)"), ("VLLM::Worker", r"\(Worker pid=(\d+)\)")):
        pids = re.findall(pattern, log)
        if pids:
            found[role] = int(pids[-1])
    return found


def pinned_cores(pid: int, engines: dict[str, int]) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """The CPU affinity of each of the app's roles: the replicas among the processes under `pid` by their titles,
    the engine's processes by their pids; and every process under `pid` as "pid ppid title"."""
    pinned: dict[str, tuple[int, ...]] = {}
    processes = []
    for process in psutil.Process(pid).children(recursive=True):
        try:
            title = " ".join(process.cmdline())
            processes.append(f"{process.pid} {process.ppid()} {title[:60]}")
            role = next((name for name in ("ServeReplica:claas-ray:inference", "ServeReplica:claas-ray:trainer")
                         if name in title), None)
            if role:
                pinned[role] = tuple(process.cpu_affinity())
        except psutil.NoSuchProcess:  # a short-lived helper that ended meanwhile
            continue
    for role, engine_pid in engines.items():
        try:
            pinned[role] = tuple(psutil.Process(engine_pid).cpu_affinity())
        except psutil.NoSuchProcess:
            continue
    return pinned, processes
