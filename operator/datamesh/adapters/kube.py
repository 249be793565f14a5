"""The Kubernetes API calls the operator makes itself (kopf handles watching and status).

Also the Kubernetes implementations of two ports: catalog shards as ConfigMaps, and inference
runtimes as a Deployment + Service per product.

Every call has a timeout; conflicts and server errors are the caller's to retry.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import aiohttp
import orjson
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.client.rest import RESTResponse

from datamesh.core.children import RuntimeDefaults, deployment_available, desired_objects, inference_name, service_url
from datamesh.core.conditions import Check, ConditionType
from datamesh.core.election import LeaseConflict, LeaseRecord
from datamesh.core.jobs import JobPolicy, ingest_job, job_labels, job_phase, last_report
from datamesh.core.ports import CatalogUnavailable, Conflict, JobState, Shard
from datamesh.resource.catalog import CATALOG_LABEL
from datamesh.resource.models import Inference

REQUEST_TIMEOUT = 15
T = TypeVar("T")


async def api_client() -> client.ApiClient:
    """An API client from the in-cluster service account, or ``KUBECONFIG`` / ~/.kube/config."""
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        return client.ApiClient()
    configuration = client.Configuration()
    # The library reads KUBECONFIG once at import; read it now so a later export counts.
    await config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
    return client.ApiClient(configuration)


def api_error(exc: BaseException) -> str:
    """What went wrong with an API call, in one line: the status and the API server's own message.

    An ApiException's text is its headers and body on many lines, which cut to an Event's length
    often lost the cause itself; a timeout's text is empty.
    """
    if isinstance(exc, ApiException):
        try:
            message = json.loads(exc.body or "{}").get("message")
        except (ValueError, AttributeError):
            message = None
        detail = message or " ".join(str(exc.body or "").split())[:300]
        return f"HTTP {exc.status} {exc.reason}" + (f": {detail}" if detail else "")
    if isinstance(exc, TimeoutError):
        return f"no answer from the API server within {REQUEST_TIMEOUT} s"
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


async def _catalog_call(what: str, call: Awaitable[T]) -> T:
    """A catalog API call whose failure names the shard and the cause (a 409 is a Conflict to retry)."""
    try:
        return await call
    except ApiException as exc:
        if exc.status == 409:
            raise Conflict(what) from exc
        raise CatalogUnavailable(f"{what}: {api_error(exc)}") from exc
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise CatalogUnavailable(f"{what}: {api_error(exc)}") from exc


async def _raw(call: Awaitable[Any]) -> bytes:
    """The body of a call made with ``_preload_content=False``, its status checked; not parsed here.

    Catalog shards are up to 800 kB: the client's own parsing into a V1ConfigMap took 15 ms a shard
    (orjson: 4 ms), and the answer to a write, the whole shard again, is not needed at all.
    """
    response = await call
    try:
        body: bytes = await response.read()  # read whole: a connection left mid-answer is closed, not reused
    finally:
        response.release()
    if not 200 <= response.status <= 299:
        # As the library's own rest.py raises it (its type hints name the bare aiohttp response).
        raise ApiException(http_resp=RESTResponse(response, body))  # type: ignore[arg-type]
    return body


async def _none_if_missing(call: Awaitable[T]) -> T | None:
    """The call's result, or None when the API server answers 404."""
    try:
        return await call
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


