"""The orphan reaper kills engine children of a parent that died by SIGKILL, and nothing else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
from claas_ray.serving import orphan_reaper
orphan_reaper.start(__import__("os").getpid(), [child.pid])
print(child.pid, bystander.pid, flush=True)
time.sleep(600)
"""


def test_children_die_with_their_parent():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child_pid, bystander_pid = map(int, parent.stdout.readline().split())
    try:
        assert psutil.pid_exists(child_pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and psutil.pid_exists(child_pid) and psutil.Process(child_pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.2)
        assert not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE
        assert psutil.pid_exists(bystander_pid)  # only the recorded children are touched
    finally:
        for pid in (child_pid, bystander_pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
