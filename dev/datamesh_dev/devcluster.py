"""A real local Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager, and
kube-scheduler with a kwok-simulated node.

Used by the test suite (one control plane per pytest session) and by the developer command
(``datamesh-dev up|down|status|kubectl``), which keeps one running in the background. Objects
are stored, validated, watched and garbage-collected for real; pods are scheduled onto a fake
node that kwok reports Ready (``datamesh_dev.kwok``), so Deployments become Available, but no
container runs. The binaries are built from the Go module proxy by ``hack/build-tools.sh``.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from datamesh.web.serving import free_ports

if TYPE_CHECKING:
    from datamesh_dev.kwok import FakeNodes

__all__ = [
    "ControlPlane",
    "ControlPlaneError",
    "ExternalCluster",
    "default_workdir",
    "down",
    "is_running",
    "pinned_kubernetes_version",
    "repo_root",
    "run_background",
    "stop_background",
    "tool_paths",
    "up",
]

DEFAULT_TOOLS: tuple[str, ...] = ("etcd", "k8s", "helm", "kwok")
BUILD_TIMEOUT_S = 3 * 60 * 60  # a cold build of kubernetes on two cores takes 20+ minutes
READY_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0
LOG_TAIL_LINES = 40
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"  # first address of SERVICE_CIDR: the `kubernetes` Service's ClusterIP

# Names inside the work directory that ControlPlane creates (and removes again on stop()).
_OWNED = (
    "pki",
    "etcd-data",
    "apiserver-certs",
    "kcm-certs",
    "kubeconfig",
    "etcd.log",
    "kube-apiserver.log",
    "kube-controller-manager.log",
    "kwok",
)


class ControlPlaneError(RuntimeError):
    """The control plane's binaries could not be built, or a process failed to start."""


# --------------------------------------------------------------------------------------------
# Binaries


def repo_root() -> Path:
    """The repository holding ``hack/build-tools.sh`` (``$DATAMESH_REPO_ROOT`` overrides)."""
    env = os.environ.get("DATAMESH_REPO_ROOT")
    return Path(env).resolve() if env else Path(__file__).resolve().parents[2]


def pinned_kubernetes_version() -> str:
    """The Kubernetes version pinned in ``hack/tools/k8s/go.mod`` (e.g. ``v1.34.3``)."""
    text = (repo_root() / "hack" / "tools" / "k8s" / "go.mod").read_text()
    m = re.search(r"^\s*(?:require\s+)?k8s\.io/kubernetes\s+(v\S+)", text, re.MULTILINE)
    if not m:
        raise ControlPlaneError("hack/tools/k8s/go.mod does not require k8s.io/kubernetes")
    return m.group(1)


