"""CPU cores of their own for the trainer and the CPU inference engine (`trainer.cpu_cores`, `serving.cpu_cores`).

On the CPU build, vLLM binds its engine's threads to cores and spins on them, and a step's threads share the
machine with it; where a machine has cores to spare, giving each its own keeps a step from slowing serving and
serving from slowing a step. Cores are written as Linux CPU lists ("0", "2-5", "0,4-7").
"""

from __future__ import annotations

import os
import re

CPU_LIST_PATTERN = r"^\d+(-\d+)?(,\d+(-\d+)?)*$"


def parse_cpu_list(text: str) -> list[int]:
    """"0,4-6" -> [0, 4, 5, 6]; ValueError for anything else, a backwards range included."""
    if not re.fullmatch(CPU_LIST_PATTERN, text):
        raise ValueError(f"{text!r} is not a CPU list such as '0', '2-5' or '0,4-7'")
    cores: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        start, end = int(first), int(last or first)
        if end < start:
            raise ValueError(f"{part!r} in {text!r} is a backwards range")
        cores.update(range(start, end + 1))
    return sorted(cores)


def available_cores(text: str, key: str) -> list[int]:
    """The cores of `text`, checked against the ones this process may run on (ValueError naming `key`)."""
    cores = parse_cpu_list(text)
    allowed = os.sched_getaffinity(0)
    missing = [core for core in cores if core not in allowed]
    if missing:
        raise ValueError(f"{key}: CPUs {missing} are not available on this node (it has {sorted(allowed)})")
    return cores


def pin_process(cores: list[int]) -> None:
    """Every thread of this process, and each it starts later, runs on `cores` only."""
    for thread in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(thread), cores)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass
