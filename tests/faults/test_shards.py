"""Two operator shards on the real control plane: disjoint products, one shared catalog, restarts and deletions.

Each test runs two ``datamesh operator`` processes (``--shard a`` and ``--shard b``, leader election
on, each with its own Lease) that write the catalog of one shared platform namespace: shards by
namespace (``--namespace``), then shards by label (``--label-selector``, every namespace). Both
shards use the same finalizer and annotation prefix, as the chart's shard Deployments do (a
product that moves between shards keeps them), but one of their own, so the session's in-process
operator, if another test started it, is not mistaken for them. A product counts as reconciled by
a shard when its log names the product's handler, and its catalog entry carries the shard's name.
Each shard has its own embedded store: Qdrant's embedded engine is locked to one process, where
production shards share a Qdrant server.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from datamesh.resource.catalog import CATALOG_LABEL, CatalogEntry, decode_entries, entry_key
from datamesh.web.serving import free_ports
from tests.faults.helpers import abandon, reconciled_under
from tests.faults.test_leader_election import Api, small_product
from tests.harness import Kubectl, OperatorProcess, wait_for

PREFIX = "shard-test.datamesh.io"
FINALIZER = f"{PREFIX}/finalizer"
LABEL = f"{PREFIX}/shard"
# The operator's log prefixes what kopf does to an object with its namespace/name; the handler's id
# is its qualified name, with the field for updates (``build_registry.<locals>.reconcile_product/spec``).
HANDLER_LINE = re.compile(
    r"\[(?P<product>[^\]\s]+/[^\]\s]+)\] Handler '(?:[\w.<>]+\.)?reconcile_product(?:/spec)?' succeeded"
)


@dataclass
class Shards:
    """Operator shards writing one platform namespace's catalog."""

    platform: str
    processes: dict[str, OperatorProcess]
    namespaces: list[str]
    kubectl: Kubectl
    api: Api

    def products(self) -> list[dict[str, Any]]:
        return [p for ns in self.namespaces for p in self.api.products(ns)]

    def catalog(self) -> list[tuple[str, CatalogEntry]]:
        """Every (key, entry) of the shared catalog, duplicates included."""
        cms = self.kubectl.json("get", "configmaps", "-n", self.platform, "-l", f"{CATALOG_LABEL}=true")["items"]
        return [item for cm in cms for item in decode_entries(cm.get("data") or {}).items()]

    def raw_catalog(self) -> dict[str, str]:
        """The stored JSON of every entry: what a shard that did not write an entry must leave byte for byte."""
        cms = self.kubectl.json("get", "configmaps", "-n", self.platform, "-l", f"{CATALOG_LABEL}=true")["items"]
        return {k: v for cm in cms for k, v in (cm.get("data") or {}).items()}

    def handled_by(self) -> dict[str, set[str]]:
        """Product (namespace/name) -> the shards whose log shows its reconcile handler succeeding."""
        seen: dict[str, set[str]] = {}
        for name, op in self.processes.items():
            for m in HANDLER_LINE.finditer(op.log_text()):
                seen.setdefault(m["product"], set()).add(name)
        return seen

    def wait_leading(self, timeout: float = 45) -> None:
        """Every shard leads its own Lease (one replica each), its holder named after the shard."""

        def all_lead() -> bool:
            for name, op in self.processes.items():
                op.alive(f"while waiting for shard {name} to lead")
            holders = {n: self.api.lease_holder(self.platform, f"datamesh-operator-{n}") for n in self.processes}
            roles = {n: (op.health() or {}).get("role") for n, op in self.processes.items()}
            return all(roles[n] == "leader" and (holders[n] or "").startswith(f"{n}-0_") for n in self.processes)

        wait_for(all_lead, timeout, interval=0.2, what="each shard leading its own Lease")

    def wait_reconciled(self, refs: set[str], timeout: float = 60) -> list[dict[str, Any]]:
        """The products ``refs`` (namespace/name), once all are Ready and reconciled by the shards."""

        def done() -> list[dict[str, Any]] | None:
            for op in self.processes.values():
                op.alive("while products are reconciled")
            products = [p for p in self.products() if ref(p) in refs]
            return products if len(products) == len(refs) and all(map(reconciled, products)) else None

        return wait_for(done, timeout, interval=0.3, what=f"{len(refs)} products Ready")

    def wait_catalog(self, expected: dict[str, str], timeout: float = 30) -> list[tuple[str, CatalogEntry]]:
        """The catalog holds exactly ``expected`` (key -> shard), each once and Ready."""

        def complete() -> list[tuple[str, CatalogEntry]] | None:
            entries = self.catalog()
            ours = {k: e.shard for k, e in entries if k.split(".", 1)[0] in self.namespaces and e.phase == "Ready"}
            return entries if ours == expected and len(entries) == len(expected) else None

        try:
            return wait_for(complete, timeout, interval=0.2, what="the catalog to hold every product once")
        except AssertionError:
            got = Counter(f"{k}={e.shard}" for k, e in self.catalog())
            raise AssertionError(f"catalog: want {sorted(expected.items())}, got {sorted(got.items())}") from None


