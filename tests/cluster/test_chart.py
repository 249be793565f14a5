"""The Helm chart (charts/datamesh), with helm built from the Go module proxy (hack/build-tools.sh).

Without a cluster: ``helm lint --strict`` and ``helm template`` with the default values and
every ``ci/*-values.yaml``; values.schema.json refusing wrong values (helm's own messages);
hardened security contexts, probes and resources on every pod; RBAC rules commented and
narrow; every value documented in values.yaml, the schema and the README; the chart's CRD
identical to ``crds/``.

On the real control plane (pods never run there: no nodes): ``helm install`` creates every
object, ``helm upgrade`` with changed values keeps DataProducts and the Qdrant volume,
``helm uninstall`` removes the release and leaves the CRD, the products and the volume. RBAC
with the API server's own authorization: the operator runs as a subprocess with a token of the
chart's ServiceAccount (namespaced mode) and reconciles an example to Ready, while the same
identity is refused what it must not do.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from datamesh.resource.catalog import CATALOG_LABEL, decode_entries, entry_key
from tests.harness import Helm, Kubectl, wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "datamesh"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
VARIANTS = [None, *CI_VALUES]
VARIANT_IDS = ["default", *(p.name.removesuffix("-values.yaml") for p in CI_VALUES)]
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "Pod"}


# ==== helm =====================================================================================


def values_args(values: Path | None) -> list[str]:
    return ["-f", str(values)] if values else []


def render(helm: Helm, kube_version: str, *args: str, namespace: str = "datamesh") -> list[dict[str, Any]]:
    out = helm.run("template", "dm", str(CHART), "--namespace", namespace, "--kube-version", kube_version, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(objs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]


def one(objs: list[dict[str, Any]], kind: str, name_suffix: str) -> dict[str, Any]:
    found = find(objs, kind, name_suffix)
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_specs(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for o in objs:
        if o["kind"] == "Pod":
            specs.append((f"Pod/{o['metadata']['name']}", o["spec"]))
        elif o["kind"] in WORKLOADS:
            specs.append((f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]))
    return specs


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# ==== static: CRD, lint, template ==============================================================


def test_chart_crd_is_the_generated_crd() -> None:
    top = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    chart = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert chart == top, "charts/datamesh/crds/ must hold exactly the files of crds/"
    for name in top:
        assert (CHART / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes(), (
            f"charts/datamesh/crds/{name} differs from crds/{name}: run `cp crds/*.yaml charts/datamesh/crds/`"
        )


@pytest.mark.parametrize("values", VARIANTS, ids=VARIANT_IDS)
def test_helm_lint_strict(helm: Helm, kube_version: str, values: Path | None) -> None:
    result = helm.run("lint", "--strict", str(CHART), "--kube-version", kube_version, *values_args(values))
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


def test_ci_values_cover_the_three_scenarios() -> None:
    names = {p.name for p in CI_VALUES}
    assert {
        "external-qdrant-values.yaml",
        "namespaced-values.yaml",
        "query-ingress-autoscaling-values.yaml",
        "embedded-values.yaml",
        "scale-values.yaml",
    } <= names


def test_template_default(helm: Helm, kube_version: str) -> None:
    objs = render(helm, kube_version, "--include-crds")
    kinds = {o["kind"] for o in objs}
    assert {
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
    } <= kinds
    assert not kinds & {"Ingress", "HorizontalPodAutoscaler", "NetworkPolicy", "ServiceMonitor", "Secret"}
    assert one(objs, "CustomResourceDefinition", "")["metadata"]["name"] == "dataproducts.datamesh.io"

    op = one(objs, "Deployment", "-operator")
    # Two replicas electing a leader; a rollout adds a standby before it removes a replica.
    assert op["spec"]["replicas"] == 2
    assert op["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    (spread,) = op["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    (container,) = op["spec"]["template"]["spec"]["containers"]
    assert container["args"][:2] == ["operator", "--all-namespaces"]
    assert "--leader-election" in container["args"]
    liveness = next(a for a in container["args"] if a.startswith("--liveness="))
    assert liveness == "--liveness=http://0.0.0.0:8081/healthz"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    env = env_of(container)
    assert env["DATAMESH_PLATFORM_NAMESPACE"] == "datamesh"
    assert env["DATAMESH_QDRANT_URL"] == "http://dm-datamesh-qdrant.datamesh.svc:6333"
    assert (env["DATAMESH_WATCH_SERVER_TIMEOUT"], env["DATAMESH_WATCH_CLIENT_TIMEOUT"]) == ("300", "330")
    # The probe asks kopf's endpoint, which fails when the operator is stuck for this long.
    assert env["DATAMESH_LIVENESS_STALL_SECONDS"] == "300"
    assert env["DATAMESH_INFERENCE_IMAGE"] == container["image"] == "ghcr.io/datamesh-io/datamesh:0.1.0"
    assert "DATAMESH_QDRANT_API_KEY" not in env
    # The holder identity is the pod's name (downward API); one Lease per release.
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["DATAMESH_LEADER_ELECTION_LEASE_NAME"] == "dm-datamesh-operator"
    assert (
        env["DATAMESH_LEADER_ELECTION_LEASE_SECONDS"],
        env["DATAMESH_LEADER_ELECTION_RENEW_DEADLINE_SECONDS"],
        env["DATAMESH_LEADER_ELECTION_RETRY_SECONDS"],
    ) == ("20", "15", "2")
    # The Lease's own Role in the platform namespace: create it, then read and replace this one only.
    lease_role = one(objs, "Role", "-operator-lease")
    assert lease_role["metadata"]["namespace"] == "datamesh"
    assert lease_role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["dm-datamesh-operator"],
            "verbs": ["get", "update"],
        },
    ]
    binding = one(objs, "RoleBinding", "-operator-lease")
    assert binding["metadata"]["namespace"] == "datamesh"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "dm-datamesh-operator-lease",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "dm-datamesh-operator", "namespace": "datamesh"}]

    query = one(objs, "Deployment", "-query")
    assert query["spec"]["replicas"] == 2
    (qc,) = query["spec"]["template"]["spec"]["containers"]
    assert qc["args"] == ["query-service", "--host=0.0.0.0", "--port=8080"]
    assert qc["readinessProbe"]["httpGet"]["path"] == "/readyz" and qc["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert env_of(qc)["DATAMESH_QUERY_CATALOG_NAMESPACE"] == "datamesh"
    assert env_of(qc)["DATAMESH_QUERY_ALLOW_ANONYMOUS"] == "false"
    assert "DATAMESH_QUERY_MCP" not in env_of(qc), "the MCP tools are off by default"

    sts = one(objs, "StatefulSet", "-qdrant")
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    (qd,) = sts["spec"]["template"]["spec"]["containers"]
    assert re.fullmatch(r"docker\.io/qdrant/qdrant:v\d+\.\d+\.\d+", qd["image"]), "Qdrant's image must be pinned"
    assert {p["containerPort"] for p in qd["ports"]} == {6333, 6334}
    assert qd["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sts["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_template_external_qdrant(helm: Helm, kube_version: str) -> None:
    objs = render(helm, kube_version, "-f", str(CHART / "ci" / "external-qdrant-values.yaml"))
    assert not find(objs, "StatefulSet") and not find(objs, "Service", "-qdrant")
    for deployment in find(objs, "Deployment"):
        env = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
        assert env["DATAMESH_QDRANT_URL"] == "https://qdrant.qdrant.svc.cluster.local:6333"
        assert env["DATAMESH_QDRANT_API_KEY"] == {"secretKeyRef": {"name": "datamesh-qdrant", "key": "api-key"}}
        # The private CA's bundle, mounted from its ConfigMap, is what the client trusts.
        spec = deployment["spec"]["template"]["spec"]
        assert env["DATAMESH_QDRANT_CA_FILE"] == "/etc/datamesh/qdrant-ca/ca.crt"
        assert {"name": "qdrant-ca", "mountPath": "/etc/datamesh/qdrant-ca", "readOnly": True} in spec["containers"][0][
            "volumeMounts"
        ]
        assert {
            "name": "qdrant-ca",
            "configMap": {"name": "qdrant-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]},
        } in spec["volumes"]
    # The CA from a Secret instead.
    objs_secret = render(
        helm,
        kube_version,
        "-f",
        str(CHART / "ci" / "external-qdrant-values.yaml"),
        "--set",
        "qdrant.external.tls.ca.configMapName=",
        "--set",
        "qdrant.external.tls.ca.secretName=qdrant-tls",
        "--set",
        "qdrant.external.tls.ca.key=bundle.pem",
    )
    for deployment in find(objs_secret, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        assert env_of(spec["containers"][0])["DATAMESH_QDRANT_CA_FILE"] == "/etc/datamesh/qdrant-ca/bundle.pem"
        assert {
            "name": "qdrant-ca",
            "secret": {"secretName": "qdrant-tls", "items": [{"key": "bundle.pem", "path": "bundle.pem"}]},
        } in spec["volumes"]
    # Without a CA nothing is mounted: the system's CAs apply.
    plain = render(helm, kube_version, "--set", "qdrant.mode=external", "--set", "qdrant.external.url=https://q:6333")
    for deployment in find(plain, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        assert "DATAMESH_QDRANT_CA_FILE" not in env_of(spec["containers"][0])
        assert all(v["name"] != "qdrant-ca" for v in spec["volumes"])
    # No Qdrant pod to fence off, but the operator and query service still get their policies.
    assert {o["metadata"]["name"] for o in find(objs, "NetworkPolicy")} == {"dm-datamesh-operator", "dm-datamesh-query"}


def test_template_namespaced_mode(helm: Helm, kube_version: str) -> None:
    objs = render(helm, kube_version, "-f", str(CHART / "ci" / "namespaced-values.yaml"))
    (container,) = one(objs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"]
    assert container["args"][:4] == ["operator", "--namespace=sales", "--namespace=support", "--namespace=finance"]
    assert "--all-namespaces" not in container["args"] and "--verbose" in container["args"]
    roles = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in find(objs, "Role")}
    assert {
        ("sales", "dm-datamesh-operator"),
        ("support", "dm-datamesh-operator"),
        ("finance", "dm-datamesh-operator"),
        ("datamesh-system", "dm-datamesh-operator-catalog"),
        ("datamesh-system", "dm-datamesh-operator-lease"),
        ("datamesh-system", "dm-datamesh-query-catalog-reader"),
    } == roles
    # Nothing cluster-wide in namespaced mode.
    assert not find(objs, "ClusterRole") and not find(objs, "ClusterRoleBinding")
    assert env_of(container)["DATAMESH_PLATFORM_NAMESPACE"] == "datamesh-system"
    assert not find(objs, "PodDisruptionBudget")


def test_template_query_ingress_autoscaling(helm: Helm, kube_version: str) -> None:
    objs = render(helm, kube_version, "-f", str(CHART / "ci" / "query-ingress-autoscaling-values.yaml"))
    ingress = one(objs, "Ingress", "-query")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "datamesh-tls", "hosts": ["datamesh.example.com"]}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "datamesh.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": "dm-datamesh-query", "port": {"number": 8080}}
    hpa = one(objs, "HorizontalPodAutoscaler", "-query")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}
    assert hpa["spec"]["scaleTargetRef"]["name"] == "dm-datamesh-query"
    assert "replicas" not in one(objs, "Deployment", "-query")["spec"], "the HPA owns the replica count"
    assert one(objs, "PodDisruptionBudget", "-query")["spec"]["maxUnavailable"] == "50%"
    query = one(objs, "Deployment", "-query")["spec"]["template"]["spec"]
    assert env_of(query["containers"][0])["DATAMESH_QUERY_TOKENS_FILE"] == "/etc/datamesh/tokens/tokens.yaml"
    # mcp.enabled: the query service serves /mcp on its own port, with the same tokens; no new objects.
    assert env_of(query["containers"][0])["DATAMESH_QUERY_MCP"] == "true"
    assert not [o for o in objs if "mcp" in o["metadata"]["name"]]
    assert next(v for v in query["volumes"] if v["name"] == "tokens")["secret"]["secretName"] == "datamesh-query-tokens"
    policies = {o["metadata"]["name"]: o for o in find(objs, "NetworkPolicy")}
    assert set(policies) == {"dm-datamesh-qdrant", "dm-datamesh-operator", "dm-datamesh-query"}
    qdrant_from = policies["dm-datamesh-qdrant"]["spec"]["ingress"][0]["from"]
    assert {p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in qdrant_from} == {
        "operator",
        "query",
    }
    assert len(find(objs, "ServiceMonitor")) == 2


def test_template_embedded_store(helm: Helm, kube_version: str) -> None:
    objs = render(helm, kube_version, "-f", str(CHART / "ci" / "embedded-values.yaml"))
    # One pod: no Qdrant server and no query Deployment (nor its HPA, PDB, account or Role).
    assert not find(objs, "StatefulSet") and not find(objs, "Service", "-qdrant")
    assert [d["metadata"]["name"] for d in find(objs, "Deployment")] == ["dm-datamesh-operator"]
    assert not find(objs, "HorizontalPodAutoscaler") and not find(objs, "PodDisruptionBudget")
    assert not find(objs, "ServiceAccount", "-query") and not find(objs, "Role", "-query-catalog-reader")
    operator = one(objs, "Deployment", "-operator")
    # One process owns the embedded store: one replica (the default asks for 2), stopped before the next starts.
    assert operator["spec"]["replicas"] == 1 and operator["spec"]["strategy"] == {"type": "Recreate"}
    spec = operator["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["args"][-2:] == ["--query-host=0.0.0.0", "--query-port=8080"]
    assert "--leader-election" in container["args"], "a restarted container still never overlaps its predecessor"
    env = env_of(container)
    assert env["DATAMESH_QDRANT_PATH"] == "/var/lib/datamesh/store" and "DATAMESH_QDRANT_URL" not in env
    assert env["DATAMESH_QUERY_TOKENS_FILE"] == "/etc/datamesh/tokens/tokens.yaml"
    assert env["DATAMESH_QUERY_MCP"] == "true", "the operator's query API serves the MCP tools too"
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["store"]["emptyDir"] == {"sizeLimit": "2Gi"}
    assert volumes["tokens"]["secret"]["secretName"] == "dm-datamesh-query-tokens"
    # The query Service (and so Ingress and `helm test`) reaches the operator pod.
    service = one(objs, "Service", "-query")
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "operator"
    catalog = one(objs, "Role", "-operator-catalog")
    assert ["watch"] in [r["verbs"] for r in catalog["rules"]], "the embedded query API watches the catalog"
    policy = one(objs, "NetworkPolicy", "-operator")
    assert any(p["port"] == "http" for rule in policy["spec"]["ingress"] for p in rule["ports"])
    assert not find(objs, "NetworkPolicy", "-query")

    claim = render(helm, kube_version, "--set", "store.mode=embedded", "--set", "store.embedded.existingClaim=dm-store")
    volumes = {v["name"]: v for v in one(claim, "Deployment", "-operator")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["store"] == {"name": "store", "persistentVolumeClaim": {"claimName": "dm-store"}}
    result = helm.run(
        "template",
        "dm",
        str(CHART),
        "--kube-version",
        kube_version,
        "--set",
        "store.mode=embedded",
        "--set",
        "queryService.autoscaling.enabled=true",
        check=False,
    )
    assert result.returncode != 0 and "cannot be used with store.mode" in result.stderr, result.stderr


def test_template_scale_out(helm: Helm, kube_version: str) -> None:
    """ci/scale-values.yaml: a three-node Qdrant cluster and two operator shards by label."""
    objs = render(helm, kube_version, "-f", str(CHART / "ci" / "scale-values.yaml"))

    sts = one(objs, "StatefulSet", "-qdrant")
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["podManagementPolicy"] == "Parallel", "after a full restart every node must come back at once"
    spec = sts["spec"]["template"]["spec"]
    (qd,) = spec["containers"]
    env = env_of(qd)
    assert env["QDRANT__CLUSTER__ENABLED"] == "true" and env["QDRANT__CLUSTER__P2P__PORT"] == "6335"
    assert {"name": "p2p", "containerPort": 6335, "protocol": "TCP"} in qd["ports"]
    # Pod 0 starts the cluster; every other pod joins it through pod 0's stable DNS name.
    assert qd["command"] == ["/bin/bash", "-c"]
    (script,) = qd["args"]
    peer = "dm-datamesh-qdrant-headless.datamesh.svc:6335"

    # Run with each pod's hostname (echo exec'd instead of the entrypoint): what each node is told.
    def started_as(hostname: str) -> list[str]:
        run = subprocess.run(
            ["bash", "-c", script.replace("./entrypoint.sh", "echo")],
            env={"HOSTNAME": hostname},
            capture_output=True,
            text=True,
            check=True,
        )
        return run.stdout.split()

    assert started_as("dm-datamesh-qdrant-0") == ["--uri", f"http://dm-datamesh-qdrant-0.{peer}"]
    assert started_as("dm-datamesh-qdrant-2") == [
        "--bootstrap",
        f"http://dm-datamesh-qdrant-0.{peer}",
        "--uri",
        f"http://dm-datamesh-qdrant-2.{peer}",
    ]
    # A volume per node, and the nodes spread over machines.
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "storage"
    (term,) = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "qdrant"
    # The peer-to-peer port on the headless Service only; clients keep the ClusterIP Service.
    assert {"name": "p2p", "port": 6335, "targetPort": "p2p", "protocol": "TCP"} in one(
        objs, "Service", "-qdrant-headless"
    )["spec"]["ports"]
    assert all(p["name"] != "p2p" for p in one(objs, "Service", "-qdrant")["spec"]["ports"])
    # Drains keep a majority of the three nodes (Raft) up.
    pdb = one(objs, "PodDisruptionBudget", "-qdrant")
    assert pdb["spec"]["minAvailable"] == 2
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "qdrant"

    # With NetworkPolicies the nodes still reach each other's peer-to-peer port; hard anti-affinity is required.
    fenced = render(
        helm,
        kube_version,
        "-f",
        str(CHART / "ci" / "scale-values.yaml"),
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "qdrant.cluster.antiAffinity=hard",
    )
    peers = [
        rule
        for rule in one(fenced, "NetworkPolicy", "-qdrant")["spec"]["ingress"]
        if rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "qdrant"
    ]
    assert len(peers) == 1 and {"port": "p2p", "protocol": "TCP"} in peers[0]["ports"]
    hard = one(fenced, "StatefulSet", "-qdrant")["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert hard["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname"

    # Two operator Deployments, each its own shard, label selector and Lease; none for every product.
    operators = {d["metadata"]["name"]: d for d in find(objs, "Deployment") if "-operator" in d["metadata"]["name"]}
    assert set(operators) == {"dm-datamesh-operator-a", "dm-datamesh-operator-b"}
    selectors = {"a": "datamesh.io/shard=a", "b": "datamesh.io/shard!=a"}
    for name, selector in selectors.items():
        deployment = operators[f"dm-datamesh-operator-{name}"]
        assert deployment["spec"]["replicas"] == 2
        labels = deployment["spec"]["selector"]["matchLabels"]
        assert labels["datamesh.io/operator-shard"] == name
        assert deployment["spec"]["template"]["metadata"]["labels"]["datamesh.io/operator-shard"] == name
        (spread,) = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert spread["labelSelector"]["matchLabels"] == labels, "a shard's leader and standby spread apart"
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["args"][:4] == [
            "operator",
            "--all-namespaces",
            f"--shard={name}",
            f"--label-selector={selector}",
        ]
        assert env_of(container)["DATAMESH_LEADER_ELECTION_LEASE_NAME"] == f"dm-datamesh-operator-{name}"
    lease_role = one(objs, "Role", "-operator-lease")
    assert lease_role["rules"][1]["resourceNames"] == ["dm-datamesh-operator-a", "dm-datamesh-operator-b"]
    # Label shards watch every namespace: the ClusterRole, as without shards.
    assert find(objs, "ClusterRole")
    # One metrics Service and one account for every shard.
    metrics = one(objs, "Service", "-operator-metrics")
    assert "datamesh.io/operator-shard" not in metrics["spec"]["selector"]
    assert [o["metadata"]["name"] for o in find(objs, "ServiceAccount", "-operator")] == ["dm-datamesh-operator"]


def test_template_ingest_jobs(helm: Helm, kube_version: str, kubectl: Kubectl) -> None:
    from datamesh.core.jobs import JobPolicy, ingest_job

    args = ["--set", "operator.ingestJobs.enabled=true", "--set", "operator.ingestJobs.minBytes=1000"]
    objs = render(
        helm,
        kube_version,
        *args,
        "-f",
        str(CHART / "ci" / "embedded-values.yaml"),
        "--set",
        "store.embedded.existingClaim=dm-store",
    )
    operator = one(objs, "Deployment", "-operator")["spec"]["template"]
    env = env_of(operator["spec"]["containers"][0])
    assert env["DATAMESH_INGEST_JOB_MIN_BYTES"] == "1000"
    assert env["DATAMESH_INGEST_JOB_TEMPLATE"] == "/etc/datamesh/ingest-job/pod.yaml"
    assert "checksum/ingest-job" in operator["metadata"]["annotations"], "a new template rolls the operator"
    mounted = {v["name"]: v for v in operator["spec"]["volumes"]}["ingest-job"]
    assert mounted["configMap"]["name"] == "dm-datamesh-operator-ingest-job"

    # The pod template: the chart's image and the ingest account, the store's claim, on the operator's node.
    pod = yaml.safe_load(one(objs, "ConfigMap", "-ingest-job")["data"]["pod.yaml"])
    assert pod["spec"]["serviceAccountName"] == "dm-datamesh-operator-ingest"
    (container,) = pod["spec"]["containers"]
    assert env_of(container)["DATAMESH_QDRANT_PATH"] == "/var/lib/datamesh/store"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["store"]["persistentVolumeClaim"] == {"claimName": "dm-store"}
    affinity = pod["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert affinity["topologyKey"] == "kubernetes.io/hostname"
    assert affinity["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"

    # Its account may read products and write their status; the operator may run Jobs in its namespace only.
    ingest = one(objs, "ClusterRole", "-operator-ingest")
    assert [(r["resources"], r["verbs"]) for r in ingest["rules"]] == [
        (["dataproducts"], ["get"]),
        (["dataproducts/status"], ["patch"]),
    ]
    jobs = one(objs, "Role", "-operator-jobs")
    assert jobs["metadata"]["namespace"] == "datamesh"
    assert [(r["resources"], r["verbs"]) for r in jobs["rules"]] == [
        (["jobs"], ["get", "list", "watch", "create", "delete"]),
        (["pods"], ["list"]),
    ]
    for binding in (o for o in objs if o["kind"].endswith("Binding") and "-ingest" in o["metadata"]["name"]):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "dm-datamesh-operator-ingest", "namespace": "datamesh"}
        ]

    # The Job the operator makes from it is one the API server accepts (a dry run needs neither account nor claim).
    job = ingest_job("default", "sales", "churn", "ingest-churn-0123456789", pod, JobPolicy())
    kubectl.run("create", "--dry-run=server", "-f", "-", input=yaml.safe_dump(job))

    qdrant = render(helm, kube_version, *args)
    pod = yaml.safe_load(one(qdrant, "ConfigMap", "-ingest-job")["data"]["pod.yaml"])
    assert env_of(pod["spec"]["containers"][0])["DATAMESH_QDRANT_URL"] == "http://dm-datamesh-qdrant.datamesh.svc:6333"
    assert "affinity" not in pod["spec"] and "store" not in {v["name"] for v in pod["spec"]["volumes"]}


def test_template_namespace_shards(helm: Helm, kube_version: str) -> None:
    objs = render(
        helm,
        kube_version,
        "--set-json",
        'operator.shards=[{"name": "sales", "namespaces": ["sales", "hr"]}, {"name": "ops", "namespaces": ["ops"]}]',
    )
    args = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["args"]
        for d in find(objs, "Deployment")
        if "-operator" in d["metadata"]["name"]
    }
    assert args["dm-datamesh-operator-sales"][:4] == [
        "operator",
        "--namespace=sales",
        "--namespace=hr",
        "--shard=sales",
    ]
    assert args["dm-datamesh-operator-ops"][:3] == ["operator", "--namespace=ops", "--shard=ops"]
    assert not any("--label-selector" in a for shard in args.values() for a in shard)
    # Roles in every shard's namespaces, nothing cluster-wide.
    assert not find(objs, "ClusterRole") and not find(objs, "ClusterRoleBinding")
    product_roles = {o["metadata"]["namespace"] for o in find(objs, "Role", "-operator")}
    assert product_roles == {"sales", "hr", "ops"}


def test_chart_managed_tokens_secret(helm: Helm, kube_version: str) -> None:
    objs = render(
        helm,
        kube_version,
        "--set-json",
        'queryService.auth.tokens={"t0k3n": {"identity": "alice@example.com", "groups": ["finance"]}}',
    )
    secret = one(objs, "Secret", "-query-tokens")
    assert yaml.safe_load(secret["stringData"]["tokens.yaml"]) == {
        "t0k3n": {"identity": "alice@example.com", "groups": ["finance"]}
    }
    template = one(objs, "Deployment", "-query")["spec"]["template"]
    assert "checksum/tokens" in template["metadata"]["annotations"]


# ==== static: the schema refuses wrong values with helm's own, readable message ================


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"operator": {"replicas": "two"}}, "at '/operator/replicas': got string, want integer"),
        ({"operator": {"replicas": -1}}, "at '/operator/replicas': minimum: got -1, want 0"),
        (
            {"operator": {"leaderElection": {"leaseDuration": 10}}},
            "at '/operator/leaderElection': additional properties 'leaseDuration' not allowed",
        ),
        ({"operator": {"replica": 1}}, "at '/operator': additional properties 'replica' not allowed"),
        ({"qdrant": {"mode": "embedded"}}, "at '/qdrant/mode': value must be one of 'builtin', 'external'"),
        ({"store": {"mode": "sqlite"}}, "at '/store/mode': value must be one of 'qdrant', 'embedded'"),
        ({"qdrant": {"mode": "external"}}, "at '/qdrant/external/url': minLength: got 0, want 1"),
        ({"operator": {"watchNamespaces": ["Sales"]}}, "at '/operator/watchNamespaces/0'"),
        (
            {"queryService": {"podDisruptionBudget": {"maxUnavailable": "half"}}},
            "at '/queryService/podDisruptionBudget/maxUnavailable'",
        ),
        (
            {"image": {"pullPolicy": "Sometimes"}},
            "at '/image/pullPolicy': value must be one of 'Always', 'IfNotPresent', 'Never'",
        ),
        ({"qdrant": {"replicas": 0}}, "at '/qdrant/replicas': minimum: got 0, want 1"),
        ({"qdrant": {"cluster": {"replicationFactor": 2}}}, "at '/qdrant/cluster': additional properties"),
        ({"qdrant": {"cluster": {"antiAffinity": "strict"}}}, "at '/qdrant/cluster/antiAffinity'"),
        ({"operator": {"shards": [{"name": "Shard_A", "namespaces": ["x"]}]}}, "at '/operator/shards/0/name'"),
        (
            {"operator": {"shards": [{"name": "a", "namespace": ["x"]}]}},
            "at '/operator/shards/0': additional properties 'namespace' not allowed",
        ),
    ],
    ids=[
        "replicas-string",
        "replicas-negative",
        "lease-misspelled-key",
        "misspelled-key",
        "qdrant-mode",
        "store-mode",
        "external-without-url",
        "namespace-uppercase",
        "pdb-not-a-number",
        "pull-policy",
        "qdrant-no-nodes",
        "replication-factor-is-per-product",
        "anti-affinity-unknown",
        "shard-name-uppercase",
        "shard-misspelled-key",
    ],
)
def test_schema_refuses_wrong_values(
    helm: Helm, kube_version: str, tmp_path: Path, values: dict[str, Any], message: str
) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    for command in (["template", "dm", str(CHART)], ["lint", "--strict", str(CHART)]):
        result = helm.run(*command, "--kube-version", kube_version, "-f", str(path), check=False)
        output = result.stderr + result.stdout
        assert result.returncode != 0, f"helm {command[0]} accepted {values}"
        assert "values don't meet the specifications of the schema" in output, output
        assert message in output, output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--set", "operator.watch.clientTimeoutSeconds=300"],
            "operator.watch.clientTimeoutSeconds (300) must be greater than operator.watch.serverTimeoutSeconds (300)",
        ),
        (["--set", "queryService.ingress.enabled=true"], "queryService.ingress.hosts needs at least one host"),
        (
            [
                "--set",
                "queryService.autoscaling.enabled=true",
                "--set",
                "queryService.autoscaling.minReplicas=5",
                "--set",
                "queryService.autoscaling.maxReplicas=2",
            ],
            "queryService.autoscaling.maxReplicas must be at least queryService.autoscaling.minReplicas",
        ),
        (
            ["--set", "operator.leaderElection.enabled=false"],
            "operator.replicas (2) above 1 needs operator.leaderElection.enabled",
        ),
        (
            ["--set", "operator.leaderElection.renewDeadlineSeconds=20"],
            "operator.leaderElection.renewDeadlineSeconds (20) must be less than leaseDurationSeconds (20)",
        ),
        (
            ["--set", "operator.leaderElection.retryPeriodSeconds=8"],
            "operator.leaderElection.retryPeriodSeconds (8) must be at most half of renewDeadlineSeconds (15)",
        ),
        (
            ["--set", "mcp.enabled=true", "--set", "queryService.enabled=false"],
            "mcp.enabled needs queryService.enabled: the query service serves the MCP tools at /mcp",
        ),
        (
            ["--set-json", 'operator.shards=[{"name": "a", "namespaces": ["x"]}, {"name": "a", "namespaces": ["y"]}]'],
            'operator.shards: the shard name "a" is used twice',
        ),
        (
            ["--set-json", 'operator.shards=[{"name": "a"}]'],
            "operator.shards[0] (a) needs namespaces or a labelSelector",
        ),
        (
            ["--set-json", 'operator.shards=[{"name": "a", "namespaces": ["x"], "labelSelector": "team=a"}]'],
            "operator.shards[0] (a) has both namespaces and labelSelector",
        ),
        (
            [
                "--set",
                "store.mode=embedded",
                "--set-json",
                'operator.shards=[{"name": "a", "labelSelector": "t=a"}, {"name": "b", "labelSelector": "t!=a"}]',
            ],
            'operator.shards cannot be used with store.mode "embedded"',
        ),
        (
            [
                "--set-json",
                'operator.shards=[{"name": "a", "namespaces": ["x"]}, {"name": "b", "labelSelector": "t=b"}]',
            ],
            "operator.shards: split every shard by namespaces or every shard by labelSelector, not both",
        ),
        (
            ["--set-json", 'operator.shards=[{"name": "a", "namespaces": ["x"]}, {"name": "b", "namespaces": ["x"]}]'],
            'operator.shards: namespace "x" is in shards a and b',
        ),
        (
            [
                "--set-json",
                'operator.watchNamespaces=["x"]',
                "--set-json",
                'operator.shards=[{"name": "a", "namespaces": ["y"]}]',
            ],
            "operator.watchNamespaces cannot be used with shards split by namespaces",
        ),
        (
            ["--set", "qdrant.replicas=3"],
            "qdrant.replicas (3) above 1 needs qdrant.cluster.enabled",
        ),
        (
            ["--set", "qdrant.cluster.enabled=true", "--set", "qdrant.builtin.persistence.enabled=false"],
            "qdrant.cluster.enabled needs qdrant.builtin.persistence.enabled",
        ),
        (
            [
                "--set",
                "qdrant.mode=external",
                "--set",
                "qdrant.external.url=https://q:6333",
                "--set",
                "qdrant.external.tls.ca.secretName=s",
                "--set",
                "qdrant.external.tls.ca.configMapName=c",
            ],
            "qdrant.external.tls.ca: set secretName or configMapName, not both",
        ),
        (
            [
                "--set",
                "qdrant.mode=external",
                "--set",
                "qdrant.external.url=http://q:6333",
                "--set",
                "qdrant.external.tls.ca.configMapName=c",
            ],
            'qdrant.external.tls.ca needs an https:// qdrant.external.url (got "http://q:6333")',
        ),
        (
            ["--set", "qdrant.external.tls.ca.configMapName=c"],
            'qdrant.external.tls.ca is for qdrant.mode "external"',
        ),
        (
            [
                "--set",
                "qdrant.mode=external",
                "--set",
                "qdrant.external.url=https://q:6333",
                "--set",
                "qdrant.cluster.enabled=true",
            ],
            'qdrant.replicas and qdrant.cluster are for the built-in Qdrant (qdrant.mode "builtin")',
        ),
        (
            ["--set", "operator.ingestJobs.enabled=true", "--set", "store.mode=embedded"],
            "operator.ingestJobs.enabled with store.mode embedded needs store.embedded.existingClaim",
        ),
        (
            [
                "--set",
                "operator.ingestJobs.enabled=true",
                "--set-json",
                'operator.shards=[{"name": "a", "namespaces": ["x"]}]',
            ],
            "operator.ingestJobs.enabled is not supported with operator.shards yet",
        ),
    ],
    ids=[
        "watch-timeouts",
        "ingress-without-host",
        "hpa-min-above-max",
        "replicas-without-election",
        "renew-deadline-not-below-lease",
        "retry-above-half-deadline",
        "mcp-without-query-service",
        "shard-names-twice",
        "shard-without-scope",
        "shard-with-both-scopes",
        "shards-with-embedded-store",
        "shards-split-two-ways",
        "namespace-in-two-shards",
        "watch-namespaces-with-namespace-shards",
        "qdrant-replicas-without-cluster",
        "cluster-without-persistence",
        "ca-from-secret-and-configmap",
        "ca-with-http-url",
        "ca-for-builtin-qdrant",
        "cluster-for-external-qdrant",
        "ingest-jobs-without-a-shared-volume",
        "ingest-jobs-with-shards",
    ],
)
def test_template_refuses_inconsistent_values(helm: Helm, kube_version: str, args: list[str], message: str) -> None:
    result = helm.run("template", "dm", str(CHART), "--kube-version", kube_version, *args, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


# ==== static: hardening, RBAC, documentation ===================================================


@pytest.mark.parametrize("values", VARIANTS, ids=VARIANT_IDS)
def test_every_pod_is_hardened(helm: Helm, kube_version: str, values: Path | None) -> None:
    objs = render(helm, kube_version, *values_args(values))
    specs = pod_specs(objs)
    assert specs
    for where, spec in specs:
        pod = spec.get("securityContext") or {}
        assert pod.get("runAsNonRoot") is True, where
        assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        assert "hostNetwork" not in spec and "hostPID" not in spec and "hostIPC" not in spec, where
        for container in spec.get("initContainers", []) + spec["containers"]:
            what = f"{where} container {container['name']}"
            sc = container.get("securityContext") or {}
            assert sc.get("runAsNonRoot") is True, what
            assert sc.get("allowPrivilegeEscalation") is False, what
            assert sc.get("readOnlyRootFilesystem") is True, what
            assert sc.get("privileged") in (None, False), what
            assert sc.get("capabilities") == {"drop": ["ALL"]}, what
            assert sc.get("seccompProfile") == {"type": "RuntimeDefault"}, what
            assert isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] > 0, what
            resources = container.get("resources") or {}
            assert resources.get("requests", {}).get("memory") and resources.get("requests", {}).get("cpu"), what
            assert resources.get("limits", {}).get("memory"), what
            if where.startswith("Pod/"):
                continue  # the helm test pod runs once
            assert container.get("livenessProbe") and container.get("readinessProbe"), what
            # A read-only root filesystem needs a writable /tmp.
            assert any(m["mountPath"] == "/tmp" for m in container.get("volumeMounts", [])), what


def _rbac_objects(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] in ("Role", "ClusterRole")]


@pytest.mark.parametrize("values", VARIANTS, ids=VARIANT_IDS)
def test_rbac_is_narrow(helm: Helm, kube_version: str, values: Path | None) -> None:
    objs = render(helm, kube_version, *values_args(values))
    roles = _rbac_objects(objs)
    assert roles
    forbidden_resources = {
        "secrets",
        "pods",
        "pods/exec",
        "nodes",
        "serviceaccounts",
        "serviceaccounts/token",
        "roles",
        "rolebindings",
        "clusterroles",
        "clusterrolebindings",
    }
    for role in roles:
        for rule in role["rules"]:
            where = f"{role['kind']}/{role['metadata']['name']}: {rule}"
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], where
            assert not set(rule["resources"]) & forbidden_resources, where
            assert not set(rule["verbs"]) & {"delete", "deletecollection", "escalate", "bind", "impersonate"}, where
            assert "resourceNames" not in rule or rule["resourceNames"], where
    # Every binding points at a role of the chart and at a ServiceAccount of the release.
    names = {(o["kind"], o["metadata"]["name"]) for o in roles}
    for binding in (o for o in objs if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        assert (binding["roleRef"]["kind"], binding["roleRef"]["name"]) in names
        assert all(s["kind"] == "ServiceAccount" and s["namespace"] == "datamesh" for s in binding["subjects"])


@pytest.mark.parametrize("values", VARIANTS, ids=VARIANT_IDS)
def test_every_rbac_rule_is_commented(helm: Helm, kube_version: str, values: Path | None) -> None:
    out = helm.run("template", "dm", str(CHART), "--kube-version", kube_version, *values_args(values)).stdout
    lines = out.splitlines()
    rules = [i for i, line in enumerate(lines) if line.strip().startswith("- apiGroups:")]
    assert rules
    for i in rules:
        assert lines[i - 1].strip().startswith("#"), "RBAC rule without a comment above it:\n" + "\n".join(
            lines[i - 3 : i + 3]
        )


def documented_values() -> dict[str, str]:
    """``path: description`` of every value in values.yaml (a ``# --`` comment right above the key).

    Keys without such a comment must be sections (a mapping of documented keys); anything else fails.
    """
    documented: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    skip_below: int | None = None
    previous = ""
    for line in (CHART / "values.yaml").read_text().splitlines():
        m = re.match(r"^(\s*)([A-Za-z0-9_]+):(.*)$", line)
        if m:
            indent, key, rest = len(m.group(1)), m.group(2), m.group(3).strip()
            if skip_below is not None and indent > skip_below:
                previous = line
                continue
            skip_below = None
            while stack and stack[-1][0] >= indent:
                stack.pop()
            path = ".".join([k for _, k in stack] + [key])
            if previous.strip().startswith("# --"):
                documented[path] = previous.strip().removeprefix("# --").strip()
                skip_below = indent
            else:
                assert rest == "" or rest.startswith("#"), f"values.yaml: {path} has no '# --' comment above it"
                stack.append((indent, key))
        elif line.strip() and not line.strip().startswith("#") and skip_below is None:
            raise AssertionError(f"values.yaml: unexpected line outside a documented value: {line!r}")
        if line.strip():
            previous = line
    return documented


def test_every_value_is_documented_in_values_schema_and_readme() -> None:
    documented = documented_values()
    assert len(documented) > 100
    assert all(documented.values())
    sections = {p.rsplit(".", 1)[0] for p in documented if "." in p}
    schema = json.loads((CHART / "values.schema.json").read_text())
    readme = (CHART / "README.md").read_text()
    for path in documented:
        node = schema
        for key in path.split("."):
            assert key in node.get("properties", {}), f"{path} is missing from values.schema.json"
            node = node["properties"][key]
        assert node.get("description"), f"values.schema.json: {path} has no description"
        assert f"`{path}`" in readme, f"{path} is not documented in charts/datamesh/README.md"
    # ...and the README documents nothing that is not a value.
    for path in re.findall(r"^\| `([A-Za-z0-9_.]+)` \|", readme, re.MULTILINE):
        assert path in documented, f"README.md documents {path}, which values.yaml does not have"
    # Every section of the schema is closed, so a misspelled key is refused.
    for section in sections:
        node = schema
        for key in section.split("."):
            node = node["properties"][key]
        assert node.get("additionalProperties") is False, (
            f"values.schema.json: {section} must set additionalProperties: false"
        )


# ==== the real control plane ===================================================================

CLUSTER_NS = "datamesh-chart-test"
PRODUCTS_NS = "datamesh-chart-products"
RBAC_NS = "datamesh-chart-rbac"
RBAC_PRODUCTS_NS = "datamesh-chart-rbac-products"


@pytest.fixture(scope="module")
def cluster_helm(control_plane: Any, helm_binary: Path, helm_home: Path, crd_installed: None) -> Helm:
    # crd_installed: the CRD exists (and is owned by kubectl apply), so helm skips its crds/;
    # either way helm never takes ownership of CRDs in crds/ and never deletes them.
    return Helm(control_plane.helm or helm_binary, helm_home, control_plane.kubeconfig)


def example_product(namespace: str, name: str = "customer-churn") -> dict[str, Any]:
    product = yaml.safe_load((REPO / "examples" / "sales-customer-churn.yaml").read_text())
    product["metadata"]["namespace"] = namespace
    product["metadata"]["name"] = name
    return product


def delete_products(kubectl: Kubectl, namespace: str) -> None:
    """Delete the namespace's products; strip finalizers left by an operator that is gone."""
    kubectl.run("delete", "dataproducts", "--all", "-n", namespace, "--wait=false", check=False)
    try:
        wait_for(
            lambda: not kubectl.json("get", "dataproducts", "-n", namespace)["items"],
            timeout=15,
            what="products deleted",
        )
    except AssertionError:
        for item in kubectl.json("get", "dataproducts", "-n", namespace)["items"]:
            kubectl.run(
                "patch",
                "dataproduct",
                item["metadata"]["name"],
                "-n",
                namespace,
                "--type=merge",
                "-p",
                '{"metadata":{"finalizers":null}}',
                check=False,
            )


def manifest_objects(helm: Helm, release: str, namespace: str) -> tuple[str, list[dict[str, Any]]]:
    text = helm.run("get", "manifest", release, "-n", namespace).stdout
    return text, [d for d in yaml.safe_load_all(text) if d]


def can_i(kubectl: Kubectl, user: str, verb: str, resource: str, namespace: str | None) -> bool:
    ns = ["-n", namespace] if namespace else []
    result = kubectl.run("auth", "can-i", verb, resource, *ns, f"--as={user}", check=False)
    assert result.stdout.strip() in ("yes", "no"), result.stderr
    return result.stdout.strip() == "yes"


RELEASE = "dm-chart"


@pytest.fixture(scope="module")
def installed(cluster_helm: Helm, kubectl: Kubectl) -> Iterator[subprocess.CompletedProcess[str]]:
    """The cluster-mode release of TestReleaseLifecycle (whose last test uninstalls it)."""
    kubectl.run("create", "namespace", PRODUCTS_NS, check=False)
    try:
        yield cluster_helm.run(
            "install",
            RELEASE,
            str(CHART),
            "--namespace",
            CLUSTER_NS,
            "--create-namespace",
            "--set-json",
            'queryService.auth.tokens={"chart-test-token": {"identity": "ci@example.com", "groups": ["qa"]}}',
        )
    finally:
        cluster_helm.run("uninstall", RELEASE, "-n", CLUSTER_NS, "--wait", "--timeout", "60s", check=False)
        delete_products(kubectl, PRODUCTS_NS)
        for ns in (PRODUCTS_NS, CLUSTER_NS):
            kubectl.run("delete", "namespace", ns, "--wait=false", check=False)


@pytest.mark.usefixtures("installed")
class TestReleaseLifecycle:
    """One release in cluster mode: install, RBAC as seen by the API server, upgrade, uninstall (in this order)."""

    release = RELEASE

    def test_install_creates_every_object(
        self, installed: subprocess.CompletedProcess[str], cluster_helm: Helm, kubectl: Kubectl, tmp_path: Path
    ) -> None:
        assert "NOTES:" in installed.stdout and "kubectl get dataproducts -A" in installed.stdout
        status = json.loads(cluster_helm.run("status", self.release, "-n", CLUSTER_NS, "-o", "json").stdout)
        assert status["info"]["status"] == "deployed"
        text, objs = manifest_objects(cluster_helm, self.release, CLUSTER_NS)
        kinds = {o["kind"] for o in objs}
        assert {
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Secret",
            "Service",
            "Deployment",
            "StatefulSet",
            "PodDisruptionBudget",
        } <= kinds
        (tmp_path / "manifest.yaml").write_text(text)
        live = kubectl.json("get", "-f", str(tmp_path / "manifest.yaml"))
        items = live["items"] if live.get("kind") == "List" else [live]
        assert sorted((o["kind"], o["metadata"]["name"]) for o in items) == sorted(
            (o["kind"], o["metadata"]["name"]) for o in objs
        )
        for item in items:
            assert item["metadata"]["annotations"]["meta.helm.sh/release-name"] == self.release
        # The StatefulSet controller made the Qdrant volume claim (nothing can bind it here: no nodes).
        wait_for(
            lambda: kubectl.get("pvc", "storage-dm-chart-datamesh-qdrant-0", CLUSTER_NS), timeout=30, what="Qdrant PVC"
        )
        # The API server accepted the hardened pod templates and the controllers made pods of them.
        pods = wait_for(
            lambda: kubectl.json("get", "pods", "-n", CLUSTER_NS, "-l", f"app.kubernetes.io/instance={self.release}")[
                "items"
            ],
            timeout=30,
            what="pods",
        )
        assert all(p["spec"]["securityContext"]["runAsNonRoot"] for p in pods)

    def test_api_server_refuses_what_the_accounts_must_not_do(self, kubectl: Kubectl) -> None:
        operator = f"system:serviceaccount:{CLUSTER_NS}:dm-chart-datamesh-operator"
        query = f"system:serviceaccount:{CLUSTER_NS}:dm-chart-datamesh-query"
        qdrant = f"system:serviceaccount:{CLUSTER_NS}:dm-chart-datamesh-qdrant"
        allowed = [
            (operator, "watch", "dataproducts.datamesh.io", PRODUCTS_NS),
            (operator, "patch", "dataproducts.datamesh.io/status", PRODUCTS_NS),
            (operator, "create", "deployments.apps", PRODUCTS_NS),
            (operator, "get", "configmaps", PRODUCTS_NS),
            (operator, "update", "configmaps", CLUSTER_NS),
            (operator, "create", "events", PRODUCTS_NS),
            (operator, "create", "leases.coordination.k8s.io", CLUSTER_NS),
            (operator, "get", "leases.coordination.k8s.io/dm-chart-datamesh-operator", CLUSTER_NS),
            (operator, "update", "leases.coordination.k8s.io/dm-chart-datamesh-operator", CLUSTER_NS),
            (query, "watch", "configmaps", CLUSTER_NS),
        ]
        refused = [
            (operator, "get", "secrets", PRODUCTS_NS),
            (operator, "list", "secrets", None),
            (operator, "get", "secrets", CLUSTER_NS),
            (operator, "delete", "namespaces", None),
            (operator, "delete", "dataproducts.datamesh.io", PRODUCTS_NS),
            (operator, "create", "pods", PRODUCTS_NS),
            (operator, "delete", "deployments.apps", PRODUCTS_NS),
            (operator, "update", "configmaps", PRODUCTS_NS),
            (operator, "create", "clusterrolebindings.rbac.authorization.k8s.io", None),
            (operator, "impersonate", "serviceaccounts", CLUSTER_NS),
            # Only its own Lease, only in the platform namespace, never deleted.
            (operator, "update", "leases.coordination.k8s.io/kube-scheduler", CLUSTER_NS),
            (operator, "update", "leases.coordination.k8s.io/dm-chart-datamesh-operator", "kube-system"),
            (operator, "delete", "leases.coordination.k8s.io/dm-chart-datamesh-operator", CLUSTER_NS),
            (operator, "list", "leases.coordination.k8s.io", CLUSTER_NS),
            (query, "get", "leases.coordination.k8s.io/dm-chart-datamesh-operator", CLUSTER_NS),
            (query, "get", "secrets", CLUSTER_NS),
            (query, "list", "configmaps", PRODUCTS_NS),
            (query, "update", "configmaps", CLUSTER_NS),
            (query, "list", "dataproducts.datamesh.io", PRODUCTS_NS),
            (qdrant, "list", "configmaps", CLUSTER_NS),
            (qdrant, "get", "secrets", CLUSTER_NS),
        ]
        wrong = [f"{u} cannot {v} {r} in {n}" for u, v, r, n in allowed if not can_i(kubectl, u, v, r, n)]
        wrong += [f"{u} CAN {v} {r} in {n}" for u, v, r, n in refused if can_i(kubectl, u, v, r, n)]
        assert not wrong, "\n".join(wrong)

    def test_upgrade_with_changed_values_keeps_products_and_data(self, cluster_helm: Helm, kubectl: Kubectl) -> None:
        kubectl.run("apply", "-f", "-", input=yaml.safe_dump(example_product(PRODUCTS_NS)))
        before = kubectl.get("dataproduct", "customer-churn", PRODUCTS_NS)
        pvc = wait_for(
            lambda: kubectl.get("pvc", "storage-dm-chart-datamesh-qdrant-0", CLUSTER_NS), timeout=30, what="Qdrant PVC"
        )
        sts = kubectl.get("statefulset", "dm-chart-datamesh-qdrant", CLUSTER_NS)
        crd = kubectl.json("get", "crd", "dataproducts.datamesh.io")

        cluster_helm.run(
            "upgrade",
            self.release,
            str(CHART),
            "--namespace",
            CLUSTER_NS,
            "--reuse-values",
            "--set",
            "queryService.replicas=3",
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "queryService.podDisruptionBudget.enabled=false",
            "--set",
            "operator.slaCheckSeconds=30",
        )
        status = json.loads(cluster_helm.run("status", self.release, "-n", CLUSTER_NS, "-o", "json").stdout)
        assert (status["version"], status["info"]["status"]) == (2, "deployed")
        assert kubectl.get("deployment", "dm-chart-datamesh-query", CLUSTER_NS)["spec"]["replicas"] == 3
        operator = kubectl.get("deployment", "dm-chart-datamesh-operator", CLUSTER_NS)
        assert env_of(operator["spec"]["template"]["spec"]["containers"][0])["DATAMESH_SLA_CHECK_SECONDS"] == "30"
        policies = {o["metadata"]["name"] for o in kubectl.json("get", "networkpolicies", "-n", CLUSTER_NS)["items"]}
        assert policies == {"dm-chart-datamesh-qdrant", "dm-chart-datamesh-operator", "dm-chart-datamesh-query"}
        assert kubectl.get("poddisruptionbudget", "dm-chart-datamesh-query", CLUSTER_NS) is None, (
            "a disabled object is removed"
        )
        assert kubectl.get("secret", "dm-chart-datamesh-query-tokens", CLUSTER_NS), "--reuse-values kept the tokens"

        after = kubectl.get("dataproduct", "customer-churn", PRODUCTS_NS)
        assert after and after["metadata"]["uid"] == before["metadata"]["uid"] and after["spec"] == before["spec"]
        assert kubectl.get("pvc", pvc["metadata"]["name"], CLUSTER_NS)["metadata"]["uid"] == pvc["metadata"]["uid"]
        assert (
            kubectl.get("statefulset", "dm-chart-datamesh-qdrant", CLUSTER_NS)["metadata"]["uid"]
            == sts["metadata"]["uid"]
        )
        assert kubectl.json("get", "crd", "dataproducts.datamesh.io")["metadata"]["uid"] == crd["metadata"]["uid"]

    def test_uninstall_leaves_crd_products_and_volume(
        self, cluster_helm: Helm, kubectl: Kubectl, tmp_path: Path
    ) -> None:
        text, objs = manifest_objects(cluster_helm, self.release, CLUSTER_NS)
        product = kubectl.get("dataproduct", "customer-churn", PRODUCTS_NS)
        assert product is not None
        cluster_helm.run("uninstall", self.release, "-n", CLUSTER_NS, "--wait", "--timeout", "60s")
        (tmp_path / "manifest.yaml").write_text(text)
        left = kubectl.run(
            "get", "-f", str(tmp_path / "manifest.yaml"), "--ignore-not-found", "-o", "name"
        ).stdout.split()
        assert not left, f"left behind by helm uninstall: {left}"
        assert len(objs) > 15
        assert kubectl.json("get", "crd", "dataproducts.datamesh.io")["metadata"]["name"] == "dataproducts.datamesh.io"
        assert (
            kubectl.get("dataproduct", "customer-churn", PRODUCTS_NS)["metadata"]["uid"] == product["metadata"]["uid"]
        )
        assert kubectl.get("pvc", "storage-dm-chart-datamesh-qdrant-0", CLUSTER_NS), (
            "the Qdrant volume outlives the release"
        )


# ==== RBAC, enforced by the API server, with the operator running as the chart's account =========


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token_kubeconfig(admin_kubeconfig: Path, token: str, path: Path) -> Path:
    """A kubeconfig for the same API server (server and CA of the admin's) with a bearer token."""
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    cluster = admin["clusters"][0]["cluster"]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "cluster",
                        "cluster": {
                            "server": cluster["server"],
                            "certificate-authority-data": cluster["certificate-authority-data"],
                        },
                    }
                ],
                "users": [{"name": "sa", "user": {"token": token}}],
                "contexts": [{"name": "sa", "context": {"cluster": "cluster", "user": "sa"}}],
                "current-context": "sa",
            }
        )
    )
    path.chmod(0o600)
    return path


