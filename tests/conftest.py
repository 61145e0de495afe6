"""Shared fixtures. Ray and the app start once per session (see DEVELOPERS.md), never per test."""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep every Ray socket on 127.0.0.1
os.environ.setdefault("RAY_AUTH_MODE", "token")  # the cluster and every client (serve, ray job) agree on token auth
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that do not need the session app run first, before it starts: its two vLLM replicas and
    trainer then cannot take the two cores or the RAM from in-process training or from apps of their own."""
    items.sort(key=lambda item: "app" in getattr(item, "fixturenames", ()))  # stable: file order otherwise


@pytest.fixture(scope="session")
def trainer():
    """The real SDPO trainer on the embedded SmolLM2-135M model (pulled on demand), in the shipped training dtype
    unless CLAAS_RAY_TEST_DTYPE names another (how the learning tests compare float32 and bfloat16)."""
    from claas_ray.config import ModelConfig
    from claas_ray.training import SDPOTrainer

    dtype = os.environ.get("CLAAS_RAY_TEST_DTYPE", "auto")
    return SDPOTrainer(ModelConfig(max_model_len=8192, dtype=dtype))  # the whole context, as configs/local.yaml


@pytest.fixture(scope="session")
def fp32_trainer():
    """The trainer in float32, for tests that two ways of computing a step agree to float32 precision (bf16 keeps
    about three significant digits, and a different split of the same sum rounds differently)."""
    from claas_ray.config import ModelConfig
    from claas_ray.training import SDPOTrainer

    return SDPOTrainer(ModelConfig(max_model_len=8192, dtype="float32"))


# --- a real local Ray cluster and the real app, once per session -------------------------------
import contextlib
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import yaml

from deployments.launch import wait_healthy

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    wait_healthy(url, timeout, alive=None if process is None else (lambda: process.poll() is None))


class RayCluster:
    """`ray start --head` from the venv, on loopback only, with ports of its own."""

    def __init__(self, workdir: Path, num_cpus: int = 4):
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        # As `claas-ray serve` starts a cluster of its own (deployments/launch.py, local_cluster_environment).
        self.env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_worker_niceness="0",
                        PATH=f"{VENV_BIN}:{os.environ['PATH']}")
        self.workdir = workdir
        # Token auth is on (RAY_AUTH_MODE=token): a fresh machine has no token until one is generated.
        subprocess.run([str(VENV_BIN / "ray"), "get-auth-token", "--generate"], check=True, env=self.env,
                       capture_output=True, timeout=60)
        subprocess.run(
            [str(VENV_BIN / "ray"), "start", "--head", f"--port={self.gcs_port}", f"--num-cpus={num_cpus}",
             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
             "--disable-usage-stats"],
            check=True, env=self.env, cwd=ROOT, capture_output=True, timeout=120,
        )

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        env = dict(self.env, RAY_ADDRESS=self.address)
        return subprocess.run(list(args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=check)

    def stop(self) -> None:
        # Graceful first, so replicas shut their engines down; then the processes themselves.
        self.run(str(VENV_BIN / "serve"), "shutdown", "-y", "--address", self.dashboard, timeout=180, check=False)
        subprocess.run([str(VENV_BIN / "ray"), "stop", "--force"], env=self.env, capture_output=True, timeout=120)
        deadline = time.monotonic() + 15  # the orphan reaper needs a moment after a forced stop
        while orphan_engines() and time.monotonic() < deadline:
            time.sleep(1)
        leaked = orphan_engines()
        for process in leaked:
            process.kill()
        if leaked:
            warnings.warn(f"killed {len(leaked)} orphaned vLLM processes after the Ray cluster stopped")


def engine_pids(expected: int = 2, timeout: float = 420) -> set[int]:
    """The vLLM engine-core processes, once each inference replica has started its own (the app's /health
    answers before its inference replicas have)."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        found = {p.pid for p in psutil.process_iter(["cmdline"])
                 if " ".join(p.info["cmdline"] or []).startswith("VLLM::EngineCore")}
        if len(found) >= expected or time.monotonic() > deadline:
            return found
        time.sleep(1)


def orphan_engines() -> list:
    import psutil

    found = []
    for process in psutil.process_iter(["name", "cmdline", "ppid"]):
        title = " ".join(process.info["cmdline"] or []) or process.info["name"] or ""
        if title.startswith("VLLM::") and process.info["ppid"] == 1:
            found.append(process)
    return found


