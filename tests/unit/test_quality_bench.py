"""The quality benchmark's figures and its reading of /v1/query answers (bench/quality.py): no model, no server."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import bench_script

q = bench_script("quality")

RANKED = ["a/x/1", "a/x/2", "b/y/1", "a/x/2", "c/z/9", "b/y/2", "a/x/3"]


def test_recall_counts_the_labelled_rows_in_the_first_k_distinct_ones() -> None:
    assert q.recall_at(RANKED, ["a/x/1", "b/y/2"], 5) == 1.0  # the repeated a/x/2 does not push b/y/2 out
    assert q.recall_at(RANKED, ["a/x/1", "b/y/2"], 4) == 0.5
    assert q.recall_at(RANKED, ["a/x/3", "d/w/1", "c/z/9", "a/x/2"], 5) == 0.5
    assert q.recall_at([], ["a/x/1"], 5) == 0.0
    with pytest.raises(ValueError):
        q.recall_at(RANKED, [], 5)


def test_mrr_is_the_reciprocal_rank_of_the_first_labelled_row() -> None:
    assert q.mrr_at(RANKED, ["a/x/1"], 10) == 1.0
    assert q.mrr_at(RANKED, ["c/z/9", "a/x/3"], 10) == 0.25  # rank 4 once the duplicate is gone
    assert q.mrr_at(RANKED, ["a/x/3"], 10) == pytest.approx(1 / 6)
    assert q.mrr_at(RANKED, ["a/x/3"], 5) == 0.0
    assert q.mrr_at([], ["a/x/3"], 10) == 0.0


def test_accuracy_at_1_accepts_either_product_of_a_multi_question() -> None:
    assert q.accuracy_at_1(["b/y", "a/x"], ["a/x", "b/y"]) == 1.0
    assert q.accuracy_at_1(["c/z", "a/x"], ["a/x", "b/y"]) == 0.0
    assert q.accuracy_at_1([], ["a/x"]) == 0.0


def test_a_pooled_ranking_orders_products_by_their_best_row() -> None:
    assert q.products_by_best_row(RANKED) == ["a/x", "b/y", "c/z"]
    assert q.product_of("python/stdlib-text-processing/asyncio.Queue.join") == "python/stdlib-text-processing"
    assert q.product_of("ns/name/a/b") == "ns/name"


def _question(kind: str, products: tuple[str, ...], rows: tuple[str, ...]) -> object:
    return q.Question("q1", "text", kind, products, rows, "bench")


def test_score_and_summary_of_hand_made_answers() -> None:
    rows_q = _question("rows", ("a/x",), ("a/x/2", "a/x/3"))
    routing_q = _question("routing", ("c/z",), ())
    multi_q = _question("multi", ("a/x", "b/y"), ("b/y/1", "a/x/9"))
    scores = [
        q.score(rows_q, q.Answer(["a/x", "b/y"], RANKED)),
        q.score(routing_q, q.Answer(["a/x", "b/y", "c/z"], [])),
        q.score(multi_q, q.Answer(["b/y"], ["b/y/1"])),
    ]
    first, routing, multi = scores
    assert (first.accuracy_at_1, first.product_recall_at_3, first.row_recall_at_5, first.mrr_at_10) == (
        1.0,
        1.0,
        0.5,
        0.5,
    )
    assert (routing.accuracy_at_1, routing.product_recall_at_3, routing.row_recall_at_5, routing.mrr_at_10) == (
        0.0,
        1.0,
        None,
        None,
    )
    assert routing.empty and not first.empty
    assert (multi.accuracy_at_1, multi.product_recall_at_3, multi.row_recall_at_5, multi.mrr_at_10) == (
        1.0,
        0.5,
        0.5,
        1.0,
    )
    overall = q.summarise(scores)
    assert overall["questions"] == 3 and overall["with_rows"] == 2
    assert overall["routing_accuracy_at_1"] == pytest.approx(2 / 3, abs=1e-4)
    assert overall["product_recall_at_3"] == pytest.approx(2.5 / 3, abs=1e-4)
    assert overall["row_recall_at_5"] == 0.5  # the routing question does not count
    assert overall["mrr_at_10"] == 0.75
    assert overall["empty_answers"] == 1
    groups = q.groups_of(scores)
    assert set(groups) == {"overall", "kind:rows", "kind:routing", "kind:multi", "source:bench"}
    assert groups["kind:routing"]["row_recall_at_5"] is None


def test_targets_need_the_project_to_beat_every_baseline_run() -> None:
    def run(acc: float, recall: float, mrr: float, empty: int) -> dict[str, object]:
        figures = {"routing_accuracy_at_1": acc, "row_recall_at_5": recall, "mrr_at_10": mrr, "empty_answers": empty}
        return {"groups": {"overall": figures}}

    good = q.targets({"project": run(0.9, 0.6, 0.5, 0), "bm25": run(0.6, 0.5, 0.5 - 1e-3, 0), "dense": run(0, 0, 0, 0)})
    assert good["pass"] is True and len(good["checks"]) == 7
    unstable = q.targets({"project": {**run(0.9, 0.6, 0.5, 0), "unstable": ["q001"]}, "bm25": run(0.6, 0.5, 0.4, 0)})
    assert [c["target"] for c in unstable["checks"] if not c["ok"]] == ["answers changed on asking again <= 0"]
    tied = q.targets({"project": run(0.9, 0.6, 0.5, 0), "bm25": run(0.6, 0.6, 0.4, 0)})
    assert tied["pass"] is False
    assert [c["target"] for c in tied["checks"] if not c["ok"]] == ["row recall@5 > bm25"]
    assert q.targets({"project": run(0.84, 0.6, 0.5, 1)})["pass"] is False
    assert q.targets({"bm25": run(0.6, 0.6, 0.4, 0)})["pass"] is None


NEW_ANSWER = {
    "routedTo": [
        {"product": "python/stdlib-concurrency", "score": 0.8, "why": "..."},
        {"product": "linux/syscall-manual", "score": 0.4},
    ],
    "merged": [
        {"product": "python/stdlib-concurrency", "key": "asyncio.Queue.join", "score": 0.9},
        {"product": "linux/syscall-manual", "key": "futex", "score": 0.8},
        {"product": "sales/orders", "key": ["EU", 42], "score": 0.7},
        {"product": "python/stdlib-concurrency", "key": 7, "score": 0.6},
    ],
    "lowConfidence": False,
}


def test_project_ranking_reads_the_new_answer_shape() -> None:
    products, rows = q.project_ranking(NEW_ANSWER)
    assert products == ["python/stdlib-concurrency", "linux/syscall-manual"]
    assert rows == [
        "python/stdlib-concurrency/asyncio.Queue.join",
        "linux/syscall-manual/futex",
        "sales/orders/EU/42",
        "python/stdlib-concurrency/7",
    ]


def test_project_ranking_reads_the_old_answer_shape_with_the_manifests_primary_keys() -> None:
    old = {
        "routedTo": [{"product": "sales/customer-churn", "score": 0.5, "why": "", "degraded": False}],
        "results": [],
        "merged": [
            {"product": "sales/customer-churn", "id": "0b5c", "score": 0.016, "payload": {"customer_id": "ACC-1"}},
            {"product": "hr/exit-interviews", "id": "9f1e", "score": 0.016, "payload": {"interview_id": 12}},
            {"product": "sales/customer-churn", "id": "77aa", "score": 0.015, "payload": {"customer_id": "ACC-1"}},
            {"product": "finance/unknown", "id": "c0de", "score": 0.014, "payload": {"x": 1}},
        ],
        "errors": [],
    }
    keys = {"sales/customer-churn": ("customer_id",), "hr/exit-interviews": ["interview_id"]}
    products, rows = q.project_ranking(old, keys)
    assert products == ["sales/customer-churn"]
    # A row met twice counts once; without a known primary key the point id stands in.
    assert rows == ["sales/customer-churn/ACC-1", "hr/exit-interviews/12", "finance/unknown/c0de"]


def test_project_ranking_of_empty_or_partial_answers() -> None:
    assert q.project_ranking({}) == ([], [])
    assert q.project_ranking({"routedTo": [], "merged": [], "message": "nothing relevant"}) == ([], [])
    # No routedTo: the products come in the order of their best merged row.
    products, rows = q.project_ranking({"merged": NEW_ANSWER["merged"]})
    assert products == ["python/stdlib-concurrency", "linux/syscall-manual", "sales/orders"]
    assert len(rows) == 4


def test_row_ids_and_key_texts_match_the_labels() -> None:
    product = q.Product("ns/p", "bench", ("qualname",), ("qualname", "summary", "details"))
    row = {"qualname": "str.casefold", "summary": "Return a casefolded copy.", "details": "", "kind": "method"}
    assert product.row_id(row) == "ns/p/str.casefold"
    assert q.key_text(row, product.key_fields) == "str.casefold\nReturn a casefolded copy."
    assert q.format_key(["a", 1]) == "a/1"
    assert q.format_key(12) == "12"


# ------------------------------------------------------------------ the bench products' rows files

PRODUCTS_DIR = q.DATA / "products"


def test_every_bench_manifest_passes_the_manifest_check_and_names_its_rows_file() -> None:
    from datamesh.resource.manifest import Verdict, check_file

    manifests = sorted(p for p in PRODUCTS_DIR.glob("*.yaml") if p.name != "00-namespaces.yaml")
    assert len(manifests) == 6
    for path in manifests:
        checked = check_file(path)
        assert checked.error is None, path
        (doc,) = checked.documents
        assert doc.verdict is Verdict.product, f"{path}: {doc.message}"
        source = doc.body["spec"]["source"]
        assert set(source) == {"url"}, path  # no inline rows: 225-299 rows are far over the inline bound
        assert source["url"] == {"url": f"{q.ROWS_PLACEHOLDER}rows/{path.stem}.jsonl", "format": "jsonl"}
        assert q.rows_file(source["url"]["url"]) == (q.ROWS / f"{path.stem}.jsonl").resolve()


def test_load_mesh_reads_the_bench_rows_from_their_files() -> None:
    bodies, products = q.load_mesh()
    assert len(products) == 14 and len(bodies) == 14
    bench = {ref: p for ref, p in products.items() if p.source == "bench"}
    assert {ref: len(p.rows) for ref, p in bench.items()} == {
        "platform/debian-network-tools": 260,
        "platform/debian-mail-software": 225,
        "media/debian-audio-software": 250,
        "python/stdlib-concurrency": 299,
        "python/stdlib-text-processing": 234,
        "linux/syscall-manual": 268,
    }
    assert sum(len(p.rows) for p in products.values()) == 1718
    casefold = next(r for r in bench["python/stdlib-text-processing"].rows if r["qualname"] == "str.casefold")
    assert casefold["kind"] == "method" and casefold["summary"].startswith("Return a version of the string")
    sizes = [r["installed_size_kb"] for r in bench["platform/debian-mail-software"].rows]
    assert all(isinstance(s, int) for s in sizes)  # numbers stay numbers, as the inline rows had them


def test_rows_file_knows_only_the_placeholder_and_the_rows_folder() -> None:
    assert (
        q.rows_file("http://quality-data.invalid/rows/syscall-manual.jsonl")
        == (q.ROWS / "syscall-manual.jsonl").resolve()
    )
    assert q.rows_file("https://example.com/rows/syscall-manual.jsonl") is None
    assert q.rows_file("http://quality-data.invalid/questions.yaml") is None
    assert q.rows_file("http://quality-data.invalid/rows/../questions.yaml") is None


def test_with_rows_at_points_the_placeholder_urls_at_the_server_and_copies() -> None:
    url_body = {"metadata": {"name": "p"}, "spec": {"source": {"url": {"url": f"{q.ROWS_PLACEHOLDER}rows/p.jsonl"}}}}
    other = {"metadata": {"name": "o"}, "spec": {"source": {"url": {"url": "https://example.com/o.csv"}}}}
    inline = {"metadata": {"name": "i"}, "spec": {"source": {"inline": [{"a": 1}]}}}
    bodies = [(Path("p.yaml"), url_body), (Path("o.yaml"), other), (Path("i.yaml"), inline)]
    served, changed = q.with_rows_at(bodies, "http://127.0.0.1:4321")
    assert changed == 1
    assert served[0][1]["spec"]["source"]["url"]["url"] == "http://127.0.0.1:4321/rows/p.jsonl"
    assert served[1][1] is other and served[2][1] is inline
    assert url_body["spec"]["source"]["url"]["url"] == f"{q.ROWS_PLACEHOLDER}rows/p.jsonl"  # the input is untouched
    assert q.with_rows_at(bodies, "http://127.0.0.1:4321/")[0][0][1]["spec"]["source"]["url"]["url"] == (
        "http://127.0.0.1:4321/rows/p.jsonl"
    )


def test_the_rows_app_serves_the_files_the_project_parses_into_the_same_rows() -> None:
    from starlette.testclient import TestClient

    from datamesh.adapters.sources import parse_rows

    _, products = q.load_mesh()
    app = q.RowsFiles()
    with TestClient(app) as client:
        response = client.get("/rows/syscall-manual.jsonl")
        assert response.status_code == 200
        assert response.content == (q.ROWS / "syscall-manual.jsonl").read_bytes()
        assert list(parse_rows(response.content, "jsonl")) == list(products["linux/syscall-manual"].rows)
        assert client.get("/rows/missing.jsonl").status_code == 404
        assert client.get("/questions.yaml").status_code == 404
    assert app.requests["/rows/syscall-manual.jsonl"] == 1
