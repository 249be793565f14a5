"""Process settings, read from environment variables.

``DATAMESH_*`` configures the operator, ``DATAMESH_QDRANT_*`` the vector store that the
operator, the query service and local mode share. Every field's default is documented in the
README's configuration table (``datamesh settings`` prints the effective values).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from datamesh.core.children import RuntimeDefaults
from datamesh.core.selector import LabelSelector, SelectorError

DEFAULT_LEASE_NAME = "datamesh-operator"


class StoreSettings(BaseSettings):
    """The vector store: a Qdrant server, or the embedded engine in a folder."""

    model_config = SettingsConfigDict(env_prefix="DATAMESH_QDRANT_", extra="ignore")

    url: str | None = Field(
        None, description="Qdrant server URL; unset uses the embedded engine (qdrant-edge) at path."
    )
    api_key: str | None = Field(None, description="API key for the Qdrant server.")
    path: str = Field(
        ":memory:", description="Folder of the embedded store (':memory:': a temporary folder, gone on exit)."
    )
    ca_file: str | None = Field(
        None,
        description=(
            "PEM bundle of the certificate authorities that signed the Qdrant server's certificate (an https URL); "
            "unset: the system's CAs."
        ),
    )
    timeout: float = Field(10.0, gt=0, description="Seconds per Qdrant request.")
    concurrency: int = Field(16, ge=1, description="Store requests in flight at once.")
    max_open: int = Field(
        256, ge=1, description="Embedded store: collections kept open at once (least recently used closed first)."
    )
    search_threads: int = Field(1, ge=1, description="Embedded store: search threads per open collection.")
    optimize_min_points: int = Field(
        20_000,
        ge=0,
        description=(
            "Embedded store: a collection of this many points gets an HNSW index, built in a child process "
            "(0: never); smaller ones are searched exactly."
        ),
    )

    @field_validator("ca_file")
    @classmethod
    def _ca_file_readable(cls, value: str | None) -> str | None:
        # Refused at start with the variable's name, not at the first request with an SSL error.
        if value and not Path(value).is_file():
            raise ValueError(f"the CA bundle {value} is not a readable file (DATAMESH_QDRANT_CA_FILE)")
        return value or None


class EmbeddingSettings(BaseSettings):
    """In-process embedding models (the default ONNX model): how much CPU and memory they may take.

    Read by every process that embeds (operator, query service, inference runtime, local mode).
    At most ``concurrency`` inferences run at once in the whole process, each on ``threads``
    onnxruntime threads, so embedding never takes more than ``concurrency * threads`` cores.
    """

    model_config = SettingsConfigDict(env_prefix="DATAMESH_EMBEDDING_", extra="ignore")

    threads: int = Field(1, ge=1, le=64, description="onnxruntime intra-op threads per inference.")
    concurrency: int = Field(
        2, ge=1, le=64, description="Inferences running at once in the process (one worker thread each)."
    )
    batch_size: int = Field(32, ge=1, le=1024, description="Texts per inference batch.")
    token_budget: int = Field(
        512,
        ge=256,
        le=1_048_576,
        description=(
            "Padded tokens per inference batch (at least one text of 256 tokens), so that long texts cannot take "
            "much memory; larger budgets were not faster on one thread."
        ),
    )


@lru_cache(maxsize=1)
def get_embedding_settings() -> EmbeddingSettings:
    """The embedding settings of this process, read once from the environment."""
    return EmbeddingSettings()


class OperatorSettings(BaseSettings):
    """Settings of the operator process."""

    model_config = SettingsConfigDict(env_prefix="DATAMESH_", extra="ignore")

    platform_namespace: str = Field("datamesh-system", description="Namespace of the discovery catalog ConfigMaps.")
    finalizer: str = Field("datamesh.io/finalizer", description="Finalizer the operator puts on every DataProduct.")
    annotation_prefix: str = Field("datamesh.io", description="Prefix of the operator's bookkeeping annotations.")

    watch_server_timeout: int = Field(
        300, gt=0, description="Seconds the API server keeps a watch open before it must be renewed."
    )
    watch_client_timeout: int = Field(
        330, gt=0, description="Seconds after which the operator abandons a silent watch."
    )
    watch_connect_timeout: int = Field(30, gt=0, description="Seconds to establish a watch connection.")

    catalog_prefix: str = Field("datamesh-catalog", description="Name prefix of the catalog ConfigMaps.")
    catalog_flush_seconds: float = Field(
        0.5, ge=0, description="Window within which catalog changes are coalesced into one write per ConfigMap."
    )
    catalog_shard_bytes: int = Field(
        800_000,
        gt=10_000,
        description="Bytes per catalog ConfigMap before a new shard is started (the API limit is 1 MiB).",
    )

    ingest_concurrency: int = Field(4, ge=1, description="Products ingested at the same time.")
    kopf_workers: int = Field(
        1024,
        ge=1,
        description=(
            "Products kopf handles at the same time; the others' events wait, and they show no status meanwhile. "
            "Most of them only wait for an ingestion slot, so this can be far above ingest_concurrency."
        ),
    )
    check_concurrency: int = Field(
        16,
        ge=1,
        description=(
            "Periodic checks run at the same time; the others wait their turn, so that changes (a new or edited "
            "product) never queue behind thousands of checks after a restart."
        ),
    )
    ingest_batch_size: int = Field(256, ge=1, description="Rows embedded and upserted per batch.")
    routing_rows_per_product: int = Field(
        1000,
        ge=0,
        description=(
            "Rows of one product the routing collection holds: all of a product's rows up to this many, a uniform "
            "sample of this many of a larger one's (0: every row). Answers always search the whole product."
        ),
    )
    url_timeout: float = Field(30.0, gt=0, description="Seconds to fetch a url source or check an inference endpoint.")
    ingest_job_min_bytes: int | None = Field(
        None,
        ge=0,
        description=(
            "url sources of at least this many bytes (or of a size the server does not tell) are ingested by a "
            "Kubernetes Job running `datamesh ingest NAMESPACE/NAME`, not in the operator; unset: every source is "
            "ingested in the operator. Needs ingest_job_template."
        ),
    )
    ingest_job_template: Path | None = Field(
        None,
        description=(
            "YAML file of the ingestion Jobs' pod template (image, service account, environment, the store's volume, "
            "resources); the operator sets the command's arguments, the labels and restartPolicy Never."
        ),
    )
    ingest_job_backoff_limit: int = Field(
        2, ge=0, description="Retries of a failed ingestion pod within one Job (Kubernetes backs off between them)."
    )
    ingest_job_deadline_seconds: int = Field(
        6 * 3600, ge=1, description="An ingestion Job running longer than this fails (activeDeadlineSeconds)."
    )
    ingest_job_ttl_seconds: int = Field(
        86400,
        ge=0,
        description=(
            "A finished ingestion Job the operator keeps (one that failed for good, as its record) is removed by "
            "Kubernetes this long after it ended."
        ),
    )

    retry_base_seconds: float = Field(
        2.0, gt=0, description="First retry delay after a transient error; doubles per attempt."
    )
    retry_max_seconds: float = Field(300.0, gt=0, description="Longest retry delay.")
    sla_check_seconds: float = Field(
        60.0,
        gt=0,
        description=(
            "How often each product's SLA, endpoints and drift are re-checked (a source.refreshInterval shorter than "
            "this is kept too); after a restart the checks are spread over one period."
        ),
    )
    liveness_stall_seconds: float = Field(
        300.0,
        gt=0,
        description=(
            "The liveness endpoint fails when reconciles are in flight and none has finished (nor written an "
            "ingestion batch) for this long."
        ),
    )

    inference_image: str = Field(
        "ghcr.io/datamesh-io/datamesh:0.1.0", description="Image of operator-deployed inference runtimes."
    )
    inference_cpu_request: str = Field("100m", description="Default CPU request of an inference container.")
    inference_memory_request: str = Field(
        "512Mi", description="Default memory request of an inference container (the default model takes about 350 MB)."
    )
    inference_memory_limit: str = Field("1Gi", description="Default memory limit of an inference container.")

    liveness_port: int = Field(8081, description="Port of the operator's /healthz endpoint.")
    metrics_port: int = Field(9090, description="Port of the operator's Prometheus /metrics endpoint (0 disables it).")

    leader_election: bool = Field(
        True,
        description=(
            "Reconcile only while holding a Lease in the platform namespace, so that replicas never reconcile "
            "twice (`datamesh operator --no-leader-election` turns it off)."
        ),
    )
    leader_election_lease_name: str = Field(
        DEFAULT_LEASE_NAME,
        min_length=1,
        max_length=253,
        description=(
            "Name of the leader-election Lease; operators sharing a platform namespace need distinct ones "
            "(a shard's default is datamesh-operator-<shard>)."
        ),
    )
    # Long enough for a slow leader to keep its lease: the embedded engine holds the GIL while it
    # syncs a collection to disk, and under disk pressure (10,000 products created at once) that
    # froze a whole process, lease keeper included, for 7-8 s; a 7 s deadline lost the lease.
    leader_election_lease_seconds: int = Field(
        20, ge=2, le=300, description="Seconds a standby waits for an unrenewed lease before it takes over."
    )
    leader_election_renew_deadline_seconds: float = Field(
        15.0, gt=0, description="Seconds the leader may fail to renew before it stops reconciling and exits."
    )
    leader_election_retry_seconds: float = Field(
        2.0, gt=0, description="Seconds between renewals by the leader, and between a standby's looks at the lease."
    )

    shard: str | None = Field(
        None,
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description=(
            "Name of this operator's shard (`--shard`): written into its catalog entries, so that its start-up "
            "rebuild replaces only its own, and into its Events; its default Lease is datamesh-operator-<shard>."
        ),
    )
    label_selector: str | None = Field(
        None,
        description=(
            "Reconcile only the DataProducts matching this label selector (`--label-selector`; applied by the API "
            "server to the watch). Needs a shard name."
        ),
    )

    @field_validator("label_selector")
    @classmethod
    def _selector_parses(cls, value: str | None) -> str | None:
        # Refused here, at start, rather than by the API server on every watch attempt.
        if value is None:
            return None
        try:
            return str(LabelSelector.parse(value))
        except SelectorError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _shard_is_named(self) -> OperatorSettings:
        if self.label_selector and not self.shard:
            raise ValueError(
                "a label selector needs a shard name (--shard, DATAMESH_SHARD): the catalog entries of a label shard "
                "carry it, so that its start-up rebuild leaves other shards' entries alone"
            )
        if self.shard and "leader_election_lease_name" not in self.model_fields_set:
            # Each shard elects its own leader; a shared Lease would let only one shard reconcile.
            self.leader_election_lease_name = f"{DEFAULT_LEASE_NAME}-{self.shard}"
        return self

    @property
    def selector(self) -> LabelSelector | None:
        """The parsed label selector, or None when the operator takes every product of its namespaces."""
        return LabelSelector.parse(self.label_selector) if self.label_selector else None

    @model_validator(mode="after")
    def _jobs_have_a_template(self) -> OperatorSettings:
        if self.ingest_job_min_bytes is not None:
            if self.ingest_job_template is None:
                raise ValueError(
                    "ingest_job_min_bytes needs ingest_job_template (DATAMESH_INGEST_JOB_TEMPLATE): the pod template "
                    "of the ingestion Jobs"
                )
            if not self.ingest_job_template.is_file():
                raise ValueError(f"the ingestion Jobs' pod template {self.ingest_job_template} is not a readable file")
        return self

    @model_validator(mode="after")
    def _leases_are_consistent(self) -> OperatorSettings:
        # The leader must give up before anyone else may take over, and get a few renewals in before that.
        if not self.leader_election_lease_seconds > self.leader_election_renew_deadline_seconds:
            raise ValueError(
                "leader_election_lease_seconds must be greater than leader_election_renew_deadline_seconds"
            )
        if not self.leader_election_renew_deadline_seconds >= 2 * self.leader_election_retry_seconds:
            raise ValueError(
                "leader_election_renew_deadline_seconds must be at least twice leader_election_retry_seconds"
            )
        return self

    def runtime_defaults(self) -> RuntimeDefaults:
        """What inference containers get when their spec does not say."""
        return RuntimeDefaults(
            self.inference_image, self.inference_cpu_request, self.inference_memory_request, self.inference_memory_limit
        )


@lru_cache(maxsize=1)
def get_settings() -> OperatorSettings:
    """The settings of this process, read once from the environment."""
    return OperatorSettings()
