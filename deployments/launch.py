"""`claas-ray serve`: start (or join) Ray and run the applications of a serve YAML, like `serve run`."""

from __future__ import annotations

import importlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "local.yaml"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def import_builder(import_path: str):
    """`module:attr` or `module.attr`, as serve YAMLs write it."""
    module_name, attribute = import_path.split(":", 1) if ":" in import_path else import_path.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), attribute)


def wait_healthy(url: str, timeout_s: float, alive: Callable[[], bool] | None = None) -> None:
    """Poll `url` until it answers 200; fail early if `alive` says the thing starting it has died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"the process serving {url} exited before it answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s")


def local_cluster_environment() -> None:
    """Settings for a cluster of our own on one machine, before Ray starts it.

    Every Ray socket on 127.0.0.1 (never when joining a cluster, `--address auto` or host:port: there it would
    make Ray refuse the other nodes). Workers at normal CPU priority: Ray starts them at niceness 15, so on a
    small machine the inference engine lost the CPU to every ordinary process (the serving benchmark's own
    client made the endpoint 0.68x the bare engine); the trainer lowers its own priority instead
    (`trainer.cpu_niceness`), so serving comes first.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")


def serve_config(
    path: str | Path, address: str | None = None, port: int | None = None, block: bool = True, ready_timeout_s: float = 900,
    dashboard_port: int = 8265,
) -> list[str]:
    """Deploy every application in a serve YAML and wait until each answers; returns their API URLs.

    A cluster started here gets Ray's dashboard on 127.0.0.1:`dashboard_port`, so `ray job submit` (replay and
    evaluation jobs) works against it as against a `ray start --head` cluster; a joined cluster keeps its own.
    With `block`, keeps serving until Ctrl-C or SIGTERM, then shuts the applications down.
    """
    if address == "local" or (address is None and not os.environ.get("RAY_ADDRESS")):
        local_cluster_environment()
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # the dashboard API and jobs need a token
    import ray
    from ray import serve

    spec: dict[str, Any] = yaml.safe_load(Path(path).read_text())
    http_options = dict(spec.get("http_options") or {})
    if port is not None:
        http_options["port"] = port
    host, listen = http_options.get("host", "127.0.0.1"), http_options.get("port", 8000)
    open_apps = [a["name"] for a in spec["applications"] if (a.get("args") or {}).get("auth", {}).get("enabled") is False]
    if open_apps and host not in LOOPBACK:
        raise ValueError(f"auth is off for {open_apps} (auth.enabled: false): serve it on 127.0.0.1, not {host}")
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
                 configure_logging=False)
    serve.start(proxy_location=spec.get("proxy_location", "HeadOnly"), http_options=http_options)
    urls = []
    for application in spec["applications"]:
        builder = import_builder(application["import_path"])
        route = application.get("route_prefix", "/")
        serve.run(builder(application.get("args") or {}), name=application["name"], route_prefix=route, blocking=False)
        root = f"http://{host}:{listen}{route.rstrip('/')}"
        wait_healthy(f"{root}/health", ready_timeout_s)
        urls.append(f"{root}/v1")
    for url in urls:
        print(f"claas-ray is serving an OpenAI-compatible API at {url}", flush=True)
    if open_apps:
        print(f"auth is OFF for {', '.join(open_apps)} (auth.enabled: false): open to every local caller, "
              f"for local use only", flush=True)
    if block:
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        finally:
            serve.shutdown()
    return urls
