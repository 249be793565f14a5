#!/usr/bin/env python
"""Benchmark: DataProducts applied at once on the real control plane, with the operator running.

Not a test. It starts a real control plane (``datamesh_dev.devcluster.ControlPlane``), applies the
CRD, runs ``datamesh operator`` as a subprocess (its own process, so its memory is its own),
and then, in one run:

1. baseline: one small inline product applied alone, several times in a row; the p50 of
   apply-to-Ready is the "apply to Ready (small inline product)" target (< 1 s);
2. for each N in ``--sizes`` (default 100 and 1000): N small products applied at once, spread
   over a few namespaces; for every product the time from the start of the apply to
   ``status.phase == Ready`` with ``observedGeneration == generation`` (one ``kubectl get dp
   --watch`` stream), catalog ConfigMap writes (a watch on the catalog ConfigMaps, and the
   operator's ``datamesh_catalog_writes_total``), the operator's peak RSS (``/proc/<pid>/status``
   sampled every 0.2 s, and ``VmHWM``), and a check that the catalog ends with N entries.
   The batch is deleted (and the deletion awaited) before the next size.

Figures are printed as a table and as plain ``key=value`` lines, with ratios against the
baseline measured in the same run. Usage::

    .venv/bin/python bench/reconcile.py                 # sizes 100 and 1000
    .venv/bin/python bench/reconcile.py --sizes 100     # a quick run

The operator's log (stderr) is kept in the printed log directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datamesh.web.serving import free_port
from procstatus import children_of, status_fields, status_mib, summed_pss_mib

REPO = Path(__file__).resolve().parents[1]
PLATFORM_NAMESPACE = "datamesh-system"
CATALOG_LABEL = "datamesh.io/catalog"
CRD = "crd/dataproducts.datamesh.io"
WORDS = (
    "shipping",
    "invoice",
    "refund",
    "churn",
    "delivery",
    "warehouse",
    "discount",
    "support",
    "renewal",
    "contract",
    "latency",
    "outage",
    "upgrade",
    "billing",
    "onboarding",
    "feedback",
)


class BenchError(RuntimeError):
    """The benchmark cannot go on (operator died, a size timed out, kubectl failed)."""


# ------------------------------------------------------------------------------------------
# Helpers


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


def product(name: str, namespace: str, rows: int, seed: int) -> dict[str, Any]:
    """A small valid product: a few inline rows, semantic search on a text field."""
    return {
        "apiVersion": "datamesh.io/v1alpha1",
        "kind": "DataProduct",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "domain": namespace,
            "description": f"Synthetic benchmark product {name} about {WORDS[seed % len(WORDS)]}.",
            "tags": ["bench", WORDS[seed % len(WORDS)]],
            "schema": {
                "fields": [
                    {"name": "id", "type": "string", "primaryKey": True},
                    {"name": "text", "type": "string"},
                    {"name": "amount", "type": "number"},
                ]
            },
            "source": {
                "inline": [
                    {
                        "id": f"r{i}",
                        "text": f"row {i} of {name} about {WORDS[(seed + i) % len(WORDS)]}",
                        "amount": i * 1.5,
                    }
                    for i in range(rows)
                ]
            },
            # The tiny lexical model: the benchmark measures reconciling, not embedding.
            "semanticSearch": {"enabled": True, "keyFields": ["text"], "embeddingModel": "builtin:ngram-384"},
        },
    }


class Kubectl:
    def __init__(self, cp: Any) -> None:
        self.cp = cp

    def cmd(self, *args: str) -> list[str]:
        return list(self.cp.kubectl_cmd(*args))

    def run(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.cmd(*args), input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise BenchError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def json(self, *args: str, timeout: float = 120) -> Any:
        return json.loads(self.run(*args, "-o", "json", timeout=timeout).stdout)


# ------------------------------------------------------------------------------------------
# Watchers (one kubectl --watch stream each, read by a thread)


class LineWatch:
    """A ``kubectl get ... --watch -o jsonpath=...`` subprocess; each line goes to ``on_line``."""

    def __init__(self, kubectl: Kubectl, args: list[str], name: str) -> None:
        self.kubectl = kubectl
        self.args = args
        self.name = name
        self.proc: subprocess.Popen[str] | None = None
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.restarts = 0
        self.stderr_path = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".err")[1])

    def on_line(self, t: float, line: str) -> None:  # overridden
        raise NotImplementedError

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            with open(self.stderr_path, "a") as err:
                self.proc = subprocess.Popen(
                    self.kubectl.cmd(*self.args), stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1
                )
                assert self.proc.stdout is not None
                for line in self.proc.stdout:
                    t = time.monotonic()
                    line = line.strip()
                    if line:
                        self.on_line(t, line)
                self.proc.wait()
            if not self.stopping:
                # A watch the server closed (or kubectl died): say so, and resume.
                self.restarts += 1
                print(
                    f"  ! {self.name}: kubectl watch ended (exit {self.proc.returncode}), restarting", file=sys.stderr
                )
                time.sleep(0.5)

    def stop(self) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.thread is not None:
            self.thread.join(timeout=5)
        self.stderr_path.unlink(missing_ok=True)


@dataclass
class ProductState:
    first_seen: float
    phase: str = ""
    first_status: float | None = None  # the first moment it had a phase: before, `kubectl get` shows none
    phases_seen: set[str] = field(default_factory=set)
    ready_by_generation: dict[str, float] = field(default_factory=dict)  # first moment Ready at each generation

    @property
    def ready_at(self) -> float | None:
        """The first moment it was Ready at the generation it then had (at any generation)."""
        return next(iter(self.ready_by_generation.values()), None)


class ProductWatch(LineWatch):
    """Every DataProduct's phase; the first moment each one is Ready for its generation."""

    # "|", not tabs: kubectl's watch output goes through a tabwriter that turns tabs into spaces.
    TEMPLATE = (
        "{.metadata.namespace}|{.metadata.name}|{.metadata.generation}|"
        '{.status.phase}|{.status.observedGeneration}{"\\n"}'
    )

    def __init__(self, kubectl: Kubectl) -> None:
        super().__init__(
            kubectl, ["get", "dataproducts", "-A", "--watch", "-o", f"jsonpath={self.TEMPLATE}"], "dp-watch"
        )
        self.lock = threading.Lock()
        self.states: dict[str, ProductState] = {}
        self.events = 0

    def on_line(self, t: float, line: str) -> None:
        parts = line.split("|")
        if len(parts) < 5:
            return
        ns, name, gen, phase, observed = parts[:5]
        key = f"{ns}/{name}"
        with self.lock:
            self.events += 1
            st = self.states.get(key)
            if st is None:
                st = self.states[key] = ProductState(first_seen=t)
            st.phase = phase
            if phase:
                st.phases_seen.add(phase)
                if st.first_status is None:
                    st.first_status = t
            if phase == "Ready" and observed and observed == gen:
                st.ready_by_generation.setdefault(gen, t)

    def relist(self) -> None:
        """Read every product once with a plain list, as the watch would have shown it."""
        template = f"{{range .items[*]}}{self.TEMPLATE}{{end}}"  # a list: the watch's template per item
        listed = self.kubectl.run("get", "dataproducts", "-A", "-o", f"jsonpath={template}", check=False)
        t = time.monotonic()
        for line in listed.stdout.splitlines():
            if line.strip():
                self.on_line(t, line.strip())

    def forget(self, keys: list[str]) -> None:
        with self.lock:
            for k in keys:
                self.states.pop(k, None)

    def snapshot(self, keys: list[str]) -> dict[str, ProductState | None]:
        with self.lock:
            return {k: self.states.get(k) for k in keys}


