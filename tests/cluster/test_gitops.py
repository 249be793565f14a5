"""GitOps: the Argo CD health check for DataProduct run by a real Lua interpreter, and docs/gitops.md.

The health check is executed with lupa's Lua 5.1 (the dialect of gopher-lua, which Argo CD
embeds), without io/os/require, on DataProducts whose status comes from the operator's own
reconcile core (``datamesh.conditions.apply_checks``) in every phase. The manifests in
docs/gitops.md are parsed, point at paths that exist, and their Helm values pass the chart's
schema.
"""

from __future__ import annotations

import copy
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51

from datamesh.core.conditions import Check, ConditionType, apply_checks
from datamesh.resource.models import DataProductStatus
from tests.cluster.test_chart import CHART, REPO
from tests.harness import Helm

LUA = REPO / "docs" / "argocd" / "dataproduct-health.lua"
DOC = REPO / "docs" / "gitops.md"
NOW = datetime(2026, 10, 1, 12, 0, tzinfo=UTC)


# ==== the health check, in Lua =================================================================


def argocd_health(obj: dict[str, Any]) -> tuple[str, str]:
    """Run the health script the way Argo CD does: ``obj`` global, the chunk returns ``hs``."""
    lua = lua51.LuaRuntime(register_eval=False, register_builtins=False)
    g = lua.globals()
    # Argo CD's VM offers the base, table, string and math libraries only.
    for name in ("io", "os", "debug", "package", "require", "dofile", "loadfile", "load", "loadstring", "python"):
        g[name] = None
    g.obj = lua.table_from(obj, recursive=True)
    hs = lua.execute(LUA.read_text())
    assert hs is not None, "the script must return its health table"
    assert hs["status"] in ("Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown")
    assert isinstance(hs["message"], str) and hs["message"]
    return hs["status"], hs["message"]


def product(checks: list[Check] | None, generation: int = 1, observed: int | None = None) -> dict[str, Any]:
    """A DataProduct whose status is what the reconcile core writes after ``checks`` (None: no status)."""
    obj: dict[str, Any] = {
        "apiVersion": "datamesh.io/v1alpha1",
        "kind": "DataProduct",
        "metadata": {
            "name": "customer-churn",
            "namespace": "sales",
            "generation": generation,
            "finalizers": ["datamesh.io/finalizer"],
        },
        "spec": {"domain": "sales"},
    }
    if checks is not None:
        status, _ = apply_checks(
            DataProductStatus(records=25, collection="sales.customer-churn"), checks, observed or generation, NOW
        )
        obj["status"] = status.model_dump(by_alias=True, mode="json", exclude_none=True)
    return obj


OK = [
    Check(ConditionType.collection_ready, True, "CollectionReady", "384 dims"),
    Check(ConditionType.ingested, True, "Ingested", "25 records in the collection"),
    Check(ConditionType.inference_ready, True, "NotRequested", "no inference"),
    Check(ConditionType.cataloged, True, "Cataloged", "in the catalog"),
]


def replace(checks: list[Check], new: Check) -> list[Check]:
    return [new if c.type is new.type else c for c in checks]


CASES = {
    "ready": (product(OK), "Healthy", "Ready: 25 records"),
    "provisioning": (
        product(
            replace(
                OK, Check(ConditionType.inference_ready, False, "DeploymentProgressing", "0/1 replicas available yet")
            )
        ),
        "Progressing",
        "Provisioning: 0/1 replicas available yet",
    ),
    "provisioning-unknown": (
        product(replace(OK, Check(ConditionType.collection_ready, None, "Waiting", "waiting for Qdrant"))),
        "Progressing",
        "waiting for Qdrant",
    ),
    # Nothing checked yet: the core writes phase Pending (its Ready condition then says True,
    # with nothing to gate on; the phase keeps the product Progressing).
    "pending": (product([]), "Progressing", "Pending: "),
    "degraded": (
        product(
            replace(
                OK,
                Check(
                    ConditionType.collection_ready, False, "QdrantUnavailable", "Qdrant is unreachable", transient=True
                ),
            )
        ),
        "Degraded",
        "Degraded: Qdrant is unreachable",
    ),
    "failed": (
        product(
            replace(
                OK,
                Check(
                    ConditionType.collection_ready,
                    False,
                    "UnknownModel",
                    "unknown embedding model 'nope'",
                    permanent=True,
                ),
            )
        ),
        "Degraded",
        "Failed: unknown embedding model 'nope'",
    ),
    "stale-generation": (product(OK, generation=3, observed=2), "Progressing", "generation 3"),
    "no-status": (product(None), "Progressing", "Waiting for the datamesh operator"),
}


