"""Kill vLLM's engine processes when the process that owns them dies without cleaning up.

vLLM's engine core runs in child processes that outlive a SIGKILLed parent (a Ray replica killed by
Ray, the OOM killer or a fault test) and keep gigabytes of RAM. This tiny watchdog runs in its own
session, polls the parent, and on its death kills the recorded children (checked by start time, so a
reused pid is never hit).

    python -m claas_ray.serving.orphan_reaper PARENT_PID CHILD_PID...
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil


def start(parent_pid: int, child_pids: list[int]) -> subprocess.Popen | None:
    if not child_pids:
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "claas_ray.serving.orphan_reaper", str(parent_pid), *map(str, child_pids)],
        start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def watch(parent_pid: int, child_pids: list[int], period_s: float = 1.0) -> None:
    children = []
    for pid in child_pids:
        try:
            process = psutil.Process(pid)
            children.append((process, process.create_time()))
        except psutil.NoSuchProcess:
            continue
    while psutil.pid_exists(parent_pid) and any(p.is_running() for p, _ in children):
        time.sleep(period_s)
    for process, created in children:
        try:
            if process.is_running() and process.create_time() == created:
                process.kill()
        except psutil.NoSuchProcess:
            pass


if __name__ == "__main__":
    watch(int(sys.argv[1]), [int(pid) for pid in sys.argv[2:]])