def test_scale_out_release_is_accepted_and_each_shard_may_use_only_leases_of_the_release(
    cluster_helm: Helm, kubectl: Kubectl
) -> None:
    """ci/scale-values.yaml installed on the API server: every object accepted, and each shard's Lease usable."""
    namespace, release = "datamesh-chart-scale", "dm-scale"
    try:
        cluster_helm.run(
            "install",
            release,
            str(CHART),
            "-n",
            namespace,
            "--create-namespace",
            "-f",
            str(CHART / "ci" / "scale-values.yaml"),
        )
        _, objs = manifest_objects(cluster_helm, release, namespace)
        missing = [
            f"{o['kind']}/{o['metadata']['name']}"
            for o in objs
            if "namespace" in o["metadata"] and kubectl.get(o["kind"], o["metadata"]["name"], namespace) is None
        ]
        assert not missing, missing
        sts = kubectl.get("statefulset", "dm-scale-datamesh-qdrant", namespace)
        assert sts and sts["spec"]["replicas"] == 3 and sts["spec"]["podManagementPolicy"] == "Parallel"
        pdb = kubectl.get("poddisruptionbudget", "dm-scale-datamesh-qdrant", namespace)
        assert pdb and pdb["spec"]["minAvailable"] == 2
        # Both shards' pods run as the operator's account: it may renew either shard's Lease, no other.
        operator = f"system:serviceaccount:{namespace}:dm-scale-datamesh-operator"
        for shard in ("a", "b"):
            lease = f"leases.coordination.k8s.io/dm-scale-datamesh-operator-{shard}"
            assert can_i(kubectl, operator, "update", lease, namespace), lease
        assert not can_i(
            kubectl, operator, "update", "leases.coordination.k8s.io/dm-scale-datamesh-operator", namespace
        )
    finally:
        cluster_helm.run("uninstall", release, "-n", namespace, "--timeout", "60s", check=False)
        kubectl.run("delete", "namespace", namespace, "--wait=false", check=False)


