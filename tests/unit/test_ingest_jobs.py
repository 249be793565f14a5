"""Large sources ingested by Jobs: what the operator starts, reports, adopts, retries and cleans up.

The Reconciler runs over the real embedded store on disk; the Job's work is the real
``run_ingestion`` writing into the Job's own folder of that store, as ``datamesh ingest`` does in
a pod. Only the Kubernetes Job API is a fake here (``FakeJobs``: a Job is a record whose pod this
test runs in-process), because the unit tier has no API server; tests/cluster/test_ingest_jobs.py
runs the same flow through real Jobs on the control plane.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from datamesh.adapters.embeddings.registry import resolve_provider
from datamesh.adapters.files import FileCatalogBackend
from datamesh.adapters.stores import open_job_store, open_store
from datamesh.core.jobs import EXIT_PERMANENT, JobPolicy, ingest_job, job_phase, last_report
from datamesh.core.ports import JobState, SearchRequest, VectorStore
from datamesh.engine.catalog_writer import CatalogWriter
from datamesh.engine.ingest_job import REPORT_BYTES, IngestReport, run_ingestion
from datamesh.engine.reconciler import Outcome, Ports, Reconciler
from datamesh.resource.models import Source
from datamesh.settings import OperatorSettings, StoreSettings
from tests.unit.test_reconciler import FakeInference, FakeProbe, FakeRows, conditions, product, routing_of, wire

MIN_BYTES = 1_000_000


@dataclass
class FakeJobs:
    """The Job API as a dict of records; ``finish`` runs a Job's pod (``run_ingestion``) in this process."""

    jobs: dict[str, JobState] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    async def get(self, namespace: str, name: str, job: str) -> JobState | None:
        return self.jobs.get(job)

    async def start(self, namespace: str, name: str, job: str) -> JobState:
        self.started.append(job)
        state = self.jobs.setdefault(job, JobState(f"datamesh-system/{job}", "running"))
        return state

    async def delete(self, namespace: str, name: str, keep: str | None = None) -> None:
        for job in [j for j in self.jobs if j != keep]:
            del self.jobs[job]
            self.deleted.append(job)

    def only(self) -> str:
        (job,) = self.jobs
        return job

    def end(self, report: IngestReport, phase: str = "succeeded", message: str = "") -> None:
        job = self.only()
        self.jobs[job] = JobState(self.jobs[job].name, phase, report.message(), message)  # type: ignore[arg-type]


@dataclass
class JobWorld:
    reconciler: Reconciler
    store: VectorStore
    root: Path
    rows: FakeRows
    jobs: FakeJobs
    sizes: dict[str, int | None]

    async def reconcile(self, body: Mapping[str, Any], **kwargs: Any) -> Outcome:
        outcome = await self.reconciler.reconcile(body, **kwargs)
        assert outcome is not None
        return outcome

    async def run_pod(self, body: Mapping[str, Any]) -> IngestReport:
        """What the Job's pod does: the product ingested into the Job's own folder of the store."""
        meta = body["metadata"]
        store = open_job_store(StoreSettings(url=None, path=str(self.root)), meta["namespace"], meta["name"])
        progress: list[tuple[int, int]] = []

        async def report(namespace: str, name: str, done: int, total: int) -> None:
            progress.append((done, total))

        try:
            result = await run_ingestion(
                body, store, resolve_provider, self.rows, report, batch_size=2, routing_rows=1000
            )
        finally:
            await store.close()
        if result.error is None:
            assert progress and progress[-1] == (result.written, result.accepted), "the pod reports its progress"
        return result


@pytest.fixture
async def job_world(tmp_path: Path) -> AsyncIterator[JobWorld]:
    template = tmp_path / "job-pod.yaml"
    template.write_text("spec:\n  containers:\n  - name: ingest\n    image: datamesh:test\n")
    settings = OperatorSettings(
        catalog_flush_seconds=0.0,
        retry_base_seconds=2.0,
        metrics_port=0,
        ingest_job_min_bytes=MIN_BYTES,
        ingest_job_template=template,
    )
    root = tmp_path / "store"
    store = open_store(StoreSettings(url=None, path=str(root)))
    catalog = CatalogWriter(FileCatalogBackend(tmp_path / "catalog.json"), "catalog", 100_000, 0.0)
    rows, jobs = FakeRows(), FakeJobs()
    sizes: dict[str, int | None] = {}

    async def size(source: Source) -> int | None:
        assert source.url is not None
        return sizes.get(source.url.url, 5 * MIN_BYTES)

    ports = Ports(store, catalog, resolve_provider, rows, FakeProbe(), FakeInference(), jobs=jobs, source_size=size)
    yield JobWorld(Reconciler(settings, ports), store, root, rows, jobs, sizes)
    await catalog.close()
    await store.close()


