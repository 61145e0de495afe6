"""The app the benchmarks measure: configs/local.yaml in a fresh local Ray cluster, with folders of its own."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


class LocalApp:
    """Edit `args` (the serve YAML's app args) before `serving()` starts it."""

    def __init__(self, prefix: str = "claas-bench-"):
        self.workdir = Path(tempfile.mkdtemp(prefix=prefix))
        self.spec: dict[str, Any] = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
        self.args: dict[str, Any] = self.spec["applications"][0]["args"]
        self.args["store"]["root"] = str(self.workdir / "adapters")
        self.args["state_dir"] = str(self.workdir / "state")

    @contextlib.contextmanager
    def serving(self, port_base: int = 19000) -> Iterator[str]:
        """The app's base URL (no /v1) while the block runs; Serve and Ray are shut down after it."""
        import ray
        from ray import serve

        from deployments.launch import local_cluster_environment, serve_config

        local_cluster_environment()  # before Ray starts: as `claas-ray serve` runs the app
        path = self.workdir / "serve.yaml"
        path.write_text(yaml.safe_dump(self.spec))
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout is the benchmark's JSON alone
                (url,) = serve_config(path, port=port_base + os.getpid() % 1000, block=False)
            yield url.removesuffix("/v1")
        finally:
            with contextlib.redirect_stdout(sys.stderr):  # Ray's shutdown notices too
                serve.shutdown()
                ray.shutdown()
