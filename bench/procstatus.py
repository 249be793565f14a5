"""One field of ``/proc/<pid>/status``: how the benchmarks read memory (VmRSS, VmHWM) and threads."""

from __future__ import annotations

from pathlib import Path


def status_field(name: str, pid: int | str = "self") -> int | None:
    """``name``'s number in the process's status (kB for Vm* fields), or None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    prefix = f"{name}:"
    return next((int(line.split()[1]) for line in text.splitlines() if line.startswith(prefix)), None)


def status_mib(name: str, pid: int | str = "self") -> float:
    """A Vm* field of the process's status in MiB (0 when the process is gone)."""
    return (status_field(name, pid) or 0) / 1024
