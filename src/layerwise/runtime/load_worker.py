"""One load worker, run as a script by path (``python -I load_worker.py spin|hold ARG PARENT``), never imported.

Standard library only, so a worker starts in milliseconds: started as a ``multiprocessing`` target it
imported the whole package (torch, transformers: 6 s warm, ~50 s from a cold disk), mostly waiting on the
disk while the load it stood for was not there yet. It prints ``ready`` once the load is on, and exits when
terminated or once the process that started it is gone (killed without a chance to stop it).
"""

import os
import sys
import time


def _orphaned(parent: int) -> bool:
    return os.getppid() != parent


def spin(duty: float, parent: int) -> None:
    """Busy for ``duty`` of every 100 ms."""
    print("ready", flush=True)
    while not _orphaned(parent):
        start = time.perf_counter()
        while time.perf_counter() - start < 0.1 * duty:
            pass
        time.sleep(0.1 * (1 - duty))


def hold(size: int, parent: int) -> None:
    """Hold ``size`` bytes resident."""
    ballast = bytearray(size)
    for offset in range(0, size, 4096):  # touch every page so it is resident
        ballast[offset] = 1
    print("ready", flush=True)
    while not _orphaned(parent):
        time.sleep(0.5)


if __name__ == "__main__":
    kind, argument, parent_pid = sys.argv[1:4]
    if kind == "spin":
        spin(float(argument), int(parent_pid))
    else:
        hold(int(argument), int(parent_pid))
