"""Bounded machine load that the tool itself creates while training or testing the controller, so the
telemetry really varies: ``idle``, ``cpu`` (busy worker processes), ``memory`` (a ballast held by a worker
process), ``mixed`` (both, lighter), and ``spin1`` (one worker spinning all the time) and ``spin2`` (two, each half the time). Every worker is a child process that is always stopped on exit,
also after an error or Ctrl-C, and that stops itself when its parent is killed outright.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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


_WORKER = Path(__file__).with_name("load_worker.py")
READY_TIMEOUT_S = 60.0


def _start_worker(kind: str, argument: float | int) -> subprocess.Popen:
    """Start one worker and return once its load is on (it printed ``ready``)."""
    worker = subprocess.Popen([sys.executable, "-I", str(_WORKER), kind, str(argument), str(os.getpid())],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([worker.stdout], [], [], READY_TIMEOUT_S)
    line = worker.stdout.readline() if ready else ""
    if line.strip() != "ready":
        exited = None
        if ready:  # end of its output: it is exiting, so wait for its exit code (a moment after the pipe closed)
            try:
                exited = worker.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        worker.kill()
        worker.wait()
        worker.stdout.close()
        raise LayerwiseError(f"A {kind} load worker exited with code {exited} before its load was on."
                             if exited is not None else
                             f"A {kind} load worker did not put its load on within {READY_TIMEOUT_S:.0f} s.")
    return worker


class MachineLoad:
    """Context manager that starts a load condition's workers, returns once their load is on, and always stops
    them."""

    def __init__(self, condition: LoadCondition) -> None:
        self.condition = condition
        self.workers: list[subprocess.Popen] = []

    def __enter__(self) -> "MachineLoad":
        try:
            for _ in range(self.condition.cpu_workers):
                self.workers.append(_start_worker("spin", self.condition.duty))
            if self.condition.memory_fraction > 0:
                size = int(min(psutil.virtual_memory().available * self.condition.memory_fraction,
                               self.condition.memory_cap_gib * 2**30))
                self.workers.append(_start_worker("hold", size))
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.terminate()
        for worker in self.workers:
            try:
                worker.wait(timeout=5)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(timeout=5)
            worker.stdout.close()
        self.workers = []
