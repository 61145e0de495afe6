"""The orphan reaper cleans up after a parent that died by SIGKILL: its engine children and its scratch
folders, and nothing else; while the parent lives, nothing is touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

PARENT = """
import subprocess, sys, time
from pathlib import Path
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
scratch = Path(sys.argv[1]) / "replica-1" / "alice" / "3"
scratch.mkdir(parents=True)
(scratch / "adapter_model.safetensors").write_bytes(b"x" * 1000)
from claas_ray.serving import orphan_reaper
orphan_reaper.start(__import__("os").getpid(), [child.pid], [scratch.parents[1]])
print(child.pid, bystander.pid, flush=True)
time.sleep(600)
"""


def wait_until(condition, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not condition():
        time.sleep(0.2)
    return condition()


def test_children_and_scratch_go_with_their_parent(tmp_path):
    (tmp_path / "replica-2").mkdir()  # another replica's folder, alive
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child_pid, bystander_pid = map(int, parent.stdout.readline().split())

    def child_gone() -> bool:
        return not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE

    try:
        time.sleep(2)  # the reaper polls every second: the living parent keeps everything
        assert not child_gone() and (tmp_path / "replica-1" / "alice" / "3").is_dir()
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert wait_until(child_gone)
        assert wait_until(lambda: not (tmp_path / "replica-1").exists())
        assert psutil.pid_exists(bystander_pid)  # only the recorded children are touched
        assert (tmp_path / "replica-2").is_dir()  # and only the recorded folders
    finally:
        for pid in (child_pid, bystander_pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
