"""A real Kubernetes node on this machine, for the end-to-end tier (``make e2e``).

``datamesh_dev.kwok`` simulates nodes: no container runs. Here containers run for real:
containerd and runc from the OS packages, a CNI bridge (``bridge`` + ``host-local`` of the OS's
``containernetworking-plugins``), and kubelet and kube-proxy (iptables mode) built from the
pinned Kubernetes module by ``hack/build-tools.sh node``, joined to a development control plane
started without its kwok node and with ``node_address`` (so pods reach the API server through
the ``kubernetes`` Service). Pod names resolve through :class:`~datamesh_dev.clusterdns.ClusterDNS`
on the node's address. The pod sandbox image is built locally (``hack/e2e/pause``), since no
registry is reachable, and images are imported with ``ctr``.

    with ControlPlane(nodes=False, node_address=node_address()) as cp, RealNode(cp) as node:
        node.import_image(archive)          # a docker-archive, e.g. from datamesh_dev.image
        ...                                  # pods run on node.name

Everything the node changes on the machine is undone by :meth:`RealNode.stop`: a baseline of
sysctls, iptables/nftables, mounts, cgroups, links, routes, network namespaces, folders and
node programs (``datamesh_dev.hoststate``) is taken before anything starts (and saved under
``/var/lib/datamesh-e2e``), and restored after; ``stop()`` returns what still differs (nothing,
normally). If the process running the node dies, ``python -m datamesh_dev.node cleanup`` does
the same from the saved baseline. Needs root, cgroups (v1 or v2) and the packages of
``hack/e2e/install-deps.sh``.

Settings this machine needs (a Firecracker VM with cgroups v1): containerd's
``restrict_oom_score_adj`` (the kernel refuses negative ``oom_score_adj``), the kubelet's
``cgroupDriver: cgroupfs``, ``failCgroupV1: false``, ``oomScoreAdj: 0`` and ``failSwapOn: false``.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from datamesh.web.serving import free_ports
from datamesh_dev import hoststate
from datamesh_dev.clusterdns import ClusterDNS
from datamesh_dev.devcluster import (
    SERVICE_CIDR,
    ControlPlane,
    ControlPlaneError,
    _admin_context,
    _cert_pem,
    _http_get,
    _issue,
    _key_pem,
    _rsa_key,
    tool_paths,
)
from datamesh_dev.kwok import SimProcess, _spawn, _wait, start_scheduler, stop, wait_node_ready

__all__ = ["BRIDGE", "NODE_NAME", "POD_SUBNET", "RUN", "STATE", "NodeError", "RealNode", "cleanup", "node_address"]

STATE = Path("/var/lib/datamesh-e2e")  # containerd's root, the kubelet's root, CNI state, baseline
RUN = Path("/run/datamesh-e2e")  # containerd's state and socket, runc's state, the node's configuration
CONFIG = RUN / "config"  # every program's config names it, so their processes are recognised as ours
BRIDGE = "dm-e2e0"
POD_SUBNET = "10.244.0.0/24"
NODE_NAME = "e2e-node-0"
CLUSTER_DOMAIN = "cluster.local"
CNI_BIN = Path("/usr/lib/cni")
BASELINE = STATE / "baseline.json"
READY_TIMEOUT_S = 120.0
DRAIN_TIMEOUT_S = 90.0


class NodeError(ControlPlaneError):
    """The node could not be started or stopped."""


def node_address() -> str:
    """The machine's primary address (the source of its default route): the node's InternalIP."""
    out = subprocess.run(["ip", "-j", "route", "get", "1.1.1.1"], capture_output=True, text=True)
    try:
        return str(json.loads(out.stdout)[0]["prefsrc"])
    except (ValueError, IndexError, KeyError):
        pass
    for link in json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True).stdout or "[]"):
        for a in link.get("addr_info", []):
            if a.get("family") == "inet" and a.get("scope") == "global":
                return str(a["local"])
    raise NodeError("this machine has no global IPv4 address for a node")


def _healthy(url: str) -> bool:
    try:
        status, _ = _http_get(url, timeout=2.0)
    except OSError:
        return False
    return status == 200


def _run(*args: str | Path, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NodeError(f"{' '.join(map(str, args))} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


# --------------------------------------------------------------------------------------------
# Configuration files


def containerd_config(pause_ref: str) -> str:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{STATE / "containerd"}"
state = "{RUN / "containerd"}"
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{RUN / "containerd.sock"}"
[ttrpc]
  address = "{RUN / "containerd.sock.ttrpc"}"
[debug]
  address = ""
[metrics]
  address = ""

[{cri}]
  sandbox_image = "{pause_ref}"
  # The kernel here refuses negative oom_score_adj values (the CRI would copy the kubelet's).
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{RUN / "runc"}"
  [{cri}.cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{STATE / "cni" / "net.d"}"
    max_conf_num = 1

[plugins."io.containerd.internal.v1.opt"]
  path = "{STATE / "containerd" / "opt"}"
"""


