"""Which products a question may go to: the caller's, answerable, narrowed by the request.

What the products' rows say about the question is decided by ``datamesh.core.routing`` from the
routing collections; here only the candidates are chosen: products the caller may read that can
answer at all, within the request's domains, or exactly the products it names (a bare name is
enough when only one visible product has it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from datamesh.resource.catalog import CatalogEntry

ROUTABLE_PHASES = frozenset({"Ready", "Degraded"})


class ProductNameError(Exception):
    """A product named in a request is unknown to the caller, or ambiguous."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def product_ref(entry: CatalogEntry) -> str:
    """How the API names a product: ``<namespace>/<name>``."""
    return entry.product


def routable(entry: CatalogEntry) -> bool:
    """Whether a product can answer questions at all: Ready or Degraded, with a collection."""
    return entry.phase in ROUTABLE_PHASES and bool(entry.collection)


@dataclass(frozen=True)
class Candidates:
    """The products a question may go to, and the ones it names (always asked)."""

    entries: list[CatalogEntry]
    named: list[str]
    note: str | None = None  # why there are none


def resolve_names(names: Sequence[str], visible: Sequence[CatalogEntry]) -> list[CatalogEntry]:
    """The products a request names, as 'namespace/name' or a bare name; ProductNameError otherwise."""
    chosen: list[CatalogEntry] = []
    for name in names:
        found = (
            [e for e in visible if name in (e.product, e.name)]
            if "/" not in name
            else [e for e in visible if e.product == name]
        )
        if not found:
            raise ProductNameError(f"product {name} not found", 404)  # the same answer as for a hidden one
        if len(found) > 1:
            options = ", ".join(sorted(e.product for e in found))
            raise ProductNameError(f"product name {name!r} is ambiguous: say one of {options}", 422)
        if found[0] not in chosen:
            chosen.append(found[0])
    return chosen


def candidates(
    visible: Iterable[CatalogEntry], *, domains: Sequence[str] | None, products: Sequence[str] | None
) -> Candidates:
    """The products to route among: the request narrows them, never routing below one."""
    pool = sorted(visible, key=lambda e: e.product)
    if products:
        named = resolve_names(products, pool)
        answering = [e for e in named if routable(e)]
        note = None if answering else "none of the named products can answer now (not Ready)"
        return Candidates(answering, [e.product for e in answering], note)
    if domains:
        wanted = {d.lower() for d in domains}
        pool = [e for e in pool if e.domain.lower() in wanted]
    answering = [e for e in pool if routable(e)]
    if answering:
        return Candidates(answering, [])
    where = f" in the domains {', '.join(domains)}" if domains else ""
    return Candidates([], [], f"no product you may read{where} can answer questions now")
