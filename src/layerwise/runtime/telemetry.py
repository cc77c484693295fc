"""Hardware telemetry for the runtime controller, each reading normalised to about [0, 1].

The vector (``TELEMETRY_FEATURES``, in order): CPU utilisation by *other* processes since the previous reading
(all CPUs' busy time less this process's own, over wall time × CPUs: the server's own decoding keeps the cores
busy, so plain utilisation reads ~100% whatever else runs), 1-minute load
average per core (capped at 2), available memory fraction, this process's resident memory over total
memory; GPU utilisation, memory used fraction and power over its limit through NVML (``nvidia-ml-py``) when
a GPU exists, else 0; battery charge and "on battery" when a battery exists, else 1 and 0.
"""

from __future__ import annotations

import contextlib
import os
import time
from functools import lru_cache
from typing import Any

import psutil

TELEMETRY_FEATURES = ("cpu", "load", "memory_available", "process_rss", "gpu_util", "gpu_memory", "gpu_power",
                      "battery", "on_battery")


@lru_cache(maxsize=1)
def _nvml_handle() -> Any | None:
    """The first GPU's NVML handle, or None without nvidia-ml-py or a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # no library, no driver, no device: all mean "no GPU telemetry"
        return None


def _gpu() -> tuple[float, float, float]:
    handle = _nvml_handle()
    if handle is None:
        return 0.0, 0.0, 0.0
    import pynvml

    utilisation = pynvml.nvmlDeviceGetUtilizationRates(handle)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        power = pynvml.nvmlDeviceGetPowerUsage(handle) / max(1, pynvml.nvmlDeviceGetEnforcedPowerLimit(handle))
    except pynvml.NVMLError:
        power = 0.0
    return utilisation.gpu / 100.0, memory.used / max(1, memory.total), power


class Telemetry:
    """Reads ``TELEMETRY_FEATURES``; CPU utilisation is measured between consecutive reads (non-blocking)."""

    def __init__(self, children_are_own: bool = False) -> None:
        """``children_are_own``: count this process's children as its own work (a benchmark's subprocesses), not
        as other processes' (the runtime's load workers, which are children too, must read as load)."""
        self.process = psutil.Process(os.getpid())
        self.cpus = psutil.cpu_count() or 1
        self.children_are_own = children_are_own
        self.last = self._clocks()  # starts the utilisation window

    def _clocks(self) -> tuple[float, float, float]:
        """(wall, busy CPU seconds of the machine, CPU seconds of this process and, if own, its children)."""
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        own = self.process.cpu_times()
        seconds = own.user + own.system
        if self.children_are_own:
            seconds += own.children_user + own.children_system  # those already waited for
            for child in self.process.children(recursive=True):
                with contextlib.suppress(psutil.Error):  # gone since listed: counted once waited for
                    used = child.cpu_times()
                    seconds += used.user + used.system
        return time.monotonic(), busy, seconds

    def external_cpu(self) -> float:
        """Share of all CPUs used by other processes since the previous call, in [0, 1]."""
        now = self._clocks()
        wall, busy, own = (a - b for a, b in zip(now, self.last))
        self.last = now
        if wall <= 0:
            return 0.0
        return min(1.0, max(0.0, (busy - own) / (wall * self.cpus)))

    def read(self) -> dict[str, float]:
        memory = psutil.virtual_memory()
        gpu_util, gpu_memory, gpu_power = _gpu()
        battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
        return {
            "cpu": self.external_cpu(),
            "load": min(2.0, os.getloadavg()[0] / self.cpus) if hasattr(os, "getloadavg") else 0.0,
            "memory_available": memory.available / memory.total,
            "process_rss": self.process.memory_info().rss / memory.total,
            "gpu_util": gpu_util,
            "gpu_memory": gpu_memory,
            "gpu_power": gpu_power,
            "battery": battery.percent / 100.0 if battery is not None else 1.0,
            "on_battery": float(battery is not None and not battery.power_plugged),
        }

    def vector(self) -> list[float]:
        reading = self.read()
        return [reading[name] for name in TELEMETRY_FEATURES]
