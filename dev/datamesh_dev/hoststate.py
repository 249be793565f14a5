"""What a real node changes on the machine, captured before and compared after.

A kubelet, kube-proxy, containerd and the CNI plugins change machine-wide state: sysctls
(``vm.overcommit_memory``, ``kernel.panic``, ``kernel.panic_on_oops``, ``net.ipv4.ip_forward``, ...),
iptables/nftables rules (KUBE-*, CNI-* chains), mounts (the kubelet's root bind mount, pod
volumes, container root filesystems, network namespaces), cgroups (``/kubepods``), network links
(the bridge, veths), routes, and folders (``/var/log/pods``, ``/run/containerd``...).
:func:`capture` records all of it; :func:`diff` says what differs from a baseline, leaving out
what changes by itself (counters, random pools, free-page statistics). ``datamesh_dev.node``
takes a baseline before its node starts, restores it after, and the e2e tier asserts the diff
is empty.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["WATCHED_PATHS", "HostState", "capture", "cgroup_roots", "diff", "links", "mounts", "sysctl_path", "sysctls"]

# Folders the node's programs create when missing; their existence is compared.
WATCHED_PATHS: tuple[str, ...] = (
    "/var/lib/kubelet",
    "/var/lib/kube-proxy",
    "/var/log/pods",
    "/var/log/containers",
    "/etc/cni",
    "/opt/cni",
    "/var/lib/cni",
    "/run/containerd",
    "/var/lib/containerd",
    "/run/netns",
    "/run/runc",
    "/etc/kubernetes",
    "/var/lib/datamesh-e2e",
    "/run/datamesh-e2e",
)
# Binaries whose processes must all be gone after a node stops.
NODE_PROGRAMS: frozenset[str] = frozenset(
    {"kubelet", "kube-proxy", "containerd", "containerd-shim-runc-v2", "containerd-shim", "runc", "pause"}
)

# Sysctls that change by themselves (statistics, counters, entropy), never compared.
_VOLATILE = re.compile(
    r"^(kernel\.random\.|kernel\.ns_last_pid$|kernel\.pty\.nr$|fs\.(dentry-state|dentry-negative|file-nr|inode-nr"
    r"|inode-state|aio-nr|quota\.)|net\.netfilter\.nf_conntrack_count$|vm\.(stat_refresh|drop_caches|compact_memory)$"
    r"|kernel\.sched_domain\.|net\.ipv4\.route\.flush$|net\.ipv6\.route\.flush$|dev\.cdrom\.)"
)


def sysctl_path(key: str) -> Path:
    return Path("/proc/sys") / key.replace(".", "/")


@dataclass(frozen=True)
class HostState:
    """One snapshot of the machine-wide state a node touches."""

    sysctls: dict[str, str] = field(default_factory=dict)
    iptables: dict[str, str] = field(default_factory=dict)  # iptables-save per family and backend, normalized
    nftables: str = ""  # `nft list ruleset`, without handles and counters
    mounts: list[str] = field(default_factory=list)  # "mountpoint fstype source"
    cgroups: dict[str, list[str]] = field(default_factory=dict)  # hierarchy -> its cgroup folders
    links: list[str] = field(default_factory=list)  # "name type"
    addresses: list[str] = field(default_factory=list)  # "ifname address/prefix"
    routes: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)  # ip rule
    netns: list[str] = field(default_factory=list)  # /run/netns entries
    paths: dict[str, bool] = field(default_factory=dict)
    processes: list[str] = field(default_factory=list)  # node programs running ("name" per process)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)


# --------------------------------------------------------------------------------------------
# Capture


def sysctls() -> dict[str, str]:
    """Every readable sysctl but the volatile ones, ``{key: value}``."""
    values: dict[str, str] = {}
    root = Path("/proc/sys")
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            key = path.relative_to(root).as_posix().replace("/", ".")
            if _VOLATILE.match(key):
                continue
            try:
                values[key] = " ".join(path.read_text().split())
            except OSError:
                continue  # write-only or refused
    return values


def _output(args: list[str]) -> str:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return ""
    return proc.stdout if proc.returncode == 0 else ""


def normalize_iptables(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        # Chain counters: ":INPUT ACCEPT [12:3456]".
        lines.append(re.sub(r" \[\d+:\d+\]$", "", line))
    return "\n".join(lines)


def normalize_nft(text: str) -> str:
    text = re.sub(r" # handle \d+", "", text)
    text = re.sub(r"counter packets \d+ bytes \d+", "counter", text)
    return "\n".join(line.rstrip() for line in text.splitlines() if line.strip())


def _iptables() -> dict[str, str]:
    out = {}
    for family in ("iptables", "ip6tables"):
        for backend in ("nft", "legacy"):
            binary = f"{family}-{backend}-save"
            out[f"{family}-{backend}"] = normalize_iptables(_output([binary]))
    return out


def mounts() -> list[str]:
    """``mountpoint fstype source`` of every mount of this mount namespace."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        fstype, source = [*right.split(), "", ""][:2]
        mounts.append(f"{fields[4]} {fstype} {source}")
    return sorted(mounts)


def cgroup_roots() -> dict[str, Path]:
    """Every cgroup hierarchy (v1 controllers and v2) by name, e.g. ``memory``, ``unified``."""
    roots = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[0] in ("cgroup", "cgroup2"):
            mountpoint = Path(left.split()[4])
            roots[mountpoint.name] = mountpoint
    return roots


