"""Ingestion Jobs: the Job that ingests a product, and what a Job and its pods say about how it went.

Plain functions over plain objects (the API server's JSON), shared by the Kubernetes adapter and
the tests. The Jobs live in the platform namespace, beside the store's volume; a product in
another namespace cannot own them, so labels name the product and the operator cleans them up.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from datamesh.core.children import MANAGED_BY
from datamesh.core.ports import JobPhase

ROLE = "ingest"
PRODUCT_NAMESPACE_LABEL = "datamesh.io/product-namespace"
PRODUCT_NAME_LABEL = "datamesh.io/product-name"
EXIT_PERMANENT = 2  # `datamesh ingest` exits 2 when retrying cannot help: the pod failure policy fails the Job


@dataclass(frozen=True)
class JobPolicy:
    """How long and how often an ingestion Job may try (settings.ingest_job_*)."""

    backoff_limit: int = 2
    deadline_seconds: int = 6 * 3600
    ttl_seconds: int = 86400


def job_labels(namespace: str, name: str) -> dict[str, str]:
    """The labels of a product's ingestion Jobs (and their pods)."""
    return {
        "app.kubernetes.io/name": "datamesh-ingest",
        "app.kubernetes.io/component": ROLE,
        "app.kubernetes.io/part-of": "datamesh",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        PRODUCT_NAMESPACE_LABEL: namespace[:63],
        PRODUCT_NAME_LABEL: name[:63],
    }


def product_of_job(job: Mapping[str, Any]) -> tuple[str, str] | None:
    """The product (namespace, name) an ingestion Job ingests, from its annotation."""
    annotation = ((job.get("metadata") or {}).get("annotations") or {}).get("datamesh.io/product", "")
    namespace, _, name = str(annotation).partition("/")
    return (namespace, name) if namespace and name else None


def ingest_job(
    platform_namespace: str,
    namespace: str,
    name: str,
    job: str,
    template: Mapping[str, Any],
    policy: JobPolicy,
) -> dict[str, Any]:
    """The Job running ``datamesh ingest NAMESPACE/NAME`` in the pod ``template`` (a pod template: metadata, spec)."""
    pod = copy.deepcopy(dict(template))
    spec = pod.setdefault("spec", {})
    containers = spec.get("containers") or []
    if not containers:
        raise ValueError("the ingestion Jobs' pod template has no container")
    containers[0]["args"] = ["ingest", f"{namespace}/{name}"]
    # A crash before the report is written still tells why, from the log's last lines.
    containers[0].setdefault("terminationMessagePolicy", "FallbackToLogsOnError")
    spec["restartPolicy"] = "Never"
    metadata = pod.setdefault("metadata", {})
    metadata["labels"] = {**(metadata.get("labels") or {}), **job_labels(namespace, name)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job,
            "namespace": platform_namespace,
            "labels": job_labels(namespace, name),
            "annotations": {"datamesh.io/product": f"{namespace}/{name}"},
        },
        "spec": {
            "backoffLimit": policy.backoff_limit,
            "activeDeadlineSeconds": policy.deadline_seconds,
            "ttlSecondsAfterFinished": policy.ttl_seconds,
            # Bad data or a bad spec fails the Job at once; anything else is retried with Kubernetes' backoff.
            "podFailurePolicy": {
                "rules": [
                    {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [EXIT_PERMANENT]}},
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "template": pod,
        },
    }


def job_phase(job: Mapping[str, Any]) -> tuple[JobPhase, str]:
    """Whether a Job runs, succeeded or failed, and (failed) why in Kubernetes' words."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Complete":
            return "succeeded", ""
        if condition.get("type") == "Failed":
            reason, message = condition.get("reason") or "Failed", condition.get("message") or ""
            return "failed", f"{reason}: {message}".rstrip(": ")
    return "running", ""


def last_report(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """The termination message of the Job's pod that ended last (its report, or its log's last lines)."""
    ended: list[tuple[str, str]] = []
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated") or {}
            if terminated.get("message"):
                ended.append((str(terminated.get("finishedAt") or ""), str(terminated["message"])))
    return max(ended)[1] if ended else None