def test_operator_with_the_charts_account_reconciles_an_example_and_nothing_more(
    cluster_helm: Helm, kubectl: Kubectl, control_plane: Any, tmp_path: Path
) -> None:
    release = "dm-rbac"
    account = "dm-rbac-datamesh-operator"
    finalizer = "chart-test.datamesh.io/finalizer"  # not the in-process test operator's, if one runs
    for ns in (RBAC_NS, RBAC_PRODUCTS_NS):
        kubectl.run("create", "namespace", ns, check=False)
    proc: subprocess.Popen[bytes] | None = None
    log = tmp_path / "operator.log"
    try:
        cluster_helm.run(
            "install",
            release,
            str(CHART),
            "--namespace",
            RBAC_NS,
            "--set",
            f"operator.watchNamespaces={{{RBAC_PRODUCTS_NS}}}",
        )
        token = kubectl.run("create", "token", account, "-n", RBAC_NS, "--duration=1h").stdout.strip()
        sa_kubeconfig = token_kubeconfig(control_plane.kubeconfig, token, tmp_path / "sa-kubeconfig")
        sa = Kubectl(kubectl.binary, sa_kubeconfig)

        # The API server's own authorization, for the token itself: things it must not do.
        for args in (
            ["get", "secrets", "-n", RBAC_PRODUCTS_NS],
            ["get", "secrets", "-n", "default"],
            ["get", "configmaps", "-n", "kube-system"],
            ["get", "leases", "-n", RBAC_NS],
            ["delete", "namespace", RBAC_PRODUCTS_NS, "--dry-run=server"],
            ["get", "dataproducts", "-n", "default", "customer-churn"],
            ["get", "deployments", "-n", "default"],
            ["create", "configmap", "x", "-n", "default", "--dry-run=server"],
        ):
            result = sa.run(*args, check=False)
            assert result.returncode != 0 and "forbidden" in result.stderr.lower(), (
                f"the operator's token may {' '.join(args)}: {result.stdout}{result.stderr}"
            )
        for verb, resource, ns in (
            ("get", "secrets", RBAC_PRODUCTS_NS),
            ("list", "secrets", RBAC_NS),
            ("create", "deployments.apps", "default"),
            ("patch", "dataproducts.datamesh.io", "default"),
            ("delete", "dataproducts.datamesh.io", RBAC_PRODUCTS_NS),
            ("update", "configmaps", RBAC_PRODUCTS_NS),
            ("create", "pods", RBAC_PRODUCTS_NS),
        ):
            result = sa.run("auth", "can-i", verb, resource, "-n", ns, check=False)
            assert result.stdout.strip() == "no", f"the operator's token can {verb} {resource} in {ns}"

        # The operator, as a subprocess that only has the token: embedded Qdrant, this one namespace.
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATAMESH_", "KUBERNETES_"))}
        env.update(
            KUBECONFIG=str(sa_kubeconfig),
            DATAMESH_PLATFORM_NAMESPACE=RBAC_NS,
            DATAMESH_METRICS_PORT="0",
            DATAMESH_FINALIZER=finalizer,
            DATAMESH_ANNOTATION_PREFIX="chart-test.datamesh.io",
            DATAMESH_CATALOG_FLUSH_SECONDS="0.2",
            DATAMESH_RETRY_BASE_SECONDS="0.5",
            DATAMESH_RETRY_MAX_SECONDS="4",
            # As the chart's Deployment sets them: the election runs on the Role the chart grants.
            POD_NAME="dm-rbac-operator-0",
            DATAMESH_LEADER_ELECTION_LEASE_NAME="dm-rbac-datamesh-operator",
        )
        script = Path(sys.executable).with_name("datamesh")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "datamesh"]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    *command,
                    "operator",
                    "--namespace",
                    RBAC_PRODUCTS_NS,
                    "--liveness",
                    f"http://127.0.0.1:{port}/healthz",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
            )

        def alive(what: str) -> str:
            assert proc is not None
            if proc.poll() is not None:
                raise AssertionError(
                    f"the operator exited ({proc.returncode}) while waiting for {what}:\n{log.read_text()[-4000:]}"
                )
            return what

        def healthy() -> bool:
            alive("its liveness endpoint")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(healthy, timeout=60, what="the operator's /healthz")
        kubectl.run("apply", "-f", "-", input=yaml.safe_dump(example_product(RBAC_PRODUCTS_NS)))

        def ready() -> dict[str, Any] | None:
            # Ready, with the subprocess' finalizer and kopf's record of the handled spec under
            # the subprocess' own annotation prefix: both written with the chart's account.
            alive("Ready")
            product = kubectl.get("dataproduct", "customer-churn", RBAC_PRODUCTS_NS)
            if not product or (product.get("status") or {}).get("phase") != "Ready":
                return None
            meta = product["metadata"]
            handled = "chart-test.datamesh.io/last-handled-configuration" in (meta.get("annotations") or {})
            return product if finalizer in meta.get("finalizers", []) and handled else None

        try:
            product = wait_for(ready, timeout=60, what="customer-churn Ready, finalized and handled by the subprocess")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- operator log ---\n{log.read_text()[-4000:]}") from None
        assert product["status"]["records"] == 25

        # Only this subprocess writes the catalog of the chart's platform namespace.
        def cataloged() -> dict[str, Any] | None:
            alive("the catalog entry")
            for cm in kubectl.json("get", "configmaps", "-n", RBAC_NS, "-l", f"{CATALOG_LABEL}=true")["items"]:
                entry = decode_entries(cm.get("data") or {}).get(entry_key(RBAC_PRODUCTS_NS, "customer-churn"))
                if entry is not None and entry.phase == "Ready":
                    return entry.model_dump()
            return None

        entry = wait_for(cataloged, timeout=30, what="the product's Ready entry in the chart's catalog")
        assert entry["records"] == 25 and entry["domain"] == "sales"
        # It reconciled as the elected leader, holding the chart's Lease with the chart's account.
        lease = kubectl.get("lease", "dm-rbac-datamesh-operator", RBAC_NS)
        assert lease and lease["spec"]["holderIdentity"].startswith("dm-rbac-operator-0_"), lease

        # Deleting the product runs the subprocess' finalizer (patch with the same account).
        kubectl.run("delete", "dataproduct", "customer-churn", "-n", RBAC_PRODUCTS_NS, "--wait=false")
        wait_for(
            lambda: alive("deletion") and kubectl.get("dataproduct", "customer-churn", RBAC_PRODUCTS_NS) is None,
            timeout=30,
            what="the product to be finalized and gone",
        )

        text = log.read_text()
        # kopf logs every refused request; a sufficient role leaves none.
        assert not re.search("forbidden", text, re.IGNORECASE), f"the operator was refused something:\n{text[-4000:]}"
        assert "Traceback" not in text, text[-4000:]
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        delete_products(kubectl, RBAC_PRODUCTS_NS)
        cluster_helm.run("uninstall", release, "-n", RBAC_NS, "--wait", "--timeout", "60s", check=False)
        for ns in (RBAC_PRODUCTS_NS, RBAC_NS):
            kubectl.run("delete", "namespace", ns, "--wait=false", check=False)
