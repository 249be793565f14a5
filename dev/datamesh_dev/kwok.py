"""Simulated nodes for the development control plane: kube-scheduler plus kwok.

The control plane of ``datamesh_dev.devcluster`` has no kubelet, so without these no pod is
ever scheduled or becomes Ready. Here kube-scheduler binds pods to fake Nodes, and kwok (sigs.k8s.io/kwok) plays
their kubelet through the stage configs in ``hack/kwok/stages``: a Node becomes Ready and keeps
its Lease renewed, a bound pod is Running and Ready at once (so Deployments become Available),
a Job's pod then succeeds, and a deleted pod goes away (so scaling down works). No container
runs and no image is pulled.

    with FakeNodes(cp.kubeconfig) as nodes:   # cp: a started devcluster.ControlPlane
        ...                                   # Deployments become Available on "kwok-node-0"

The lower-level functions start and stop each piece on its own. Binaries come from
``hack/build-tools.sh k8s kwok`` (kube-scheduler, kubectl, kwok).

``ControlPlane`` starts one ``FakeNodes`` after its controller manager (``nodes=True``, the
default). The process handling mirrors ``ControlPlane``'s (one ``<name>.log`` per process in
the work directory, its own process group, killed with us through PDEATHSIG) and reuses its
helpers, imported in one place below.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from datamesh.web.serving import free_ports

# The development control plane's helpers (the only coupling to it; see the module docstring).
from datamesh_dev.devcluster import (
    LOG_TAIL_LINES,
    STOP_GRACE_S,
    ControlPlaneError,
    _http_get,
    _http_ok,
    _insecure_context,
    _pdeathsig_preexec,
    _tail,
    _terminate,
    repo_root,
    tool_paths,
)

__all__ = [
    "DEFAULT_NODE_NAME",
    "NODE_ANNOTATION",
    "NODE_IP",
    "POD_CIDR",
    "FakeNodes",
    "SimProcess",
    "create_fake_node",
    "default_stages_dir",
    "start_kwok",
    "start_scheduler",
    "stop",
    "wait_node_ready",
]

# kwok manages only the Nodes carrying this annotation (--manage-nodes-with-annotation-selector),
# so a real node (an external cluster) is never touched.
NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
DEFAULT_NODE_NAME = "kwok-node-0"
# Pod IPs that kwok hands out. kwok's default (10.0.0.0/24) is the control plane's Service CIDR;
# the node IP must lie outside it too, or a pod could get the node's address.
POD_CIDR = "10.244.0.0/16"
NODE_IP = "10.245.0.1"
NODE_CAPACITY = {"cpu": "32", "memory": "256Gi", "pods": "110"}
NODE_LEASE_SECONDS = 40  # what a kubelet uses; kwok renews the Lease at a quarter of it
READY_TIMEOUT_S = 60.0


def default_stages_dir() -> Path:
    """``hack/kwok/stages`` of the repository (``$DATAMESH_REPO_ROOT`` overrides the root)."""
    return repo_root() / "hack" / "kwok" / "stages"


# --------------------------------------------------------------------------------------------
# Processes


@dataclass
class SimProcess:
    """One started process: its ``Popen``, argument list, log file and loopback port."""

    name: str
    args: list[str]
    log: Path
    proc: subprocess.Popen[bytes]
    port: int | None = None
    started_in: float = 0.0  # seconds from spawn until ready

    def running(self) -> bool:
        return self.proc.poll() is None


def _spawn(name: str, args: list[str], workdir: Path, env: Mapping[str, str] | None = None) -> SimProcess:
    log_path = workdir / f"{name}.log"
    with open(log_path, "ab") as log:
        log.write(f"\n==> {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(args)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            args,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_pdeathsig_preexec(),
            env=dict(env) if env is not None else None,
        )
    return SimProcess(name, args, log_path, proc)


def _wait(sp: SimProcess, ready: Callable[[], bool], timeout: float, what: str = "ready") -> None:
    deadline = time.monotonic() + timeout
    while True:
        if sp.proc.poll() is not None:
            raise ControlPlaneError(
                f"{sp.name} exited with code {sp.proc.returncode} during start; last "
                f"{LOG_TAIL_LINES} lines of {sp.log}:\n{_tail(sp.log)}"
            )
        if ready():
            return
        if time.monotonic() > deadline:
            raise ControlPlaneError(
                f"{sp.name} not {what} after {timeout:.0f} s; last {LOG_TAIL_LINES} lines of {sp.log}:\n{_tail(sp.log)}"
            )
        time.sleep(0.1)


def stop(procs: Iterable[SimProcess], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM each process group, SIGKILL whatever still runs after ``grace`` seconds."""
    _terminate([sp.proc for sp in procs], grace)


