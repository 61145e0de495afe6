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
import json
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


HEAD_RESOURCES = {"claas_head": 1, "claas_replica_slot": 1}
SECOND_NODE_RESOURCES = {"claas_node2": 1, "claas_replica_slot": 1}
"""Each node's own custom resource pins deployments to it (the session app's router and trainer take `claas_head`);
one `claas_replica_slot` per node puts one inference replica on each."""


class RayCluster:
    """`ray start --head` from the venv, on loopback only, with ports of its own; `add_node` joins a second node
    as `ray start --address` does on another machine."""

    def __init__(self, workdir: Path, num_cpus: int = 4):
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        # As `claas-ray serve` starts a cluster of its own (deployments/launch.py, local_cluster_environment).
        self.env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_worker_niceness="0",
                        PATH=f"{VENV_BIN}:{os.environ['PATH']}")
        self.workdir = workdir
        self.nodes: list[RayNode] = []
        # Token auth is on (RAY_AUTH_MODE=token): a fresh machine has no token until one is generated.
        subprocess.run([str(VENV_BIN / "ray"), "get-auth-token", "--generate"], check=True, env=self.env,
                       capture_output=True, timeout=60)
        subprocess.run(
            [str(VENV_BIN / "ray"), "start", "--head", f"--port={self.gcs_port}", f"--num-cpus={num_cpus}",
             f"--resources={json.dumps(HEAD_RESOURCES)}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard_port}", "--disable-usage-stats"],
            check=True, env=self.env, cwd=ROOT, capture_output=True, timeout=120,
        )

    def add_node(self, num_cpus: int = 1, resources: dict[str, float] = SECOND_NODE_RESOURCES) -> RayNode:
        node = RayNode(self, num_cpus, resources)
        self.nodes.append(node)
        return node

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        env = dict(self.env, RAY_ADDRESS=self.address)
        return subprocess.run(list(args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=check)

    def stop(self) -> None:
        # No graceful `serve shutdown` (20 s of the suite): each replica's orphan reaper takes its vLLM engine and
        # tmpfs folder with it, and whatever is left is killed below.
        subprocess.run([str(VENV_BIN / "ray"), "stop", "--force"], env=self.env, capture_output=True, timeout=120)
        for node in self.nodes:
            node.kill()
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


def replica_pids(deployment: str, processes: list | None = None) -> list[int]:
    """The processes of a deployment's Serve replicas: on this machine, or among `processes`."""
    import psutil

    marker = f"ServeReplica:claas-ray:{deployment}"
    found = []
    for process in psutil.process_iter() if processes is None else processes:
        with contextlib.suppress(psutil.Error):
            if any(marker in part for part in process.cmdline()):
                found.append(process.pid)
    return sorted(found)


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


class RayNode:
    """A worker node on this machine with a temp dir and a custom resource of its own, started as Ray's test
    clusters add one (tests/ray_worker_node.py). Its processes (raylet, agents, workers, their vLLM engines) all
    descend from one, so `kill` takes down exactly them, as if its machine had died.

    Not in a session of its own: Linux would schedule that session as one task against every thread of the
    head's (autogroups), and a replica starting there got 5% of a core while the head served."""

    def __init__(self, cluster: RayCluster, num_cpus: int, resources: dict[str, float]):
        import tempfile

        self.temp_dir = Path(tempfile.mkdtemp(prefix="claas-node-", dir="/tmp"))  # short: Ray's socket paths
        log_path = self.temp_dir.with_suffix(".log")
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in kill()
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "ray_worker_node.py"), f"--address={cluster.address}",
             f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}", f"--temp-dir={self.temp_dir}"],
            env=cluster.env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while "is up" not in log_path.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the second Ray node did not start: {log_path.read_text()[-3000:]}")
            time.sleep(0.5)

    def processes(self) -> list:
        """The node's processes, but not a replica's orphan reaper (it runs in a session of its own to outlive the
        replica, and cleans up after it as after any lone crash)."""
        import psutil

        try:
            root = psutil.Process(self.process.pid)
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        found = []
        for process in family:
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getsid(process.pid) == os.getsid(self.process.pid):
                    found.append(process)
        return found

    def replica_pids(self, deployment: str) -> list[int]:
        return replica_pids(deployment, self.processes())

    def kill(self) -> None:
        """SIGKILL, all at once: no process of the node gets to clean up or say goodbye."""
        for process in self.processes():
            with contextlib.suppress(Exception):
                process.kill()
        self.process.wait()
        self.log.close()

    def worker_logs(self, marker: str, chars: int = 4000) -> str:
        """The end of the logs of this node's workers that mention `marker` (a replica's name), for a failure."""
        found = []
        for path in sorted(self.temp_dir.glob("session_*/logs/worker-*")):
            text = path.read_text(errors="replace")
            if marker in text:
                found.append(f"--- {path.name}\n{text[-chars:]}")
        return "\n".join(found)