@contextlib.contextmanager
def claas_ray_serve(config: Path, log_path: Path, port: int, dashboard_port: int | None = None):
    """`claas-ray serve --address local` (a fresh cluster of its own) until the block ends, then SIGTERM.

    `tests/` is on its PYTHONPATH (inherited by the cluster's workers), so a config may name the tests' stand-ins.
    The cluster's dashboard (`ray job submit`) is on 127.0.0.1:`dashboard_port`, a free port unless given.
    """
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])))
    env.pop("RAY_ADDRESS", None)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(VENV_BIN / "claas-ray"), "serve", "--config", str(config), "--address", "local",
             "--dashboard-port", str(dashboard_port or free_port())],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            wait_for(f"http://127.0.0.1:{port}/health", timeout=420, process=process)
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                raise


def write_serve_config(source: Path, target: Path, port: int, overrides: dict) -> Path:
    """A copy of a shipped serve YAML with the test's port and folders, and nothing else changed."""
    spec = yaml.safe_load(source.read_text())
    spec["http_options"]["port"] = port
    args = spec["applications"][0]["args"]
    for section, values in overrides.items():
        if isinstance(values, dict):
            args.setdefault(section, {}).update(values)
        else:
            args[section] = values
    target.write_text(yaml.safe_dump(spec))
    return target


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    cluster = RayCluster(tmp_path_factory.mktemp("ray"))
    yield cluster
    cluster.stop()


# The session app tests the service's plumbing (queues, versions, broadcast, restarts, auth, the APIs), which does
# not depend on the recipe: its steps skip the teacher's rollouts and the collapse guard and make one update, not
# two: a few seconds on a short item instead of 25. That the shipped recipe teaches is asserted on an app that
# runs configs/local.yaml as shipped (test_eval_run.py) and in-process (test_learning.py); the collapse guard
# through an app in test_cli_serve.py.
PLUMBING_TRAINING = {"teacher_rollouts": 0, "collapse_check_tokens": None, "optimizer_steps": 1}
ADMIN_KEY = f"sk-claas-admin-{uuid.uuid4().hex}"
TENANT_KEYS = {name: f"sk-claas-{name}-{uuid.uuid4().hex}" for name in ("alice", "bob", "openclaw")}
MAX_PENDING_PER_ADAPTER = 8  # one step's batch (trainer.max_batch_items): a full queue drains in one step


def sha256_hex(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="session")
def app(ray_cluster, tmp_path_factory):
    """configs/local.yaml deployed with `serve deploy` on the session cluster: 2 inference replicas, auth on, the
    plumbing recipe (PLUMBING_TRAINING).

    The admin key is in the config; the tenants' keys are SHA-256 digests in a keys file.
    """
    workdir = tmp_path_factory.mktemp("app")
    scratch = Path(f"/dev/shm/claas-ray-tests-{workdir.name}-{os.getpid()}")  # the replicas' tmpfs folders
    port = free_port()
    keys_file = workdir / "keys.yaml"
    keys_file.write_text(yaml.safe_dump([{"key_sha256": sha256_hex(key), "tenant": name} for name, key in TENANT_KEYS.items()]))
    config = write_serve_config(
        ROOT / "configs" / "local.yaml", workdir / "serve.yaml", port,
        {
            "serving": {"num_replicas": 2, "replica_num_cpus": 1},
            "training": PLUMBING_TRAINING,
            "store": {"root": str(workdir / "adapters")},
            "state_dir": str(workdir / "state"),
            "trainer": {"max_pending_per_adapter": MAX_PENDING_PER_ADAPTER, "tmpfs_dir": str(scratch)},
            "auth": {"enabled": True, "keys": [{"key": ADMIN_KEY, "admin": True}], "keys_file": str(keys_file)},
        },
    )
    ray_cluster.run(str(VENV_BIN / "serve"), "deploy", str(config), "--address", ray_cluster.dashboard)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base_url}/health", timeout=420)
    except TimeoutError:
        status = ray_cluster.run(str(VENV_BIN / "serve"), "status", "--address", ray_cluster.dashboard, check=False)
        pytest.fail(f"the app did not come up:\n{status.stdout}\n{status.stderr}")
    yield AppHandle(base_url=base_url, config_path=config, workdir=workdir, cluster=ray_cluster, keys_file=keys_file,
                    scratch=scratch)
    shutil.rmtree(scratch, ignore_errors=True)  # the session's end: the replicas go with the cluster


