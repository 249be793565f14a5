"""Operator shards: label selectors, shard settings, kopf's server-side filter, and the catalog scope of a rebuild."""

from __future__ import annotations

import asyncio
from pathlib import Path

import kopf
import pytest
from kopf._cogs.structs.references import Resource
from typer.testing import CliRunner

from datamesh import cli
from datamesh.adapters.files import FileCatalogBackend, read_catalog_file
from datamesh.controller.handlers import kopf_settings
from datamesh.core.selector import LabelSelector, NamespacePatterns, Operator, SelectorError
from datamesh.engine.catalog_writer import CatalogScope, CatalogWriter
from datamesh.resource.catalog import CatalogEntry
from datamesh.resource.models import GROUP, PLURAL, VERSION
from datamesh.settings import OperatorSettings

# ==== label selectors ==========================================================================


@pytest.mark.parametrize(
    ("text", "labels", "selected"),
    [
        ("datamesh.io/shard=a", {"datamesh.io/shard": "a"}, True),
        ("datamesh.io/shard==a", {"datamesh.io/shard": "b"}, False),
        ("datamesh.io/shard=a", {}, False),
        ("datamesh.io/shard!=a", {}, True),  # as the API server: != holds when the key is absent
        ("datamesh.io/shard!=a", {"datamesh.io/shard": "a"}, False),
        ("tier in (gold, silver)", {"tier": "silver"}, True),
        ("tier in (gold,silver)", {"tier": "bronze"}, False),
        ("tier notin (gold)", {}, True),
        ("tier notin (gold)", {"tier": "gold"}, False),
        ("team", {"team": ""}, True),
        ("!team", {"team": "x"}, False),
        ("! team", {}, True),
        ("team=sales, tier in (gold,silver), !legacy", {"team": "sales", "tier": "gold"}, True),
        ("team=sales, tier in (gold,silver), !legacy", {"team": "sales", "tier": "gold", "legacy": "1"}, False),
        ("team=", {"team": ""}, True),
    ],
)
def test_a_selector_matches_as_the_api_server_does(text: str, labels: dict[str, str], selected: bool) -> None:
    assert LabelSelector.parse(text).matches(labels) is selected


def test_a_selector_prints_in_canonical_form() -> None:
    selector = LabelSelector.parse(" team = sales ,tier in ( silver ,gold ),!legacy, env , x!=y")
    assert str(selector) == "team=sales,tier in (gold,silver),!legacy,env,x!=y"
    assert [r.operator for r in selector.requirements] == [
        Operator.IN,
        Operator.IN,
        Operator.DOES_NOT_EXIST,
        Operator.EXISTS,
        Operator.NOT_IN,
    ]
    assert LabelSelector.parse(str(selector)) == selector


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("a=1,,b=2", "empty"),
        ("a b", "'a b' is not one of"),
        ("count>3", "is not one of"),
        ("tier in ()", "empty value"),
        ("Bad Key=1", "is not one of"),
        ("-x=1", "'-x' is not a label key"),
        ("a=b c", "is not one of"),
        ("a=-b", "'-b' is not a label value"),
        ("tier in (a,b", "unbalanced"),
    ],
)
def test_a_wrong_selector_is_refused_with_the_part_that_is_wrong(text: str, message: str) -> None:
    with pytest.raises(SelectorError, match=message):
        LabelSelector.parse(text)


# ==== settings and the command line =============================================================


def test_a_shard_elects_its_own_leader() -> None:
    assert OperatorSettings(shard="a").leader_election_lease_name == "datamesh-operator-a"
    named = OperatorSettings(shard="a", leader_election_lease_name="mine")
    assert named.leader_election_lease_name == "mine", "an explicit lease name is kept"
    assert OperatorSettings().leader_election_lease_name == "datamesh-operator"
    settings = OperatorSettings(shard="b", label_selector="datamesh.io/shard = b")
    assert settings.label_selector == "datamesh.io/shard=b"
    assert settings.selector == LabelSelector.parse("datamesh.io/shard=b")


def test_a_label_selector_needs_a_shard_and_must_parse() -> None:
    with pytest.raises(ValueError, match="a label selector needs a shard name"):
        OperatorSettings(label_selector="datamesh.io/shard=a")
    with pytest.raises(ValueError, match="is not one of"):
        OperatorSettings(shard="a", label_selector="shard is a")
    with pytest.raises(ValueError, match="shard"):
        OperatorSettings(shard="Shard_A")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--label-selector", "datamesh.io/shard=a"], "needs a shard name"),
        (["--shard", "a", "-l", "shard is a"], "is not one of"),
        (["--shard", "A"], "shard"),
    ],
)
def test_the_command_refuses_a_wrong_shard_before_it_starts(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli.app, ["operator", *args], env={"COLUMNS": "250"})
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output


def test_kopf_lists_and_watches_only_the_shards_products() -> None:
    """The selector is a server-side filter: kopf sends it with the list and the watch of DataProducts only."""
    settings = kopf_settings(OperatorSettings(shard="a", label_selector="datamesh.io/shard=a"), ["sales"])
    products = Resource(GROUP, VERSION, PLURAL, namespaced=True)
    deployments = Resource("apps", "v1", "deployments", namespaced=True)
    assert settings.watching.label_selectors.collect(products) == ["datamesh.io/shard=a"]
    assert settings.watching.label_selectors.collect(deployments) == []
    assert (settings.posting.reporting_component, settings.posting.reporting_instance) == ("datamesh-operator", "a")
    assert kopf_settings(OperatorSettings()).watching.label_selectors.collect(products) == []
    assert isinstance(settings, kopf.OperatorSettings)