@pytest.mark.parametrize(("obj", "health", "message"), CASES.values(), ids=CASES.keys())
def test_argocd_health_of_each_phase(obj: dict[str, Any], health: str, message: str) -> None:
    status, text = argocd_health(obj)
    assert status == health, f"{obj.get('status', {}).get('phase')} -> {status} ({text})"
    assert message in text


def test_the_cases_cover_every_phase() -> None:
    phases = {case[0].get("status", {}).get("phase") for case in CASES.values()}
    assert phases == {"Ready", "Provisioning", "Pending", "Degraded", "Failed", None}


def test_argocd_health_edge_cases() -> None:
    ready = CASES["ready"][0]
    # Ready phase but a Ready condition that is not True: trust the condition.
    not_ready = copy.deepcopy(ready)
    next(c for c in not_ready["status"]["conditions"] if c["type"] == "Ready")["status"] = "False"
    assert argocd_health(not_ready)[0] == "Progressing"
    # A status without observedGeneration is stale by definition.
    unobserved = copy.deepcopy(ready)
    del unobserved["status"]["observedGeneration"]
    assert argocd_health(unobserved)[0] == "Progressing"
    # An empty status (e.g. only a message written so far) is not healthy.
    empty = copy.deepcopy(ready)
    empty["status"] = {}
    assert argocd_health(empty)[0] == "Progressing"
    # No phase, Ready=True and current: kstatus would call it Current; so does the check.
    no_phase = copy.deepcopy(ready)
    del no_phase["status"]["phase"]
    assert argocd_health(no_phase)[0] == "Healthy"
    # A Ready phase without conditions (an older operator): Healthy, as kstatus would have it.
    bare = copy.deepcopy(ready)
    del bare["status"]["conditions"]
    assert argocd_health(bare) == ("Healthy", "Ready: 25 records")
    # A later generation, once observed, is Healthy again.
    assert argocd_health(product(OK, generation=2, observed=2))[0] == "Healthy"


def test_argocd_health_on_a_product_as_the_api_server_returns_it() -> None:
    # Field names and shapes of a real object (kubectl get dp -o json), not only of the models.
    obj = yaml.safe_load((REPO / "examples" / "sales-customer-churn.yaml").read_text())
    obj["metadata"].update(generation=4, uid="4f1c", resourceVersion="812", creationTimestamp="2026-10-01T11:00:00Z")
    obj["status"] = {
        "phase": "Ready",
        "observedGeneration": 4,
        "records": 25,
        "message": "all resources of the product are in place",
        "conditions": [
            {
                "type": "CollectionReady",
                "status": "True",
                "reason": "CollectionReady",
                "message": "384 dims",
                "observedGeneration": 4,
                "lastTransitionTime": "2026-10-01T11:00:02Z",
            },
            {
                "type": "Ready",
                "status": "True",
                "reason": "Reconciled",
                "message": "all resources of the product are in place",
                "observedGeneration": 4,
                "lastTransitionTime": "2026-10-01T11:00:02Z",
            },
        ],
    }
    assert argocd_health(obj) == ("Healthy", "Ready: 25 records")
    obj["metadata"]["generation"] = 5  # someone edited the spec; the operator has not caught up
    assert argocd_health(obj) == ("Progressing", "Waiting for the operator to observe generation 5")