def cni_config() -> dict[str, Any]:
    """One bridge with host-local addresses; no masquerading (pods only talk inside the node)."""
    return {
        "cniVersion": "1.0.0",
        "name": "datamesh-e2e",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(STATE / "cni" / "ipam"),
                },
            }
        ],
    }


def kubelet_config(node_ip: str, ca: Path, cert: Path, key: Path, healthz_port: int) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": f"unix://{RUN / 'containerd.sock'}",
        # This machine: cgroups v1 without systemd, swap tolerated, no negative OOM scores.
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        "oomScoreAdj": 0,
        "address": node_ip,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "tlsCertFile": str(cert),
        "tlsPrivateKeyFile": str(key),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "Webhook"},
        "clusterDomain": CLUSTER_DOMAIN,
        "clusterDNS": [node_ip],
        "podCIDR": POD_SUBNET,
        "maxPods": 50,
        "serializeImagePulls": False,
        # Imported images are never garbage-collected (they cannot be pulled again), and a
        # full disk on a CI machine never evicts the test's pods.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "shutdownGracePeriod": "0s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
        "staticPodPath": "",
        "registerNode": True,
    }


def kube_proxy_config(kubeconfig: Path, node_ip: str, healthz_port: int, metrics_port: int) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": NODE_NAME,
        "mode": "iptables",
        "clusterCIDR": POD_SUBNET,
        "detectLocalMode": "ClusterCIDR",
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        # Node ports on the node's address only: no localhost node ports, so no route_localnet.
        "nodePortAddresses": [f"{node_ip}/32"],
        "iptables": {"localhostNodePorts": False, "masqueradeAll": False, "syncPeriod": "30s", "minSyncPeriod": "0s"},
        # 0: leave the machine's conntrack table size and timeouts as they are.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
            "udpTimeout": "0s",
            "udpStreamTimeout": "0s",
        },
    }


def _kubeconfig(server: str, ca: Path, cert: Path, key: Path) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": server, "certificate-authority": str(ca)}}],
            "users": [{"name": "u", "user": {"client-certificate": str(cert), "client-key": str(key)}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "c",
        }
    )


def _node_certs(pki: Path, out: Path, node_ip: str) -> None:
    """Client certs of the kubelet (system:node:<name>) and kube-proxy, and the kubelet's serving cert."""
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    out.mkdir(parents=True, exist_ok=True)

    def issue(name: str, cn: str, org: str | None, usage: Any, sans: list[x509.GeneralName] | None = None) -> None:
        key = _rsa_key()
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)] if org else []
        subject = x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        cert = _issue(subject, key, ca_cert, ca_key, usages=[usage], sans=sans)  # type: ignore[arg-type]
        (out / f"{name}.crt").write_bytes(_cert_pem(cert))
        (out / f"{name}.key").write_bytes(_key_pem(key))
        (out / f"{name}.key").chmod(0o600)

    issue("kubelet-client", f"system:node:{NODE_NAME}", "system:nodes", ExtendedKeyUsageOID.CLIENT_AUTH)
    issue("kube-proxy", "system:kube-proxy", None, ExtendedKeyUsageOID.CLIENT_AUTH)
    sans: list[x509.GeneralName] = [
        x509.DNSName(NODE_NAME),
        x509.IPAddress(ipaddress.ip_address(node_ip)),
    ]
    issue("kubelet-serving", NODE_NAME, None, ExtendedKeyUsageOID.SERVER_AUTH, sans)
    shutil.copy2(pki / "ca.crt", out / "ca.crt")