def ref(dp: dict[str, Any]) -> str:
    return f"{dp['metadata']['namespace']}/{dp['metadata']['name']}"


def reconciled(dp: dict[str, Any]) -> bool:
    """Ready at its generation, with the shards' finalizer and record of the handled spec."""
    return reconciled_under(dp, PREFIX)


@pytest.fixture
def make_shards(kubectl: Kubectl, crd_installed: None, tmp_path: Path) -> Iterator[Callable[..., Shards]]:
    started: list[Shards] = []

    def start(tag: str, namespaces: list[str], shard_args: dict[str, list[str]], check_seconds: float = 60) -> Shards:
        platform = f"dm-shard-{tag}-platform"
        for ns in (*namespaces, platform):
            kubectl.run("create", "namespace", ns, check=False)
        processes = {}
        for (name, args), port in zip(shard_args.items(), free_ports(len(shard_args)), strict=True):
            env = {
                "KUBECONFIG": str(kubectl.kubeconfig),
                "POD_NAME": f"{name}-0",
                "DATAMESH_PLATFORM_NAMESPACE": platform,
                "DATAMESH_METRICS_PORT": "0",
                "DATAMESH_FINALIZER": FINALIZER,
                "DATAMESH_ANNOTATION_PREFIX": PREFIX,
                "DATAMESH_CATALOG_FLUSH_SECONDS": "0.2",
                "DATAMESH_RETRY_BASE_SECONDS": "0.5",
                "DATAMESH_RETRY_MAX_SECONDS": "4",
                # Each product's periodic checks (a reconcile of its own) run at this pace.
                "DATAMESH_SLA_CHECK_SECONDS": str(check_seconds),
                "DATAMESH_QDRANT_PATH": str(tmp_path / f"{tag}-{name}-store"),
            }
            processes[name] = OperatorProcess(
                ["--shard", name, *args], env, tmp_path / f"{tag}-{name}.log", port, tmp_path
            )
        shards = Shards(platform, processes, namespaces, kubectl, Api())
        started.append(shards)
        return shards

    try:
        yield start
    finally:
        for shards in started:
            for op in shards.processes.values():
                op.stop(10)
            for ns in shards.namespaces:
                kubectl.run("delete", "dataproducts", "--all", "-n", ns, "--wait=false", check=False)
            abandon(kubectl, (*shards.namespaces, shards.platform), shards.products())
            shards.api.close()