def tool_paths(names: Iterable[str] = DEFAULT_TOOLS) -> dict[str, Path]:
    """Build (or find in the cache) the named tool sets and return ``{binary: path}``.

    ``names`` are ``hack/build-tools.sh`` targets: ``etcd``, ``k8s`` (kube-apiserver,
    kube-controller-manager, kubectl) and ``helm``. The build's progress goes to our stderr.
    """
    script = repo_root() / "hack" / "build-tools.sh"
    if not script.is_file():
        raise ControlPlaneError(f"{script} not found (set DATAMESH_REPO_ROOT to the repository)")
    proc = subprocess.Popen(
        ["bash", str(script), *names],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    # Relay stderr line by line while the build runs: a silent 20-minute wait looks like a hang.
    # (Not communicate(): it would read stderr too, racing the relay for lines.)
    err_lines: list[str] = []
    out_lines: list[str] = []
    readers = [
        threading.Thread(target=_relay, args=(proc.stderr, err_lines, True), daemon=True),
        threading.Thread(target=_relay, args=(proc.stdout, out_lines, False), daemon=True),
    ]
    for t in readers:
        t.start()
    try:
        proc.wait(timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise ControlPlaneError(f"{script} did not finish within {BUILD_TIMEOUT_S} s") from None
    for t in readers:
        t.join(timeout=10)
    out = "".join(out_lines)
    if proc.returncode != 0:
        raise ControlPlaneError(f"{script} {' '.join(names)} failed (exit {proc.returncode}):\n" + "".join(err_lines))
    paths: dict[str, Path] = {}
    for line in out.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip():
            paths[name.strip()] = Path(value.strip())
    for name, path in paths.items():
        if not os.access(path, os.X_OK):
            raise ControlPlaneError(f"{script} reported {name}={path}, which is not executable")
    return paths


def _relay(stream: IO[str], sink: list[str], echo: bool) -> None:
    for line in stream:
        sink.append(line)
        if echo:
            sys.stderr.write(line)
            sys.stderr.flush()


# --------------------------------------------------------------------------------------------
# Certificates


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _issue(
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    ca_cert: x509.Certificate | None,
    ca_key: rsa.RSAPrivateKey | None,
    *,
    usages: list[x509.ObjectIdentifier] | None = None,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    """Self-signed CA when ``ca_cert`` is None, otherwise a leaf signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    is_ca = ca_cert is None
    issuer = subject if ca_cert is None else ca_cert.subject
    signer = key if ca_key is None else ca_key
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Backdated so small clock differences between processes never make it "not yet valid".
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(_key_usage(ca=is_ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca_cert is not None:
        # Python 3.13's strict verification wants the leaf to name its issuer's key.
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)  # type: ignore[arg-type]
    if usages:
        b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(signer, hashes.SHA256())


def _write_pki(pki: Path, node_address: str | None = None) -> None:
    """Throwaway CA, API serving cert, admin client cert and service-account key pair.

    With ``node_address`` (real nodes reach the API server there) the serving cert names it too,
    and a client cert for the API server's calls to kubelets (logs, exec) is added.
    """
    pki.mkdir(parents=True, exist_ok=True)
    ca_key = _rsa_key()
    ca = _issue(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "datamesh-dev-ca")]), ca_key, None, None)
    srv_key = _rsa_key()
    dns = [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    ips = ["127.0.0.1", "::1", SERVICE_IP, *([node_address] if node_address else [])]
    srv = _issue(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
        srv_key,
        ca,
        ca_key,
        usages=[ExtendedKeyUsageOID.SERVER_AUTH],
        sans=[*(x509.DNSName(d) for d in dns), *(x509.IPAddress(ipaddress.ip_address(i)) for i in ips)],
    )
    adm_key = _rsa_key()
    adm = _issue(
        x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                x509.NameAttribute(NameOID.COMMON_NAME, "datamesh-admin"),
            ]
        ),
        adm_key,
        ca,
        ca_key,
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    sa_key = _rsa_key()
    files = {
        "ca.crt": _cert_pem(ca),
        "ca.key": _key_pem(ca_key),
        "apiserver.crt": _cert_pem(srv),
        "apiserver.key": _key_pem(srv_key),
        "admin.crt": _cert_pem(adm),
        "admin.key": _key_pem(adm_key),
        "sa.key": _key_pem(sa_key),
        **_kubelet_client_files(ca, ca_key, node_address),
        "sa.pub": sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }
    for name, data in files.items():
        _atomic_write(pki / name, data, mode=0o600)


def _kubelet_client_files(
    ca: x509.Certificate, ca_key: rsa.RSAPrivateKey, node_address: str | None
) -> dict[str, bytes]:
    if node_address is None:
        return {}
    key = _rsa_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
            x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver-kubelet-client"),
        ]
    )
    cert = _issue(name, key, ca, ca_key, usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    return {"kubelet-client.crt": _cert_pem(cert), "kubelet-client.key": _key_pem(key)}


# --------------------------------------------------------------------------------------------
# Small helpers


def _atomic_write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    # Readers poll for some of these files (kubeconfig, ready): never let them see half a file.
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    os.replace(tmp, path)


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _http_get(url: str, context: ssl.SSLContext | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    # An empty ProxyHandler: HTTPS_PROXY in the environment must never route loopback checks.
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _admin_context(pki: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return ctx


def _insecure_context() -> ssl.SSLContext:
    # kube-controller-manager serves with a self-signed cert it generates itself.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


_PR_SET_PDEATHSIG = 1


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn making the child die with us, even if we are SIGKILLed (Linux only).

    The kernel ties PDEATHSIG to the *thread* that forked, so it is only used from the main
    thread; a worker thread ending would otherwise take the control plane down with it.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _terminate(procs: Iterable[subprocess.Popen[bytes]], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM each process group, then SIGKILL whatever is still running after ``grace``."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        _killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in running:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _killpg(p.pid, signal.SIGKILL)
            p.wait()


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # start_new_session made the child its own group leader
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------------------------
# The control plane

_RUNNING: set[ControlPlane] = set()


@atexit.register
def _stop_all() -> None:
    for cp in list(_RUNNING):
        try:
            cp.stop()
        except Exception:  # interpreter is exiting: best effort, keep stopping the others
            pass


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on free loopback ports.

    ``with ControlPlane() as cp: subprocess.run(cp.kubectl_cmd("get", "ns"))``. With no
    ``workdir`` a temporary directory is used; ``stop()`` removes what it created unless
    ``keep=True``. ``tools`` maps binary names to paths (default: ``tool_paths()``).
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        keep: bool = False,
        tools: Mapping[str, Path] | None = None,
        with_helm: bool = True,
        nodes: bool = True,
        node_address: str | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
    ) -> None:
        self._requested_workdir = Path(workdir).expanduser().resolve() if workdir else None
        self._keep = keep
        self._tools = dict(tools) if tools is not None else None
        self._with_helm = with_helm
        self._with_nodes = nodes
        self._nodes: FakeNodes | None = None
        self._ready_timeout = ready_timeout
        # Where real nodes (datamesh_dev.node) and their pods reach the API server: it then
        # listens on every address and advertises this one as the `kubernetes` Service endpoint.
        self.node_address = node_address
        self._workdir: Path | None = None
        self._created_workdir = False
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._args: dict[str, list[str]] = {}
        self._ports: dict[str, int] = {}
        self._lock = threading.RLock()

    # ---- properties

    @property
    def workdir(self) -> Path:
        """Directory with the PKI, etcd data, kubeconfig and one ``<process>.log`` per process."""
        if self._workdir is None:
            raise ControlPlaneError("control plane not started")
        return self._workdir

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (system:masters) with the CA and client pair inlined."""
        return self.workdir / "kubeconfig"

    @property
    def server(self) -> str:
        """The API server's URL, e.g. ``https://127.0.0.1:40123``."""
        if "apiserver" not in self._ports:
            raise ControlPlaneError("control plane not started")
        return f"https://127.0.0.1:{self._ports['apiserver']}"

    @property
    def etcd_url(self) -> str:
        if "etcd" not in self._ports:
            raise ControlPlaneError("control plane not started")
        return f"http://127.0.0.1:{self._ports['etcd']}"

    @property
    def kubectl(self) -> Path:
        return self._tool("kubectl")

    @property
    def helm(self) -> Path | None:
        return self._resolved_tools().get("helm")

    def kubectl_cmd(self, *args: str) -> list[str]:
        """``[kubectl, "--kubeconfig", kubeconfig, *args]`` for ``subprocess.run``."""
        return [str(self.kubectl), "--kubeconfig", str(self.kubeconfig), *args]

    # ---- lifecycle

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start etcd, kube-apiserver and kube-controller-manager; return once all are ready."""
        with self._lock:
            if self._procs:
                raise ControlPlaneError("control plane already started")
            tools = self._resolved_tools()
            for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl"):
                self._tool(name)
            self._make_workdir()
            _RUNNING.add(self)
            try:
                self._start(tools)
            except BaseException:
                self.stop()
                raise

    def _start(self, tools: Mapping[str, Path]) -> None:
        wd = self.workdir
        pki = wd / "pki"
        _write_pki(pki, self.node_address)
        etcd_port, peer_port, api_port, kcm_port = free_ports(4)
        self._ports = {"etcd": etcd_port, "apiserver": api_port, "kcm": kcm_port}

        etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        self._args["etcd"] = [
            str(tools["etcd"]),
            "--name=default",
            f"--data-dir={wd / 'etcd-data'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            # Throwaway data: fsync only costs time (envtest does the same).
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]
        self._spawn("etcd")
        self._wait("etcd", lambda: _etcd_healthy(etcd_url))

        self._args["kube-apiserver"] = [
            str(tools["kube-apiserver"]),
            f"--etcd-servers={etcd_url}",
            f"--cert-dir={wd / 'apiserver-certs'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--secure-port={api_port}",
            f"--bind-address={'0.0.0.0' if self.node_address else '127.0.0.1'}",
            f"--advertise-address={self.node_address or '127.0.0.1'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            "--authorization-mode=RBAC",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-issuer=https://127.0.0.1:{api_port}/",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            # Close open watches on SIGTERM instead of letting them hold the HTTP server's
            # shutdown for its 60 s request timeout (which outlasts our 10 s grace period).
            "--shutdown-watch-termination-grace-period=5s",
        ]
        if self.node_address:
            # kubectl logs/exec: the API server calls kubelets at their InternalIP, with a client cert.
            self._args["kube-apiserver"] += [
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-client-certificate={pki / 'kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'kubelet-client.key'}",
                f"--kubelet-certificate-authority={pki / 'ca.crt'}",
            ]
        self._start_apiserver()

        self._write_kubeconfig()

        self._args["kube-controller-manager"] = [
            str(tools["kube-controller-manager"]),
            f"--kubeconfig={self.kubeconfig}",
            # Without these it cannot authenticate callers of its own endpoints (and warns).
            # The client CA is given directly: looking it up in the extension-apiserver-
            # authentication ConfigMap logs errors because no request-header CA is configured.
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--authentication-skip-lookup=true",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--leader-elect=false",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            "--use-service-account-credentials=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={kcm_port}",
            f"--cert-dir={wd / 'kcm-certs'}",
            "--controllers=*",
        ]
        self._spawn("kube-controller-manager")
        kcm_health = f"https://127.0.0.1:{kcm_port}/healthz"
        self._wait("kube-controller-manager", lambda: _http_ok(kcm_health, _insecure_context()))

        if self._with_nodes:
            # kube-scheduler + kwok + one fake Node: pods are scheduled and become Ready.
            from datamesh_dev.kwok import FakeNodes

            self._nodes = FakeNodes(self.kubeconfig, workdir=wd / "kwok", keep=True, tools=tools)
            self._nodes.start()

    @property
    def node_names(self) -> tuple[str, ...]:
        """The simulated nodes pods are scheduled on (none with ``nodes=False``)."""
        return self._nodes.nodes if self._nodes is not None else ()

    def restart_apiserver(self) -> None:
        """Stop and start kube-apiserver alone (same port and certs), wait until it is ready.

        Clients' watches break and must resume; etcd and kube-controller-manager keep running.
        """
        with self._lock:
            proc = self._procs.get("kube-apiserver")
            if proc is None:
                raise ControlPlaneError("control plane not started")
            _terminate([proc])
            self._start_apiserver()

    @contextlib.contextmanager
    def etcd_paused(self) -> Iterator[None]:
        """etcd frozen (SIGSTOP) for the block, then thawed (SIGCONT), even if the block fails.

        The API server keeps serving watches from its cache, but every write and every quorum
        read hangs until etcd answers again, as with a stalled disk or a partitioned member.
        """
        with self._lock:
            proc = self._procs.get("etcd")
            if proc is None:
                raise ControlPlaneError("control plane not started")
            os.kill(proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop all processes (SIGTERM, SIGKILL after 10 s); remove the workdir unless kept."""
        with self._lock:
            procs = self._procs
            self._procs = {}
            if self._nodes is not None:
                self._nodes.stop()
                self._nodes = None
            # The API server and controller manager first, so they never see etcd vanish.
            _terminate([p for n, p in procs.items() if n != "etcd"])
            _terminate([p for n, p in procs.items() if n == "etcd"])
            _RUNNING.discard(self)
            if self._workdir is not None and not self._keep:
                if self._created_workdir:
                    shutil.rmtree(self._workdir, ignore_errors=True)
                else:
                    for name in _OWNED:
                        p = self._workdir / name
                        if p.is_dir():
                            shutil.rmtree(p, ignore_errors=True)
                        else:
                            p.unlink(missing_ok=True)
                self._workdir = None

    def dead_process(self) -> str | None:
        """The name of a control-plane process that has exited, if any."""
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                return name
        return None

    # ---- internals

    def _resolved_tools(self) -> dict[str, Path]:
        if self._tools is None:
            names = ("etcd", "k8s", *(("helm",) if self._with_helm else ()), *(("kwok",) if self._with_nodes else ()))
            self._tools = tool_paths(names)
        return self._tools

    def _tool(self, name: str) -> Path:
        path = self._resolved_tools().get(name)
        if path is None:
            raise ControlPlaneError(f"no {name} binary among {sorted(self._resolved_tools())}")
        return path

    def _make_workdir(self) -> None:
        if self._requested_workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="datamesh-cp-"))
            self._created_workdir = True
            return
        wd = self._requested_workdir
        self._created_workdir = not wd.exists()
        wd.mkdir(parents=True, exist_ok=True)
        # A previous run's etcd data would hold objects signed with keys that no longer exist.
        for name in _OWNED:
            p = wd / name
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        self._workdir = wd

    def _spawn(self, name: str) -> None:
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "ab") as log:
            log.write(f"\n==> {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(self._args[name])}\n".encode())
            log.flush()
            self._procs[name] = subprocess.Popen(
                self._args[name],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_pdeathsig_preexec(),
            )

    def _start_apiserver(self) -> None:
        self._spawn("kube-apiserver")
        ctx = _admin_context(self.workdir / "pki")
        self._wait("kube-apiserver", lambda: _http_ok(f"{self.server}/readyz", ctx))
        # /readyz can pass a moment before the system namespaces are created.
        self._wait(
            "kube-apiserver",
            lambda: _http_ok(f"{self.server}/api/v1/namespaces/default", ctx),
            what="the default namespace",
        )

    def _wait(self, name: str, ready: Callable[[], bool], what: str = "ready") -> None:
        proc = self._procs[name]
        log_path = self.workdir / f"{name}.log"
        deadline = time.monotonic() + self._ready_timeout
        while True:
            if proc.poll() is not None:
                raise ControlPlaneError(
                    f"{name} exited with code {proc.returncode} during start; last "
                    f"{LOG_TAIL_LINES} lines of {log_path}:\n{_tail(log_path)}"
                )
            if ready():
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"{name} not {what} after {self._ready_timeout:.0f} s; last "
                    f"{LOG_TAIL_LINES} lines of {log_path}:\n{_tail(log_path)}"
                )
            time.sleep(0.25)

    def _write_kubeconfig(self) -> None:
        pki = self.workdir / "pki"

        def b64(name: str) -> str:
            return base64.b64encode((pki / name).read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "datamesh-dev",
                    "cluster": {"server": self.server, "certificate-authority-data": b64("ca.crt")},
                }
            ],
            "users": [
                {
                    "name": "datamesh-admin",
                    "user": {"client-certificate-data": b64("admin.crt"), "client-key-data": b64("admin.key")},
                }
            ],
            "contexts": [
                {
                    "name": "datamesh-dev",
                    "context": {"cluster": "datamesh-dev", "user": "datamesh-admin", "namespace": "default"},
                }
            ],
            "current-context": "datamesh-dev",
        }
        _atomic_write(self.kubeconfig, yaml.safe_dump(config, sort_keys=False), mode=0o600)