class CatalogWatch(LineWatch):
    """ADDED/MODIFIED/DELETED events of the catalog ConfigMaps, with their times."""

    TEMPLATE = '{.type}|{.object.metadata.name}|{.object.metadata.resourceVersion}{"\\n"}'

    def __init__(self, kubectl: Kubectl) -> None:
        super().__init__(
            kubectl,
            [
                "get",
                "configmaps",
                "-n",
                PLATFORM_NAMESPACE,
                "-l",
                f"{CATALOG_LABEL}=true",
                "--watch",
                "--output-watch-events",
                "-o",
                f"jsonpath={self.TEMPLATE}",
            ],
            "catalog-watch",
        )
        self.lock = threading.Lock()
        self.events: list[tuple[float, str, str, str]] = []
        self.seen_rv: set[tuple[str, str]] = set()

    def on_line(self, t: float, line: str) -> None:
        parts = line.split("|")
        if len(parts) < 3:
            return
        typ, name, rv = parts[:3]
        with self.lock:
            # The initial list (and a restarted watch's list) repeats versions already seen.
            if (name, rv) in self.seen_rv:
                return
            self.seen_rv.add((name, rv))
            self.events.append((t, typ, name, rv))

    def writes_between(self, t0: float, t1: float) -> tuple[int, set[str]]:
        with self.lock:
            hits = [(typ, name) for t, typ, name, _ in self.events if t0 <= t <= t1 and typ in ("ADDED", "MODIFIED")]
        return len(hits), {name for _, name in hits}


# ------------------------------------------------------------------------------------------
# The operator subprocess


