"""Two operator replicas on the real control plane: one leads, the other takes over when it dies.

Each test runs two ``datamesh operator`` processes (leader election on, the default) against the
session's API server, each with its own liveness port, watching a namespace of their own and
writing the catalog of a platform namespace of their own, with their own finalizer and annotation
prefix: so a product counts as reconciled by *them* only when it carries their finalizer, their
record of the handled spec and their catalog entry (the session's in-process operator, if another
test started it, watches every namespace and may reconcile these products too, into its own
store and catalog). The processes are killed with SIGKILL, or paused with SIGSTOP, as a node
failure or a frozen process would.

The two processes share one embedded store folder, as replicas share a Qdrant server: Qdrant's
embedded engine locks a collection to the process that opens it, and a standby opens nothing
before it leads, so the new leader opens the folder once the killed one's locks died with it.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from datamesh.adapters.kube import api_client
from datamesh.adapters.stores import open_store
from datamesh.core.plan import DIGEST_KEY, KIND_KEY, PRODUCT_KEY, collection_plan, routing_plan
from datamesh.resource.catalog import CATALOG_LABEL, decode_entries, entry_key
from datamesh.resource.models import GROUP, PLURAL, VERSION, parse_spec
from datamesh.settings import StoreSettings
from datamesh.web.serving import free_ports
from tests.cluster.test_reconcile_cluster import product
from tests.faults.helpers import abandon, reconciled_under
from tests.harness import Kubectl, OperatorProcess, wait_for
from tests.httpserver import LoopThread

PREFIX = "ha-test.datamesh.io"
FINALIZER = f"{PREFIX}/finalizer"
LEASE = "datamesh-operator"
TAKEOVER_S = 15.0


class Api:
    """The API server through the project's client on a loop thread: polls cost no kubectl process each."""

    def __init__(self) -> None:
        self.loop = LoopThread("api-reader")
        self.api = self.loop.call(api_client())  # KUBECONFIG is the session's (control_plane fixture)

    def products(self, namespace: str) -> list[dict[str, Any]]:
        call = client.CustomObjectsApi(self.api).list_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, _request_timeout=30
        )
        return list(self.loop.call(call)["items"])

    def lease_holder(self, namespace: str, name: str) -> str | None:
        async def read() -> str | None:
            try:
                lease = await client.CoordinationV1Api(self.api).read_namespaced_lease(
                    name, namespace, _request_timeout=10
                )
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise
            return lease.spec.holder_identity if lease.spec else None

        return self.loop.call(read())

    def close(self) -> None:
        self.loop.call(self.api.close())
        self.loop.close()


@dataclass
class Pair:
    """Two operator replicas, ``a`` and ``b``, over the products of ``namespace``."""

    namespace: str
    platform: str
    processes: dict[str, OperatorProcess]
    store: Path
    kubectl: Kubectl
    api: Api

    def holder(self) -> str | None:
        return self.api.lease_holder(self.platform, LEASE)

    def holder_name(self) -> str | None:
        """Which of ``a`` and ``b`` holds the lease (identities are ``<POD_NAME>_<random>``)."""
        holder = self.holder()
        return holder.rsplit("_", 1)[0] if holder else None

    def wait_leader(self, timeout: float = 30) -> tuple[str, OperatorProcess, OperatorProcess]:
        """The leader's name, the leader and the standby, once exactly one leads."""

        def one_leads() -> str | None:
            for op in self.processes.values():
                op.alive("while waiting for a leader")
            name = self.holder_name()
            roles = {n: (op.health() or {}).get("role") for n, op in self.processes.items()}
            one = (
                name is not None
                and sorted(map(str, roles.values())) == ["leader", "standby"]
                and roles[name] == "leader"
            )
            return name if one else None

        name = wait_for(one_leads, timeout, interval=0.2, what="one leader and one standby")
        other = next(n for n in self.processes if n != name)
        return name, self.processes[name], self.processes[other]

    def products(self) -> list[dict[str, Any]]:
        return self.api.products(self.namespace)

    def catalog(self) -> list[tuple[str, Any]]:
        """Every (key, entry) of the pair's catalog ConfigMaps, duplicates included."""
        cms = self.kubectl.json("get", "configmaps", "-n", self.platform, "-l", f"{CATALOG_LABEL}=true")["items"]
        return [item for cm in cms for item in decode_entries(cm.get("data") or {}).items()]