def write_serve_config(source: Path, target: Path, port: int, overrides: dict,
                       env_vars: dict[str, str] | None = None) -> Path:
    """A copy of a shipped serve YAML with the test's port, folders and settings, and nothing else changed;
    `env_vars` go to every deployment (the application's runtime_env)."""
    spec = yaml.safe_load(source.read_text())
    spec["http_options"]["port"] = port
    if env_vars:
        spec["applications"][0].setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env_vars)
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
    """Two Ray nodes on loopback: the head (4 CPUs) and a second node (1 CPU), each with its own custom resource."""
    cluster = RayCluster(tmp_path_factory.mktemp("ray"))
    try:
        cluster.add_node()
        yield cluster
    finally:
        cluster.stop()


# The session app tests the service's plumbing (queues, versions, broadcast, restarts, auth, the APIs), which does
# not depend on the recipe: its steps skip the teacher's rollouts, the collapse guard and the KL guard's extra
# forward pass, and make one update, not two: a few seconds on a short item instead of 25. That the shipped recipe
# teaches is asserted on an app that runs configs/local.yaml as shipped (test_eval_run.py) and in-process
# (test_learning.py); the collapse guard through an app in test_cli_serve.py, the KL guard in test_trainer_step.py.
PLUMBING_TRAINING = {"teacher_rollouts": 0, "collapse_check_tokens": None, "max_kl_to_base": None, "optimizer_steps": 1}
ADMIN_KEY = f"sk-claas-admin-{uuid.uuid4().hex}"
TENANT_KEYS = {name: f"sk-claas-{name}-{uuid.uuid4().hex}" for name in ("alice", "bob", "openclaw")}
MAX_PENDING_PER_ADAPTER = 8  # one step's batch (trainer.max_batch_items): a full queue drains in one step


def sha256_hex(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="session")
def app(ray_cluster, s3_server, postgres_server, tmp_path_factory):
    """configs/local.yaml made a cluster deployment (as configs/cluster.yaml is) and deployed with `serve deploy` on
    the session's two-node cluster: router and trainer pinned to the head, one inference replica on each node,
    adapters in S3 (moto's server) and the journal and completion log in PostgreSQL, the only state the nodes share.
    Auth on, the plumbing recipe (PLUMBING_TRAINING).

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
            "multi_node": True,
            "serving": {"num_replicas": 2, "replica_num_cpus": 1, "replica_resources": {"claas_replica_slot": 1}},
            "training": PLUMBING_TRAINING,
            "store": {"kind": "s3", "bucket": s3_server.new_bucket(), "prefix": "adapters",
                      "endpoint_url": s3_server.endpoint_url, "root": str(workdir / "s3-cache")},
            "journal": {"kind": "postgres", "dsn": postgres_server.new_database()},
            "state_dir": str(workdir / "state"),
            "trainer": {"max_pending_per_adapter": MAX_PENDING_PER_ADAPTER, "tmpfs_dir": str(scratch),
                        "resources": {"claas_head": 0.5}},
            "router": {"resources": {"claas_head": 0.5}},
            "auth": {"enabled": True, "keys": [{"key": ADMIN_KEY, "admin": True}], "keys_file": str(keys_file)},
        },
        env_vars=S3_TEST_ENVIRONMENT,
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
        self.state_dir = workdir / "state"
        self.admin_key = ADMIN_KEY

    def diagnosis(self) -> str:
        """What Serve and Ray say about the app and the cluster, for an assertion's message."""
        serve = self.cluster.run(str(VENV_BIN / "serve"), "status", "--address", self.cluster.dashboard, check=False)
        ray = self.cluster.run(str(VENV_BIN / "ray"), "status", check=False)
        groups = self.cluster.run(str(VENV_BIN / "ray"), "list", "placement-groups", "--address", self.cluster.dashboard,
                                  check=False)
        return "\n".join(done.stdout[-3000:] + done.stderr[-1000:] for done in (serve, ray, groups))

    def config(self):
        from claas_ray.config import load_config

        return load_config(yaml.safe_load(self.config_path.read_text())["applications"][0]["args"])

    def store(self):
        """The app's adapter store, as a deployment opens it."""
        from claas_ray.stores import open_store

        return open_store(self.config().store)

    def journal(self):
        from claas_ray.feedback.journal import FeedbackJournal
        from claas_ray.sql_database import open_database

        return FeedbackJournal(open_database(self.config(), "feedback.sqlite", "FULL"))

    def completions(self):
        from claas_ray.serving.completion_log import CompletionLog
        from claas_ray.sql_database import open_database

        return CompletionLog(open_database(self.config(), "completions.sqlite", "NORMAL"))

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


S3_TEST_ENVIRONMENT = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"}
"""Static test credentials, and no instance-metadata lookups: nothing may leave 127.0.0.1."""


@pytest.fixture(scope="session")
def s3_server():
    os.environ.update(S3_TEST_ENVIRONMENT)
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