def start_scheduler(
    kubeconfig: Path, workdir: Path, *, binary: Path | None = None, timeout: float = READY_TIMEOUT_S
) -> SimProcess:
    """kube-scheduler against ``kubeconfig``, without leader election; returns once ready.

    It serves /healthz and /readyz on a free loopback port (self-signed, in
    ``<workdir>/kube-scheduler-certs``); /readyz passes once its informers have synced, i.e.
    once it schedules. The kubeconfig's user needs the ``system:kube-scheduler`` rights (the
    admin one has them).
    """
    exe = binary or tool_paths(("k8s",))["kube-scheduler"]
    workdir.mkdir(parents=True, exist_ok=True)
    # Options in a config file: every kube-scheduler flag but --config (and the serving ones)
    # is deprecated and warns.
    config = workdir / "kube-scheduler.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubescheduler.config.k8s.io/v1",
                "kind": "KubeSchedulerConfiguration",
                "clientConnection": {"kubeconfig": str(kubeconfig), "qps": 100, "burst": 200},
                "leaderElection": {"leaderElect": False},
            },
            sort_keys=False,
        )
    )
    (port,) = free_ports(1)
    args = [
        str(exe),
        f"--config={config}",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--cert-dir={workdir / 'kube-scheduler-certs'}",
        # Authenticate and authorize callers of its endpoints through the API server, without
        # the extension-apiserver-authentication ConfigMap lookup (it logs errors otherwise).
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--authentication-skip-lookup=true",
    ]
    t0 = time.monotonic()
    sp = _spawn("kube-scheduler", args, workdir)
    sp.port = port
    try:
        _wait(sp, lambda: _http_ok(f"https://127.0.0.1:{port}/readyz", _insecure_context()), timeout)
    except BaseException:
        stop([sp])
        raise
    sp.started_in = time.monotonic() - t0
    return sp


def start_kwok(
    kubeconfig: Path,
    workdir: Path,
    *,
    binary: Path | None = None,
    stages_dir: Path | None = None,
    cidr: str = POD_CIDR,
    node_ip: str = NODE_IP,
    annotation_selector: str = "=".join(NODE_ANNOTATION),
    lease_seconds: int = NODE_LEASE_SECONDS,
    timeout: float = READY_TIMEOUT_S,
) -> SimProcess:
    """kwok against ``kubeconfig``, playing the Nodes that match ``annotation_selector``.

    Loads every ``*.yaml`` stage in ``stages_dir`` (default: ``hack/kwok/stages``). Pod IPs come
    from ``cidr``; every Node's InternalIP is ``node_ip``. Returns once its controllers run
    (its /healthz on a free loopback port answers; plain HTTP, no debugging endpoints used).
    """
    exe = binary or tool_paths(("kwok",))["kwok"]
    stages = sorted((stages_dir or default_stages_dir()).glob("*.yaml"))
    if not stages:
        # kwok itself would exit with "no stages found".
        raise ControlPlaneError(f"no kwok stage configs (*.yaml) in {stages_dir or default_stages_dir()}")
    workdir.mkdir(parents=True, exist_ok=True)
    kwok_home = workdir / "kwok-home"
    kwok_home.mkdir(exist_ok=True)
    (port,) = free_ports(1)
    args = [
        str(exe),
        f"--kubeconfig={kubeconfig}",
        *(f"--config={s}" for s in stages),
        "--manage-all-nodes=false",
        f"--manage-nodes-with-annotation-selector={annotation_selector}",
        f"--cidr={cidr}",
        f"--node-ip={node_ip}",
        f"--node-lease-duration-seconds={lease_seconds}",
        f"--server-address=127.0.0.1:{port}",
    ]
    # kwok also loads $KWOK_WORKDIR/kwok.yaml (default ~/.kwok/kwok.yaml) when it exists: point
    # it at an empty folder of ours so a developer's kwokctl settings never leak in.
    env = {**os.environ, "KWOK_WORKDIR": str(kwok_home)}
    t0 = time.monotonic()
    sp = _spawn("kwok", args, workdir, env)
    sp.port = port

    def healthy() -> bool:
        try:
            status, _ = _http_get(f"http://127.0.0.1:{port}/healthz", timeout=2.0)
        except OSError:
            return False
        return status == 200

    try:
        _wait(sp, healthy, timeout)
    except BaseException:
        stop([sp])
        raise
    sp.started_in = time.monotonic() - t0
    return sp


# --------------------------------------------------------------------------------------------
# Fake Nodes