def _http_ok(url: str, ctx: ssl.SSLContext) -> bool:
    try:
        status, _ = _http_get(url, ctx, timeout=5.0)
    except (OSError, ssl.SSLError):
        return False
    return status == 200


def _etcd_healthy(url: str) -> bool:
    try:
        status, body = _http_get(f"{url}/health", timeout=5.0)
    except OSError:
        return False
    try:
        return status == 200 and json.loads(body).get("health") == "true"
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# An existing cluster (DATAMESH_TEST_KUBECONFIG)


class ExternalCluster:
    """A cluster someone else runs, with ControlPlane's client-side interface."""

    def __init__(self, kubeconfig: Path, tools: Mapping[str, Path] | None = None) -> None:
        self.kubeconfig = Path(kubeconfig).expanduser().resolve()
        config = yaml.safe_load(self.kubeconfig.read_text())
        current = config.get("current-context")
        ctx = next((c["context"] for c in config.get("contexts", []) if c["name"] == current), None)
        cluster_name = ctx["cluster"] if ctx else config["clusters"][0]["name"]
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == cluster_name)
        self.server: str = cluster["server"]
        self.workdir = self.kubeconfig.parent
        self._tools = dict(tools) if tools is not None else tool_paths(("k8s", "helm"))

    @property
    def kubectl(self) -> Path:
        return self._tools["kubectl"]

    @property
    def helm(self) -> Path | None:
        return self._tools.get("helm")

    def kubectl_cmd(self, *args: str) -> list[str]:
        return [str(self.kubectl), "--kubeconfig", str(self.kubeconfig), *args]

    def restart_apiserver(self) -> None:
        raise ControlPlaneError("cannot restart the API server of an external cluster")

    def etcd_paused(self) -> contextlib.AbstractContextManager[None]:
        raise ControlPlaneError("cannot pause the etcd of an external cluster")