def url_product(
    generation: int = 1, status: Mapping[str, Any] | None = None, url: str = "https://data.example/churn.csv"
) -> dict[str, Any]:
    return product(generation=generation, status=status, source={"url": {"url": url, "format": "csv"}})


async def test_a_large_source_is_ingested_by_a_job_whose_rows_the_operator_adopts(job_world: JobWorld) -> None:
    body = url_product()
    started = await job_world.reconcile(body)
    ingested = conditions(started)["Ingested"]
    assert ingested[:2] == ("Unknown", "IngestingInJob") and "is ingesting the source" in ingested[2]
    assert started.status.phase != "Ready" and started.retry_after is None, "the Job's end wakes the operator"
    assert (
        started.status.ingestion is not None
        and started.status.ingestion.job == f"datamesh-system/{job_world.jobs.only()}"
    )
    assert job_world.rows.reads == 0, "the operator never read the source"
    again = await job_world.reconcile(url_product(status=wire(started)))
    assert job_world.jobs.started == [job_world.jobs.only()], "one Job per ingestion, however often it is checked"
    assert conditions(again)["Ingested"][1] == "IngestingInJob"

    job_world.jobs.end(await job_world.run_pod(body))
    done = await job_world.reconcile(url_product(status=wire(again)))
    assert done.status.phase == "Ready", conditions(done)
    assert done.status.records == 3 and done.status.ingestion is None
    assert "IngestedInJob" in [e.reason for e in done.events]
    assert job_world.jobs.jobs == {}, "a Job that succeeded is deleted once adopted"
    assert not (job_world.root / "ingest").exists() or not any((job_world.root / "ingest").iterdir())
    (vector,) = await resolve_provider("builtin:ngram-384").embed(["competitor merger"])
    hits = await job_world.store.search("sales.churn", SearchRequest(vector, "competitor merger", 1))
    assert hits[0].payload["id"] == "b"
    routing = routing_of(body).index
    assert await job_world.store.routing_points(routing, "sales/churn", done.status.ingested_digest or "") == 3
    assert await job_world.store.routing_points(routing, "sales/churn", done.status.ingested_digest or "", "card") == 1
    # Nothing more to do: the next check finds the rows where the Job put them.
    later = await job_world.reconcile(url_product(status=wire(done)))
    assert later.status.phase == "Ready" and job_world.jobs.jobs == {} and len(job_world.jobs.started) == 1


async def test_a_source_under_the_size_stays_inline(job_world: JobWorld) -> None:
    job_world.sizes["https://data.example/small.csv"] = 10
    outcome = await job_world.reconcile(url_product(url="https://data.example/small.csv"))
    assert outcome.status.phase == "Ready" and outcome.status.records == 3
    assert job_world.jobs.started == [] and job_world.rows.reads == 1


async def test_a_failed_job_is_reported_deleted_and_started_again_after_a_backoff(job_world: JobWorld) -> None:
    first = await job_world.reconcile(url_product())
    job_world.jobs.end(
        IngestReport(generation=1, error="cannot fetch https://data.example/churn.csv: HTTP 503"),
        "failed",
        "BackoffLimitExceeded: Job has reached the specified backoff limit",
    )
    failed = await job_world.reconcile(url_product(status=wire(first)), retry=1)
    status, reason, message = conditions(failed)["Ingested"]
    assert (status, reason) == ("False", "IngestionJobFailed") and "HTTP 503" in message
    assert failed.retry_after == 4.0, "retried with the reconcile's backoff"
    assert job_world.jobs.jobs == {} and len(job_world.jobs.deleted) == 1
    retried = await job_world.reconcile(url_product(status=wire(failed)))
    assert conditions(retried)["Ingested"][1] == "IngestingInJob" and len(job_world.jobs.started) == 2


async def test_a_job_that_fails_for_good_is_kept_as_the_record_and_not_started_again(job_world: JobWorld) -> None:
    job_world.rows.rows = [{"reason": "no id"}] * 5  # every row refused: retrying cannot help
    first = await job_world.reconcile(url_product())
    report = await job_world.run_pod(url_product())
    assert report.error is not None and report.permanent and "5 of 5 rows rejected" in report.error
    job_world.jobs.end(report, "failed", "PodFailurePolicy: Container ingest exited with code 2")
    failed = await job_world.reconcile(url_product(status=wire(first)))
    assert failed.status.phase == "Failed" and failed.retry_after is None
    assert "5 of 5 rows rejected" in conditions(failed)["Ingested"][2]
    again = await job_world.reconcile(url_product(status=wire(failed)))
    assert again.status.phase == "Failed" and len(job_world.jobs.started) == 1 and job_world.jobs.jobs