def reconciled_by_pair(dp: dict[str, Any]) -> bool:
    """Ready at its generation, with the pair's finalizer and record of the handled spec."""
    return reconciled_under(dp, PREFIX)


def small_product(name: str, namespace: str, rows: int = 3) -> dict[str, Any]:
    body = product(name, [{"id": f"r{i}", "text": f"row {i} of {name}, shipping", "amount": i} for i in range(rows)])
    body["metadata"]["namespace"] = namespace
    return body


@pytest.fixture
def make_pair(kubectl: Kubectl, crd_installed: None, tmp_path: Path) -> Iterator[Callable[..., Pair]]:
    pairs: list[Pair] = []

    def start(tag: str, *, shared_store: bool = True) -> Pair:
        namespace, platform = f"dm-ha-{tag}", f"dm-ha-{tag}-platform"
        for ns in (namespace, platform):
            kubectl.run("create", "namespace", ns, check=False)
        store = tmp_path / f"{tag}-store"
        processes = {}
        for name, port in zip(("a", "b"), free_ports(2), strict=True):
            env = {
                "KUBECONFIG": str(kubectl.kubeconfig),
                "POD_NAME": name,
                "DATAMESH_PLATFORM_NAMESPACE": platform,
                "DATAMESH_METRICS_PORT": "0",
                "DATAMESH_FINALIZER": FINALIZER,
                "DATAMESH_ANNOTATION_PREFIX": PREFIX,
                "DATAMESH_CATALOG_FLUSH_SECONDS": "0.2",
                "DATAMESH_RETRY_BASE_SECONDS": "0.5",
                "DATAMESH_RETRY_MAX_SECONDS": "4",
                "DATAMESH_QDRANT_PATH": str(store if shared_store else store / name),
                # Faster than the defaults (20 / 15 / 2), so that a takeover fits the tests' 15 s.
                "DATAMESH_LEADER_ELECTION_LEASE_SECONDS": "10",
                "DATAMESH_LEADER_ELECTION_RENEW_DEADLINE_SECONDS": "7",
            }
            processes[name] = OperatorProcess(
                ["--namespace", namespace], env, tmp_path / f"{tag}-{name}.log", port, tmp_path
            )
        pair = Pair(namespace, platform, processes, store, kubectl, Api())
        pairs.append(pair)
        return pair

    try:
        yield start
    finally:
        for pair in pairs:
            for op in pair.processes.values():
                op.stop(10)
            # Finalizers of processes that are gone: strip them (one request per product, from one
            # kubectl), or the namespace never goes.
            kubectl.run("delete", "dataproducts", "--all", "-n", pair.namespace, "--wait=false", check=False)
            abandon(kubectl, (pair.namespace, pair.platform), pair.products())
            pair.api.close()


def watch_holder(pair: Pair, old: str, since: float, timeout: float) -> tuple[str, float]:
    """The new holder and the seconds from ``since`` until the lease named it (polled every ~0.1 s)."""

    def changed() -> str | None:
        holder = pair.holder()
        return holder if holder and holder != old else None

    holder = wait_for(changed, timeout, interval=0.05, what=f"the lease to leave {old}")
    return holder, time.monotonic() - since