class Operator:
    def __init__(
        self,
        kubeconfig: Path,
        log_dir: Path,
        extra_env: dict[str, str] | None = None,
        verbose: bool = False,
        exe: Path = REPO / ".venv" / "bin" / "datamesh",
        name: str = "operator",
        args: tuple[str, ...] = (),
    ) -> None:
        self.kubeconfig = kubeconfig
        self.args = args
        self.exe = exe
        self.verbose = verbose
        self.extra_env = extra_env or {}
        self.log_path = log_dir / f"{name}.log"
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._samples: list[tuple[float, int]] = []
        self._tree: list[tuple[float, float]] = []  # (time, MiB): its and its children's summed PSS
        self.peak_threads = 0
        self.peak_fds = 0
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self, timeout: float = 90) -> None:
        self.spawn()
        self.wait_live(timeout)

    def spawn(self) -> None:
        """Start the operator process (without waiting for it)."""
        env = dict(os.environ)
        env.update(
            KUBECONFIG=str(self.kubeconfig),
            DATAMESH_METRICS_PORT=str(self.metrics_port),
            DATAMESH_PLATFORM_NAMESPACE=PLATFORM_NAMESPACE,
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        exe = self.exe
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open for the process's lifetime, closed in stop()
        self.proc = subprocess.Popen(
            [
                str(exe),
                "operator",
                "--liveness",
                f"http://127.0.0.1:{self.liveness_port}/healthz",
                *(["--verbose"] if self.verbose else []),
                *self.args,
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        self._sampler = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._sampler.start()

    def wait_live(self, timeout: float = 90) -> None:
        """Return once kopf's liveness endpoint answers 200."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"operator not live after {timeout} s; log tail:\n{self.log_tail()}")
            time.sleep(0.2)

    def probes(self) -> dict[str, Any]:
        """What kopf's liveness endpoint answers: the result of every probe (empty when it does not answer)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=5) as r:
                answer: dict[str, Any] = json.loads(r.read() or b"{}")
                return answer
        except (urllib.error.URLError, OSError, ValueError):
            return {}

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"the operator exited with code {self.proc.returncode}; log tail:\n{self.log_tail()}")

    def _sample(self) -> None:
        pid = self.proc.pid  # type: ignore[union-attr]
        while not self._stop.wait(0.2):
            status = status_fields(("VmRSS", "Threads"), pid)
            if "VmRSS" in status:
                self._samples.append((time.monotonic(), status["VmRSS"]))
            # The pod holds the children too (the embedded store's builders, the built-in model's process).
            self._tree.append((time.monotonic(), summed_pss_mib([pid, *children_of(pid)])))
            try:
                fds = len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                continue
            self.peak_threads = max(self.peak_threads, status.get("Threads", 0))
            self.peak_fds = max(self.peak_fds, fds)

    def rss_mib(self) -> float:
        return status_mib("VmRSS", self.proc.pid)  # type: ignore[union-attr]

    def hwm_mib(self) -> float:
        return status_mib("VmHWM", self.proc.pid)  # type: ignore[union-attr]

    def peak_rss_mib(self, t0: float, t1: float) -> float:
        window = [kb for t, kb in list(self._samples) if t0 <= t <= t1]
        return max(window, default=0) / 1024

    def peak_tree_pss_mib(self, t0: float, t1: float) -> float:
        """The largest summed PSS of the operator and its child processes between ``t0`` and ``t1``."""
        return max((mib for t, mib in list(self._tree) if t0 <= t <= t1), default=0.0)

    def metrics(self) -> dict[str, float]:
        """The operator's Prometheus samples (name{labels} -> value)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except (urllib.error.URLError, OSError):
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
        return out

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # kopf stops gracefully on SIGTERM
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()


class Fleet:
    """The operator processes of a run: one, or one per shard (``--shards``), measured as one operator.

    Metrics and reconciled products are summed over the shards; RSS, threads and file descriptors are
    the largest of one process (the figure that must fit a pod's limit); the total RSS is kept apart.
    """

    def __init__(self, members: list[Operator]) -> None:
        self.members = members
        self.log_path = members[0].log_path

    @property
    def pids(self) -> list[int]:
        return [m.proc.pid for m in self.members if m.proc is not None]

    def start(self, timeout: float = 90) -> None:
        self.spawn()
        self.wait_live(timeout)

    def spawn(self) -> None:
        for m in self.members:
            m.spawn()

    def wait_live(self, timeout: float = 90) -> None:
        for m in self.members:
            m.wait_live(timeout)

    def check_alive(self) -> None:
        for m in self.members:
            m.check_alive()

    def probes(self) -> dict[str, Any]:
        return {"products": sum(int(m.probes().get("products") or 0) for m in self.members)}

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for m in self.members:
            for k, v in m.metrics().items():
                out[k] = out.get(k, 0.0) + v
        return out

    def rss_mib(self) -> float:
        return max(m.rss_mib() for m in self.members)

    def total_rss_mib(self) -> float:
        return sum(m.rss_mib() for m in self.members)

    def hwm_mib(self) -> float:
        return max(m.hwm_mib() for m in self.members)

    def peak_rss_mib(self, t0: float, t1: float) -> float:
        return max(m.peak_rss_mib(t0, t1) for m in self.members)

    def peak_tree_pss_mib(self, t0: float, t1: float) -> float:
        return max(m.peak_tree_pss_mib(t0, t1) for m in self.members)

    @property
    def peak_threads(self) -> int:
        return max(m.peak_threads for m in self.members)

    @property
    def peak_fds(self) -> int:
        return max(m.peak_fds for m in self.members)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(f"[{m.log_path.name}]\n{m.log_tail(lines)}" for m in self.members)

    def stop(self) -> None:
        for m in self.members:
            m.stop()


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def control_plane_pids() -> dict[str, int]:
    """etcd, kube-apiserver and kube-controller-manager started by this process (the ControlPlane)."""
    me = os.getpid()
    out: dict[str, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            head, _, rest = (d / "stat").read_text().rpartition(")")
        except OSError:
            continue
        comm = head.partition("(")[2]
        if int(rest.split()[1]) == me and comm in ("etcd", "kube-apiserver", "kube-controller"):
            out[comm] = int(d.name)
    return out


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


class CpuMeter:
    """CPU seconds used by the operator and by the control plane between start() and stop()."""

    def __init__(self, operator_pids: list[int]) -> None:
        self.operator_pids = operator_pids
        self.pids = control_plane_pids()

    def read(self) -> dict[str, float]:
        cp = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        # The operator's children (collection builders, the built-in model's process) work for it: a
        # child that stopped between two reads is missed, so this is a lower bound.
        children = [child for pid in self.operator_pids for child in children_of(pid)]
        return {
            "operator": sum(cpu_seconds(pid) for pid in self.operator_pids),
            "operator children": sum(cpu_seconds(pid) for pid in children),
            **cp,
        }


def api_requests(metrics_text: str) -> Counter[str]:
    """The API server's requests so far (``apiserver_request_total``) by verb and resource ("PATCH leases")."""
    counts: Counter[str] = Counter()
    for line in metrics_text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels, _, value = line.rpartition(" ")
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        resource = pairs.get("resource", "") + (f"/{pairs['subresource']}" if pairs.get("subresource") else "")
        counts[f"{pairs.get('verb', '?')} {resource or pairs.get('component', '?')}"] += int(float(value))
    return counts


def metric_sum(m: dict[str, float], name: str) -> float:
    """Sum of a metric over its label sets."""
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


def reconcile_stats(m0: dict[str, float], m1: dict[str, float]) -> tuple[float, float]:
    """Reconciles between two scrapes, and their mean duration (datamesh_reconcile_duration_seconds)."""
    count = metric_sum(m1, "datamesh_reconcile_duration_seconds_count") - metric_sum(
        m0, "datamesh_reconcile_duration_seconds_count"
    )
    total = metric_sum(m1, "datamesh_reconcile_duration_seconds_sum") - metric_sum(
        m0, "datamesh_reconcile_duration_seconds_sum"
    )
    return count, (total / count if count else float("nan"))


# ------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class EditResult:
    """A Ready product edited (its description) while a batch is being applied and reconciled."""

    at_s: float  # after the start of the batch's apply
    batch_ready: int  # products of the batch Ready at that moment
    ready_s: float | None  # from the edit to Ready at the new generation (None: not within the timeout)


@dataclass
class SizeResult:
    n: int
    ready: int
    timed_out: bool
    apply_s: float
    total_s: float
    p50: float
    p95: float
    max_s: float
    seen_p50: float
    no_status_p50: float  # from first seen to a first phase: how long `kubectl get` showed it without one
    no_status_max: float
    per_s: float
    cm_writes: int
    cm_names: int
    metric_writes: float
    peak_rss: float
    peak_tree_pss: float  # the operator and its child processes, summed PSS (MiB)
    rss_before: float
    hwm: float
    catalog_entries: int
    catalog_ready_entries: int
    catalog_complete_s: float | None
    phases_seen: Counter[str]
    reconcile_errors: float
    reconciles: float
    reconcile_mean: float
    cpu: dict[str, float]
    load_before: str
    load_after: str
    delete_s: float | None
    delete_cm_writes: int
    api: Counter[str] = field(default_factory=Counter)  # API server requests during the batch
    edit: EditResult | None = None


class Bench:
    def __init__(self, cp: Any, args: argparse.Namespace, log_dir: Path) -> None:
        self.cp = cp
        self.args = args
        self.kubectl = Kubectl(cp)
        self.log_dir = log_dir
        # The embedded store in a folder of its own, as on a volume: a restarted operator finds its collections.
        self.operator_env = dict(e.split("=", 1) for e in args.env)
        self.operator = self.new_operator("operator")
        self.dp_watch = ProductWatch(self.kubectl)
        self.cm_watch = CatalogWatch(self.kubectl)

    def new_operator(self, name: str) -> Fleet:
        """The run's operator, or with ``--shards K`` K of them, shard k owning the namespaces ending ``-s<k>``."""
        verbose, exe, shards = self.args.operator_verbose, self.args.operator_exe, self.args.shards
        members = []
        for k in range(shards):
            # The embedded store in a folder of its own, as on a volume: a restarted operator finds its collections.
            env = {"DATAMESH_QDRANT_PATH": str(self.log_dir / (f"store-s{k}" if shards > 1 else "store"))}
            args = ("--shard", f"s{k}", "--namespace", f"*-s{k}") if shards > 1 else ()
            label = f"{name}-s{k}" if shards > 1 else name
            members.append(
                Operator(self.cp.kubeconfig, self.log_dir, {**env, **self.operator_env}, verbose, exe, label, args)
            )
        return Fleet(members)

    def namespace(self, prefix: str, j: int) -> str:
        """The j-th namespace of a batch; with shards, named for the shard that owns it."""
        return f"{prefix}-{j}-s{j % self.args.shards}" if self.args.shards > 1 else f"{prefix}-{j}"

    # ---- setup

    def setup(self) -> None:
        t0 = time.monotonic()
        self.kubectl.run("apply", "--server-side", "-f", str(REPO / "crds"))
        # Polled rather than `kubectl wait`, which fails outright while the new CRD has no conditions yet.
        deadline = time.monotonic() + 60
        jsonpath = 'jsonpath={.status.conditions[?(@.type=="Established")].status}'
        while self.kubectl.run("get", CRD, "-o", jsonpath, check=False).stdout.strip() != "True":
            if time.monotonic() > deadline:
                raise BenchError(f"{CRD} not Established after 60 s")
            time.sleep(0.2)
        self.kubectl.run("create", "namespace", PLATFORM_NAMESPACE, check=False)
        self.operator.start()
        self.cpu = CpuMeter(self.operator.pids)
        self.dp_watch.start()
        self.cm_watch.start()
        print(
            f"  operator live (pids {self.operator.pids}, RSS {self.operator.rss_mib():.0f} MiB) "
            f"in {time.monotonic() - t0:.1f} s; log: {self.operator.log_path}"
        )

    def wait_ready(self, keys: list[str], since: float, timeout: float, label: str) -> dict[str, ProductState | None]:
        deadline = since + timeout
        last_report = last_progress = time.monotonic()
        last_ready = -1
        while True:
            self.operator.check_alive()
            snap = self.dp_watch.snapshot(keys)
            ready = sum(1 for s in snap.values() if s is not None and s.ready_at is not None)
            if ready == len(keys):
                return snap
            now = time.monotonic()
            if now > deadline:
                return snap
            if ready != last_ready:
                last_ready, last_progress = ready, now
            elif len(keys) > 1 and now - last_progress >= 3:
                # No progress for 3 s: read the list, in case the watch missed events (the API server closes
                # a watch that falls behind in a burst, and kubectl's restart missed some); a product found
                # Ready this way counts as Ready now, an upper bound at most 3 s late (it was 15 s).
                self.dp_watch.relist()
                last_progress = now
            if len(keys) > 1 and now - last_report >= 15:
                phases = Counter((s.phase or "(no status)") if s else "(not seen)" for s in snap.values())
                print(f"  {label}: {ready}/{len(keys)} Ready after {now - since:.0f} s  {dict(phases)}", flush=True)
                last_report = now
            time.sleep(0.02 if len(keys) == 1 else 0.25)

    def catalog(self) -> dict[str, dict[str, Any]]:
        items = self.kubectl.json("get", "configmaps", "-n", PLATFORM_NAMESPACE, "-l", f"{CATALOG_LABEL}=true")["items"]
        out: dict[str, dict[str, Any]] = {}
        for cm in items:
            for k, v in (cm.get("data") or {}).items():
                try:
                    out[k] = json.loads(v)
                except ValueError:
                    out[k] = {}
        return out

    def delete_products(self, namespaces: list[str], keys: list[str], timeout: float) -> float | None:
        """Delete every product in ``namespaces``; wait until they and their catalog entries are gone."""
        t0 = time.monotonic()
        for ns in namespaces:
            self.kubectl.run("delete", "dataproducts", "--all", "-n", ns, "--wait=false", timeout=timeout)
        self.last_delete_issue_s = time.monotonic() - t0
        prefixes = tuple(f"{ns}." for ns in namespaces)
        while True:
            self.operator.check_alive()
            left = sum(len(self.kubectl.json("get", "dataproducts", "-n", ns)["items"]) for ns in namespaces)
            entries = sum(1 for k in self.catalog() if k.startswith(prefixes)) if left == 0 else -1
            if left == 0 and entries == 0:
                self.dp_watch.forget(keys)
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                print(
                    f"  ! deletion not finished after {timeout:.0f} s: {left} products left, "
                    f"{entries if entries >= 0 else '?'} catalog entries left",
                    flush=True,
                )
                return None
            time.sleep(1.0)

    # ---- baseline

    def baseline(self) -> dict[str, Any]:
        ns = "bench-single-s0" if self.args.shards > 1 else "bench-single"
        self.kubectl.run("create", "namespace", ns, check=False)
        lat_start: list[float] = []
        lat_return: list[float] = []
        apply_s: list[float] = []
        keys: list[str] = []
        m0: dict[str, float] = {}
        t_first = 0.0
        for i in range(self.args.single_repeats + 1):  # the first is a warm-up, not counted
            name = f"single-{i:02d}"
            body = product(name, ns, self.args.rows, i)
            key, t0, t1, ready_at = self.apply_one(body)
            keys.append(key)
            if i == 0:
                print(f"  warm-up {name}: {ready_at - t0:.3f} s (not counted)")
                time.sleep(1.0)  # let the warm-up's trailing catalog write land outside the window
                m0, t_first = self.operator.metrics(), time.monotonic()
                continue
            lat_start.append(ready_at - t0)
            lat_return.append(ready_at - t1)
            apply_s.append(t1 - t0)
        time.sleep(1.0)
        m1, t_last = self.operator.metrics(), time.monotonic()
        writes, _ = self.cm_watch.writes_between(t_first, t_last)
        rss = self.operator.peak_rss_mib(t_first, t_last)
        t_del = self.delete_products([ns], keys, 120)
        return {
            "reconciles": reconcile_stats(m0, m1)[0],
            "reconcile_mean": reconcile_stats(m0, m1)[1],
            "cm_writes": writes,
            "cm_writes_per_product": writes / len(lat_start),
            "rss": rss,
            "n": len(lat_start),
            "p50": statistics.median(lat_start),
            "p95": percentile(lat_start, 95),
            "min": min(lat_start),
            "max": max(lat_start),
            "p50_after_kubectl": statistics.median(lat_return),
            "kubectl_apply_p50": statistics.median(apply_s),
            "delete_s": t_del,
            "all": lat_start,
        }

    def apply_all(self, bodies: list[dict[str, Any]], timeout: float, label: str) -> float:
        """Apply ``bodies`` with ``--apply-parallel`` kubectl processes; the time they all returned."""
        chunks = [bodies[j :: self.args.apply_parallel] for j in range(self.args.apply_parallel)]
        docs = [yaml.safe_dump_all(c) for c in chunks if c]
        procs = [
            subprocess.Popen(
                self.kubectl.cmd("apply", "-f", "-"),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in docs
        ]
        errors: list[str] = [""] * len(procs)

        def feed(i: int) -> None:
            try:
                errors[i] = procs[i].communicate(docs[i], timeout=timeout)[1]
            except subprocess.TimeoutExpired:
                procs[i].kill()
                errors[i] = procs[i].communicate()[1] + f"\n(kubectl apply killed after {timeout:.0f} s)"

        feeders = [threading.Thread(target=feed, args=(i,), daemon=True) for i in range(len(procs))]
        for f in feeders:
            f.start()
        for f in feeders:
            f.join(timeout=timeout)
        failed = [(p.returncode, e) for p, e in zip(procs, errors, strict=True) if p.returncode != 0]
        if failed:
            raise BenchError(f"kubectl apply of the {label} batch failed: {failed[0][1].strip()[:2000]}")
        return time.monotonic()

    # ---- one size

    def run_size(self, n: int, timeout: float) -> SizeResult:
        namespaces = [self.namespace(f"bench-n{n}", j) for j in range(self.args.namespaces)]
        for ns in namespaces:
            self.kubectl.run("create", "namespace", ns, check=False)
        bodies = [product(f"p-{i:05d}", namespaces[i % len(namespaces)], self.args.rows, i) for i in range(n)]
        keys = [f"{b['metadata']['namespace']}/{b['metadata']['name']}" for b in bodies]

        edited, *_ = self.apply_one(product("edited", namespaces[0], self.args.rows, n))
        m0 = self.operator.metrics()
        api0 = self.api_requests()
        rss_before = self.operator.rss_mib()
        load_before = loadavg()
        cpu0 = self.cpu.read()
        t0 = time.monotonic()
        edits: list[EditResult] = []
        editor = threading.Thread(target=lambda: edits.append(self.edit_mid_batch(edited, keys, t0, timeout)))
        editor.start()
        t_applied = self.apply_all(bodies, timeout, f"N={n}")
        print(
            f"  N={n}: applied in {t_applied - t0:.1f} s ({self.args.apply_parallel} parallel kubectl apply); "
            "waiting for Ready ...",
            flush=True,
        )

        snap = self.wait_ready(keys, t0, timeout, f"N={n}")
        editor.join()
        ready_times = [s.ready_at - t0 for s in snap.values() if s is not None and s.ready_at is not None]
        seen_to_ready = [s.ready_at - s.first_seen for s in snap.values() if s is not None and s.ready_at is not None]
        no_status = [s.first_status - s.first_seen for s in snap.values() if s and s.first_status is not None]
        timed_out = len(ready_times) < n
        t_end = max((s.ready_at for s in snap.values() if s and s.ready_at), default=time.monotonic())
        if timed_out:
            t_end = time.monotonic()
            stuck = [(k, s) for k, s in snap.items() if s is None or s.ready_at is None]
            phases = Counter((s.phase or "(no status)") if s else "(never seen by the watch)" for _, s in stuck)
            print(
                f"  !! TIMEOUT N={n}: {len(ready_times)}/{n} Ready after {timeout:.0f} s; the rest by phase: "
                f"{dict(phases)}",
                flush=True,
            )
            for k, _ in stuck[:3]:
                ns, name = k.split("/")
                r = self.kubectl.run("get", "dp", name, "-n", ns, "-o", "json", check=False)
                if r.returncode == 0:
                    body = json.loads(r.stdout)
                    print(
                        f"     {k}: metadata.annotations keys={sorted(body['metadata'].get('annotations') or {})} "
                        f"finalizers={body['metadata'].get('finalizers')} status={json.dumps(body.get('status'))[:600]}"
                    )

        # The catalog: N entries for the batch (it may trail the last status write by a flush).
        expected = {key.replace("/", ".", 1) for key in keys}  # not the edited product beside the batch
        complete_s: float | None = None
        entries = ready_entries = 0
        cat_deadline = time.monotonic() + (5 if timed_out else 60)
        while True:
            cat = self.catalog()
            batch = {k: v for k, v in cat.items() if k in expected}
            entries = len(batch)
            ready_entries = sum(1 for v in batch.values() if v.get("phase") == "Ready")
            if entries == n and ready_entries == n:
                complete_s = time.monotonic() - t0
                if self.args.shards > 1:
                    owners = Counter(str(v.get("shard")) for v in batch.values())
                    print(f"  N={n}: catalog entries by shard: {dict(sorted(owners.items()))}", flush=True)
                break
            if time.monotonic() > cat_deadline:
                break
            time.sleep(0.5)
        time.sleep(max(0.0, 2.0 - (time.monotonic() - t_end)))  # let trailing catalog writes show up in the watch
        t_window = time.monotonic()
        writes, cm_names = self.cm_watch.writes_between(t0, t_window)
        m1 = self.operator.metrics()
        api1 = self.api_requests()
        cpu1 = self.cpu.read()
        load_after = loadavg()
        peak = self.operator.peak_rss_mib(t0, t_window)
        peak_tree = self.operator.peak_tree_pss_mib(t0, t_window)
        hwm = self.operator.hwm_mib()
        phases_seen: Counter[str] = Counter()
        for s in snap.values():
            if s is not None:
                phases_seen.update(s.phases_seen)

        print(f"  N={n}: deleting the batch ...", flush=True)
        t_del0 = time.monotonic()
        delete_s = self.delete_products(namespaces, [*keys, edited], max(120.0, timeout / 2))
        print(
            f"  N={n}: kubectl delete returned after {self.last_delete_issue_s:.1f} s; products and catalog entries "
            "gone after "
            f"{f'{delete_s:.1f} s' if delete_s is not None else 'TIMEOUT'}",
            flush=True,
        )
        del_writes, _ = self.cm_watch.writes_between(t_del0, time.monotonic())

        total = (t_end - t0) if ready_times else float("nan")
        return SizeResult(
            n=n,
            ready=len(ready_times),
            timed_out=timed_out,
            apply_s=t_applied - t0,
            total_s=total,
            p50=statistics.median(ready_times) if ready_times else float("nan"),
            p95=percentile(ready_times, 95) if ready_times else float("nan"),
            max_s=max(ready_times, default=float("nan")),
            seen_p50=statistics.median(seen_to_ready) if seen_to_ready else float("nan"),
            no_status_p50=statistics.median(no_status) if no_status else float("nan"),
            no_status_max=max(no_status, default=float("nan")),
            per_s=len(ready_times) / total if ready_times and total > 0 else float("nan"),
            cm_writes=writes,
            cm_names=len(cm_names),
            metric_writes=metric_sum(m1, "datamesh_catalog_writes_total")
            - metric_sum(m0, "datamesh_catalog_writes_total"),
            peak_rss=peak,
            peak_tree_pss=peak_tree,
            rss_before=rss_before,
            hwm=hwm,
            catalog_entries=entries,
            catalog_ready_entries=ready_entries,
            catalog_complete_s=complete_s,
            phases_seen=phases_seen,
            reconcile_errors=metric_sum(m1, "datamesh_reconcile_errors_total")
            - metric_sum(m0, "datamesh_reconcile_errors_total"),
            reconciles=reconcile_stats(m0, m1)[0],
            reconcile_mean=reconcile_stats(m0, m1)[1],
            cpu={k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1} | {"wall": t_window - t0},
            load_before=load_before,
            load_after=load_after,
            delete_s=delete_s,
            delete_cm_writes=del_writes,
            api=api1 - api0,
            edit=edits[0] if edits else None,
        )

    def api_requests(self) -> Counter[str]:
        """The API server's request counters now (every client's: kubectl, the operator, the controllers)."""
        return api_requests(self.kubectl.run("get", "--raw", "/metrics").stdout)

    def apply_one(self, body: dict[str, Any]) -> tuple[str, float, float, float]:
        """Apply one product and wait until it is Ready: its key, when the apply began and returned, when Ready."""
        key = f"{body['metadata']['namespace']}/{body['metadata']['name']}"
        t0 = time.monotonic()
        self.kubectl.run("apply", "-f", "-", input=yaml.safe_dump(body))
        t1 = time.monotonic()
        state = self.wait_ready([key], t0, 60, key)[key]
        if state is None or state.ready_at is None:
            raise BenchError(
                f"product {key} not Ready after 60 s (phase {state.phase if state else 'not seen'}); "
                f"operator log tail:\n{self.operator.log_tail()}"
            )
        return key, t0, t1, state.ready_at

    def edit_mid_batch(self, key: str, batch: list[str], t0: float, timeout: float) -> EditResult:
        """Once a quarter of ``batch`` is Ready, change ``key``'s description; how long until it is Ready again."""
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            ready = sum(1 for s in self.dp_watch.snapshot(batch).values() if s is not None and s.ready_at is not None)
            if ready >= len(batch) // 4:
                break
            time.sleep(0.2)
        namespace, name = key.split("/")
        patch = json.dumps({"spec": {"description": "Edited while a batch was being applied."}})
        t_edit = time.monotonic()
        generation = self.kubectl.run(
            "patch",
            "dp",
            name,
            "-n",
            namespace,
            "--type",
            "merge",
            "-p",
            patch,
            "-o",
            "jsonpath={.metadata.generation}",
        ).stdout.strip()
        while time.monotonic() < deadline:
            state = self.dp_watch.snapshot([key])[key]
            if state is not None and generation in state.ready_by_generation:
                return EditResult(t_edit - t0, ready, state.ready_by_generation[generation] - t_edit)
            time.sleep(0.1)
        return EditResult(t_edit - t0, ready, None)

    # ---- restart with many products

    def run_restart(self, n: int, timeout: float) -> RestartResult:
        """N products Ready, the operator restarted, and a new product applied at the restart.

        Steady state is every existing product resumed: the new operator's ``products`` probe (products
        it has reconciled) reaches N + 1 and the catalog holds every entry, Ready.
        """
        namespaces = [self.namespace("bench-restart", j) for j in range(self.args.namespaces)]
        for ns in namespaces:
            self.kubectl.run("create", "namespace", ns, check=False)
        bodies = [product(f"p-{i:05d}", namespaces[i % len(namespaces)], self.args.rows, i) for i in range(n)]
        keys = [f"{b['metadata']['namespace']}/{b['metadata']['name']}" for b in bodies]
        t0 = time.monotonic()
        self.apply_all(bodies, timeout, f"restart N={n}")
        snap = self.wait_ready(keys, t0, timeout, f"restart N={n}")
        ready = sum(1 for s in snap.values() if s is not None and s.ready_at is not None)
        if ready < n:
            raise BenchError(f"restart N={n}: only {ready}/{n} Ready after {timeout:.0f} s before the restart")
        ready_s = max(s.ready_at for s in snap.values() if s is not None and s.ready_at is not None) - t0
        print(f"  restart N={n}: all Ready {ready_s:.1f} s after the apply; restarting the operator ...", flush=True)
        time.sleep(2.0)  # trailing catalog writes land before the stop

        t_stop = time.monotonic()
        self.operator.stop()
        stop_s = time.monotonic() - t_stop
        self.operator = self.new_operator("operator-restarted")
        fresh = product("p-new", namespaces[0], self.args.rows, n)
        fresh_key = f"{namespaces[0]}/p-new"
        load_before = loadavg()
        t_restart = time.monotonic()
        self.operator.spawn()
        self.kubectl.run("apply", "-f", "-", input=yaml.safe_dump(fresh))
        self.operator.wait_live(timeout)
        live_s = time.monotonic() - t_restart
        self.cpu = CpuMeter(self.operator.pids)
        new_ready_s: float | None = None
        resumed_s: float | None = None
        reconciled = 0
        deadline = t_restart + timeout
        last_report = time.monotonic()
        while (new_ready_s is None or resumed_s is None) and time.monotonic() < deadline:
            self.operator.check_alive()
            state = self.dp_watch.snapshot([fresh_key])[fresh_key]
            if new_ready_s is None and state is not None and state.ready_at is not None:
                new_ready_s = state.ready_at - t_restart
            reconciled = int(self.operator.probes().get("products") or 0)
            if resumed_s is None and reconciled >= n + 1:
                resumed_s = time.monotonic() - t_restart
            if time.monotonic() - last_report >= 15:
                print(f"  restart: {reconciled}/{n + 1} products reconciled after {time.monotonic() - t_restart:.0f} s")
                last_report = time.monotonic()
            time.sleep(0.25)
        t_end = time.monotonic()
        entries = self.catalog()
        prefixes = tuple(f"{ns}." for ns in namespaces)
        ready_entries = sum(1 for k, v in entries.items() if k.startswith(prefixes) and v.get("phase") == "Ready")
        not_ready = sum(
            1
            for ns in namespaces
            for dp in self.kubectl.json("get", "dataproducts", "-n", ns)["items"]
            if (dp.get("status") or {}).get("phase") != "Ready"
        )
        result = RestartResult(
            n=n,
            ready_before_s=ready_s,
            stop_s=stop_s,
            live_s=live_s,
            new_ready_s=new_ready_s,
            resumed_s=resumed_s,
            reconciled=reconciled,
            catalog_ready=ready_entries,
            not_ready=not_ready,
            operator_cpu_s=self.cpu.read()["operator"],
            peak_rss=self.operator.peak_rss_mib(t_restart, t_end),
            peak_threads=self.operator.peak_threads,
            peak_fds=self.operator.peak_fds,
            load_before=load_before,
            load_after=loadavg(),
        )
        print(f"  {result.line()}\n  restart N={n}: deleting the products ...", flush=True)
        result.delete_s = self.delete_products(namespaces, [*keys, fresh_key], max(120.0, timeout / 2))
        return result


@dataclass
class RestartResult:
    n: int
    ready_before_s: float
    stop_s: float
    live_s: float
    new_ready_s: float | None
    resumed_s: float | None
    reconciled: int
    catalog_ready: int
    not_ready: int
    operator_cpu_s: float
    peak_rss: float
    peak_threads: int
    peak_fds: int
    load_before: str
    load_after: str
    delete_s: float | None = None

    def line(self) -> str:
        def secs(v: float | None) -> str:
            return f"{v:.2f}" if v is not None else "TIMEOUT"

        return (
            f"restart N={self.n} all_ready_before_s={self.ready_before_s:.2f} operator_stop_s={self.stop_s:.2f} "
            f"restart_to_live_s={self.live_s:.2f} restart_to_new_product_ready_s={secs(self.new_ready_s)} "
            f"restart_to_all_resumed_s={secs(self.resumed_s)} reconciled={self.reconciled}/{self.n + 1} "
            f"catalog_ready_entries={self.catalog_ready}/{self.n + 1} products_not_ready={self.not_ready} "
            f"operator_cpu_s={self.operator_cpu_s:.1f} operator_peak_rss_mib={self.peak_rss:.0f} "
            f"operator_peak_threads={self.peak_threads} operator_peak_fds={self.peak_fds} "
            f"loadavg_before={self.load_before!r} loadavg_after={self.load_after!r} "
            f"delete_all_s={secs(self.delete_s)}"
        )


# ------------------------------------------------------------------------------------------
# Report


def scan_log(path: Path) -> tuple[Counter[str], list[str]]:
    """Counts of WARNING/ERROR/CRITICAL/Traceback lines in the operator log, and a few examples."""
    counts: Counter[str] = Counter()
    examples: list[str] = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return counts, examples
    for line in lines:
        for level in ("WARNING", "ERROR", "CRITICAL", "Traceback"):
            if level in line:
                counts[level] += 1
                if len(examples) < 16 and (level != "WARNING" or counts[level] <= 4):
                    examples.append(line[:400])
                break
    return counts, examples


def report(
    single: dict[str, Any], results: list[SizeResult], restarts: list[RestartResult], wall: float, op: Fleet
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    p1 = single["p50"]
    t = Table(title="Apply-to-Ready on the real API server, operator running")
    t.add_column("")
    t.add_column("1 alone (baseline)", justify="right")
    for r in results:
        t.add_column(f"N={r.n}" + (" TIMEOUT" if r.timed_out else ""), justify="right")

    def row(label: str, base: str, fmt: Any) -> None:
        t.add_row(label, base, *(fmt(r) for r in results))

    row("products Ready", f"{single['n']}/{single['n']}", lambda r: f"{r.ready}/{r.n}")
    row("kubectl apply (s)", f"{single['kubectl_apply_p50']:.2f}", lambda r: f"{r.apply_s:.1f}")
    row("time to all Ready (s)", "-", lambda r: f"{r.total_s:.1f}")
    row("apply-to-Ready p50 (s)", f"{p1:.3f}", lambda r: f"{r.p50:.2f}")
    row("apply-to-Ready p95 (s)", f"{single['p95']:.3f}", lambda r: f"{r.p95:.2f}")
    row("apply-to-Ready max (s)", f"{single['max']:.3f}", lambda r: f"{r.max_s:.2f}")
    row("seen without a phase, p50 / max (s)", "-", lambda r: f"{r.no_status_p50:.1f} / {r.no_status_max:.1f}")
    row("products/s", f"{1 / p1:.2f} (serial)", lambda r: f"{r.per_s:.1f}")
    row("reconcile mean (s)", f"{single['reconcile_mean']:.3f}", lambda r: f"{r.reconcile_mean:.3f}")
    row("catalog CM writes", f"{single['cm_writes']} (for {single['n']})", lambda r: str(r.cm_writes))
    row("catalog writes/product", f"{single['cm_writes_per_product']:.2f}", lambda r: f"{r.cm_writes / r.n:.3f}")
    row("catalog entries", "-", lambda r: f"{r.catalog_entries}/{r.n}")
    row("operator CPU (cores busy)", "-", lambda r: f"{r.cpu['operator'] / r.cpu['wall']:.2f}")
    row(
        "API server + etcd CPU (cores)",
        "-",
        lambda r: f"{(r.cpu.get('kube-apiserver', 0) + r.cpu.get('etcd', 0)) / r.cpu['wall']:.2f}",
    )
    row("operator peak RSS (MiB)", f"{single['rss']:.0f}", lambda r: f"{r.peak_rss:.0f}")
    row("with its children, peak PSS (MiB)", "-", lambda r: f"{r.peak_tree_pss:.0f}")
    row("p50 / p50 alone", "1.00", lambda r: f"{r.p50 / p1:.2f}")
    row("speed-up vs serial", "1.0", lambda r: f"{r.n * p1 / r.total_s:.1f}")
    console.print(t)

    print()
    print(
        f"target apply-to-Ready (small inline product) p50 < 1 s: p50={p1:.3f} s "
        f"({'met' if p1 < 1 else 'NOT met'}); from kubectl apply's return: p50={single['p50_after_kubectl']:.3f} s; "
        f"kubectl apply itself p50={single['kubectl_apply_p50']:.3f} s; min={single['min']:.3f} max={single['max']:.3f}"
    )
    print("baseline samples (s): " + " ".join(f"{v:.3f}" for v in single["all"]))
    print(
        f"baseline reconciles={single['reconciles']:.0f} reconcile_mean_s={single['reconcile_mean']:.3f} "
        f"catalog_cm_writes_per_product={single['cm_writes_per_product']:.2f} operator_peak_rss_mib={single['rss']:.0f}"
    )
    for r in results:
        print(
            f"reconcile N={r.n} ready={r.ready}/{r.n} timed_out={r.timed_out} apply_s={r.apply_s:.2f} "
            f"total_s={r.total_s:.2f} p50_s={r.p50:.3f} p95_s={r.p95:.3f} max_s={r.max_s:.3f} "
            f"seen_to_ready_p50_s={r.seen_p50:.3f} seen_to_first_status_p50_s={r.no_status_p50:.3f} "
            f"seen_to_first_status_max_s={r.no_status_max:.3f} products_per_s={r.per_s:.2f} "
            f"catalog_cm_writes={r.cm_writes} (metric datamesh_catalog_writes_total +{r.metric_writes:.0f}) "
            f"catalog_configmaps={r.cm_names} writes_per_product={r.cm_writes / r.n:.4f} "
            f"catalog_entries={r.catalog_entries}/{r.n} (phase Ready: {r.catalog_ready_entries}) "
            f"catalog_complete_s={f'{r.catalog_complete_s:.2f}' if r.catalog_complete_s is not None else 'INCOMPLETE'} "
            f"operator_rss_before_mib={r.rss_before:.0f} operator_peak_rss_mib={r.peak_rss:.0f} "
            f"operator_vmhwm_mib={r.hwm:.0f} operator_and_children_peak_pss_mib={r.peak_tree_pss:.0f} "
            f"ratio_p50_vs_single={r.p50 / p1:.2f} fraction_of_serial_time={r.total_s / (r.n * p1):.4f} "
            f"speedup_vs_serial={r.n * p1 / r.total_s:.1f} reconciles={r.reconciles:.0f} "
            f"reconcile_mean_s={r.reconcile_mean:.3f} phases_seen={dict(r.phases_seen)} "
            f"reconcile_errors=+{r.reconcile_errors:.0f} "
            f"delete_s={f'{r.delete_s:.1f}' if r.delete_s is not None else 'INCOMPLETE'} "
            f"delete_catalog_cm_writes={r.delete_cm_writes} "
            f"cpu_s={ {k: round(v, 1) for k, v in r.cpu.items()} } "
            f"operator_cpu_ms_per_product={1000 * r.cpu['operator'] / r.n:.1f} loadavg_before={r.load_before!r} "
            f"loadavg_after={r.load_after!r}"
        )
    for r in results:
        if r.api:
            top = ", ".join(f"{k} {v / r.n:.2f}" for k, v in r.api.most_common(12) if v / r.n >= 0.05)
            print(f"API requests N={r.n}: {sum(r.api.values()) / r.n:.1f} per product; per product by kind: {top}")
    for r in results:
        if r.edit is not None:
            ready = f"{r.edit.ready_s:.2f} s" if r.edit.ready_s is not None else "not within the timeout"
            print(
                f"edit N={r.n}: a Ready product's description changed {r.edit.at_s:.1f} s into the batch "
                f"({r.edit.batch_ready}/{r.n} of it Ready): Ready at its new generation after {ready}"
            )
    for restart in restarts:
        target = "met" if restart.resumed_s is not None and restart.resumed_s < 60 else "NOT met"
        print(f"{restart.line()} (target: steady state under 60 s, {target})")
    for member in op.members:
        counts, examples = scan_log(member.log_path)
        print(f"operator log {member.log_path}: {dict(counts) or 'no WARNING/ERROR/Traceback lines'}")
        for line in examples:
            print(f"  | {line}")
    print(f"wall time {wall:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000], help="batch sizes (default: 100 1000)")
    parser.add_argument(
        "--single-repeats", type=int, default=10, help="baseline: products applied alone, one after another"
    )
    parser.add_argument(
        "--restart",
        type=int,
        default=0,
        metavar="N",
        help="after the sizes: N products Ready, the operator restarted, a new product applied at the restart; "
        "prints restart-to-new-product-Ready and restart-to-all-resumed (0: skipped)",
    )
    parser.add_argument("--rows", type=int, default=4, help="inline rows per product")
    parser.add_argument(
        "--shards",
        type=int,
        default=1,
        help="operator processes, each owning its own namespaces (--shard s<k> --namespace '*-s<k>'; default 1)",
    )
    parser.add_argument("--namespaces", type=int, default=4, help="namespaces a batch is spread over")
    parser.add_argument("--apply-parallel", type=int, default=4, help="kubectl apply processes a batch is split over")
    parser.add_argument(
        "--timeout-per-100",
        type=float,
        default=90.0,
        help="seconds allowed per 100 products (min 120 s, so 15 min for 1000)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the operator, e.g. DATAMESH_INGEST_CONCURRENCY=8 (repeatable)",
    )
    parser.add_argument(
        "--operator-exe",
        type=Path,
        default=REPO / ".venv" / "bin" / "datamesh",
        help="the datamesh command to run as the operator (default: .venv/bin/datamesh)",
    )
    parser.add_argument("--operator-verbose", action="store_true", help="run the operator with --verbose (DEBUG log)")
    parser.add_argument(
        "--log-dir", type=Path, default=None, help="where the operator log goes (default: a new temp dir)"
    )
    args = parser.parse_args(argv)
    if any("=" not in e for e in args.env):
        parser.error("--env takes KEY=VALUE")

    from datamesh_dev.devcluster import ControlPlane

    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="datamesh-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    wall0 = time.monotonic()
    results: list[SizeResult] = []
    restarts: list[RestartResult] = []
    single: dict[str, Any] | None = None
    status = 0
    print(f"starting the control plane (logs of this run: {log_dir}; load average {loadavg()}) ...", flush=True)
    if args.env:
        print(f"  operator environment: {' '.join(args.env)}")
    with ControlPlane() as cp:
        bench = Bench(cp, args, log_dir)
        try:
            bench.setup()
            print(f"baseline: {args.single_repeats} products applied alone, one after another ...", flush=True)
            single = bench.baseline()
            print(f"  p50 {single['p50']:.3f} s, p95 {single['p95']:.3f} s", flush=True)
            for n in args.sizes:
                timeout = max(120.0, args.timeout_per_100 * n / 100)
                print(f"N={n}: applying {n} products at once (timeout {timeout:.0f} s) ...", flush=True)
                r = bench.run_size(n, timeout)
                results.append(r)
                if r.timed_out:
                    print(f"!! N={n} did not finish within {timeout:.0f} s; larger sizes skipped.", flush=True)
                    status = 1
                    break
            if args.restart and status == 0:
                timeout = max(120.0, args.timeout_per_100 * args.restart / 100)
                print(f"restart: {args.restart} products, then the operator restarted (timeout {timeout:.0f} s) ...")
                restarts.append(bench.run_restart(args.restart, timeout))
        except BenchError as exc:
            print(f"!! benchmark aborted: {exc}", file=sys.stderr, flush=True)
            status = 2
        except KeyboardInterrupt:
            print("!! interrupted", file=sys.stderr)
            status = 130
        finally:
            bench.dp_watch.stop()
            bench.cm_watch.stop()
            bench.operator.stop()
            if single is not None:
                report(single, results, restarts, time.monotonic() - wall0, bench.operator)
            else:
                print(f"operator log: {bench.operator.log_path}\n{bench.operator.log_tail()}")
    print(f"done in {time.monotonic() - wall0:.1f} s (control plane stopped)")
    return status


if __name__ == "__main__":
    sys.exit(main())
