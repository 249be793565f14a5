"""Pods run on simulated nodes: kube-scheduler binds them to a kwok Node, kwok makes them Ready.

No container runs (the image is never pulled): these check the workload controllers' view, i.e.
that a Deployment becomes Available, scales to zero and back, and that a Job completes.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.harness import Kubectl, wait_for

NAMESPACE = "kwok-nodes"
IMAGE = "registry.k8s.io/pause:3.10"


@pytest.fixture(scope="module")
def namespace(kubectl: Kubectl, fake_node: str) -> str:
    kubectl.run("create", "namespace", NAMESPACE, check=False)
    # Pods are admitted only once the namespace's default ServiceAccount exists.
    wait_for(lambda: kubectl.get("serviceaccount", "default", NAMESPACE), 30, what="the default ServiceAccount")
    return NAMESPACE


def _condition(obj: dict[str, Any] | None, type_: str) -> bool:
    conds = ((obj or {}).get("status") or {}).get("conditions") or []
    return any(c["type"] == type_ and c["status"] == "True" for c in conds)


def _pods(kubectl: Kubectl, selector: str) -> list[dict[str, Any]]:
    return kubectl.json("get", "pods", "-n", NAMESPACE, "-l", selector)["items"]


def _deployment(name: str, replicas: int) -> str:
    return json.dumps(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {
                        "containers": [
                            {
                                "name": "main",
                                "image": IMAGE,
                                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                            }
                        ]
                    },
                },
            },
        }
    )


def _available(kubectl: Kubectl, name: str, replicas: int) -> bool:
    d = kubectl.get("deployment", name, NAMESPACE) or {}
    st = d.get("status") or {}
    return (
        st.get("observedGeneration") == d["metadata"]["generation"]
        and st.get("availableReplicas", 0) == replicas
        and st.get("replicas", 0) == replicas
        and _condition(d, "Available")
    )


def test_deployment_becomes_available_and_scales(kubectl: Kubectl, namespace: str, fake_node: str) -> None:
    name = "pause"
    t0 = time.monotonic()
    kubectl.run("apply", "-f", "-", input=_deployment(name, 3))
    wait_for(lambda: _available(kubectl, name, 3), 60, 0.1, what="3 available replicas")
    took = time.monotonic() - t0
    pods = _pods(kubectl, f"app={name}")
    assert len(pods) == 3
    for pod in pods:
        assert pod["spec"]["nodeName"] == fake_node
        assert pod["status"]["phase"] == "Running"
        assert pod["status"]["podIP"].startswith("10.244.")
    print(f"\nDeployment of 3 Available in {took:.2f} s")

    kubectl.run("scale", "deployment", name, "-n", NAMESPACE, "--replicas=0")
    wait_for(
        lambda: _available(kubectl, name, 0) and not _pods(kubectl, f"app={name}"),
        60,
        0.1,
        what="the Deployment scaled to 0 with its pods gone",
    )

    kubectl.run("scale", "deployment", name, "-n", NAMESPACE, "--replicas=3")
    wait_for(lambda: _available(kubectl, name, 3), 60, 0.1, what="3 available replicas again")

    kubectl.run("delete", "deployment", name, "-n", NAMESPACE, "--wait=true")
    wait_for(lambda: not _pods(kubectl, f"app={name}"), 60, 0.1, what="the pods deleted")


def test_job_completes(kubectl: Kubectl, namespace: str, fake_node: str) -> None:
    name = "once"
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "completions": 2,
            "parallelism": 2,
            "backoffLimit": 0,
            "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": IMAGE}]}},
        },
    }
    kubectl.run("apply", "-f", "-", input=json.dumps(job))
    done = wait_for(
        lambda: (lambda j: j if _condition(j, "Complete") else None)(kubectl.get("job", name, NAMESPACE)),
        60,
        0.1,
        what="the Job to complete",
    )
    assert done["status"]["succeeded"] == 2
    assert not _condition(done, "Failed")

    kubectl.run("delete", "job", name, "-n", NAMESPACE, "--cascade=foreground", "--wait=true")
    wait_for(lambda: not _pods(kubectl, f"job-name={name}"), 60, 0.1, what="the Job's pods deleted")


def test_node_lease_is_renewed(kubectl: Kubectl, fake_node: str) -> None:
    lease = wait_for(lambda: kubectl.get("lease", fake_node, "kube-node-lease"), 30, what="the fake Node's Lease")
    assert lease["spec"]["holderIdentity"]
    assert lease["spec"].get("leaseDurationSeconds") == 40
    node = kubectl.json("get", "node", fake_node)
    assert node["status"]["allocatable"]["cpu"] == "32"
    assert node["status"]["capacity"]["pods"] == "110"