def restart_and_rebuild(shards: Shards, name: str) -> None:
    """Stop one shard cleanly and start it again; returns once its start-up catalog rebuild is done."""
    op = shards.processes[name]
    assert op.stop() == 0, op.log_text()[-3000:]
    before = len(op.log_text())
    op.restart()
    wait_for(
        lambda: op.alive("restarting") and "catalog rebuilt with" in op.log_text()[before:],
        45,
        interval=0.2,
        what=f"shard {name} restarted and its catalog rebuilt",
    )


def check_disjoint_and_cataloged(shards: Shards, owner: dict[str, str]) -> None:
    """Each product (namespace/name -> shard) reconciled by its shard alone and cataloged once, stamped by it."""
    handled = shards.handled_by()
    wrong = {p: sorted(handled.get(p, ())) for p, shard in owner.items() if handled.get(p) != {shard}}
    assert not wrong, f"products not reconciled by exactly their own shard: {wrong}"
    assert set(handled) == set(owner), f"a shard reconciled something else: {set(handled) - set(owner)}"
    shards.wait_catalog({entry_key(*p.split("/")): shard for p, shard in owner.items()})


def test_namespace_shards_reconcile_disjoint_products_into_one_catalog(make_shards: Callable[..., Shards]) -> None:
    t0 = time.monotonic()
    ns1, ns2, ns3 = "dm-shard-ns1", "dm-shard-ns2", "dm-shard-ns3"
    shards = make_shards(
        "ns",
        [ns1, ns2, ns3],
        {"a": ["--namespace", ns1, "--namespace", ns2], "b": ["--namespace", ns3]},
    )
    shards.wait_leading()
    phases = {"both shards leading": time.monotonic() - t0}
    bodies = [small_product(f"p{i}", ns) for ns, count in ((ns1, 3), (ns2, 2), (ns3, 4)) for i in range(count)]
    shards.kubectl.run("create", "-f", "-", input=yaml.safe_dump_all(bodies))
    owner = {ref(b): "b" if b["metadata"]["namespace"] == ns3 else "a" for b in bodies}
    shards.wait_reconciled(set(owner))
    check_disjoint_and_cataloged(shards, owner)
    phases[f"{len(bodies)} products Ready and cataloged"] = time.monotonic() - t0

    # Shard a restarts: its rebuild rewrites its own entries and leaves b's byte for byte.
    b_entries = {k: v for k, v in shards.raw_catalog().items() if k.startswith(f"{ns3}.")}
    restart_and_rebuild(shards, "a")
    shards.wait_leading()
    check_disjoint_and_cataloged(shards, owner)
    assert {k: v for k, v in shards.raw_catalog().items() if k.startswith(f"{ns3}.")} == b_entries
    phases["shard a restarted, catalog whole"] = time.monotonic() - t0

    # A product of shard a deleted: a finalizes it and drops its entry; b's entries stay as they were.
    shards.kubectl.run("delete", "dataproduct", "p0", "-n", ns1, "--wait=false")
    wait_for(lambda: f"{ns1}/p0" not in map(ref, shards.products()), 30, what="ns1/p0 finalized")
    del owner[f"{ns1}/p0"]
    shards.wait_catalog({entry_key(*p.split("/")): shard for p, shard in owner.items()})
    assert {k: v for k, v in shards.raw_catalog().items() if k.startswith(f"{ns3}.")} == b_entries
    phases["a product of a deleted"] = time.monotonic() - t0
    print("\nnamespace shards: " + "; ".join(f"{what} at {s:.1f}s" for what, s in phases.items()))
    for op in shards.processes.values():
        assert "Traceback" not in op.log_text(), op.log_text()[-4000:]