def _cgroups() -> dict[str, list[str]]:
    tree = {}
    for name, root in cgroup_roots().items():
        dirs = []
        for dirpath, _, _ in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            if rel != ".":
                dirs.append(rel)
        tree[name] = sorted(dirs)
    return tree


def _ip_json(*args: str) -> list[dict[str, Any]]:
    text = _output(["ip", "-j", *args])
    try:
        data = json.loads(text) if text.strip() else []
    except ValueError:
        return []
    return data if isinstance(data, list) else []


def links() -> list[str]:
    """``name type`` of every network link."""
    return sorted(f"{link['ifname']} {link.get('link_type', '')}" for link in _ip_json("link", "show"))


def _addresses() -> list[str]:
    out = []
    for link in _ip_json("addr", "show"):
        for a in link.get("addr_info", []):
            out.append(f"{link['ifname']} {a.get('local')}/{a.get('prefixlen')}")
    return sorted(out)


def _routes() -> list[str]:
    out = []
    for family in ("-4", "-6"):
        for r in _ip_json(family, "route", "show", "table", "all"):
            out.append(" ".join(f"{k}={r[k]}" for k in ("table", "type", "dst", "gateway", "dev", "prefsrc") if k in r))
    return sorted(out)


def _rules() -> list[str]:
    out = []
    for family in ("-4", "-6"):
        for r in _ip_json(family, "rule", "show"):
            out.append(json.dumps(r, sort_keys=True))
    return sorted(out)


def _netns() -> list[str]:
    try:
        return sorted(os.listdir("/run/netns"))
    except OSError:
        return []


def node_processes() -> dict[int, str]:
    """``{pid: program}`` of running node programs (kubelet, containerd, shims, runc...)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            exe = os.readlink(entry / "exe")
        except OSError:
            continue
        name = os.path.basename(exe.removesuffix(" (deleted)"))
        if name in NODE_PROGRAMS:
            found[int(entry.name)] = name
    return found


def capture(paths: Iterable[str] = WATCHED_PATHS) -> HostState:
    """The machine-wide state a node may change, now."""
    return HostState(
        sysctls=sysctls(),
        iptables=_iptables(),
        nftables=normalize_nft(_output(["nft", "list", "ruleset"])),
        mounts=mounts(),
        cgroups=_cgroups(),
        links=links(),
        addresses=_addresses(),
        routes=_routes(),
        rules=_rules(),
        netns=_netns(),
        paths={p: os.path.lexists(p) for p in paths},
        processes=sorted(node_processes().values()),
    )


# --------------------------------------------------------------------------------------------
# Compare


def _list_diff(before: Iterable[str], after: Iterable[str]) -> dict[str, list[str]]:
    b, a = set(before), set(after)
    out = {}
    if a - b:
        out["added"] = sorted(a - b)
    if b - a:
        out["removed"] = sorted(b - a)
    return out


def _interface_key(key: str) -> str | None:
    """The interface a per-interface sysctl belongs to (net.ipv4.conf.<if>.x), if it is one."""
    m = re.match(r"^net\.(?:ipv4|ipv6)\.(?:conf|neigh)\.([^.]+)\.", key)
    return m.group(1) if m and m.group(1) not in ("all", "default") else None


def diff(before: HostState, after: HostState) -> dict[str, Any]:
    """What differs between two snapshots (empty: the machine is as it was)."""
    out: dict[str, Any] = {}
    changed = {
        k: {"before": v, "after": after.sysctls[k]}
        for k, v in before.sysctls.items()
        if k in after.sysctls and after.sysctls[k] != v
    }
    # A sysctl appearing or vanishing is an interface's (reported under links) or a real change.
    appeared = [k for k in after.sysctls if k not in before.sysctls and _interface_key(k) is None]
    vanished = [k for k in before.sysctls if k not in after.sysctls and _interface_key(k) is None]
    if changed:
        out["sysctls"] = changed
    if appeared or vanished:
        out["sysctl_keys"] = {"appeared": sorted(appeared), "vanished": sorted(vanished)}
    tables = {k: v for k, v in after.iptables.items() if before.iptables.get(k) != v}
    if tables:
        out["iptables"] = {k: {"before": before.iptables.get(k, ""), "after": v} for k, v in tables.items()}
    if before.nftables != after.nftables:
        out["nftables"] = {"before": before.nftables, "after": after.nftables}
    for name in ("mounts", "links", "addresses", "routes", "rules", "netns", "processes"):
        d = _list_diff(getattr(before, name), getattr(after, name))
        if d:
            out[name] = d
    cg = {}
    for hierarchy in set(before.cgroups) | set(after.cgroups):
        d = _list_diff(before.cgroups.get(hierarchy, []), after.cgroups.get(hierarchy, []))
        if d:
            cg[hierarchy] = d
    if cg:
        out["cgroups"] = cg
    paths = {p: {"before": e, "after": after.paths.get(p)} for p, e in before.paths.items() if after.paths.get(p) != e}
    if paths:
        out["paths"] = paths
    return out


def describe(d: Mapping[str, Any]) -> str:
    return json.dumps(d, indent=1, sort_keys=True)
