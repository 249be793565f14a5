"""What the fault tests share: many products applied at once, and what a user checks about them."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from typing import Any

import yaml

from datamesh.resource.catalog import CATALOG_LABEL
from tests.cluster.test_reconcile_cluster import product
from tests.conftest import PLATFORM_NAMESPACE
from tests.harness import Kubectl, OperatorThread, wait_for


def products(namespace: str, count: int, prefix: str = "p", rows: int = 3, **spec: Any) -> list[dict[str, Any]]:
    """``count`` small inline products (the tiny lexical model) in ``namespace``."""
    out = []
    for i in range(count):
        name = f"{prefix}-{i:04d}"
        table = [{"id": f"{name}-{j}", "text": f"{name} row {j} about late parcels", "amount": j} for j in range(rows)]
        body = product(name, table)
        body["metadata"]["namespace"] = namespace
        body["spec"].update(spec)
        out.append(body)
    return out


def apply_all(kubectl: Kubectl, bodies: list[dict[str, Any]], parallel: int = 4, timeout: float = 300) -> None:
    """``kubectl apply`` of many products, in ``parallel`` processes of one multi-document YAML each."""
    errors: list[str] = []

    def apply(chunk: list[dict[str, Any]]) -> None:
        result = kubectl.run("apply", "-f", "-", input=yaml.safe_dump_all(chunk), check=False, timeout=timeout)
        if result.returncode != 0:
            errors.append(result.stderr[-2000:])

    threads = [threading.Thread(target=apply, args=(bodies[i::parallel],)) for i in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def statuses(kubectl: Kubectl, namespace: str) -> dict[str, dict[str, Any]]:
    """Every product of a namespace: name -> the whole object."""
    items = kubectl.json("get", "dataproducts", "-n", namespace)["items"]
    return {dp["metadata"]["name"]: dp for dp in items}


def phases(kubectl: Kubectl, namespace: str) -> Counter[str]:
    return Counter((dp.get("status") or {}).get("phase") or "(none)" for dp in statuses(kubectl, namespace).values())


def ready_for_generation(dp: dict[str, Any]) -> bool:
    st = dp.get("status") or {}
    return st.get("phase") == "Ready" and st.get("observedGeneration") == dp["metadata"]["generation"]


def wait_all_ready(kubectl: Kubectl, namespace: str, count: int, timeout: float) -> dict[str, dict[str, Any]]:
    """Wait until ``count`` products of the namespace are Ready for their generation."""

    def all_ready() -> dict[str, dict[str, Any]] | None:
        found = statuses(kubectl, namespace)
        return found if len(found) == count and all(map(ready_for_generation, found.values())) else None

    try:
        return wait_for(all_ready, timeout, interval=1.0, what=f"{count} products Ready in {namespace}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; phases now: {dict(phases(kubectl, namespace))}") from None


def catalog_keys(kubectl: Kubectl) -> Counter[str]:
    """How many times each entry appears across the catalog ConfigMaps (exactly once is right)."""
    items = kubectl.json("get", "configmaps", "-n", PLATFORM_NAMESPACE, "-l", f"{CATALOG_LABEL}=true")["items"]
    return Counter(key for cm in items for key in (cm.get("data") or {}))


def catalog(kubectl: Kubectl) -> dict[str, dict[str, Any]]:
    items = kubectl.json("get", "configmaps", "-n", PLATFORM_NAMESPACE, "-l", f"{CATALOG_LABEL}=true")["items"]
    return {k: json.loads(v) for cm in items for k, v in (cm.get("data") or {}).items()}


def assert_no_duplicates(kubectl: Kubectl, operator: OperatorThread, namespace: str) -> None:
    """Every product's collection holds exactly status.records points, and its catalog entry is there once."""
    found = statuses(kubectl, namespace)
    counts = catalog_keys(kubectl)
    for name, dp in found.items():
        st = dp["status"]
        points = operator.call(operator.store.count(st["collection"]))
        assert points == st["records"], f"{namespace}/{name}: {points} points for {st['records']} records"
        key = f"{namespace}.{name}"
        assert counts[key] == 1, f"{key} is {counts[key]} times in the catalog"


def create_namespace(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("create", "namespace", namespace, check=False)


def delete_namespace_products(kubectl: Kubectl, namespace: str, timeout: float = 300) -> None:
    """Delete every product of a namespace and wait until they are gone (finalized by the operator)."""
    kubectl.run("delete", "dataproducts", "--all", "-n", namespace, "--wait=false", timeout=timeout)
    wait_for(lambda: not statuses(kubectl, namespace), timeout, interval=1.0, what=f"products of {namespace} gone")


def reconciled_under(dp: dict[str, Any], prefix: str) -> bool:
    """Ready at its generation, with the finalizer and handled-spec record of the operators using ``prefix``."""
    meta, status = dp["metadata"], dp.get("status") or {}
    return (
        status.get("phase") == "Ready"
        and status.get("observedGeneration") == meta["generation"]
        and f"{prefix}/finalizer" in meta.get("finalizers", [])
        and f"{prefix}/last-handled-configuration" in (meta.get("annotations") or {})
    )


def abandon(kubectl: Kubectl, namespaces: Sequence[str], items: list[dict[str, Any]]) -> None:
    """Delete products whose operators are gone: their finalizers stripped (one request, from one
    kubectl, or the namespaces never go), then ``namespaces`` deleted without waiting."""
    for item in items:
        item["metadata"]["finalizers"] = []
    if items:
        body = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        kubectl.run("replace", "-f", "-", input=body, check=False, timeout=120)
    for ns in namespaces:
        kubectl.run("delete", "namespace", ns, "--wait=false", check=False)


def healthz(url: str) -> tuple[int, str]:
    """kopf's liveness endpoint: its status code and body (0 when it does not answer)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)


def kubectl_delete(kubectl: Kubectl, namespace: str, name: str, timeout: float) -> float:
    """``kubectl delete`` (waiting for the object to be gone); seconds it took. Fails past ``timeout``."""
    started = time.monotonic()
    try:
        kubectl.run("delete", "dataproduct", name, "-n", namespace, f"--timeout={timeout:.0f}s", timeout=timeout + 10)
    except (AssertionError, subprocess.TimeoutExpired) as exc:
        raise AssertionError(f"kubectl delete {namespace}/{name} did not return within {timeout:.0f} s: {exc}") from exc
    return time.monotonic() - started