def fake_node_manifest(name: str = DEFAULT_NODE_NAME, capacity: Mapping[str, str] = NODE_CAPACITY) -> dict[str, object]:
    """A Node for kwok: its annotation, the usual well-known labels, capacity, no taints."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {NODE_ANNOTATION[0]: NODE_ANNOTATION[1], "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/role": "agent",
                "type": "kwok",
            },
        },
        "spec": {},
        # Kept on create (a Node's status is otherwise the kubelet's): the node-initialize
        # stage copies capacity and allocatable from here.
        "status": {"capacity": dict(capacity), "allocatable": dict(capacity)},
    }


def create_fake_node(
    kubectl: Path,
    kubeconfig: Path,
    name: str = DEFAULT_NODE_NAME,
    *,
    capacity: Mapping[str, str] = NODE_CAPACITY,
    wait: bool = True,
    timeout: float = READY_TIMEOUT_S,
) -> None:
    """Create (or keep) the Node ``name`` for kwok; with ``wait``, until it is schedulable."""
    proc = subprocess.run(
        [str(kubectl), "--kubeconfig", str(kubeconfig), "apply", "-f", "-"],
        input=json.dumps(fake_node_manifest(name, capacity)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        raise ControlPlaneError(f"could not create Node {name}: {proc.stderr.strip()}")
    if wait:
        wait_node_ready(kubectl, kubeconfig, name, timeout=timeout)


def _node_schedulable(node: Mapping[str, Any]) -> bool:
    status = node.get("status") or {}
    spec = node.get("spec") or {}
    conditions = status.get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    # The API server taints a new Node not-ready; kube-controller-manager lifts it once Ready.
    return bool(ready and not spec.get("taints") and not spec.get("unschedulable"))


def wait_node_ready(
    kubectl: Path, kubeconfig: Path, name: str = DEFAULT_NODE_NAME, *, timeout: float = READY_TIMEOUT_S
) -> None:
    """Wait until the Node is Ready and carries no taint (so plain pods schedule on it)."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        proc = subprocess.run(
            [str(kubectl), "--kubeconfig", str(kubeconfig), "get", "node", name, "-o", "json"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode == 0:
            node = json.loads(proc.stdout)
            if _node_schedulable(node):
                return
            last = json.dumps(
                {"taints": node.get("spec", {}).get("taints"), "conditions": node.get("status", {}).get("conditions")}
            )
        else:
            last = proc.stderr.strip()
        if time.monotonic() > deadline:
            raise ControlPlaneError(f"Node {name} not Ready and untainted after {timeout:.0f} s: {last}")
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------
# All together


class FakeNodes:
    """kube-scheduler + kwok + fake Nodes against a running control plane.

    ``tools`` maps binary names to paths (default: ``tool_paths(("k8s", "kwok"))``). With no
    ``workdir`` a temporary directory holds the logs and is removed by ``stop()`` unless
    ``keep``. ``timings`` holds the seconds each step took.
    """

    def __init__(
        self,
        kubeconfig: Path,
        *,
        workdir: Path | None = None,
        keep: bool = False,
        tools: Mapping[str, Path] | None = None,
        nodes: Iterable[str] = (DEFAULT_NODE_NAME,),
        stages_dir: Path | None = None,
        cidr: str = POD_CIDR,
        node_ip: str = NODE_IP,
        ready_timeout: float = READY_TIMEOUT_S,
    ) -> None:
        self.kubeconfig = Path(kubeconfig)
        self.nodes = tuple(nodes)
        self._requested_workdir = workdir
        self._keep = keep
        self._tools = dict(tools) if tools is not None else None
        self._stages_dir = stages_dir
        self._cidr = cidr
        self._node_ip = node_ip
        self._timeout = ready_timeout
        self._workdir: Path | None = None
        self._created_workdir = False
        self.procs: dict[str, SimProcess] = {}
        self.timings: dict[str, float] = {}

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise ControlPlaneError("fake nodes not started")
        return self._workdir

    def __enter__(self) -> FakeNodes:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self.procs:
            raise ControlPlaneError("fake nodes already started")
        tools = self._tools if self._tools is not None else tool_paths(("k8s", "kwok"))
        for name in ("kube-scheduler", "kwok", "kubectl"):
            if name not in tools:
                raise ControlPlaneError(f"no {name} binary among {sorted(tools)}")
        if self._requested_workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="datamesh-kwok-"))
            self._created_workdir = True
        else:
            self._workdir = Path(self._requested_workdir)
            self._workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        try:
            self.procs["kube-scheduler"] = start_scheduler(
                self.kubeconfig, self.workdir, binary=tools["kube-scheduler"], timeout=self._timeout
            )
            self.timings["kube-scheduler"] = self.procs["kube-scheduler"].started_in
            self.procs["kwok"] = start_kwok(
                self.kubeconfig,
                self.workdir,
                binary=tools["kwok"],
                stages_dir=self._stages_dir,
                cidr=self._cidr,
                node_ip=self._node_ip,
                timeout=self._timeout,
            )
            self.timings["kwok"] = self.procs["kwok"].started_in
            t1 = time.monotonic()
            for name in self.nodes:
                create_fake_node(tools["kubectl"], self.kubeconfig, name, timeout=self._timeout)
            self.timings["nodes-ready"] = time.monotonic() - t1
        except BaseException:
            self.stop()
            raise
        self.timings["total"] = time.monotonic() - t0

    def dead_process(self) -> str | None:
        for name, sp in self.procs.items():
            if not sp.running():
                return name
        return None

    def stop(self) -> None:
        """Stop kwok and kube-scheduler. The Node objects stay (they go with the cluster)."""
        procs, self.procs = self.procs, {}
        stop(procs.values())
        if self._workdir is not None and self._created_workdir and not self._keep:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