# ==== docs/gitops.md ===========================================================================


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", DOC.read_text(), re.MULTILINE | re.DOTALL)


def manifests() -> list[dict[str, Any]]:
    return [d for block in code_blocks("yaml") for d in yaml.safe_load_all(block) if d]


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in manifests() if d["kind"] == kind}


def test_doc_embeds_the_health_check_verbatim() -> None:
    lua = LUA.read_text()
    assert f"```lua\n{lua}```" in DOC.read_text(), (
        "docs/gitops.md must show docs/argocd/dataproduct-health.lua verbatim"
    )
    (cm,) = [d for d in manifests() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "argocd-cm"]
    assert cm["data"]["resource.customizations.health.datamesh.io_DataProduct"] == lua
    assert "kstatus" in DOC.read_text() and "observedGeneration" in DOC.read_text()


def test_doc_argocd_applications(helm: Helm, kube_version: str, tmp_path: Path) -> None:
    apps = by_kind("Application")
    assert set(apps) == {"datamesh-crds", "datamesh", "data-products-examples"}
    for app in apps.values():
        assert app["apiVersion"] == "argoproj.io/v1alpha1"
        assert (REPO / app["spec"]["source"]["path"]).is_dir(), app["spec"]["source"]["path"]
    crds = apps["datamesh-crds"]
    assert "finalizers" not in crds["metadata"], "deleting the CRD Application must not delete the CRD"
    assert crds["spec"]["syncPolicy"]["automated"]["prune"] is False
    chart = apps["datamesh"]
    assert chart["spec"]["source"]["path"] == "charts/datamesh" and chart["spec"]["source"]["helm"]["skipCrds"] is True
    values = tmp_path / "argocd-values.yaml"
    values.write_text(yaml.safe_dump(chart["spec"]["source"]["helm"]["valuesObject"]))
    helm.run("template", "datamesh", str(CHART), "--kube-version", kube_version, "-f", str(values))
    products = apps["data-products-examples"]
    assert "SkipDryRunOnMissingResource=true" in products["spec"]["syncPolicy"]["syncOptions"]
    assert list((REPO / products["spec"]["source"]["path"]).glob("*.yaml"))


def test_doc_flux_helmrelease_and_kustomizations(helm: Helm, kube_version: str, tmp_path: Path) -> None:
    (release,) = by_kind("HelmRelease").values()
    assert release["apiVersion"] == "helm.toolkit.fluxcd.io/v2"
    chart = release["spec"]["chart"]["spec"]
    assert (REPO / chart["chart"]).resolve() == CHART
    assert chart["sourceRef"]["name"] in by_kind("GitRepository")
    assert release["spec"]["install"]["crds"] == "Create" and release["spec"]["upgrade"]["crds"] == "CreateReplace"
    values = tmp_path / "flux-values.yaml"
    values.write_text(yaml.safe_dump(release["spec"]["values"]))
    helm.run("template", "datamesh", str(CHART), "--kube-version", kube_version, "-f", str(values))

    kustomizations = by_kind("Kustomization")
    platform, products = kustomizations["datamesh-platform"], kustomizations["data-products"]
    assert {"kind": "HelmRelease", "name": release["metadata"]["name"]}.items() <= platform["spec"]["healthChecks"][
        0
    ].items()
    assert products["spec"]["dependsOn"] == [{"name": "datamesh-platform"}]
    assert products["spec"]["wait"] is True
    assert (REPO / products["spec"]["path"]).is_dir()
    (expr,) = products["spec"]["healthCheckExprs"]
    assert (expr["apiVersion"], expr["kind"]) == ("datamesh.io/v1alpha1", "DataProduct")
    assert "observedGeneration == metadata.generation" in expr["current"] and "'Ready'" in expr["current"]
    assert "'Failed'" in expr["failed"] and "'Degraded'" in expr["failed"]