# --------------------------------------------------------------------------------------------
# Background mode (the developer command)


def default_workdir() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/datamesh/dev-cluster``."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "datamesh" / "dev-cluster"


def _pid_alive(pid: int) -> bool:
    try:
        # Reap it if it is our own child (e.g. up() and down() in one process): a zombie
        # still answers kill(pid, 0).
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _serve_pid(workdir: Path) -> int | None:
    """The pid of this workdir's ``serve`` process, if it is still running."""
    try:
        pid = int((workdir / "pid").read_text().strip())
    except (OSError, ValueError):
        return None
    if not _pid_alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return pid  # no /proc: trust the pid file
    # A recycled pid belongs to some other program: never signal it.
    if b"datamesh_dev.devcluster" not in cmdline or b"serve" not in cmdline:
        return None
    return pid


def is_running(workdir: Path | None = None) -> bool:
    """Whether a background control plane is up and ready in ``workdir``."""
    wd = (workdir or default_workdir()).expanduser().resolve()
    if _serve_pid(wd) is None or not (wd / "ready").exists():
        return False
    try:
        return _http_ok(_read_server(wd) + "/readyz", _admin_context(wd / "pki"))
    except (OSError, ValueError, KeyError, ssl.SSLError):
        return False


def _read_server(workdir: Path) -> str:
    config = yaml.safe_load((workdir / "kubeconfig").read_text())
    return str(config["clusters"][0]["cluster"]["server"])


