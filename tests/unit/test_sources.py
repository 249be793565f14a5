"""Reading sources over real HTTP, and validating rows against the schema."""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi import FastAPI, Response

from datamesh.adapters.sources import SourceLoader, fetch_url, parse_rows
from datamesh.core.plan import _POINT_NAMESPACE, card_point_id, point_id
from datamesh.core.ports import SourceError
from datamesh.core.rows import validate_rows
from datamesh.resource.models import DataProductSpec, Source, SourceFormat
from tests.httpserver import ServerThread

ROWS = [{"id": "a", "text": "late parcel", "amount": 1.5}, {"id": "b", "text": "damaged box", "amount": 2.0}]


def _parquet() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(ROWS), buf)
    return buf.getvalue()


def _app() -> FastAPI:
    app = FastAPI()
    bodies = {
        "csv": "id,text,amount\na,late parcel,1.5\nb,damaged box,2.0\n",
        "jsonl": "\n".join(json.dumps(r) for r in ROWS) + "\n",
        "json": json.dumps({"rows": ROWS}),
    }

    @app.get("/rows.{fmt}")
    def rows(fmt: str) -> Response:
        if fmt == "parquet":
            return Response(_parquet(), media_type="application/octet-stream")
        return Response(bodies[fmt], media_type="text/plain")

    @app.get("/huge.csv")
    def huge() -> Response:
        return Response("id,text\n" + "x,y\n" * 100_000, media_type="text/csv")

    @app.get("/slow.csv")
    async def slow() -> Response:
        await asyncio.sleep(5)
        return Response("id,text\n")

    @app.get("/broken.json")
    def broken() -> Response:
        return Response("{not json", media_type="application/json")

    return app


@pytest.fixture(scope="module")
def server() -> str:
    with ServerThread(_app()) as url:
        yield url


def _source(url: str, fmt: str, **extra: object) -> Source:
    return Source.model_validate({"url": {"url": url, "format": fmt, **extra}})


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json", "parquet"])
async def test_url_formats(server: str, fmt: str) -> None:
    async with httpx.AsyncClient() as http:
        source = await SourceLoader(http, None)(_source(f"{server}/rows.{fmt}", fmt), "ns")
    try:
        for size in (1, 2, 10):  # read as often as needed, in batches of any size
            rows = [r for batch in source.batches(size) for r in batch]
            assert [r["id"] for r in rows] == ["a", "b"]
            assert str(rows[0]["text"]) == "late parcel"
    finally:
        source.close()


async def test_size_cap_timeout_and_errors(server: str) -> None:
    async with httpx.AsyncClient() as http:
        with pytest.raises(SourceError, match="maxBytes") as too_big:
            await SourceLoader(http, None)(_source(f"{server}/huge.csv", "csv", maxBytes=10_000), "ns")
        assert not too_big.value.transient
        started = time.monotonic()
        with pytest.raises(SourceError, match="cannot fetch") as slow:
            await SourceLoader(http, None, timeout=0.3)(_source(f"{server}/slow.csv", "csv"), "ns")
        assert slow.value.transient and time.monotonic() - started < 4
        broken = await SourceLoader(http, None)(_source(f"{server}/broken.json", "json"), "ns")
        with pytest.raises(SourceError, match="cannot parse the source as json"):
            list(broken.batches(10))
        broken.close()
        with pytest.raises(SourceError, match="HTTP 404"):
            await SourceLoader(http, None)(_source(f"{server}/missing.csv", "csv"), "ns")


async def test_url_5xx_is_retried_and_the_last_cause_named() -> None:
    url = "http://source.test/rows.csv"
    answers = iter([httpx.Response(503), httpx.Response(200, text="id,text\na,late parcel\n")])
    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda request: next(answers))) as http:
        assert await fetch_url(http, url, 1000) == b"id,text\na,late parcel\n"
    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(502))) as http:
        with pytest.raises(SourceError, match=f"cannot fetch {url}: HTTP 502") as info:
            await fetch_url(http, url, 1000, attempts=2)
    assert info.value.transient