# Kubelets authenticate as system:node:<name> in group system:nodes; without the Node authorizer
# that group gets the system:node role through this binding.
_NODE_BINDING = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "ClusterRoleBinding",
    "metadata": {"name": "datamesh-e2e:nodes"},
    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:node"},
    "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:nodes"}],
}


# --------------------------------------------------------------------------------------------
# The node


class RealNode:
    """containerd + kubelet + kube-proxy + cluster DNS on this machine, joined to ``control_plane``.

    ``tools`` maps binary names to paths (default: ``tool_paths(("k8s", "node", "pause"))``).
    Logs and configuration go to ``workdir`` (kept unless it was a temporary one); machine state
    lives under :data:`STATE` and :data:`RUN` and is removed by :meth:`stop`. ``timings`` holds
    the seconds each step took; ``teardown_diff`` what :meth:`stop` could not restore.
    """

    def __init__(
        self,
        control_plane: ControlPlane,
        *,
        tools: Mapping[str, Path] | None = None,
        workdir: Path | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
    ) -> None:
        if not control_plane.node_address:
            raise NodeError("the control plane must be started with node_address= for a real node")
        self.cp = control_plane
        self.name = NODE_NAME
        self.ip = control_plane.node_address
        self._tools = dict(tools) if tools is not None else None
        self._requested_workdir = workdir
        self._workdir: Path | None = None
        self._created_workdir = False
        self._timeout = ready_timeout
        self.procs: dict[str, SimProcess] = {}
        self.dns: ClusterDNS | None = None
        self.baseline: hoststate.HostState | None = None
        self.timings: dict[str, float] = {}
        self.teardown_diff: dict[str, Any] = {}
        self.teardown_errors: list[str] = []

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise NodeError("node not started")
        return self._workdir

    @property
    def socket(self) -> Path:
        return RUN / "containerd.sock"

    def __enter__(self) -> RealNode:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- start

    def start(self) -> None:
        if os.geteuid() != 0:
            raise NodeError("a real node needs root (kubelet, containerd, iptables, mounts)")
        for program in ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "iptables", "conntrack", "ip"):
            if shutil.which(program) is None:
                raise NodeError(f"{program} not found: run hack/e2e/install-deps.sh")
        if not (CNI_BIN / "bridge").exists():
            raise NodeError(f"no CNI plugins in {CNI_BIN}: run hack/e2e/install-deps.sh")
        if STATE.exists() or RUN.exists():
            raise NodeError(
                f"{STATE} or {RUN} exists: a previous node was not torn down; run `python -m datamesh_dev.node cleanup`"
            )
        tools = self._tools if self._tools is not None else tool_paths(("k8s", "node", "pause"))
        for name in ("kubelet", "kube-proxy", "kube-scheduler", "kubectl", "pause"):
            if name not in tools:
                raise NodeError(f"no {name} binary among {sorted(tools)}")
        self._tools = dict(tools)
        if self._requested_workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="datamesh-node-"))
            self._created_workdir = True
        else:
            self._workdir = Path(self._requested_workdir)
            self._workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        # The baseline first: nothing is changed before it is on disk.
        self.baseline = hoststate.capture()
        STATE.mkdir(parents=True)
        BASELINE.write_text(self.baseline.to_json())
        (self.workdir / "baseline.json").write_text(self.baseline.to_json())
        try:
            self._start(tools)
        except BaseException:
            self.stop()
            raise
        self.timings["node-ready-total"] = time.monotonic() - t0

    def _start(self, tools: Mapping[str, Path]) -> None:
        from datamesh_dev.image import build_pause_image

        wd = self.workdir
        CONFIG.mkdir(parents=True)
        (STATE / "cni" / "net.d").mkdir(parents=True)
        (STATE / "cni" / "net.d" / "10-datamesh-e2e.conflist").write_text(json.dumps(cni_config(), indent=2))
        pause = build_pause_image(tools["pause"])
        (CONFIG / "containerd.toml").write_text(containerd_config(pause.ref))

        t = time.monotonic()
        self.procs["containerd"] = _spawn(
            "containerd", ["containerd", "--config", str(CONFIG / "containerd.toml"), "--log-level", "warn"], wd
        )
        _wait(self.procs["containerd"], lambda: self._ctr("version", check=False).returncode == 0, self._timeout)
        self.timings["containerd"] = time.monotonic() - t
        self.import_image(pause.archive)

        # The control plane runs no scheduler without its kwok node: the node brings one.
        self.procs["kube-scheduler"] = start_scheduler(
            self.cp.kubeconfig, wd, binary=tools["kube-scheduler"], timeout=self._timeout
        )
        self.dns = ClusterDNS(self.ip, self.cp.server, _admin_context(self.cp.workdir / "pki"), domain=CLUSTER_DOMAIN)
        self.dns.start()

        certs = CONFIG / "pki"
        _node_certs(self.cp.workdir / "pki", certs, self.ip)
        kubectl = [str(tools["kubectl"]), "--kubeconfig", str(self.cp.kubeconfig)]
        binding = json.dumps(_NODE_BINDING).encode()
        proc = subprocess.run([*kubectl, "apply", "-f", "-"], input=binding, capture_output=True)
        if proc.returncode != 0:
            raise NodeError(f"could not bind system:node to the nodes' group: {proc.stderr.decode()}")
        # Pods reach the API server through the `kubernetes` Service (the control plane advertises
        # node_address), but the node's own programs use the same loopback URL as kubectl.
        server = self.cp.server
        kubelet_port, proxy_healthz, proxy_metrics = free_ports(3)
        (CONFIG / "kubelet.kubeconfig").write_text(
            _kubeconfig(server, certs / "ca.crt", certs / "kubelet-client.crt", certs / "kubelet-client.key")
        )
        (CONFIG / "kubelet.yaml").write_text(
            yaml.safe_dump(
                kubelet_config(
                    self.ip,
                    certs / "ca.crt",
                    certs / "kubelet-serving.crt",
                    certs / "kubelet-serving.key",
                    kubelet_port,
                ),
                sort_keys=False,
            )
        )
        t = time.monotonic()
        self.procs["kubelet"] = _spawn(
            "kubelet",
            [
                str(tools["kubelet"]),
                f"--config={CONFIG / 'kubelet.yaml'}",
                f"--kubeconfig={CONFIG / 'kubelet.kubeconfig'}",
                f"--root-dir={STATE / 'kubelet'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={self.ip}",
                "--v=1",
            ],
            wd,
        )
        _wait(self.procs["kubelet"], lambda: _healthy(f"http://127.0.0.1:{kubelet_port}/healthz"), self._timeout)

        (CONFIG / "kube-proxy.kubeconfig").write_text(
            _kubeconfig(server, certs / "ca.crt", certs / "kube-proxy.crt", certs / "kube-proxy.key")
        )
        (CONFIG / "kube-proxy.yaml").write_text(
            yaml.safe_dump(
                kube_proxy_config(CONFIG / "kube-proxy.kubeconfig", self.ip, proxy_healthz, proxy_metrics),
                sort_keys=False,
            )
        )
        self.procs["kube-proxy"] = _spawn(
            "kube-proxy", [str(tools["kube-proxy"]), f"--config={CONFIG / 'kube-proxy.yaml'}", "--v=1"], wd
        )
        wait_node_ready(tools["kubectl"], self.cp.kubeconfig, NODE_NAME, timeout=self._timeout)
        self.timings["kubelet-to-node-ready"] = time.monotonic() - t
        _wait(self.procs["kube-proxy"], lambda: _healthy(f"http://127.0.0.1:{proxy_healthz}/healthz"), self._timeout)
        for name in ("containerd.toml", "kubelet.yaml", "kube-proxy.yaml"):
            shutil.copy2(CONFIG / name, wd / name)  # for post-mortems: CONFIG goes with the node

    def _ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return _run("ctr", "--address", self.socket, "--namespace", "k8s.io", *args, check=check, timeout=timeout)

    def import_image(self, archive: Path) -> float:
        """Import a docker-archive into the node's containerd (as the kubelet sees it); returns seconds."""
        t = time.monotonic()
        self._ctr("images", "import", "--no-unpack=false", str(archive), timeout=600)
        seconds = time.monotonic() - t
        self.timings[f"import {archive.parent.name}"] = seconds
        return seconds

    def images(self) -> list[str]:
        return self._ctr("images", "list", "--quiet").stdout.split()

    def dead_process(self) -> str | None:
        for name, sp in self.procs.items():
            if not sp.running():
                return name
        return None

    # ---- stop

    def stop(self) -> dict[str, Any]:
        """Drain and stop the node, undo every change to the machine; return what still differs."""
        if self.baseline is None:
            return {}
        errors = self.teardown_errors
        t0 = time.monotonic()
        tools = self._tools or {}
        if "kubelet" in self.procs and self.procs["kubelet"].running() and "kubectl" in tools:
            try:
                self._drain(tools["kubectl"])
            except Exception as exc:  # keep tearing down
                errors.append(f"drain: {exc}")
        procs, self.procs = self.procs, {}
        stop([p for n, p in procs.items() if n in ("kube-proxy", "kubelet", "kube-scheduler")])
        if "containerd" in procs and procs["containerd"].running():
            try:
                self._remove_containers()
            except Exception as exc:
                errors.append(f"containers: {exc}")
        stop([p for n, p in procs.items() if n == "containerd"])
        if self.dns is not None:
            self.dns.stop()
            self.dns = None
        errors += restore(self.baseline)
        self.teardown_diff = hoststate.diff(self.baseline, hoststate.capture())
        self.timings["teardown"] = time.monotonic() - t0
        if self._workdir is not None:
            (self._workdir / "teardown.json").write_text(
                json.dumps({"diff": self.teardown_diff, "errors": errors}, indent=1)
            )
            if self._created_workdir:
                shutil.rmtree(self._workdir, ignore_errors=True)
        self.baseline = None
        return self.teardown_diff

    def _drain(self, kubectl: Path) -> None:
        """Cordon the node and delete its pods, so the kubelet stops them the regular way (CNI DEL, unmounts)."""
        base = [str(kubectl), "--kubeconfig", str(self.cp.kubeconfig)]
        subprocess.run([*base, "cordon", NODE_NAME], capture_output=True, timeout=60)
        on_node = f"--field-selector=spec.nodeName={NODE_NAME}"
        delete = [*base, "delete", "pods", "-A", on_node, "--grace-period=5", "--wait=false"]
        subprocess.run(delete, capture_output=True, timeout=60)
        pods = STATE / "kubelet" / "pods"
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            left = subprocess.run(
                [*base, "get", "pods", "-A", on_node, "-o", "name"],
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout.split()
            running = self._ctr("tasks", "list", "--quiet", check=False).stdout.split()
            if not left and not running and (not pods.exists() or not any(pods.iterdir())):
                return
            time.sleep(0.5)
        raise NodeError(f"pods still on {NODE_NAME} after {DRAIN_TIMEOUT_S:.0f} s")

    def _remove_containers(self) -> None:
        for task in self._ctr("tasks", "list", "--quiet", check=False).stdout.split():
            self._ctr("tasks", "kill", "--signal", "SIGKILL", task, check=False)
            self._ctr("tasks", "delete", "--force", task, check=False)
        for container in self._ctr("containers", "list", "--quiet", check=False).stdout.split():
            self._ctr("containers", "delete", container, check=False)


# --------------------------------------------------------------------------------------------
# Restoring the machine


# Where the node's programs mount, and the links and cgroups they create: only these are undone
# (anything else that differs is reported by the teardown diff, never touched).
_MOUNT_PREFIXES = (str(STATE) + "/", str(RUN) + "/", "/run/netns/", "/var/lib/kubelet", "/run/containerd/")
_LINK_PREFIXES = (BRIDGE, "veth")
_CGROUP_PREFIX = "kubepods"


def _ours(pid: int) -> bool:
    """A node program started for this node (its command line names our state folders)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return str(RUN).encode() in cmdline or str(STATE).encode() in cmdline


def restore(baseline: hoststate.HostState) -> list[str]:
    """Undo every change a node made since ``baseline``; returns the steps that failed."""
    errors: list[str] = []

    def step(what: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # every step runs, whatever failed before
            errors.append(f"{what}: {exc}")

    step("processes", _kill_node_processes, baseline)
    step("cgroup processes", _kill_cgroup_processes, baseline)
    step("mounts", _unmount, baseline)
    step("cgroups", _remove_cgroups, baseline)
    step("links", _remove_links, baseline)
    step("sysctls", _restore_sysctls, baseline)
    step("iptables", _restore_iptables, baseline)
    step("conntrack", _flush_conntrack)
    step("paths", _remove_paths, baseline)
    return errors


def _kill_node_processes(baseline: hoststate.HostState) -> None:
    before = len(baseline.processes)
    for _ in range(50):
        ours = [pid for pid in hoststate.node_processes() if _ours(pid)]
        if not ours:
            return
        for pid in ours:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise NodeError(f"node programs still running ({before} before the node)")


def _new_cgroups(baseline: hoststate.HostState) -> list[Path]:
    roots = hoststate.cgroup_roots()
    found = []
    for name, root in roots.items():
        before = set(baseline.cgroups.get(name, []))
        for dirpath, _, _ in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            if rel.startswith(_CGROUP_PREFIX) and rel not in before:
                found.append(Path(dirpath))
    # Deepest first.
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _kill_cgroup_processes(baseline: hoststate.HostState) -> None:
    """Container processes left in the node's cgroups (they belong to its containers)."""
    for _ in range(50):
        pids = set()
        for cg in _new_cgroups(baseline):
            try:
                pids |= {int(p) for p in (cg / "cgroup.procs").read_text().split()}
            except OSError:
                continue
        pids.discard(os.getpid())
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise NodeError("processes still in the node's cgroups")


def _node_mounts(baseline: hoststate.HostState) -> list[str]:
    before = {m.split()[0] for m in baseline.mounts}
    current = {m.split()[0] for m in hoststate.mounts()}
    return [m for m in current - before if m.startswith(_MOUNT_PREFIXES)]


def _unmount(baseline: hoststate.HostState) -> None:
    for _ in range(5):
        extra = _node_mounts(baseline)
        if not extra:
            return
        # Deepest first; a busy one is detached lazily.
        for mountpoint in sorted(extra, key=lambda m: m.count("/"), reverse=True):
            if subprocess.run(["umount", mountpoint], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", mountpoint], capture_output=True)
    left = _node_mounts(baseline)
    if left:
        raise NodeError(f"still mounted: {left}")


def _remove_cgroups(baseline: hoststate.HostState) -> None:
    failed = []
    for cg in _new_cgroups(baseline):
        try:
            cg.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            failed.append(f"{cg}: {exc}")
    if failed:
        raise NodeError("; ".join(failed))


def _remove_links(baseline: hoststate.HostState) -> None:
    before = {link.split()[0] for link in baseline.links}
    for link in hoststate.links():
        name = link.split()[0].split("@")[0]
        if name not in before and name.startswith(_LINK_PREFIXES):
            subprocess.run(["ip", "link", "delete", name], capture_output=True)


def _restore_sysctls(baseline: hoststate.HostState) -> None:
    # ip_forward first: writing it resets every conf.*.forwarding, which are then compared again.
    order = sorted(baseline.sysctls, key=lambda k: (k != "net.ipv4.ip_forward", k))
    failed = []
    for _ in range(2):
        current = hoststate.sysctls()
        for key in order:
            if key in current and current[key] != baseline.sysctls[key]:
                try:
                    hoststate.sysctl_path(key).write_text(baseline.sysctls[key] + "\n")
                except OSError as exc:
                    failed.append(f"{key}: {exc}")
    if failed:
        raise NodeError("; ".join(sorted(set(failed))))


def _nft_tables() -> set[tuple[str, str]]:
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    return {(p[1], p[2]) for p in (line.split() for line in out.splitlines()) if len(p) == 3 and p[0] == "table"}


def _restore_iptables(baseline: hoststate.HostState) -> None:
    before_tables = set()
    for line in baseline.nftables.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "table":
            before_tables.add((parts[1], parts[2]))
    # Tables of the iptables families that existed before get their old rules back.
    for family in ("iptables", "ip6tables"):
        for backend in ("nft", "legacy"):
            saved = baseline.iptables.get(f"{family}-{backend}", "")
            now = hoststate.normalize_iptables(
                subprocess.run([f"{family}-{backend}-save"], capture_output=True, text=True).stdout
            )
            if now != saved and saved:
                subprocess.run(
                    [f"{family}-{backend}-restore"], input=saved + "\n", capture_output=True, text=True, check=True
                )
            elif now != saved and backend == "legacy":
                # No legacy rules before: flush and delete every chain of the tables now present.
                for table in {line[1:] for line in now.splitlines() if line.startswith("*")}:
                    subprocess.run([f"{family}-legacy", "-t", table, "-F"], capture_output=True)
                    subprocess.run([f"{family}-legacy", "-t", table, "-X"], capture_output=True)
    # Tables that did not exist before (iptables-nft's, kube-proxy's) are deleted whole.
    for family, name in _nft_tables() - before_tables:
        subprocess.run(["nft", "delete", "table", family, name], capture_output=True)


def _flush_conntrack() -> None:
    # Connection tracking entries of pod and Service addresses (they would expire by themselves).
    for args in (["-s", POD_SUBNET], ["-d", POD_SUBNET], ["-d", SERVICE_CIDR]):
        subprocess.run(["conntrack", "-D", *args], capture_output=True)


def _remove_paths(baseline: hoststate.HostState) -> None:
    for path in [p for p, existed in baseline.paths.items() if not existed]:
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)
        elif os.path.isdir(path):
            shutil.rmtree(path)
    netns = Path("/run/netns")
    for entry in sorted(set(os.listdir(netns)) - set(baseline.netns)) if netns.is_dir() else []:
        subprocess.run(["umount", str(netns / entry)], capture_output=True)
        (netns / entry).unlink(missing_ok=True)


def cleanup() -> dict[str, Any]:
    """Undo a node whose process died (from the baseline saved under STATE); returns what still differs."""
    if not BASELINE.exists():
        if STATE.exists() or RUN.exists():
            raise NodeError(f"{STATE} exists without {BASELINE}: remove it by hand")
        return {}
    data = json.loads(BASELINE.read_text())
    baseline = hoststate.HostState(**data)
    errors = restore(baseline)
    left = hoststate.diff(baseline, hoststate.capture())
    if errors:
        left["errors"] = errors
    return left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m datamesh_dev.node", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("cleanup", help="undo a node whose process died, from its saved baseline")
    up = sub.add_parser("up", help="a control plane and a real node in the foreground until Ctrl-C")
    up.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "cleanup":
        left = cleanup()
        print(hoststate.describe(left) if left else "the machine is as it was before the node")
        return 1 if left else 0

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM both tear the node down (a background job may have SIGINT ignored).
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    with (
        ControlPlane(args.workdir, nodes=False, node_address=node_address()) as cp,
        RealNode(cp, workdir=args.workdir and args.workdir / "node") as node,
    ):
        print(f"export KUBECONFIG={cp.kubeconfig}   # node {node.name} ready: {node.timings}", flush=True)
        try:
            while node.dead_process() is None and cp.dead_process() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    print(f"teardown: {hoststate.describe(node.teardown_diff) if node.teardown_diff else 'clean'}")
    print(f"stopped at {datetime.datetime.now():%H:%M:%S}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
