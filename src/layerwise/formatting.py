"""How numbers read in tables: bytes in MiB, and a dash for what was not measured."""

from __future__ import annotations

from typing import Optional


def fmt_bytes(count: int) -> str:
    return f"{count / 2**20:,.1f} MiB"


def fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)
