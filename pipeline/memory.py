"""Memory budgets: ``--max-memory 2G`` and the default, a fraction of the memory available now.

A leaf module (it imports nothing of the pipeline): a stage that reads more than fits (train-head's features,
docs/train-head.md) asks :func:`memory_budget` how many bytes it may hold and streams the rest.
"""
from __future__ import annotations

import re

__all__ = ["AUTO_FRACTION", "available_memory", "format_size", "memory_budget", "parse_size", "size_problem"]

#: The default budget: this fraction of the memory available when the stage starts.
AUTO_FRACTION = 0.5
#: The default when the available memory cannot be read (no psutil, no /proc/meminfo).
FALLBACK_BYTES = 4 << 30

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes of ``"2G"``, ``"512M"``, ``"1.5GiB"``, ``"300000"`` (binary units: 1K = 1024). ValueError otherwise."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size (e.g. 2G, 512M, 1.5GiB or a number of bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def size_problem(text: str) -> str | None:
    """What is wrong with a ``--max-memory`` value (``auto`` or a size > 0), or None."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        return None if parse_size(text) > 0 else "must be more than 0 bytes"
    except ValueError as e:
        return str(e)


def available_memory() -> int | None:
    """Bytes of memory available now without swapping: psutil's ``available`` if installed, else
    ``MemAvailable`` of /proc/meminfo; None when neither can be read."""
    try:
        import psutil
    except ImportError:
        pass
    else:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_budget(spec: str = "auto") -> int:
    """Bytes a stage may hold: ``spec`` parsed (:func:`parse_size`), or for ``auto`` :data:`AUTO_FRACTION` of
    :func:`available_memory` (:data:`FALLBACK_BYTES` when it is unknown)."""
    if str(spec).strip().lower() != "auto":
        return parse_size(spec)
    available = available_memory()
    return int(available * AUTO_FRACTION) if available else FALLBACK_BYTES


def format_size(n: int) -> str:
    """``n`` bytes as ``1.5 GiB`` / ``300 MiB`` / ``12 KiB``."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"