def run_background(workdir: Path, *, timeout: float = 300.0, quiet: bool = False) -> Path:
    """Start a detached control plane in ``workdir`` (or reuse a running one).

    Builds the binaries in the foreground first (progress on stderr), then runs
    ``python -m datamesh_dev.devcluster serve`` in its own session, writes its pid to
    ``<workdir>/pid`` and waits until the API server is ready. Prints
    ``export KUBECONFIG=<path>`` on stdout unless ``quiet``; returns the kubeconfig path.
    """
    wd = Path(workdir).expanduser().resolve()
    kubeconfig = wd / "kubeconfig"
    if is_running(wd):
        if not quiet:
            print(f"export KUBECONFIG={kubeconfig}", flush=True)
        return kubeconfig
    if _serve_pid(wd) is not None:
        stop_background(wd)  # started but not ready (or wedged): start afresh
    wd.mkdir(parents=True, exist_ok=True)
    for stale in ("ready", "pid"):
        (wd / stale).unlink(missing_ok=True)
    tool_paths(("etcd", "k8s", "helm"))

    env = dict(os.environ)
    # The serve process must import this very package even from a source checkout.
    pkg_parent = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    log_path = wd / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "datamesh_dev.devcluster", "serve", "--workdir", str(wd)],
            cwd=wd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _atomic_write(wd / "pid", f"{proc.pid}\n")
    if not quiet:
        print(f"starting the control plane in {wd} (pid {proc.pid})...", file=sys.stderr, flush=True)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            (wd / "pid").unlink(missing_ok=True)
            raise ControlPlaneError(
                f"the control plane failed to start; last lines of {log_path}:\n{_tail(log_path, 2 * LOG_TAIL_LINES)}"
            )
        if (wd / "ready").exists() and is_running(wd):
            break
        if time.monotonic() > deadline:
            stop_background(wd)
            raise ControlPlaneError(
                f"the control plane was not ready after {timeout:.0f} s; last lines of "
                f"{log_path}:\n{_tail(log_path, 2 * LOG_TAIL_LINES)}"
            )
        time.sleep(0.5)
    if not quiet:
        print(f"export KUBECONFIG={kubeconfig}", flush=True)
    return kubeconfig