# ==== the catalog: each rebuild replaces only its own scope ========================================


def entry(namespace: str, name: str, shard: str | None = None) -> CatalogEntry:
    return CatalogEntry(
        namespace=namespace, name=name, domain="d", description="A product.", phase="Ready", shard=shard
    )


def writer(path: Path, shard: str | None) -> CatalogWriter:
    return CatalogWriter(FileCatalogBackend(path), "cat", 100_000, 0.01, shard=shard)


async def test_entries_carry_the_shard_that_wrote_them(tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    await writer(path, "a").upsert(entry("sales", "churn"))
    await writer(path, None).upsert(entry("ops", "tickets"))
    catalog = read_catalog_file(path)
    assert catalog["sales.churn"].shard == "a" and catalog["ops.tickets"].shard is None


async def test_namespace_shards_rebuild_only_their_namespaces(tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    a, b = writer(path, "a"), writer(path, "b")
    await asyncio.gather(a.upsert(entry("ns1", "p")), a.upsert(entry("ns2", "gone")), b.upsert(entry("ns3", "q")))
    # Shard a restarts: ns2/gone was deleted meanwhile; b's ns3 is not a's to judge.
    await writer(path, "a").replace_all([entry("ns1", "p")], CatalogScope(NamespacePatterns(("ns1", "ns2"))))
    assert sorted(read_catalog_file(path)) == ["ns1.p", "ns3.q"]
    # A namespace handed over from another shard (or an unsharded operator) belongs to its new shard.
    await writer(path, "c").replace_all([], CatalogScope(NamespacePatterns(("ns3",))))
    assert sorted(read_catalog_file(path)) == ["ns1.p"]


async def test_label_shards_rebuild_only_their_own_entries(tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    await asyncio.gather(
        writer(path, "a").upsert(entry("sales", "mine")),
        writer(path, "a").upsert(entry("sales", "deleted-while-a-was-down")),
        writer(path, "b").upsert(entry("sales", "theirs")),
        writer(path, None).upsert(entry("sales", "before-sharding")),
    )
    # Shard a over every namespace: it lists only its own products, so anything else is not its to remove.
    await writer(path, "a").replace_all([entry("sales", "mine"), entry("ops", "new")], CatalogScope(by_label=True))
    catalog = read_catalog_file(path)
    assert sorted(catalog) == ["ops.new", "sales.before-sharding", "sales.mine", "sales.theirs"]
    assert (catalog["ops.new"].shard, catalog["sales.theirs"].shard) == ("a", "b")
    # The shard that owns the product written before sharding restamps it at its start.
    await writer(path, "b").replace_all(
        [entry("sales", "theirs"), entry("sales", "before-sharding")], CatalogScope(by_label=True)
    )
    assert read_catalog_file(path)["sales.before-sharding"].shard == "b"


async def test_a_rebuild_reads_the_catalog_afresh(tmp_path: Path) -> None:
    """Entries another shard wrote after this writer first loaded the catalog are seen (and kept) by its rebuild."""
    path = tmp_path / "catalog.json"
    a = writer(path, "a")
    await a.upsert(entry("sales", "p"))
    await writer(path, "b").upsert(entry("sales", "q"))
    await a.replace_all([], CatalogScope(by_label=True))
    assert sorted(read_catalog_file(path)) == ["sales.q"]


# ==== namespace globs ==========================================================================


@pytest.mark.parametrize(
    ("patterns", "namespace", "in_scope"),
    [
        (("sales",), "sales", True),
        (("sales",), "sales-eu", False),
        (("*-s0",), "bench-3-s0", True),
        (("*-s0",), "bench-3-s1", False),
        (("team-*,ops",), "ops", True),
        (("team-*", "!team-legacy"), "team-legacy", False),
        (("!kube-*",), "sales", True),
        (("!kube-*",), "kube-system", False),
    ],
)
def test_namespace_patterns_match_as_kopf_reads_them(patterns: tuple[str, ...], namespace: str, in_scope: bool) -> None:
    assert NamespacePatterns(patterns).matches(namespace) is in_scope


async def test_a_glob_shard_rebuilds_the_namespaces_its_glob_matches(tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    await asyncio.gather(
        writer(path, "s0").upsert(entry("a-s0", "gone")), writer(path, "s1").upsert(entry("a-s1", "q"))
    )
    await writer(path, "s0").replace_all([], CatalogScope(NamespacePatterns(("*-s0",))))
    assert sorted(read_catalog_file(path)) == ["a-s1.q"]


def test_globs_keep_kopf_observing_namespaces_and_names_do_not() -> None:
    """With globs kopf must resolve namespaces (scanning on); plain names need no cluster-wide watch."""
    settings = OperatorSettings()
    assert kopf_settings(settings, ["*-s0"]).scanning.disabled is False
    assert kopf_settings(settings, ["sales", "ops"]).scanning.disabled is True