class AppHandle:
    def __init__(self, base_url: str, config_path: Path, workdir: Path, cluster: RayCluster, keys_file: Path,
                 scratch: Path):
        self.base_url = base_url
        self.scratch = scratch  # trainer.tmpfs_dir: one folder per inference replica
        self.config_path = config_path
        self.workdir = workdir
        self.cluster = cluster
        self.keys_file = keys_file
        self.store_root = workdir / "adapters"
        self.state_dir = workdir / "state"
        self.admin_key = ADMIN_KEY

    @staticmethod
    def headers(key: str = ADMIN_KEY) -> dict[str, str]:
        return {"authorization": f"Bearer {key}"}

    def request(self, method: str, path: str, key: str = ADMIN_KEY, **kwargs):
        """One HTTP call to the app, as the admin unless another key is given."""
        import httpx

        headers = {**self.headers(key), **kwargs.pop("headers", {})}
        return httpx.request(method, f"{self.base_url}{path}", headers=headers, timeout=kwargs.pop("timeout", 300), **kwargs)

    def final_statuses(self, ids: list[str], timeout: float) -> list[dict]:
        """Poll feedback items until each is applied or rejected."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            statuses = [self.request("GET", f"/v1/feedback/{fid}").json() for fid in ids]
            if all(s["status"] in ("applied", "rejected") for s in statuses):
                return statuses
            time.sleep(0.5)
        raise TimeoutError(f"feedback not final: {statuses}")

    def openai(self, key: str = ADMIN_KEY):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.base_url}/v1", api_key=key, max_retries=0, timeout=300)

    def job_env(self) -> str:
        """`ray job submit --runtime-env-json`: the jobs read their key from the environment, not argv."""
        import json

        return json.dumps({"env_vars": {"CLAAS_RAY_API_KEY": ADMIN_KEY}})


# --- a real S3-compatible server (moto in server mode) on 127.0.0.1 ---------------------------
class S3Server:
    """moto's S3 over HTTP on loopback; boto3 talks to it as it would to AWS."""

    def __init__(self):
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        self.process.kill()
        raise RuntimeError("moto_server did not start")

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    def new_bucket(self) -> str:
        name = f"claas-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server():
    # Static test credentials, and no instance-metadata lookups: nothing may leave 127.0.0.1.
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    server = S3Server()
    yield server
    server.process.kill()
    server.process.wait()


# --- a real PostgreSQL server (Debian's package) on 127.0.0.1 -------------------------------------
class PostgresServer:
    """`initdb` + `postgres` in a temporary folder, on a loopback port, trust auth; run as the `postgres` user
    when the tests run as root (PostgreSQL refuses root)."""

    def __init__(self, workdir: Path):
        binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        if not binaries:
            raise RuntimeError("PostgreSQL is not installed (Debian's `postgresql` package; scripts/test.sh installs it)")
        bin_dir = binaries[-1]
        self.port = free_port()
        self.dsn = f"host=127.0.0.1 port={self.port} user=claas dbname=postgres"
        workdir.mkdir(parents=True, exist_ok=True)
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if as_user:
            shutil.chown(workdir, "postgres")
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(workdir / "data"), "-A", "trust", "-U", "claas",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=120)
        self.process = subprocess.Popen(
            [*as_user, str(bin_dir / "postgres"), "-D", str(workdir / "data"), "-h", "127.0.0.1", "-p", str(self.port),
             "-k", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        import psycopg

        deadline = time.time() + 60
        while True:
            try:
                psycopg.connect(self.dsn, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.time() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError("postgres did not start") from None
                time.sleep(0.2)

    def new_database(self) -> str:
        """A fresh database on the server; returns its connection string."""
        import psycopg

        name = f"claas_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.dsn.replace("dbname=postgres", f"dbname={name}")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)  # a smart shutdown
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="session")
def postgres_server():
    import tempfile

    # Not under pytest's temporary folder: that is private to root, and the server runs as `postgres`.
    workdir = Path(tempfile.mkdtemp(prefix="claas-ray-postgres-"))
    server = PostgresServer(workdir)
    yield server
    server.stop()
    shutil.rmtree(workdir, ignore_errors=True)