def test_label_shards_split_one_namespace_and_follow_a_relabel(make_shards: Callable[..., Shards]) -> None:
    t0 = time.monotonic()
    ns = "dm-shard-labels"
    # Every namespace, each shard by label: the API server sends each shard only its own products.
    # Periodic checks every second: a shard that kept checking a product it gave up would show within seconds.
    shards = make_shards(
        "label", [ns], {n: ["--label-selector", f"{LABEL}={n}", "--verbose"] for n in ("a", "b")}, check_seconds=1
    )
    shards.wait_leading()
    bodies = []
    for i in range(6):
        body = small_product(f"q{i}", ns)
        body["metadata"]["labels"] = {LABEL: "a" if i < 3 else "b"}
        bodies.append(body)
    shards.kubectl.run("create", "-f", "-", input=yaml.safe_dump_all(bodies))
    owner = {ref(b): b["metadata"]["labels"][LABEL] for b in bodies}
    shards.wait_reconciled(set(owner))
    check_disjoint_and_cataloged(shards, owner)
    # Filtered by the API server, not by handlers: a shard's debug log never names another's product.
    for name, op in shards.processes.items():
        foreign = [p for p, shard in owner.items() if shard != name and f"[{p}]" in op.log_text()]
        assert not foreign, f"shard {name} was sent {foreign}"
    ready_s = time.monotonic() - t0

    # Shard b restarts: a's entries are not b's to rebuild, though they share the namespace.
    a_entries = {k: v for k, v in shards.raw_catalog().items() if owner[f"{ns}/{k.split('.', 1)[1]}"] == "a"}
    restart_and_rebuild(shards, "b")
    shards.wait_leading()
    shards.wait_catalog({entry_key(*p.split("/")): shard for p, shard in owner.items()})
    assert {k: v for k, v in shards.raw_catalog().items() if k in a_entries} == a_entries

    # A product relabelled from a to b moves: b restamps its entry (its spec is unchanged, so there
    # is nothing to reconcile), and its next change is reconciled by b alone.
    logged = {name: len(op.log_text()) for name, op in shards.processes.items()}
    shards.kubectl.run("label", "dataproduct", "q0", "-n", ns, f"{LABEL}=b", "--overwrite")
    owner[f"{ns}/q0"] = "b"
    shards.wait_catalog({entry_key(*p.split("/")): shard for p, shard in owner.items()})
    shards.kubectl.run("patch", "dp", "q0", "-n", ns, "--type=merge", "-p", '{"spec":{"tags":["moved"]}}')
    shards.wait_reconciled({f"{ns}/q0"})
    after = {
        name
        for name, op in shards.processes.items()
        for m in HANDLER_LINE.finditer(op.log_text()[logged[name] :])
        if m["product"] == f"{ns}/q0"
    }
    assert after == {"b"}, f"the relabelled product's edit was reconciled by {sorted(after)}"
    # Nor do a's periodic checks go on with it (they would reconcile it from a's stale copy): they stop,
    # and for several check periods its entry stays b's.
    a = shards.processes["a"]
    wait_for(
        lambda: f"{ns}/q0 left this operator's watch" in a.log_text()[logged["a"] :],
        10,
        what="shard a to stop checking the product it gave up",
    )
    stamps = set()
    for _ in range(12):
        stamps |= {e.shard for k, e in shards.catalog() if k == entry_key(ns, "q0")}
        time.sleep(0.5)
    assert stamps == {"b"}, f"the relabelled product's catalog entry was stamped by {sorted(map(str, stamps))}"

    # A product of b deleted: a's entries stay as they were.
    shards.kubectl.run("delete", "dataproduct", "q5", "-n", ns, "--wait=false")
    del owner[f"{ns}/q5"]
    shards.wait_catalog({entry_key(*p.split("/")): shard for p, shard in owner.items()})
    assert {k: v for k, v in shards.raw_catalog().items() if k in a_entries and k != f"{ns}.q0"} == {
        k: v for k, v in a_entries.items() if k != f"{ns}.q0"
    }
    print(
        f"\nlabel shards: 6 products Ready and cataloged at {ready_s:.1f}s; all checks at {time.monotonic() - t0:.1f}s"
    )
    for op in shards.processes.values():
        assert "Traceback" not in op.log_text(), op.log_text()[-4000:]
