"""Clean up after a serving process that dies without cleaning up: its vLLM engine processes and its files.

vLLM's engine core runs in child processes that outlive a SIGKILLed parent (a Ray replica killed by
Ray, the OOM killer or a fault test) and keep gigabytes of RAM; the adapter versions a replica wrote to
tmpfs are RAM too. This tiny watchdog runs in its own session, polls the parent, and on its death (or a
clean shutdown, once the engine is gone) kills the recorded children (checked by start time, so a reused
pid is never hit) and removes the parent's scratch folders.

    python -m claas_ray.serving.orphan_reaper PARENT_PID --pids CHILD_PID... --folders FOLDER...
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil


def start(parent_pid: int, child_pids: Sequence[int], folders: Sequence[Path] = ()) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "claas_ray.serving.orphan_reaper", str(parent_pid),
         "--pids", *map(str, child_pids), "--folders", *map(str, folders)],
        start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def watch(parent_pid: int, child_pids: Sequence[int], folders: Sequence[Path], period_s: float = 1.0) -> None:
    children = []
    for pid in child_pids:
        try:
            process = psutil.Process(pid)
            children.append((process, process.create_time()))
        except psutil.NoSuchProcess:
            continue
    # A clean shutdown ends the engine first; a killed parent ends nothing, so watch both.
    while psutil.pid_exists(parent_pid) and (not children or any(p.is_running() for p, _ in children)):
        time.sleep(period_s)
    for process, created in children:
        try:
            if process.is_running() and process.create_time() == created:
                process.kill()
        except psutil.NoSuchProcess:
            pass
    if psutil.pid_exists(parent_pid) and children:
        return  # the engine ended but its owner lives on (it may start another): its files are still in use
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("parent_pid", type=int)
    parser.add_argument("--pids", type=int, nargs="*", default=[])
    parser.add_argument("--folders", type=Path, nargs="*", default=[])
    args = parser.parse_args()
    watch(args.parent_pid, args.pids, args.folders)