class Kube:
    """The typed API groups the operator uses, over one connection pool."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    async def close(self) -> None:
        await self.api.close()

    async def read_config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A ConfigMap as the JSON-shaped dict the API server sent, or None when it does not exist."""
        body = await _none_if_missing(
            _raw(
                self.core.read_namespaced_config_map(
                    name, namespace, _request_timeout=REQUEST_TIMEOUT, _preload_content=False
                )
            )
        )
        return None if body is None else cast(dict[str, Any], orjson.loads(body))

    async def read_product(
        self, group: str, version: str, plural: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        """One custom object, or None when it does not exist."""
        result = await _none_if_missing(
            self.custom.get_namespaced_custom_object(
                group, version, namespace, plural, name, _request_timeout=REQUEST_TIMEOUT
            )
        )
        return None if result is None else self._plain(result)

    async def patch_product_status(
        self, group: str, version: str, plural: str, product: Mapping[str, Any], status: Mapping[str, Any]
    ) -> None:
        """Merge ``status`` into a custom object's status subresource."""
        meta = product["metadata"]
        body: Any = {"status": dict(status)}
        # _content_type is a keyword of the generated client that its stubs do not declare.
        await self.custom.patch_namespaced_custom_object_status(  # type: ignore[call-arg]
            group,
            version,
            meta["namespace"],
            plural,
            meta["name"],
            body,
            # The client would send a dict as a JSON patch, which the API server refuses.
            _content_type="application/merge-patch+json",
            _request_timeout=REQUEST_TIMEOUT,
        )

    async def read_config_map_key(self, namespace: str, name: str, key: str) -> str | None:
        """Text under ``key`` of a ConfigMap, or None when either is missing."""
        cm = await self.read_config_map(namespace, name)
        return None if cm is None else (cm.get("data") or {}).get(key)

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create the object, or patch it to the desired state (drift repair)."""
        kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
        # The client serialises plain dicts as they are; its stubs only know its model classes.
        body: Any = obj
        result: object
        try:
            if kind == "Deployment":
                result = await self.apps.patch_namespaced_deployment(name, ns, body, _request_timeout=REQUEST_TIMEOUT)
            elif kind == "Service":
                result = await self.core.patch_namespaced_service(name, ns, body, _request_timeout=REQUEST_TIMEOUT)
            else:
                raise ValueError(f"cannot apply {kind}")
        except ApiException as exc:
            if exc.status != 404:
                raise
            if kind == "Deployment":
                result = await self.apps.create_namespaced_deployment(ns, body, _request_timeout=REQUEST_TIMEOUT)
            else:
                result = await self.core.create_namespaced_service(ns, body, _request_timeout=REQUEST_TIMEOUT)
        return self._plain(result)

    def _plain(self, obj: object) -> dict[str, Any]:
        """An API object as the JSON-shaped dict the API server sent."""
        plain: dict[str, Any] = self.api.sanitize_for_serialization(obj)
        return plain

    async def read_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A Deployment as a plain dict, or None."""
        result = await _none_if_missing(
            self.apps.read_namespaced_deployment(name, namespace, _request_timeout=REQUEST_TIMEOUT)
        )
        return None if result is None else self._plain(result)

    async def list_products(
        self,
        group: str,
        version: str,
        plural: str,
        namespaces: list[str] | None = None,
        label_selector: str | None = None,
    ) -> list[dict[str, Any]]:
        """Every DataProduct in the cluster or in ``namespaces``, matching ``label_selector`` (the catalog rebuild)."""
        if not namespaces:
            result = await self.custom.list_cluster_custom_object(
                group, version, plural, label_selector=label_selector or "", _request_timeout=60
            )
            return list(result.get("items", []))
        items: list[dict[str, Any]] = []
        for namespace in namespaces:
            result = await self.custom.list_namespaced_custom_object(
                group, version, namespace, plural, label_selector=label_selector or "", _request_timeout=60
            )
            items.extend(result.get("items", []))
        return items


class ConfigMapCatalogBackend:
    """Catalog shards as labelled ConfigMaps in the platform namespace."""

    def __init__(self, kube: Kube, namespace: str, prefix: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self.prefix = prefix

    async def list_shards(self) -> list[Shard]:
        """Every catalog shard (at start-up and on a rebuild): parsed with orjson, as a read of one is."""
        body = await _catalog_call(
            f"listing the catalog ConfigMaps in {self.namespace}",
            _raw(
                self.kube.core.list_namespaced_config_map(
                    self.namespace,
                    label_selector=f"{CATALOG_LABEL}=true",
                    _request_timeout=REQUEST_TIMEOUT,
                    _preload_content=False,
                )
            ),
        )
        return [_shard_of(cm) for cm in orjson.loads(body).get("items") or []]

    async def read_shard(self, name: str) -> Shard:
        cm = await _catalog_call(
            f"reading ConfigMap {self.namespace}/{name}", self.kube.read_config_map(self.namespace, name)
        )
        return Shard(name, {}, None) if cm is None else _shard_of(cm)

    async def write_shard(self, shard: Shard) -> None:
        labels = {
            CATALOG_LABEL: "true",
            "app.kubernetes.io/part-of": "datamesh",
            "app.kubernetes.io/managed-by": "datamesh-operator",
        }
        meta = client.V1ObjectMeta(
            name=shard.name, namespace=self.namespace, labels=labels, resource_version=shard.version
        )
        body = client.V1ConfigMap(api_version="v1", kind="ConfigMap", metadata=meta, data=shard.data)
        what = f"writing ConfigMap {self.namespace}/{shard.name}"
        options: dict[str, Any] = {"_request_timeout": REQUEST_TIMEOUT, "_preload_content": False}
        if shard.version is None:
            write = self.kube.core.create_namespaced_config_map(self.namespace, body, **options)
        else:
            write = self.kube.core.replace_namespaced_config_map(shard.name, self.namespace, body, **options)
        await _catalog_call(what, _raw(write))


def _shard_of(config_map: Mapping[str, Any]) -> Shard:
    """A catalog shard from a ConfigMap as the API server sends it (JSON-shaped)."""
    meta = config_map["metadata"]
    return Shard(meta["name"], dict(config_map.get("data") or {}), meta["resourceVersion"])


class KubeInferenceBackend:
    """Runs operator-deployed models as a Deployment + Service per product."""

    def __init__(self, kube: Kube, defaults: RuntimeDefaults) -> None:
        self.kube = kube
        self.defaults = defaults

    async def ensure(self, namespace: str, name: str, uid: str, spec: Inference) -> tuple[Check, str | None]:
        """Apply the product's Deployment and Service; InferenceReady follows the Deployment's availability."""
        for obj in desired_objects(namespace, name, uid, spec, self.defaults):
            await self.kube.apply(obj)
        ok, why = deployment_available(await self.kube.read_deployment(namespace, inference_name(name)))
        url = service_url(namespace, name, spec.port)
        if ok:
            return Check(ConditionType.inference_ready, True, "DeploymentAvailable", why), url
        return Check(ConditionType.inference_ready, False, "DeploymentProgressing", why), url


# ==== leader election =============================================================================


class KubeIngestJobs:
    """Ingestion Jobs in the platform namespace, from the pod template the chart gives the operator."""

    def __init__(self, kube: Kube, namespace: str, template: Mapping[str, Any], policy: JobPolicy) -> None:
        self.kube = kube
        self.namespace = namespace
        self.template = template
        self.policy = policy

    async def get(self, namespace: str, name: str, job: str) -> JobState | None:
        """The Job ``job``, or None; once it ended, with the report its last pod left."""
        found = await _none_if_missing(
            self.kube.batch.read_namespaced_job(job, self.namespace, _request_timeout=REQUEST_TIMEOUT)
        )
        if found is None:
            return None
        return await self._state(self.kube._plain(found))

    async def _state(self, job: Mapping[str, Any]) -> JobState:
        name = job["metadata"]["name"]
        phase, message = job_phase(job)
        report = None
        if phase != "running":
            pods = await self.kube.core.list_namespaced_pod(
                self.namespace, label_selector=f"job-name={name}", _request_timeout=REQUEST_TIMEOUT
            )
            report = last_report([self.kube._plain(p) for p in pods.items])
        return JobState(f"{self.namespace}/{name}", phase, report, message)

    async def start(self, namespace: str, name: str, job: str) -> JobState:
        """Create the Job (one of that name that exists already is returned as it is)."""
        body: Any = ingest_job(self.namespace, namespace, name, job, self.template, self.policy)
        try:
            created = await self.kube.batch.create_namespaced_job(
                self.namespace, body, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status != 409:
                raise
            existing = await self.get(namespace, name, job)
            if existing is None:  # deleted meanwhile (an earlier attempt's, still going): the next check starts it
                return JobState(f"{self.namespace}/{job}", "running", message="waiting for an earlier Job to go")
            return existing
        return await self._state(self.kube._plain(created))

    async def delete(self, namespace: str, name: str, keep: str | None = None) -> None:
        """Delete the product's Jobs (but ``keep``), their pods with them."""
        selector = ",".join(f"{k}={v}" for k, v in job_labels(namespace, name).items() if k.startswith("datamesh.io/"))
        jobs = await self.kube.batch.list_namespaced_job(
            self.namespace, label_selector=selector, _request_timeout=REQUEST_TIMEOUT
        )
        for job in jobs.items:
            if job.metadata.name == keep:
                continue
            await _none_if_missing(
                self.kube.batch.delete_namespaced_job(
                    job.metadata.name,
                    self.namespace,
                    propagation_policy="Background",
                    _request_timeout=REQUEST_TIMEOUT,
                )
            )


def micro_time(moment: datetime) -> str:
    """A Lease's MicroTime: RFC 3339 in UTC with exactly six fractional digits (what the API server parses)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_record(lease: client.V1Lease) -> LeaseRecord:
    """The record of a Lease read from the API server."""
    spec = lease.spec or client.V1LeaseSpec()
    return LeaseRecord(
        holder=spec.holder_identity or None,
        duration_seconds=int(spec.lease_duration_seconds or 0),
        acquired_at=spec.acquire_time,
        renewed_at=spec.renew_time,
        transitions=int(spec.lease_transitions or 0),
        version=lease.metadata.resource_version if lease.metadata else None,
    )


def lease_body(namespace: str, name: str, record: LeaseRecord) -> dict[str, Any]:
    """The Lease object for ``record`` (with its resourceVersion, so a stale write is refused)."""
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {"app.kubernetes.io/managed-by": "datamesh-operator", "app.kubernetes.io/part-of": "datamesh"},
    }
    if record.version is not None:
        metadata["resourceVersion"] = record.version
    spec: dict[str, Any] = {
        "holderIdentity": record.holder,
        "leaseDurationSeconds": record.duration_seconds,
        "leaseTransitions": record.transitions,
        "acquireTime": micro_time(record.acquired_at) if record.acquired_at else None,
        "renewTime": micro_time(record.renewed_at) if record.renewed_at else None,
    }
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}


class KubeLeases:
    """One coordination.k8s.io/v1 Lease, the leader-election port; every call bounded by ``timeout``."""

    def __init__(self, api: client.ApiClient, namespace: str, name: str, timeout: float) -> None:
        self.api = api
        self.coordination = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.name = name
        self.timeout = timeout

    async def read(self) -> LeaseRecord | None:
        """The lease, or None when it does not exist."""
        lease = await _none_if_missing(
            self.coordination.read_namespaced_lease(self.name, self.namespace, _request_timeout=self.timeout)
        )
        return None if lease is None else lease_record(lease)

    async def create(self, record: LeaseRecord) -> LeaseRecord:
        """Create the lease; LeaseConflict when another process created it first."""
        body: Any = lease_body(self.namespace, self.name, record)
        try:
            lease = await self.coordination.create_namespaced_lease(self.namespace, body, _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status == 409:
                raise LeaseConflict(f"lease {self.namespace}/{self.name} already exists") from exc
            raise
        return lease_record(lease)

    async def replace(self, record: LeaseRecord) -> LeaseRecord:
        """Write the lease over ``record.version``; LeaseConflict when someone wrote it since."""
        body: Any = lease_body(self.namespace, self.name, record)
        try:
            lease = await self.coordination.replace_namespaced_lease(
                self.name, self.namespace, body, _request_timeout=self.timeout
            )
        except ApiException as exc:
            if exc.status in (404, 409):  # 404: deleted meanwhile, so the version we hold is gone too
                raise LeaseConflict(f"lease {self.namespace}/{self.name} changed since it was read") from exc
            raise
        return lease_record(lease)
