"""Ingestion in a Kubernetes Job: what ``datamesh ingest NAMESPACE/NAME`` runs, and what it reports.

A source over ``DATAMESH_INGEST_JOB_MIN_BYTES`` is read, validated and embedded in a Job's pod,
not in the operator. The Job writes the product's collections through the same ``ingest`` as the
operator (into the Qdrant server itself, or into a folder of the embedded store that the operator
adopts), and reports what it found as its pod's termination message: an :class:`IngestReport`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from datamesh.core.plan import collection_plan, routing_plan
from datamesh.core.ports import (
    EmbedderResolver,
    EmbeddingError,
    Progress,
    RowLoader,
    SourceError,
    VectorStore,
    VectorStoreError,
)
from datamesh.core.rows import Refusals
from datamesh.engine.ingest import Target, ingest
from datamesh.resource.models import DataProductSpec, ScoreCalibration, spec_error_message

# The kubelet keeps at most 4096 bytes of a termination message; reasons are cut to fit.
REPORT_BYTES = 4096


class IngestReport(BaseModel):
    """What an ingestion Job found and wrote, as its pod's termination message tells the operator."""

    model_config = ConfigDict(extra="ignore")

    generation: int = Field(description="metadata.generation of the spec the Job ingested.")
    index: str = Field("", description="The index collection it wrote.")
    digest: str | None = None
    accepted: int = 0
    seen: int = 0
    written: int = 0
    rejected: int = 0
    reasons: list[str] = Field(default_factory=list)
    ignored_columns: list[str] = Field(default_factory=list)
    case_mismatches: dict[str, str] = Field(default_factory=dict)
    calibration: ScoreCalibration | None = None
    error: str | None = Field(None, description="Why nothing was ingested.")
    permanent: bool = Field(False, description="Whether retrying the same spec cannot help.")

    def refusals(self) -> Refusals:
        """The refused rows as the operator's messages describe them."""
        return Refusals(self.rejected, list(self.reasons), set(self.ignored_columns), dict(self.case_mismatches))

    def message(self) -> str:
        """The report as JSON within the kubelet's limit (reasons and the error shortened if need be)."""
        report = self
        for cut in (400, 120, 0):
            text = report.model_dump_json(exclude_defaults=True)
            if len(text.encode()) <= REPORT_BYTES:
                return text
            report = self.model_copy(
                update={
                    "reasons": [r[:cut] for r in self.reasons if cut],
                    "error": self.error[: cut or 200] if self.error else None,
                    "ignored_columns": self.ignored_columns[:20],
                }
            )
        return report.model_dump_json(exclude_defaults=True)[:REPORT_BYTES]

    @classmethod
    def parse(cls, text: str) -> IngestReport | None:
        """The report in a termination message, or None when it holds none (a crash's last log lines)."""
        try:
            return cls.model_validate_json(text)
        except ValidationError:
            return None


def job_name(namespace: str, name: str, key: str) -> str:
    """The Job for one ingestion of a product: ``key`` names the ingestion (its spec and its turn)."""
    digest = hashlib.sha256(f"{namespace}/{name}/{key}".encode()).hexdigest()[:10]
    return f"ingest-{name[:40].rstrip('.-')}-{digest}"


async def run_ingestion(
    body: Mapping[str, Any],
    store: VectorStore,
    embedders: EmbedderResolver,
    load_rows: RowLoader,
    progress: Progress,
    *,
    batch_size: int,
    routing_rows: int,
) -> IngestReport:
    """Ingest the product ``body`` into ``store`` as the operator would, and say how it went."""
    meta = body.get("metadata") or {}
    namespace, name = str(meta.get("namespace") or "default"), str(meta["name"])
    generation = int(meta.get("generation") or 1)
    try:
        spec = DataProductSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        return IngestReport(generation=generation, error=spec_error_message(exc), permanent=True)
    search, source = spec.semantic_search, spec.source
    if search is None or not search.enabled or source is None:
        return IngestReport(generation=generation, error="the spec has no source to ingest", permanent=True)
    try:
        provider = embedders(search.embedding_model, search.embedding_endpoint)
        plan = collection_plan(namespace, name, spec, await provider.dimension())
        routing = routing_plan(plan, search.embedding_model, search.embedding_endpoint)
        target = Target(namespace, name, plan, routing, provider, spec.primary_key)
        await store.ensure_index(plan)
        await store.ensure_index(routing)
        rows = await load_rows(source, namespace)
        try:

            async def on_batch(done: int, total: int) -> None:
                await progress(namespace, name, done, total)

            result = await ingest(store, target, spec, rows, batch_size, routing_rows, on_batch=on_batch)
        finally:
            rows.close()
    except SourceError as exc:
        return IngestReport(generation=generation, error=str(exc), permanent=not exc.transient)
    except EmbeddingError as exc:
        return IngestReport(generation=generation, error=str(exc), permanent=not exc.transient)
    except VectorStoreError as exc:
        return IngestReport(generation=generation, error=f"vector store: {exc}")
    found = result.found
    report = IngestReport(
        generation=generation,
        index=plan.index,
        digest=found.digest,
        accepted=found.accepted,
        seen=found.seen,
        written=result.written.rows if result.written else 0,
        rejected=found.refusals.rows,
        reasons=found.refusals.reasons,
        ignored_columns=sorted(found.refusals.ignored_columns),
        case_mismatches=found.refusals.case_mismatches,
        calibration=result.written.calibration if result.written else None,
    )
    if found.too_many_refused:
        return report.model_copy(update={"error": result.refused_message(spec), "permanent": True})
    return report