def stop_background(workdir: Path, *, timeout: float = 60.0) -> bool:
    """Stop the control plane started by ``run_background``; False if none was running."""
    wd = Path(workdir).expanduser().resolve()
    pid = _serve_pid(wd)
    if pid is None:
        # Left behind if serve was SIGKILLed; a kubeconfig for a dead server only misleads.
        for stale in ("ready", "pid", "kubeconfig"):
            (wd / stale).unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            # Its children carry PDEATHSIG, so killing serve takes them down too.
            _killpg(pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    for stale in ("ready", "pid"):
        (wd / stale).unlink(missing_ok=True)
    return True


def up(workdir: Path | None = None) -> Path:
    """Start (or reuse) the background dev control plane; return its kubeconfig path."""
    return run_background(workdir or default_workdir())


def down(workdir: Path | None = None) -> bool:
    """Stop the background dev control plane; False if none was running."""
    return stop_background(workdir or default_workdir())


def _serve(workdir: Path) -> int:
    """Run a control plane in ``workdir`` until SIGTERM/SIGINT (the detached process)."""
    wd = workdir.expanduser().resolve()
    stopping = threading.Event()
    started = False

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.set()
        if not started:
            raise SystemExit(128 + signum)  # interrupt start(); it cleans up after itself

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    cp = ControlPlane(wd, keep=True)
    try:
        cp.start()
    except ControlPlaneError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    started = True
    code = 0
    try:
        _atomic_write(wd / "ready", f"{cp.server}\n")
        print(f"control plane ready at {cp.server}; KUBECONFIG={cp.kubeconfig}", flush=True)
        while not stopping.wait(1.0):
            dead = cp.dead_process()
            if dead:
                print(
                    f"error: {dead} exited; last lines of its log:\n{_tail(wd / f'{dead}.log')}",
                    file=sys.stderr,
                    flush=True,
                )
                code = 1
                break
    finally:
        cp.stop()
        # Logs stay for post-mortems; state that would mislead a later status/up goes.
        for name in ("ready", "pid", "kubeconfig"):
            (wd / name).unlink(missing_ok=True)
        for name in ("etcd-data", "pki", "apiserver-certs", "kcm-certs"):
            shutil.rmtree(wd / name, ignore_errors=True)
        print("control plane stopped", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="datamesh-dev", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("up", "start a background control plane and print export KUBECONFIG=..."),
        ("down", "stop the background control plane"),
        ("status", "tell whether the background control plane is running"),
        ("serve", "run a control plane in the foreground until SIGTERM"),
        ("kubectl", "run the built kubectl against it: datamesh-dev kubectl get dp -A"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--workdir", type=Path, default=None, help=f"state directory (default: {default_workdir()})")
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "kubectl":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    wd: Path = args.workdir or default_workdir()
    try:
        if args.command == "kubectl":
            kubeconfig = wd.expanduser().resolve() / "kubeconfig"
            if not kubeconfig.exists():
                raise ControlPlaneError("no dev cluster is running: start one with `datamesh-dev up`")
            kubectl = tool_paths(["k8s"])["kubectl"]
            os.execv(kubectl, [str(kubectl), "--kubeconfig", str(kubeconfig), *rest])
        if args.command == "serve":
            return _serve(wd)
        if args.command == "up":
            run_background(wd)
            return 0
        if args.command == "down":
            stopped = stop_background(wd)
            print("stopped" if stopped else "not running", file=sys.stderr)
            return 0
        running = is_running(wd)
        if running:
            print(
                f"running: {_read_server(wd.expanduser().resolve())}\n"
                f"export KUBECONFIG={wd.expanduser().resolve() / 'kubeconfig'}"
            )
        else:
            print("not running")
        return 0 if running else 1
    except ControlPlaneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
