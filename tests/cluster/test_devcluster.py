"""The real control plane from datamesh.devcluster: versions, TLS, garbage collection, restarts."""

from __future__ import annotations

import base64
import json
import re
import ssl
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from datamesh_dev import devcluster

Cluster = devcluster.ControlPlane | devcluster.ExternalCluster
GOMOD = Path(__file__).resolve().parents[2] / "hack" / "tools" / "k8s" / "go.mod"


def kubectl(cluster: Cluster, *args: str, input: str | None = None, timeout: float = 60) -> str:
    proc = subprocess.run(cluster.kubectl_cmd(*args), input=input, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"kubectl {' '.join(args)} failed:\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def pinned_version() -> str:
    m = re.search(r"^\s*(?:require\s+)?k8s\.io/kubernetes\s+(v\S+)", GOMOD.read_text(), re.MULTILINE)
    assert m, f"{GOMOD} does not pin k8s.io/kubernetes"
    return m.group(1)


@pytest.fixture
def namespace(control_plane: Cluster) -> Iterator[str]:
    name = f"devcluster-{uuid.uuid4().hex[:8]}"
    kubectl(control_plane, "create", "namespace", name)
    yield name
    kubectl(control_plane, "delete", "namespace", name, "--wait=false")


def test_pinned_version_helper_reads_go_mod(pinned_version: str) -> None:
    assert devcluster.pinned_kubernetes_version() == pinned_version


def test_version_endpoint_reports_pinned_version(control_plane: Cluster, pinned_version: str) -> None:
    info = json.loads(kubectl(control_plane, "get", "--raw", "/version"))
    assert info["gitVersion"] == pinned_version
    assert info["gitTreeState"] == "clean"


def test_serving_cert_verifies_against_kubeconfig_ca(
    control_plane: Cluster, pinned_version: str, tmp_path: Path
) -> None:
    # Full hostname + chain verification, as client libraries (kopf, kubernetes_asyncio) do it.
    config = yaml.safe_load(control_plane.kubeconfig.read_text())
    cluster = config["clusters"][0]["cluster"]
    ca = tmp_path / "ca.crt"
    ca.write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
    ctx = ssl.create_default_context(cafile=str(ca))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
    # /version is readable anonymously (system:public-info-viewer), so no client cert needed.
    with opener.open(f"{cluster['server']}/version", timeout=10) as resp:
        assert json.load(resp)["gitVersion"] == pinned_version


def test_kubectl_version_matches_server(control_plane: Cluster, pinned_version: str) -> None:
    info = json.loads(kubectl(control_plane, "version", "-o", "json"))
    assert info["clientVersion"]["gitVersion"] == pinned_version
    assert info["serverVersion"]["gitVersion"] == pinned_version


def test_garbage_collector_deletes_dependents(control_plane: Cluster, namespace: str) -> None:
    kubectl(control_plane, "-n", namespace, "create", "configmap", "owner", "--from-literal=a=1")
    uid = kubectl(control_plane, "-n", namespace, "get", "configmap", "owner", "-o", "jsonpath={.metadata.uid}").strip()
    assert uid
    dependent = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "dependent",
            "namespace": namespace,
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid, "blockOwnerDeletion": False}
            ],
        },
        "data": {"b": "2"},
    }
    kubectl(control_plane, "apply", "-f", "-", input=json.dumps(dependent))
    kubectl(control_plane, "-n", namespace, "delete", "configmap", "owner")

    deadline = time.monotonic() + 60
    while kubectl(
        control_plane, "-n", namespace, "get", "configmap", "dependent", "--ignore-not-found", "-o", "name"
    ).strip():
        assert time.monotonic() < deadline, "the garbage collector left the dependent ConfigMap"
        time.sleep(0.5)


def test_restart_apiserver_keeps_state(control_plane: Cluster, namespace: str) -> None:
    if isinstance(control_plane, devcluster.ExternalCluster):
        pytest.skip("an external cluster's API server cannot be restarted from here")
    kubectl(control_plane, "-n", namespace, "create", "configmap", "survivor", "--from-literal=a=1")
    started = time.monotonic()
    control_plane.restart_apiserver()
    assert time.monotonic() - started < 120
    data = json.loads(kubectl(control_plane, "-n", namespace, "get", "configmap", "survivor", "-o", "json"))["data"]
    assert data == {"a": "1"}
    # The controller manager reconnected: a namespace made after the restart gets its default
    # ServiceAccount from kube-controller-manager's serviceaccount controller.
    fresh = f"{namespace}-after"
    kubectl(control_plane, "create", "namespace", fresh)
    try:
        deadline = time.monotonic() + 60
        while not kubectl(
            control_plane, "-n", fresh, "get", "serviceaccount", "default", "--ignore-not-found", "-o", "name"
        ).strip():
            assert time.monotonic() < deadline, "no default ServiceAccount after the restart"
            time.sleep(0.5)
    finally:
        kubectl(control_plane, "delete", "namespace", fresh, "--wait=false")
