"""The inference children a product should have, their availability, and drift from them."""

from __future__ import annotations

import copy
from typing import Any

from datamesh.core.children import RuntimeDefaults, deployment_available, desired_objects, drifted
from datamesh.resource.models import Inference

DEFAULTS = RuntimeDefaults("registry.example/datamesh:1.2.3", "100m", "256Mi", "1Gi")


def objects(**spec: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    inference = Inference.model_validate({"enabled": True, "model": "builtin:ngram-384", **spec})
    deployment, service = desired_objects("sales", "customer-churn", "uid-1", inference, DEFAULTS)
    return deployment, service


def test_the_deployment_runs_the_builtin_runtime_hardened_and_owned_by_the_product() -> None:
    deployment, service = objects(replicas=2)
    assert deployment["metadata"]["name"] == service["metadata"]["name"] == "customer-churn-inference"
    (owner,) = deployment["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "datamesh.io/v1alpha1",
        "kind": "DataProduct",
        "name": "customer-churn",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] == 2 and container["image"] == DEFAULTS.image
    assert container["command"] == ["datamesh", "inference-server"] and "builtin:ngram-384" in container["args"]
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    assert container["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
    assert not pod["automountServiceAccountToken"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["selector"] == selector and service["spec"]["ports"][0]["port"] == 8080


def test_a_foreign_runtime_keeps_its_own_arguments_and_the_specs_image_and_resources() -> None:
    deployment, _ = objects(runtime="tei", image="ghcr.io/huggingface/tei:1", resources={"limits": {"cpu": "2"}})
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "args" not in container and "command" not in container
    assert container["image"] == "ghcr.io/huggingface/tei:1" and container["resources"] == {"limits": {"cpu": "2"}}


def test_availability_counts_ready_replicas_and_zero_is_intended() -> None:
    assert deployment_available(None) == (False, "the Deployment does not exist")
    assert deployment_available({"spec": {"replicas": 2}, "status": {}}) == (False, "0/2 replicas available yet")
    assert deployment_available({"spec": {"replicas": 2}, "status": {"availableReplicas": 1}})[0]
    assert deployment_available({"spec": {"replicas": 0}}) == (True, "scaled to zero replicas")


def test_drift_ignores_what_the_server_adds_and_sees_what_a_human_changed() -> None:
    deployment, service = objects()
    live = copy.deepcopy(deployment)
    live["metadata"]["uid"] = "abc"
    live["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] = "/dev/termination-log"
    live["status"] = {"availableReplicas": 1}
    assert not drifted(deployment, live)
    scaled = copy.deepcopy(live)
    scaled["spec"]["replicas"] = 5
    assert drifted(deployment, scaled)
    retagged = copy.deepcopy(live)
    retagged["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:latest"
    assert drifted(deployment, retagged)
    sidecar = copy.deepcopy(live)
    sidecar["spec"]["template"]["spec"]["containers"].append({"name": "extra"})
    assert drifted(deployment, sidecar)
    relabelled = copy.deepcopy(service)
    relabelled["spec"]["selector"] = {"app": "other"}
    assert drifted(service, relabelled)
