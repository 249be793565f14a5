"""The catalog page at ``/`` in a real browser: the product list, a product's schema and sample rows,
a question's routing, hits and merged ranking, access as the visitor, and values shown as text only.

What the page shows is compared with what the API answers the same caller, so these tests check the
page, and the API's own tests (tests/unit/test_query_service.py) check the answers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from playwright.async_api import Locator, Page, expect

from datamesh.local import load_files
from tests.browser.conftest import ALICE, Site

RESTRICTED = "finance/expense-exceptions"


def product_row(page: Page, product: str) -> Locator:
    return page.locator(f'#products tbody tr[data-product="{product}"]')


def product_of(entry: dict[str, Any]) -> str:
    return f"{entry['namespace']}/{entry['name']}"


def key_text(key: Any) -> str:
    """A row key as the page prints it (a composite key's values joined)."""
    return " / ".join(map(str, key)) if isinstance(key, list) else str(key)


async def open_catalog(page: Page) -> None:
    await page.goto("/")
    await expect(page.locator('#products[aria-busy="false"]')).to_be_attached()


async def use_token(page: Page, token: str | None) -> None:
    """Enter a token (None: the Anonymous button) and wait for the list to be loaded again as that caller."""
    if token is None:
        await page.click("#token-clear")
    else:
        await page.fill("#token", token)
        await page.click("#token-form button[type=submit]")
    await expect(page.locator('#products[aria-busy="false"]')).to_be_attached()


async def ask(page: Page, question: str) -> None:
    await page.fill("#question", question)
    await page.press("#question", "Enter")
    await expect(page.locator('#ask[aria-busy="false"]')).to_be_attached()
    await expect(page.locator("#answer-status")).to_have_text(re.compile(r"^Answered in \d+ ms\.$"))


async def test_the_product_list_shows_every_example_with_its_phase(page: Page, site: Site) -> None:
    examples = {f"{body['metadata']['namespace']}/{body['metadata']['name']}" for _, body in site.examples}
    assert set(site.phases) == examples and len(examples) == 7
    await open_catalog(page)
    await use_token(page, "alice-token")  # may read every example, the restricted one included
    await expect(page.locator("#products tbody tr")).to_have_count(len(examples))
    await expect(page.locator("#product-count")).to_have_text(f"({len(examples)})")
    listed = (await site.api.get("/v1/products", headers=ALICE)).json()["products"]
    for entry in listed:
        product = product_of(entry)
        row = product_row(page, product)
        shown = [product, entry["domain"], entry["owner"], site.phases[product], str(entry["records"]), "met"]
        await expect(row.locator("td")).to_have_text([*shown, re.compile("CollectionReady")])
        conditions = row.locator("li.condition")
        await expect(conditions).to_have_count(len(entry["conditions"]))
        for condition in entry["conditions"]:
            chip = row.locator(f'li.condition[data-type="{condition["type"]}"]')
            await expect(chip).to_have_class(re.compile(rf"\bstatus-{condition['status']}\b"))


async def test_a_question_shows_routing_hits_with_row_keys_and_the_merged_ranking(page: Page, site: Site) -> None:
    question = "which shipments were delayed by weather?"
    await open_catalog(page)
    await ask(page, question)
    answer = (await site.api.post("/v1/query", json={"question": question, "limit": 10, "perProduct": 5})).json()
    assert answer["routedTo"][0]["product"] == "logistics/shipment-delays", answer["routedTo"]
    shipments = answer["results"][0]
    assert shipments["product"] == "logistics/shipment-delays"

    routing = page.locator("#routing tbody tr")
    await expect(routing.locator("td:nth-child(2)")).to_have_text([r["product"] for r in answer["routedTo"]])
    await expect(routing.locator("td.why")).to_have_text([r["why"] for r in answer["routedTo"]])
    await expect(routing.locator("td:nth-child(3)")).to_have_text([f"{r['score']:.3f}" for r in answer["routedTo"]])
    note = page.locator("#low-confidence")
    if answer["lowConfidence"]:
        await expect(note).to_contain_text(answer["confidenceNote"])
    else:
        await expect(note).to_be_hidden()
    for result in answer["results"]:
        block = page.locator(f'#results .result[data-product="{result["product"]}"]')
        await expect(block.locator("td.key")).to_have_text([key_text(h["key"]) for h in result["hits"]])
        masked = [h for h in result["hits"] if h["masked"]]
        assert masked, "every example has a personal field"
        await expect(block.locator("tbody tr").first).to_contain_text(f"masked: {', '.join(masked[0]['masked'])}")
    first = page.locator('#results .result[data-product="logistics/shipment-delays"] td.key').first
    await expect(first).to_have_text(re.compile(r"\S+"))
    assert shipments["hits"][0]["key"] == shipments["hits"][0]["fields"]["shipment_id"], "a hit's key is its row's"
    await expect(page.locator("#merged tbody tr td.key")).to_have_text([key_text(m["key"]) for m in answer["merged"]])
    await expect(page.locator("#merged tbody tr td:nth-child(2)")).to_have_text(
        [m["product"] for m in answer["merged"]]
    )


async def test_a_restricted_product_is_absent_for_anonymous_visitors_and_present_with_a_token_that_may_read_it(
    page: Page, site: Site
) -> None:
    everything = len(site.phases)
    await open_catalog(page)
    await expect(page.locator("#caller")).to_have_text("calling anonymously")
    await expect(page.locator("#products tbody tr")).to_have_count(everything - 1)
    await expect(product_row(page, RESTRICTED)).to_have_count(0)
    await ask(page, "which expense rules are broken most?")
    await expect(page.locator(f'#answer [data-product="{RESTRICTED}"]')).to_have_count(0)

    await use_token(page, "bob-token")  # sales: not a consumer of the finance product
    await expect(page.locator("#caller")).to_have_text("calling with your token")
    await expect(page.locator("#products tbody tr")).to_have_count(everything - 1)
    await expect(product_row(page, RESTRICTED)).to_have_count(0)

    await use_token(page, "cfo-token")  # named in access.consumers
    await expect(product_row(page, RESTRICTED)).to_have_count(1)
    await page.reload()  # the token lives in this tab's sessionStorage, nowhere else
    await expect(page.locator('#products[aria-busy="false"]')).to_be_attached()
    await expect(product_row(page, RESTRICTED)).to_have_count(1)
    assert await page.evaluate("sessionStorage.getItem('datamesh.token')") == "cfo-token"
    assert await page.evaluate("localStorage.length + document.cookie.length") == 0
    await ask(page, "which expense rules are broken most?")
    await expect(page.locator("#routing tbody tr").first).to_have_attribute("data-product", RESTRICTED)

    await use_token(page, None)
    await expect(product_row(page, RESTRICTED)).to_have_count(0)
    assert await page.evaluate("sessionStorage.getItem('datamesh.token')") is None
    await use_token(page, "not-a-token")
    await expect(page.locator("#catalog-status")).to_have_text(re.compile("invalid bearer token"))
    await expect(page.locator("#products tbody tr")).to_have_count(0)


async def test_sample_rows_show_personal_fields_masked(page: Page, site: Site) -> None:
    await open_catalog(page)
    await page.click('button[data-product="sales/customer-churn"]')
    await expect(page.locator('#product[aria-busy="false"]')).to_be_attached()
    await expect(page.locator("#product-title")).to_have_text("sales/customer-churn")
    pii = page.locator('#schema tr[data-field="primary_contact_email"] td')
    await expect(pii).to_have_text(["primary_contact_email", "string", "", "PII", re.compile("Email")])
    sample = (await site.api.get("/v1/products/sales/customer-churn/sample", params={"limit": 5})).json()["rows"]
    assert len(sample) == 5 and all(r["masked"] == ["primary_contact_email"] for r in sample)
    await expect(page.locator("#sample tbody tr")).to_have_count(5)
    await expect(page.locator('#sample td[data-field="customer_id"]')).to_have_text([r["key"] for r in sample])
    masked = page.locator('#sample td[data-field="primary_contact_email"]')
    await expect(masked).to_have_text(["masked"] * 5)
    await expect(masked.first).to_have_class(re.compile(r"\bmasked\b"))
    assert "@" not in await page.locator("#sample").inner_text()

    await use_token(page, "alice-token")  # a reader of the restricted product, not of its personal data
    await page.click(f'button[data-product="{RESTRICTED}"]')
    await expect(page.locator('#product[aria-busy="false"]')).to_be_attached()
    await expect(page.locator('#sample td[data-field="employee_name"]')).to_have_text(["masked"] * 5)
    names = {r["employee_name"] for r in restricted_rows(site)}
    text = await page.locator("#sample").inner_text()
    assert not [n for n in names if n in text], "no employee name reaches the page"


def restricted_rows(site: Site) -> list[dict[str, Any]]:
    body = next(b for _, b in site.examples if product_of(b["metadata"]) == RESTRICTED)
    rows: list[dict[str, Any]] = body["spec"]["source"]["inline"]
    return rows


HOSTILE = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'


async def test_values_from_a_product_are_shown_as_text_and_never_run(page: Page, site: Site, tmp_path: Path) -> None:
    manifest = {
        "apiVersion": "datamesh.io/v1alpha1",
        "kind": "DataProduct",
        "metadata": {"name": "hostile", "namespace": "sales"},
        "spec": {
            "domain": "sales",
            "description": f"Markup in every value {HOSTILE}",
            "owner": {"team": f"team {HOSTILE}"},
            "tags": ["markup"],
            "schema": {
                "fields": [
                    {"name": "id", "type": "string", "primaryKey": True},
                    {"name": "note", "type": "string", "description": HOSTILE},
                ]
            },
            "source": {"inline": [{"id": f"K-1 {HOSTILE}", "note": f"zebra crossing painted over {HOSTILE}"}]},
            "semanticSearch": {"keyFields": ["note"]},
        },
    }
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump(manifest))
    loaded = load_files([path])
    assert not loaded.errors, [e.line() for e in loaded.errors]
    await site.reconcile([*site.examples, *loaded.products])
    try:
        await open_catalog(page)
        await expect(product_row(page, "sales/hostile").locator("td").nth(2)).to_have_text(f"team {HOSTILE}")
        await page.click('button[data-product="sales/hostile"]')
        await expect(page.locator('#product[aria-busy="false"]')).to_be_attached()
        await expect(page.locator("#product-description")).to_have_text(f"Markup in every value {HOSTILE}")
        await expect(page.locator('#sample td[data-field="id"]')).to_have_text(f"K-1 {HOSTILE}")
        await ask(page, "zebra crossing painted over")
        await expect(page.locator('#results .result[data-product="sales/hostile"] td.key')).to_have_text(
            f"K-1 {HOSTILE}"
        )
        assert await page.locator("main img, main script").count() == 0
        assert await page.evaluate("window.pwned === undefined")
    finally:
        await site.reconcile(site.examples)
