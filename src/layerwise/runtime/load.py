"""Bounded machine load that the tool itself creates while training or testing the controller, so the
telemetry really varies: ``idle``, ``cpu`` (busy worker processes), ``memory`` (a ballast held by a worker
process), ``mixed`` (both, lighter), and ``spin1`` (one worker spinning all the time) and ``spin2`` (two, each half the time). Every worker is a child process that is always stopped on exit,
also after an error or Ctrl-C, and that stops itself when its parent is killed outright.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import dataclass

import psutil

from ..errors import LayerwiseError
from ..registry import Registry


@dataclass(frozen=True)
class LoadCondition:
    """``cpu_workers`` spinning processes (each busy ``duty`` of the time) and a ``memory_fraction`` ballast
    of the available memory (capped at ``memory_cap_gib``)."""

    name: str
    cpu_workers: int = 0
    duty: float = 1.0
    memory_fraction: float = 0.0
    memory_cap_gib: float = 4.0


LOAD_CONDITIONS: Registry[LoadCondition] = Registry("load condition")
LOAD_CONDITIONS.add("idle", LoadCondition("idle"))
LOAD_CONDITIONS.add("cpu", LoadCondition("cpu", cpu_workers=2, duty=0.9))
LOAD_CONDITIONS.add("memory", LoadCondition("memory", memory_fraction=0.5))
LOAD_CONDITIONS.add("mixed", LoadCondition("mixed", cpu_workers=1, duty=0.7, memory_fraction=0.3))
LOAD_CONDITIONS.add("spin1", LoadCondition("spin1", cpu_workers=1))
# two workers spinning all the time on 2 cores slow torch's two threads 3-15x, erratically (2.5-22 s for a
# request that takes 0.7 s idle on smollm2-135m): half-duty keeps the contention and makes it measurable
LOAD_CONDITIONS.add("spin2", LoadCondition("spin2", cpu_workers=2, duty=0.5))


def parse_load_profile(text: str) -> list[LoadCondition]:
    """``idle,cpu,memory,mixed`` as load conditions; unknown names raise."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise LayerwiseError(f"--load-profile needs at least one of {', '.join(LOAD_CONDITIONS.names())}.")
    return [LOAD_CONDITIONS.get(name) for name in names]


def _orphaned(parent: int) -> bool:
    """True once the process that started this worker is gone (killed without a chance to stop us)."""
    return os.getppid() != parent


def _spin(duty: float, parent: int) -> None:
    """Busy for ``duty`` of every 100 ms until terminated or orphaned."""
    while not _orphaned(parent):
        start = time.perf_counter()
        while time.perf_counter() - start < 0.1 * duty:
            pass
        time.sleep(0.1 * (1 - duty))


def _hold(size: int, ready, parent: int) -> None:
    ballast = bytearray(size)
    for offset in range(0, size, 4096):  # touch every page so it is resident
        ballast[offset] = 1
    ready.set()
    while not _orphaned(parent):
        time.sleep(0.5)


class MachineLoad:
    """Context manager that starts a load condition's workers and always stops them."""

    def __init__(self, condition: LoadCondition) -> None:
        self.condition = condition
        self.workers: list[multiprocessing.Process] = []

    def __enter__(self) -> "MachineLoad":
        context = multiprocessing.get_context("spawn")
        try:
            for _ in range(self.condition.cpu_workers):
                worker = context.Process(target=_spin, args=(self.condition.duty, os.getpid()), daemon=True)
                worker.start()
                self.workers.append(worker)
            if self.condition.memory_fraction > 0:
                size = int(min(psutil.virtual_memory().available * self.condition.memory_fraction,
                               self.condition.memory_cap_gib * 2**30))
                ready = context.Event()
                worker = context.Process(target=_hold, args=(size, ready, os.getpid()), daemon=True)
                worker.start()
                self.workers.append(worker)
                ready.wait(timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        for worker in self.workers:
            if worker.is_alive():
                worker.terminate()
        for worker in self.workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)
        self.workers = []