def test_one_replica_leads_and_the_standby_takes_over_a_killed_leader(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair("kill")
    name, leader, standby = pair.wait_leader()
    old_holder = pair.holder()
    assert old_holder and old_holder.startswith(f"{name}_")
    assert "leadership acquired" in leader.log_text() and "leadership acquired" not in standby.log_text()

    pair.kubectl.run("apply", "-f", "-", input=yaml.safe_dump(small_product("before", pair.namespace)))
    wait_for(
        lambda: leader.alive() and any(reconciled_by_pair(p) for p in pair.products()),
        60,
        what="the first product reconciled by the leader",
    )
    assert "Handler" not in standby.log_text(), "the standby reconciles nothing"
    # The leader's liveness endpoint carries kopf's probes (a stalled leader fails it); a standby's, its role.
    # kopf keeps its probes' answers for 10 s: the product count may take that long to show.
    leading = wait_for(
        lambda: (h := leader.health()) and h.get("products", 0) >= 1 and h, 20, what="the leader's probes"
    )
    assert leading["role"] == "leader" and "progress" in leading, leading
    assert set(standby.health() or {}) >= {"role"} and "progress" not in (standby.health() or {})

    killed_at = time.monotonic()
    leader.kill()
    pair.kubectl.run("apply", "-f", "-", input=yaml.safe_dump(small_product("after", pair.namespace)))

    # The standby stays live while it waits (its liveness endpoint answers throughout).
    healthy = threading.Event()
    healthy.set()
    stop_probing = threading.Event()

    def probe() -> None:
        while not stop_probing.is_set():
            if standby.proc.poll() is not None or standby.health() is None:
                healthy.clear()
            time.sleep(0.2)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        new_holder, holder_s = watch_holder(pair, old_holder, killed_at, 30)
        assert new_holder.startswith(f"{next(n for n in pair.processes if n != name)}_")

        def after_ready() -> bool:
            standby.alive("after taking over")
            return any(p["metadata"]["name"] == "after" and reconciled_by_pair(p) for p in pair.products())

        wait_for(after_ready, 60, interval=0.1, what="the product applied after the kill Ready")
        ready_s = time.monotonic() - killed_at
    finally:
        stop_probing.set()
        prober.join(5)
    print(f"\ntakeover after kill -9: lease holder changed in {holder_s:.1f}s, new product Ready in {ready_s:.1f}s")
    assert healthy.is_set(), "the standby's liveness endpoint must answer while it waits"
    assert holder_s < TAKEOVER_S and ready_s < TAKEOVER_S, (holder_s, ready_s)
    assert (standby.health() or {}).get("role") == "leader"
    assert all(reconciled_by_pair(p) for p in pair.products())
    entries = wait_for(
        lambda: (c := pair.catalog()) and sorted(k for k, _ in c) == ["dm-ha-kill.after", "dm-ha-kill.before"] and c,
        15,
        what="both products in the catalog once",
    )
    assert all(e.phase == "Ready" for _, e in entries)

    # Restarted, as Kubernetes restarts a killed container, the old leader comes back as a standby.
    leader.restart()
    wait_for(
        lambda: leader.alive() and (leader.health() or {}).get("role") == "standby",
        30,
        what="the restarted replica standing by",
    )
    assert pair.holder() == new_holder
    stopped = time.monotonic()
    assert leader.stop() == 0 and time.monotonic() - stopped < 5, "a standby stops at once on SIGTERM"
    assert pair.holder() == new_holder, "a standby that stops leaves the lease alone"

    # A clean stop gives the lease up at once, for the next replica not to wait for its expiry.
    assert standby.stop() == 0, standby.log_text()[-3000:]
    assert not pair.holder(), "a stopped leader releases the lease"
    assert "Traceback" not in standby.log_text() + leader.log_text(), standby.log_text()[-4000:]


def test_killing_the_leader_during_a_burst_loses_and_duplicates_nothing(make_pair: Callable[..., Pair]) -> None:
    count, rows = 200, 3
    t0 = time.monotonic()
    pair = make_pair("burst")
    _, leader, standby = pair.wait_leader()
    old_holder = pair.holder()
    assert old_holder
    phases = {"two replicas up, one leading": time.monotonic() - t0}
    bodies = [small_product(f"p{i:03d}", pair.namespace, rows) for i in range(count)]
    started = time.monotonic()
    pair.kubectl.run("create", "-f", "-", input=yaml.safe_dump_all(bodies), timeout=120)
    phases[f"{count} products created"] = time.monotonic() - started

    def under_way() -> int:
        leader.alive("during the burst")
        ready = sum(map(reconciled_by_pair, pair.products()))
        return ready if ready >= count // 4 else 0

    ready_at_kill = wait_for(under_way, 90, interval=0.3, what=f"a quarter of the {count} products Ready")
    killed_at = time.monotonic()
    phases[f"{ready_at_kill} Ready, leader killed"] = killed_at - started
    leader.kill()
    assert ready_at_kill < count, "the leader must die during the burst, not after it"

    _, phases["lease taken over"] = watch_holder(pair, old_holder, killed_at, 30)

    def all_ready() -> bool:
        standby.alive("after taking over")
        return sum(map(reconciled_by_pair, pair.products())) == count

    try:
        wait_for(all_ready, 120, interval=0.5, what=f"all {count} products Ready")
    except AssertionError as exc:
        log_tail = standby.log_text()[-6000:]
        raise AssertionError(f"{exc}\n{stuck(pair.products())}\nnew leader's log:\n{log_tail}") from None
    phases[f"all {count} Ready"] = time.monotonic() - killed_at

    # Each product exactly once in the catalog, Ready.
    def catalog_complete() -> list[tuple[str, Any]] | None:
        entries = pair.catalog()
        return entries if len({k for k, e in entries if e.phase == "Ready"}) == count else None

    entries = wait_for(catalog_complete, 30, what="every product Ready in the catalog")
    keys = Counter(k for k, _ in entries)
    assert set(keys) == {entry_key(pair.namespace, b["metadata"]["name"]) for b in bodies}
    assert max(keys.values()) == 1, [k for k, n in keys.items() if n > 1]

    # The new leader stops cleanly; then nothing holds the store, and the test reads it itself.
    products = pair.products()
    assert standby.stop() == 0, standby.log_text()[-3000:]
    points, routing, payloads = count_points(pair.store, products)
    print(
        f"\nburst of {count} products, kill -9 of the leader: "
        + "; ".join(f"{what} {s:.1f}s" for what, s in phases.items())
        + f" (the last two after the kill); catalog entries {len(entries)} ({len(keys)} distinct); "
        f"points {sum(points.values())} in {len(points)} product collections; routing points {routing}"
    )
    wrong = {n: (pts, rows) for n, pts in points.items() if pts != rows}
    assert not wrong, f"points per collection != records: {wrong}"
    assert all(p["status"]["records"] == rows for p in products)
    held: dict[str, Counter[tuple[str, str]]] = {
        f"{b['metadata']['namespace']}/{b['metadata']['name']}": Counter() for b in bodies
    }
    for p in payloads:
        held.setdefault(p[PRODUCT_KEY], Counter())[p[KIND_KEY], p[DIGEST_KEY]] += 1
    short = {
        product: dict(kinds)
        for product, kinds in held.items()
        if sorted((kind, n) for (kind, _), n in kinds.items()) != [("card", 1), ("row", rows)]
    }
    assert not short and routing == len(payloads) == count * (rows + 1), (
        f"every row and one card per product in the routing collection, once: {routing} counted, "
        f"{len(payloads)} read; products not holding {rows} rows and one card (by kind and ingestion): {short}"
    )
    assert phases["lease taken over"] < TAKEOVER_S


def stuck(products: list[dict[str, Any]]) -> str:
    """The products not reconciled by the pair, with what they lack, for a failure message."""
    lines = []
    for dp in products:
        if reconciled_by_pair(dp):
            continue
        meta, status = dp["metadata"], dp.get("status") or {}
        notes = [
            f"phase={status.get('phase')}",
            f"gen={meta['generation']}/{status.get('observedGeneration')}",
            f"finalizer={FINALIZER in meta.get('finalizers', [])}",
            "annotations=" + ",".join(sorted(k.removeprefix(PREFIX + "/") for k in (meta.get("annotations") or {}))),
            f"conditions={[(c.get('type'), c.get('status'), c.get('reason')) for c in status.get('conditions') or []]}",
        ]
        lines.append(f"{meta['name']}: " + " ".join(notes))
    return f"{len(lines)} not reconciled:\n" + "\n".join(lines[:20])


def count_points(store: Path, products: list[dict[str, Any]]) -> tuple[dict[str, int], int, list[Mapping[str, Any]]]:
    """Points per product collection, the routing collection's count and payloads, read from the store folder."""
    loop = LoopThread("store-reader")
    try:
        st = loop.call(_open(store))
        points = {p["metadata"]["name"]: loop.call(st.count(p["status"]["collection"])) for p in products}
        body = products[0]
        spec = parse_spec(body)
        assert spec is not None and spec.semantic_search is not None
        plan = collection_plan(body["metadata"]["namespace"], body["metadata"]["name"], spec, 384)
        name = routing_plan(plan, spec.semantic_search.embedding_model, None).alias
        routing = loop.call(st.count(name))
        payloads = loop.call(st.sample(name, 100_000))  # every point, whatever the count says
        loop.call(st.close())
        return points, routing, payloads
    finally:
        loop.close()


async def _open(store: Path) -> Any:
    return open_store(StoreSettings(url=None, path=str(store)))


def test_a_paused_leader_that_lost_its_lease_exits_without_reconciling(make_pair: Callable[..., Pair]) -> None:
    # Separate stores: a paused process keeps its store locked, as a partitioned pod keeps its volume.
    pair = make_pair("pause", shared_store=False)
    _, leader, standby = pair.wait_leader()
    old_holder = pair.holder()
    assert old_holder
    pair.kubectl.run("apply", "-f", "-", input=yaml.safe_dump(small_product("first", pair.namespace)))
    wait_for(
        lambda: leader.alive() and any(reconciled_by_pair(p) for p in pair.products()),
        60,
        what="the first product reconciled by the leader",
    )

    leader.signal(signal.SIGSTOP)
    paused_at = time.monotonic()
    _, holder_s = watch_holder(pair, old_holder, paused_at, 30)
    # Work the paused leader's watches now hold for it: a changed spec and a new product.
    pair.kubectl.run("patch", "dp", "first", "-n", pair.namespace, "--type=merge", "-p", '{"spec":{"tags":["edited"]}}')
    pair.kubectl.run("apply", "-f", "-", input=yaml.safe_dump(small_product("second", pair.namespace)))

    def both_handled() -> bool:
        standby.alive("after taking over")
        products = {p["metadata"]["name"]: p for p in pair.products()}
        return (
            len(products) == 2
            and all(map(reconciled_by_pair, products.values()))
            and products["first"]["metadata"]["generation"] == 2
        )

    wait_for(both_handled, 60, what="the new leader to reconcile the edit and the new product")

    before = len(leader.log_text())
    leader.signal(signal.SIGCONT)
    code = leader.proc.wait(10)
    after = leader.log_text()[before:]
    print(f"\npaused leader: lease taken over in {holder_s:.1f}s; on resuming it exited with {code}:\n{after}")
    assert code == 1, after
    assert "leadership lost" in after and "exiting now" in after, after
    # Nothing but the election's own lines after resuming, and kopf's notice that it is stopping when
    # it logs that before the exit (a millisecond decides): no handler ran on the pending events.
    lines = [line for line in after.splitlines() if line.strip()]
    stopping = " kopf._core.reactor.running: Stop-flag is set"
    assert all(" datamesh.controller.leader: " in line or stopping in line for line in lines), after
    assert (standby.health() or {}).get("role") == "leader"