def test_parse_rows_refuses_non_objects() -> None:
    with pytest.raises(SourceError, match="list of JSON objects"):
        parse_rows("[1, 2]", SourceFormat.json)


def test_validation_counts_and_explains_bad_rows() -> None:
    spec = DataProductSpec.model_validate(
        {
            "domain": "t",
            "description": "validation test product",
            "schema": {
                "fields": [
                    {"name": "id", "type": "integer", "primaryKey": True},
                    {"name": "text", "type": "string", "required": True},
                    {"name": "when", "type": "timestamp"},
                    {"name": "ok", "type": "boolean"},
                ]
            },
            "source": {"inline": []},
            "semanticSearch": {"keyFields": ["text"]},
        }
    )
    rows = [
        {"id": "1", "text": "fine", "when": "2026-10-03T14:12:00Z", "ok": "yes", "extra": 1},
        {"id": "2", "text": "bad time", "when": "yesterday"},
        {"id": "x", "text": "bad id"},
        {"id": "3"},
        {"id": 1, "text": "duplicate"},
        {"id": "4", "text": "   "},
    ]
    result, refused = validate_rows("ns", "p", spec, rows)
    assert len(result.rows) == 1 and result.rows[0] == {
        "id": 1,
        "text": "fine",
        "when": "2026-10-03T14:12:00+00:00",
        "ok": True,
    }
    assert refused.rows == 5
    assert refused.reasons[0].startswith("row 2: when") and "duplicate primary key" in refused.reasons[3]
    assert refused.ignored_columns == {"extra"}
    again, _ = validate_rows("ns", "p", spec, rows)
    assert again.ids == result.ids, "point ids are derived from the primary key"


def test_point_ids_are_the_uuid5_of_product_and_key_as_stores_already_hold_them() -> None:
    # Computed by hand for speed; a different id would orphan every point of every existing store.
    keys: list[list[object]] = [["R-0000001"], [1], [2.5, "b"], ["café", None], ["a\x1fb"], [""], ["x" * 500], []]
    for namespace, name in (("ns", "p"), ("sales", "orders-2026"), ("é", "ü")):
        for key in keys:
            text = f"{namespace}/{name}/" + "\x1f".join(map(str, key))
            assert point_id(namespace, name, key) == str(uuid.uuid5(_POINT_NAMESPACE, text))
    assert point_id("ns", "p", ["1"]) == "f4337d3c-9cbe-5ad5-8a9e-47927c7067ac"
    assert card_point_id("é", "ü") == str(uuid.uuid5(_POINT_NAMESPACE, "card:é/ü"))


def test_numbers_keep_their_type_and_case_mismatches_are_named() -> None:
    spec = DataProductSpec.model_validate(
        {
            "domain": "t",
            "description": "validation test product",
            "schema": {
                "fields": [
                    {"name": "id", "primaryKey": True},
                    {"name": "amount", "type": "number"},
                    {"name": "reason", "required": True},
                ]
            },
            "source": {"inline": []},
            "semanticSearch": {"keyFields": ["reason"]},
        }
    )
    good, _ = validate_rows(
        "ns", "p", spec, [{"id": "a", "amount": 20000, "reason": "x"}, {"id": "b", "amount": "7", "reason": "y"}]
    )
    assert [r["amount"] for r in good.rows] == [20000, 7] and isinstance(good.rows[0]["amount"], int)
    half, _ = validate_rows("ns", "p", spec, [{"id": "c", "amount": "2.5", "reason": "z"}])
    assert half.rows[0]["amount"] == 2.5
    none, refused = validate_rows("ns", "p", spec, [{"id": "a", "Reason": "price"}, {"id": "b", "Reason": "sso"}])
    assert none.rows == [] and refused.rows == 2
    assert "the source has 'Reason': column names are case-sensitive" in refused.reasons[0]
    assert "'Reason' is 'reason' except for case" in refused.summary()
