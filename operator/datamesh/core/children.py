"""A product's children: the inference Deployment and Service it should have, and drift from them.

Plain builders over the spec, so the kopf handlers, the drift repair and the unit tests agree on
exactly one desired state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from datamesh.resource.models import API_VERSION, KIND, Inference, InferenceRuntime

MANAGED_BY = "datamesh-operator"
COMPONENT = "inference"

# Default container command per runtime; TEI and OpenAI-compatible images bring their own.
_RUNTIME_COMMAND = {InferenceRuntime.builtin: ["datamesh", "inference-server"]}


def inference_name(product: str) -> str:
    """Name of a product's inference Deployment and Service."""
    return f"{product}-inference"[:63].rstrip("-")


def service_url(namespace: str, product: str, port: int) -> str:
    """In-cluster URL of an operator-deployed inference runtime."""
    return f"http://{inference_name(product)}.{namespace}.svc:{port}"


def labels(product: str) -> dict[str, str]:
    """Kubernetes recommended labels of a product's inference objects."""
    return {
        "app.kubernetes.io/name": "datamesh-inference",
        "app.kubernetes.io/instance": inference_name(product),
        "app.kubernetes.io/component": COMPONENT,
        "app.kubernetes.io/part-of": "datamesh",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "datamesh.io/product": product,
    }


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    """Makes the DataProduct the controller owner, so deleting it garbage-collects the child."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


@dataclass(frozen=True)
class RuntimeDefaults:
    """What an inference container gets when the spec does not say (from the operator's settings)."""

    image: str
    cpu_request: str
    memory_request: str
    memory_limit: str


def desired_objects(
    namespace: str, product: str, uid: str, spec: Inference, defaults: RuntimeDefaults
) -> list[dict[str, Any]]:
    """The Deployment and Service that serve ``spec.model`` for a product."""
    name = inference_name(product)
    meta = {
        "name": name,
        "namespace": namespace,
        "labels": labels(product),
        "ownerReferences": [owner_reference(product, uid)],
    }
    selector = {"app.kubernetes.io/instance": name, "app.kubernetes.io/component": COMPONENT}
    resources = (
        spec.resources.wire()
        if spec.resources
        else {
            "requests": {"cpu": defaults.cpu_request, "memory": defaults.memory_request},
            "limits": {"memory": defaults.memory_limit},
        }
    )
    command = spec.command or _RUNTIME_COMMAND.get(InferenceRuntime(spec.runtime))
    container: dict[str, Any] = {
        "name": "runtime",
        "image": spec.image or defaults.image,
        "args": ["--host", "0.0.0.0", "--port", str(spec.port), "--model", spec.model or ""],
        "ports": [{"name": "http", "containerPort": spec.port}],
        "env": [{"name": "DATAMESH_INFERENCE_MODEL", "value": spec.model or ""}],
        "resources": resources,
        # The root filesystem is read-only; the runtime's caches and temp files go here.
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 10},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 20, "failureThreshold": 6},
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if command:
        container["command"] = command
    if InferenceRuntime(spec.runtime) is not InferenceRuntime.builtin:
        container.pop("args")  # foreign images take their model from env or their own args
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {**labels(product), **selector}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {"selector": selector, "ports": [{"name": "http", "port": spec.port, "targetPort": "http"}]},
    }
    return [deployment, service]


def deployment_available(deployment: Mapping[str, Any] | None) -> tuple[bool, str]:
    """Whether a Deployment serves traffic, and why not."""
    if deployment is None:
        return False, "the Deployment does not exist"
    wanted = deployment.get("spec", {}).get("replicas", 1)
    status = deployment.get("status") or {}
    available = status.get("availableReplicas") or 0
    if wanted == 0:
        return True, "scaled to zero replicas"
    if available >= 1:
        return True, f"{available}/{wanted} replicas available"
    return False, f"0/{wanted} replicas available yet"


def drifted(desired: Mapping[str, Any], actual: Mapping[str, Any]) -> bool:
    """Whether a field the operator sets differs in the live object (fields it does not set are ignored)."""
    for key, value in desired.items():
        if isinstance(value, Mapping):
            live = actual.get(key)
            if not isinstance(live, Mapping) or drifted(value, live):
                return True
        elif isinstance(value, list):
            live = actual.get(key)
            if not isinstance(live, list) or len(live) != len(value):
                return True
            for want, have in zip(value, live, strict=True):
                if isinstance(want, Mapping) and isinstance(have, Mapping):
                    if drifted(want, have):
                        return True
                elif want != have:
                    return True
        elif actual.get(key) != value:
            return True
    return False
