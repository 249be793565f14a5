"""How the benchmarks read a process: memory (VmRSS, VmHWM, RssAnon, PSS), threads and its children."""

from __future__ import annotations

from pathlib import Path


def status_fields(names: tuple[str, ...], pid: int | str = "self") -> dict[str, int]:
    """The numbers of ``names`` from one read of the process's status (kB for memory fields); {} when it is gone.

    One read: fields summed or compared with each other then come from the same moment.
    """
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    found: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in names:
            found[name] = int(value.split()[0])
    return found


def status_field(name: str, pid: int | str = "self") -> int | None:
    """``name``'s number in the process's status (kB for Vm* fields), or None when the process is gone."""
    return status_fields((name,), pid).get(name)


def status_mib(name: str, pid: int | str = "self") -> float:
    """A Vm* field of the process's status in MiB (0 when the process is gone)."""
    return (status_field(name, pid) or 0) / 1024


def pss_mib(pid: int | str = "self") -> float:
    """The process's proportional set size in MiB: each page it shares counted as a share (0 when it is gone).

    Summed over processes, shared pages (the interpreter, the libraries) count once, as a cgroup counts them;
    a sum of RSS counts them in every process.
    """
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children_of(pid: int | str = "self") -> list[int]:
    """The process ids of the process's children, whichever of its threads started them (none when it is gone)."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def summed_pss_mib(pids: list[int]) -> float:
    """The processes' proportional set sizes summed in MiB: their shared pages counted once, as a container
    counts them (a process that is gone counts 0)."""
    return sum(pss_mib(pid) for pid in pids)