async def test_a_job_that_read_an_older_spec_is_replaced(job_world: JobWorld) -> None:
    first = await job_world.reconcile(url_product())
    job_world.jobs.end(await job_world.run_pod(url_product()))
    edited = await job_world.reconcile(url_product(generation=2, status=wire(first)))
    assert conditions(edited)["Ingested"][1] == "IngestingInJob"
    assert len(job_world.jobs.started) == 2, "the edit's own Job"
    assert (job_world.jobs.only(), len(job_world.jobs.deleted)) == (job_world.jobs.started[1], 1)


async def test_deleting_the_product_deletes_its_jobs_and_what_they_wrote(job_world: JobWorld) -> None:
    await job_world.reconcile(url_product())
    await job_world.run_pod(url_product())
    assert any((job_world.root / "ingest").iterdir())
    await job_world.reconciler.finalize(url_product())
    assert job_world.jobs.jobs == {}
    assert not any((job_world.root / "ingest").iterdir()), "the Job's unadopted folder goes with the product"


def test_the_job_runs_the_ingest_command_and_fails_at_once_on_bad_data() -> None:
    template = {
        "metadata": {"labels": {"team": "platform"}},
        "spec": {"containers": [{"name": "ingest", "image": "datamesh:1"}]},
    }
    job = ingest_job("datamesh-system", "sales", "churn", "ingest-churn-0123456789", template, JobPolicy(3, 600, 60))
    pod = job["spec"]["template"]
    assert job["metadata"]["namespace"] == "datamesh-system"
    assert pod["spec"]["containers"][0]["args"] == ["ingest", "sales/churn"]
    assert pod["spec"]["restartPolicy"] == "Never" and pod["metadata"]["labels"]["team"] == "platform"
    assert (
        job["spec"]["backoffLimit"],
        job["spec"]["activeDeadlineSeconds"],
        job["spec"]["ttlSecondsAfterFinished"],
    ) == (3, 600, 60)
    fail_job = job["spec"]["podFailurePolicy"]["rules"][0]
    assert fail_job == {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [EXIT_PERMANENT]}}
    assert template["spec"]["containers"][0].get("args") is None, "the template itself is left as it was"
    with pytest.raises(ValueError, match="no container"):
        ingest_job("datamesh-system", "sales", "churn", "j", {"spec": {}}, JobPolicy())


def test_a_jobs_phase_and_report_are_read_from_its_status_and_its_last_pod() -> None:
    assert job_phase({"status": {"active": 1}}) == ("running", "")
    assert job_phase({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}) == ("succeeded", "")
    failed = {
        "status": {
            "conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "too long"}]
        }
    }
    assert job_phase(failed) == ("failed", "DeadlineExceeded: too long")

    def pod(finished: str, message: str) -> dict[str, Any]:
        terminated = {"finishedAt": finished, "message": message, "exitCode": 1}
        return {"status": {"containerStatuses": [{"state": {"terminated": terminated}}]}}

    pods = [pod("2026-12-02T10:00:05Z", "second"), pod("2026-12-02T10:00:01Z", "first"), {"status": {}}]
    assert last_report(pods) == "second" and last_report([{"status": {}}]) is None


def test_a_report_fits_the_termination_message_however_many_reasons() -> None:
    report = IngestReport(generation=3, index="x", rejected=9, reasons=["row 1: " + "z" * 3000] * 5, error="e" * 5000)
    text = report.message()
    assert len(text.encode()) <= REPORT_BYTES
    parsed = IngestReport.parse(text)
    assert parsed is not None and parsed.generation == 3 and parsed.rejected == 9 and parsed.error
    assert IngestReport.parse("Traceback (most recent call last): ...") is None


async def test_a_spec_that_no_longer_needs_a_job_stops_the_running_one(job_world: JobWorld) -> None:
    started = await job_world.reconcile(url_product())
    assert job_world.jobs.jobs
    inline = product(generation=2, status=wire(started))
    done = await job_world.reconcile(inline)
    assert done.status.phase == "Ready" and done.status.records == 3 and done.status.ingestion is None
    assert job_world.jobs.jobs == {}, "the url source's Job was deleted, not left writing"
