"""DataProducts as Open Data Contract Standard (ODCS) v3 documents, and back.

A contract carries what a product promises its consumers: domain, description, owner, tags, the
schema (types, descriptions, primary key, personal data, required and filterable columns) and the
SLA. It cannot say where the rows come from or which fields are embedded, so
:func:`import_contract` takes those as options, and checks the DataProduct it makes with the same
rules local mode applies to a manifest file (``datamesh.resource.manifest``). The documents are
the ``open-data-contract-standard`` package's models, checked against the JSON schema it ships.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import jsonschema
import yaml
from jsonschema.exceptions import ValidationError as SchemaError
from jsonschema.exceptions import best_match
from open_data_contract_standard.model import (
    CustomProperty,
    Description,
    OpenDataContractStandard,
    SchemaObject,
    SchemaProperty,
    ServiceLevelAgreementProperty,
    Support,
    Team,
    TeamMember,
)
from pydantic import ValidationError

from datamesh.resource.manifest import (
    DEFAULT_NAMESPACE,
    CheckedDocument,
    ManifestFileError,
    Verdict,
    check_document,
    decode,
    parse_documents,
)
from datamesh.resource.models import (
    API_VERSION,
    GROUP,
    KIND,
    SLA,
    DataProductSpec,
    FieldType,
    SchemaField,
    SourceFormat,
    parse_duration,
)

# The approved standard (v3.2.0 is a draft); contracts of any v3 version are read.
ODCS_API_VERSION = "v3.1.0"
CONTRACT_KIND = "DataContract"
DEFAULT_VERSION = "1.0.0"
DEFAULT_STATUS = "active"
# Where an imported product keeps its contract's identity, so exporting it again gives the same one.
ID_ANNOTATION = f"{GROUP}/contract-id"
VERSION_ANNOTATION = f"{GROUP}/contract-version"
STATUS_ANNOTATION = f"{GROUP}/contract-status"

PII_TAG = "pii"
PII_CLASSIFICATION = "restricted"
# On import any of these marks a column as personal data: masking a column that need not be is the safe mistake.
_PII_CLASSIFICATIONS = {"pii", "personal", "sensitive", "restricted", "confidential"}
FILTERABLE = "filterable"
DATE_FORMAT = "yyyy-MM-dd"

# SLA properties. ODCS names data freshness `latency` (its list says: "preferred to freshness");
# the p99 query latency has no ODCS name and keeps the DataProduct's. Synonyms are the standard's,
# but `freshness`, which datacontract-cli writes.
SLA_FRESHNESS = "latency"
SLA_AVAILABILITY = "availability"
SLA_QUERY_LATENCY = "queryLatencyP99"
SLA_FREQUENCY = "frequency"
_SLA_NAMES = {
    "latency": SLA_FRESHNESS,
    "ly": SLA_FRESHNESS,
    "freshness": SLA_FRESHNESS,
    "availability": SLA_AVAILABILITY,
    "av": SLA_AVAILABILITY,
    SLA_QUERY_LATENCY.lower(): SLA_QUERY_LATENCY,
    "frequency": SLA_FREQUENCY,
    "fy": SLA_FREQUENCY,
}
# Duration units of the CRD (ms, s, m, h) as ODCS writes them ("min": "m" reads as month to some).
_UNIT_OUT = {"ms": "ms", "s": "s", "m": "min", "h": "h"}
_UNIT_SECONDS = {
    **dict.fromkeys(("ms", "millisecond", "milliseconds"), 0.001),
    **dict.fromkeys(("s", "sec", "second", "seconds"), 1.0),
    # "m" is minutes to datacontract-cli's freshness checks, so it is here too.
    **dict.fromkeys(("m", "min", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
    **dict.fromkeys(("w", "week", "weeks"), 604800.0),
}
_SINGLE_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)$")
_NUMBER = r"([0-9]+(?:\.[0-9]+)?)"
_ISO_DURATION = re.compile(rf"^P(?:{_NUMBER}W)?(?:{_NUMBER}D)?(?:T(?:{_NUMBER}H)?(?:{_NUMBER}M)?(?:{_NUMBER}S)?)?$")
_ISO_SECONDS = (604800.0, 86400.0, 3600.0, 60.0, 1.0)

# Logical types a flat DataProduct row can hold, and physical types read when a property has none.
_TIME_AS_STRING = "time"
_PHYSICAL_TYPES: list[tuple[re.Pattern[str], FieldType]] = [
    (re.compile(r"^(timestamp|datetime)"), FieldType.timestamp),
    (re.compile(r"^date$"), FieldType.date),
    (re.compile(r"^bool"), FieldType.boolean),
    (re.compile(r"^(tinyint|smallint|mediumint|int|integer|bigint|long|short|byte)\b"), FieldType.integer),
    (re.compile(r"^(double|float|real|decimal|numeric|number)"), FieldType.number),
]
_SOURCE_SUFFIXES = {
    ".csv": SourceFormat.csv,
    ".jsonl": SourceFormat.jsonl,
    ".ndjson": SourceFormat.jsonl,
    ".json": SourceFormat.json,
    ".parquet": SourceFormat.parquet,
}
MAX_SCHEMA_ERRORS = 5
_NO_WRAP = 1 << 20

# Top-level and property keys in the order the standard's own examples use.
_CONTRACT_ORDER = (
    "apiVersion",
    "kind",
    "id",
    "name",
    "version",
    "status",
    "domain",
    "tags",
    "description",
    "schema",
    "slaProperties",
    "team",
    "support",
)
_DESCRIPTION_ORDER = ("purpose", "usage", "limitations")
_PROPERTY_ORDER = (
    "name",
    "logicalType",
    "logicalTypeOptions",
    "description",
    "primaryKey",
    "primaryKeyPosition",
    "required",
    "classification",
    "tags",
)


class ContractError(ValueError):
    """A contract or manifest that cannot be converted; the message says why, the caller says which file."""


class OptionError(ValueError):
    """Import options that contradict each other or leave something undecided."""


# ==== export ===================================================================================


def export_contract(
    product: CheckedDocument, *, version: str | None = None, status: str | None = None
) -> OpenDataContractStandard:
    """The ODCS v3 contract of a checked DataProduct; id, version and status default to its annotations."""
    if product.spec is None:
        raise ContractError(f"{product.key} is not a DataProduct that can be used: {product.message}")
    spec = product.spec
    annotations = (product.body.get("metadata") or {}).get("annotations") or {}
    key_positions = {name: i for i, name in enumerate(spec.primary_key, 1)}
    return OpenDataContractStandard(
        apiVersion=ODCS_API_VERSION,
        kind=CONTRACT_KIND,
        id=annotations.get(ID_ANNOTATION) or f"{product.namespace}.{product.name}",
        name=product.name,
        version=version or annotations.get(VERSION_ANNOTATION) or DEFAULT_VERSION,
        status=status or annotations.get(STATUS_ANNOTATION) or DEFAULT_STATUS,
        domain=spec.domain,
        tags=list(spec.tags) or None,
        description=Description(purpose=spec.description, usage=_usage(product, spec), limitations=_limitations(spec)),
        schema=[
            SchemaObject(
                name=product.name,
                logicalType="object",
                properties=[_property(f, key_positions.get(f.name)) for f in spec.data_schema.fields],
            )
        ],
        slaProperties=_sla_properties(spec) or None,
        team=Team(name=spec.owner.team) if spec.owner else None,
        support=(
            [Support(channel=spec.owner.email, tool="email", url=f"mailto:{spec.owner.email}")]
            if spec.owner and spec.owner.email
            else None
        ),
    )


def _usage(product: CheckedDocument, spec: DataProductSpec) -> str | None:
    if not spec.key_fields:
        return None
    return (
        f"Ask the datamesh query service (POST /v1/query) about {product.namespace}/{product.name}: questions are "
        f"matched against {', '.join(spec.key_fields)}."
    )


def _limitations(spec: DataProductSpec) -> str | None:
    personal = [f.name for f in spec.data_schema.fields if f.pii]
    if not personal:
        return None
    readers = spec.access.pii_readers
    who = f"every caller but {', '.join(readers)}" if readers else "every caller"
    return f"Personal data ({', '.join(personal)}) is masked in query answers for {who}."


def _property(f: SchemaField, key_position: int | None) -> SchemaProperty:
    kind = FieldType(f.type)
    return SchemaProperty(
        name=f.name,
        logicalType=kind.value,
        # ODCS's default date format is a full timestamp; DataProduct dates are days.
        logicalTypeOptions={"format": DATE_FORMAT} if kind is FieldType.date else None,
        description=f.description,
        primaryKey=True if key_position else None,
        primaryKeyPosition=key_position,
        required=True if f.required else None,
        classification=PII_CLASSIFICATION if f.pii else None,
        tags=[PII_TAG] if f.pii else None,
        customProperties=([CustomProperty(property=FILTERABLE, value=True)] if f.filterable else None),
    )


def _duration_value(duration: str) -> tuple[float | int, str]:
    """A CRD duration as an ODCS value and unit: as written when it has one unit, else in seconds."""
    single = _SINGLE_DURATION.match(duration)
    if single:
        number, unit = single.groups()
        return (float(number) if "." in number else int(number)), _UNIT_OUT[unit]
    seconds = parse_duration(duration)
    return (int(seconds) if seconds.is_integer() else seconds), "s"


def _sla_properties(spec: DataProductSpec) -> list[ServiceLevelAgreementProperty]:
    sla = spec.sla or SLA()
    out = []
    if sla.freshness:
        value, unit = _duration_value(sla.freshness)
        out.append(
            ServiceLevelAgreementProperty(
                property=SLA_FRESHNESS,
                value=value,
                unit=unit,
                description="Freshness: the newest ingestion is at most this old.",
            )
        )
    if sla.availability:
        out.append(
            ServiceLevelAgreementProperty(
                property=SLA_AVAILABILITY,
                value=sla.availability,
                unit="%",
                description="Availability of the product's inference endpoint.",
            )
        )
    if sla.query_latency_p99:
        value, unit = _duration_value(sla.query_latency_p99)
        out.append(
            ServiceLevelAgreementProperty(
                property=SLA_QUERY_LATENCY,
                value=value,
                unit=unit,
                description="99th percentile latency of a query on this product.",
            )
        )
    if spec.source is not None and spec.source.refresh_interval:
        value, unit = _duration_value(spec.source.refresh_interval)
        out.append(
            ServiceLevelAgreementProperty(
                property=SLA_FREQUENCY, value=value, unit=unit, description="The source is ingested again this often."
            )
        )
    return out


def contract_yaml(contract: OpenDataContractStandard) -> str:
    """The contract as YAML, keys in the order of the standard's examples."""
    data = contract.model_dump(by_alias=True, exclude_none=True, mode="json")
    data = _ordered(data, _CONTRACT_ORDER)
    if "description" in data:
        data["description"] = _ordered(data["description"], _DESCRIPTION_ORDER)
    for obj in data.get("schema", []):
        obj["properties"] = [_ordered(p, _PROPERTY_ORDER) for p in obj.get("properties", [])]
    return dump_yaml(data)


def _ordered(data: Mapping[str, Any], order: Sequence[str]) -> dict[str, Any]:
    return {**{k: data[k] for k in order if k in data}, **{k: v for k, v in data.items() if k not in order}}


def dump_yaml(data: Any) -> str:
    """YAML as this package writes it for people: keys in the given order, long lines kept whole."""
    # A folded description would move every line of a diff when one word changes.
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=_NO_WRAP)


def product_to_export(documents: Iterable[Any], wanted: str | None) -> CheckedDocument:
    """The DataProduct among a file's documents (or ``kubectl get -o json`` lists) named ``wanted``.

    ``wanted`` is ``namespace/name`` or a name; it may be left out when there is one DataProduct.
    """
    # Documents meant as DataProducts, refused ones included: their refusal says what to fix.
    products = [c for c in map(check_document, _expand_lists(documents)) if c.verdict is not Verdict.other]
    if wanted is not None:
        products = [p for p in products if wanted in (p.key, p.name)]
    if len(products) == 1:
        product = products[0]
        if product.verdict is not Verdict.product:
            who = product.key if product.name else "its document"
            raise ContractError(f"{who} is refused as `kubectl apply` would refuse it: {product.message}")
        return product
    if not products:
        raise ContractError(f"no {KIND} ({API_VERSION})" + (f" named {wanted}" if wanted else "") + " in it")
    raise ContractError(
        f"it holds {len(products)} DataProducts ({', '.join(p.key for p in products)}): choose one with --product"
    )


def _expand_lists(documents: Iterable[Any]) -> Iterable[Any]:
    for doc in documents:
        if isinstance(doc, Mapping) and str(doc.get("kind", "")).endswith("List") and "items" in doc:
            yield from doc["items"] or []
        else:
            yield doc


# ==== import ===================================================================================


@cache
def _validator() -> jsonschema.protocols.Validator:
    schema = json.loads(resources.files("open_data_contract_standard").joinpath("schema.json").read_text())
    _require_tested_keys(schema)
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema)


def _require_tested_keys(node: Any) -> None:
    """Make each ``if: {properties: {key: {const: ...}}}`` also require the key, as the schema means it.

    Without it the condition holds when the key is absent: the schema shipped with the package
    (ODCS v3.2.0, a draft) then asks every property that has no logicalType for a `map`. Its
    conditions on a server's type already require the key; those on logicalType do not.
    """
    if isinstance(node, list):
        for item in node:
            _require_tested_keys(item)
    elif isinstance(node, dict):
        condition = node.get("if")
        for case in [condition, *(condition.get("anyOf", []) if isinstance(condition, dict) else [])]:
            tested = [k for k, v in (case or {}).get("properties", {}).items() if isinstance(v, dict) and "const" in v]
            if tested and "required" not in case:
                case["required"] = tested
        for value in node.values():
            _require_tested_keys(value)


def read_contract(data: bytes) -> OpenDataContractStandard:
    """An ODCS v3 document from a file's bytes, checked against the standard's JSON schema."""
    try:
        documents = parse_documents(decode(data))
    except ManifestFileError as exc:
        raise ContractError(str(exc)) from None
    if len(documents) != 1 or not isinstance(documents[0], Mapping):
        raise ContractError(f"a contract is one YAML document holding a map (found {len(documents)} documents)")
    doc = dict(documents[0])
    api_version = str(doc.get("apiVersion", ""))
    if api_version.startswith("v2"):
        raise ContractError(f"apiVersion {api_version} is ODCS v2: only v3 contracts (apiVersion v3.x.y) are read")
    errors = _schema_errors(doc)
    if errors:
        more = f" (and {len(errors) - MAX_SCHEMA_ERRORS} more)" if len(errors) > MAX_SCHEMA_ERRORS else ""
        raise ContractError("not a valid ODCS v3 contract: " + "; ".join(errors[:MAX_SCHEMA_ERRORS]) + more)
    try:
        return OpenDataContractStandard.model_validate(doc)
    except ValidationError as exc:  # the schema passed it, so the package's models are stricter
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "the contract"
        raise ContractError(f"not a valid ODCS v3 contract: {where}: {first['msg']}") from None


def _schema_errors(doc: Mapping[str, Any]) -> list[str]:
    found: dict[str, None] = {}  # ordered and unique: a branch of a oneOf can report one problem twice
    for error in sorted(_validator().iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        # "is not valid under any of the given schemas" says nothing; the closest branch's error does.
        deepest = best_match(error.context) if error.context else error
        where = _where(doc, deepest)
        found[f"{where}: {_message(deepest)}" if where else _message(deepest)] = None
    return list(found)


def _message(error: SchemaError) -> str:
    """The validator's message; unknown keys as kubectl words them (the schema reports them twice, in two ways)."""
    unexpected = re.search(r"\((.*) (?:was|were) unexpected\)", error.message)
    if error.validator in ("additionalProperties", "unevaluatedProperties") and unexpected:
        return f"unknown field {unexpected.group(1)}"
    return error.message


def _where(doc: Any, error: SchemaError) -> str:
    """A JSON path such as ``schema[0].properties[3]``, with the name of the element it ends at."""
    path, node, named = "", doc, None
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
        if isinstance(node, Mapping):
            node = node.get(part)
        else:
            node = node[part] if isinstance(node, list) and isinstance(part, int) else None
        if isinstance(node, Mapping) and isinstance(node.get("name"), str):
            named = node["name"]
    if not path:
        return ""
    return f"{path} ({named})" if named else path


@dataclass(frozen=True)
class ImportOptions:
    """What a contract cannot say about a DataProduct, and overrides of what it can."""

    namespace: str | None = None
    name: str | None = None
    domain: str | None = None
    schema_object: str | None = None
    source_url: str | None = None
    configmap: str | None = None
    configmap_key: str | None = None
    source_format: str | None = None
    refresh_interval: str | None = None
    key_fields: tuple[str, ...] = ()
    embedding_model: str | None = None


@dataclass
class ImportedProduct:
    """The DataProduct manifest made from a contract, and what of the contract it could not keep."""

    manifest: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_yaml(self) -> str:
        """The manifest as YAML."""
        return dump_yaml(self.manifest)


# What sets which part of the manifest, for the hint on a refusal.
_HINTS = {
    "spec.description": "the contract's description.purpose",
    "metadata.name": "--name",
    "metadata.namespace": "--namespace",
    "spec.domain": "--domain",
    "spec.source": "--source-url, --configmap, --configmap-key, --source-format, --refresh-interval",
    "spec.semanticSearch": "--key-fields, --embedding-model",
}


def import_contract(contract: OpenDataContractStandard, options: ImportOptions) -> ImportedProduct:
    """The DataProduct manifest of a contract, checked as local mode checks a manifest file."""
    notes: list[str] = []
    obj = _schema_object(contract, options.schema_object)
    fields = [_field(p, notes) for p in obj.properties or []]
    name = options.name or _dns_name(contract.name or obj.name or "")
    if not name:
        raise OptionError("the contract has no name: give the product's with --name")
    domain = options.domain or contract.domain
    sla, frequency = _sla(contract.slaProperties or [], notes)
    spec: dict[str, Any] = {
        "domain": domain,
        "description": _description(contract, obj),
        "owner": _owner(contract, notes),
        "tags": contract.tags,
        "schema": {"fields": fields},
        "sla": sla,
        "source": _source(options, frequency, notes),
        "semanticSearch": _semantic_search(options),
    }
    metadata = {
        "name": name,
        "namespace": options.namespace or domain or DEFAULT_NAMESPACE,
        "annotations": {
            ID_ANNOTATION: contract.id,
            VERSION_ANNOTATION: contract.version,
            STATUS_ANNOTATION: contract.status,
        },
    }
    manifest = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": _without_empty(metadata),
        "spec": _without_empty(spec),
    }
    checked = check_document(manifest)
    if checked.verdict is not Verdict.product:
        hints = [hint for where, hint in _HINTS.items() if re.search(rf"{re.escape(where)}[:.\[]", checked.message)]
        also = f" (set by: {'; '.join(hints)})" if hints else ""
        raise ContractError(f"the DataProduct it gives would be refused: {checked.message}{also}")
    _note_ignored(contract, obj, notes)
    return ImportedProduct(manifest, notes)


def _without_empty(data: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            value = _without_empty(value)
        if value not in (None, [], {}):
            out[key] = value
    return out


def _dns_name(text: str) -> str:
    """A contract's name made a Kubernetes object name: lowercase, other characters as '-'."""
    name = re.sub(r"[^a-z0-9.-]+", "-", text.lower())
    return re.sub(r"^[^a-z0-9]+|[^a-z0-9]+$", "", name)[:253]


def _schema_object(contract: OpenDataContractStandard, wanted: str | None) -> SchemaObject:
    objects = contract.schema_ or []
    names = [o.name or f"#{i}" for i, o in enumerate(objects)]
    if wanted is not None:
        chosen = [o for o, n in zip(objects, names, strict=True) if n == wanted]
        if not chosen:
            raise OptionError(f"--object {wanted}: the contract's schema has {', '.join(names) or 'no objects'}")
        return chosen[0]
    if not objects:
        raise ContractError("its schema is empty: a DataProduct needs the properties of one object")
    if len(objects) > 1:
        raise OptionError(
            f"its schema has {len(objects)} objects ({', '.join(names)}): a DataProduct is one, choose it with --object"
        )
    return objects[0]


def _field(prop: SchemaProperty, notes: list[str]) -> dict[str, Any]:
    where = f"property {prop.name}"
    kind = _field_type(prop, where, notes)
    if prop.properties or prop.items or prop.map:
        raise ContractError(f"{where} has nested properties: DataProduct rows are flat")
    out: dict[str, Any] = {"name": prop.name, "type": kind.value}
    if prop.description:
        out["description"] = prop.description
    flags = {
        "primaryKey": bool(prop.primaryKey),
        "pii": _is_pii(prop),
        "required": bool(prop.required),
        "filterable": any(_truthy(c.value) for c in prop.customProperties or [] if c.property == FILTERABLE),
    }
    return out | {k: True for k, v in flags.items() if v}


def _field_type(prop: SchemaProperty, where: str, notes: list[str]) -> FieldType:
    logical = (prop.logicalType or "").lower()
    if logical in FieldType.__members__:
        return FieldType(logical)
    if logical == _TIME_AS_STRING:
        notes.append(f"{where} is a time of day: kept as a string")
        return FieldType.string
    if logical:
        raise ContractError(f"{where} is of type {logical}: DataProduct columns hold single values")
    physical = (prop.physicalType or "").strip().lower()
    for pattern, kind in _PHYSICAL_TYPES:
        if pattern.match(physical):
            return kind
    if physical and not re.match(r"^(n?var)?char|^n?text|^string|^uuid|^varchar", physical):
        notes.append(f"{where} has physicalType {prop.physicalType} and no logicalType: read as string")
    return FieldType.string


def _truthy(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "yes", "1")


def _is_pii(prop: SchemaProperty) -> bool:
    tagged = any(t.strip().lower() in (PII_TAG, "personal-data", "personal_data") for t in prop.tags or [])
    classified = (prop.classification or "").strip().lower() in _PII_CLASSIFICATIONS
    # datacontract-cli writes the Data Contract Specification's `pii: true` as a custom property.
    custom = any(_truthy(c.value) for c in prop.customProperties or [] if (c.property or "").lower() == PII_TAG)
    return tagged or classified or custom


def _description(contract: OpenDataContractStandard, obj: SchemaObject) -> str | None:
    purpose = contract.description.purpose if contract.description else None
    return purpose or obj.description


def _owner(contract: OpenDataContractStandard, notes: list[str]) -> dict[str, Any] | None:
    team = contract.team
    members: list[TeamMember] = team if isinstance(team, list) else (team.members or []) if team else []
    email = next(
        (s.url.removeprefix("mailto:") for s in contract.support or [] if s.url and s.url.startswith("mailto:")),
        None,
    ) or next(
        (m.username for m in members if (m.role or "").lower() == "owner" and "@" in (m.username or "")),
        None,
    )
    name = team.name if isinstance(team, Team) else None
    if not name:
        if email:
            notes.append(f"the contract names no team: owner (email {email}) left out")
        return None
    return {"team": name, "email": email}


def _sla(properties: Sequence[ServiceLevelAgreementProperty], notes: list[str]) -> tuple[dict[str, str], str | None]:
    """The DataProduct's sla, and the refresh interval the contract's `frequency` asks for."""
    sla: dict[str, str] = {}
    frequency = None
    for i, prop in enumerate(properties):
        where = f"slaProperties[{i}] ({prop.property})"
        kind = _SLA_NAMES.get((prop.property or "").lower())
        if kind is None or prop.element:
            # An SLA on one column (element) is not one the product keeps: its freshness is the ingestion's.
            notes.append(f"{where} has no DataProduct counterpart: left out")
        elif kind == SLA_AVAILABILITY:
            sla["availability"] = str(prop.value).strip().removesuffix("%").strip()
        elif kind == SLA_FREQUENCY:
            frequency = _duration(prop, where)
        else:
            sla["freshness" if kind == SLA_FRESHNESS else "queryLatencyP99"] = _duration(prop, where)
    return sla, frequency


def _duration(prop: ServiceLevelAgreementProperty, where: str) -> str:
    """An SLA value as a CRD duration: a number and a unit (days by default), or an ISO 8601 duration."""
    value = prop.value
    iso = _ISO_DURATION.match(value.strip().upper()) if isinstance(value, str) else None
    if iso and any(iso.groups()):
        seconds = sum(float(p) * size for p, size in zip(iso.groups(), _ISO_SECONDS, strict=True) if p)
    else:
        unit = (prop.unit or "d").strip().lower()
        if unit not in _UNIT_SECONDS:
            raise ContractError(f"{where}: unit {prop.unit!r} is not a unit of time (ms, s, min, h, d or w)")
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ContractError(f"{where}: value {value!r} is not a number")
        try:
            seconds = float(value) * _UNIT_SECONDS[unit]
        except ValueError:
            raise ContractError(f"{where}: value {value!r} is not a number") from None
    if seconds <= 0:
        raise ContractError(f"{where}: value {value!r} is not a positive duration")
    return _crd_duration(seconds)


def _crd_duration(seconds: float) -> str:
    """Seconds as a CRD duration in the largest unit that keeps it whole (24h, 90m, 500ms)."""
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{round(seconds * 1000)}ms"


def _source(options: ImportOptions, frequency: str | None, notes: list[str]) -> dict[str, Any] | None:
    refresh = options.refresh_interval or frequency
    if options.source_url and options.configmap:
        raise OptionError("give one source: --source-url or --configmap, not both")
    if options.configmap_key and not options.configmap:
        raise OptionError("--configmap-key needs --configmap")
    if options.source_url:
        fmt = options.source_format or _format_of(options.source_url.split("?", 1)[0], "--source-url")
        kind: dict[str, Any] = {"url": {"url": options.source_url, "format": fmt}}
    elif options.configmap:
        if not options.configmap_key:
            raise OptionError("--configmap needs --configmap-key (the key holding the rows)")
        fmt = options.source_format or _format_of(options.configmap_key, "--configmap-key")
        kind = {"configMapRef": {"name": options.configmap, "key": options.configmap_key, "format": fmt}}
    else:
        if options.source_format or options.refresh_interval:
            raise OptionError("--source-format and --refresh-interval need --source-url or --configmap")
        if frequency:
            notes.append(f"the contract's update frequency ({frequency}) needs a source: left out")
        return None
    return kind | ({"refreshInterval": refresh} if refresh else {})


def _format_of(location: str, option: str) -> str:
    for suffix, fmt in _SOURCE_SUFFIXES.items():
        if location.lower().endswith(suffix):
            return fmt.value
    raise OptionError(
        f"cannot tell the format of {location} from its name: give --source-format "
        f"({', '.join(f.value for f in SourceFormat)}) with {option}"
    )


def _semantic_search(options: ImportOptions) -> dict[str, Any] | None:
    keys = [k.strip() for item in options.key_fields for k in item.split(",") if k.strip()]
    if not keys:
        if options.embedding_model:
            raise OptionError("--embedding-model needs --key-fields (the fields whose text is embedded)")
        return None
    return {"enabled": True, "keyFields": keys} | (
        {"embeddingModel": options.embedding_model} if options.embedding_model else {}
    )


def _note_ignored(contract: OpenDataContractStandard, obj: SchemaObject, notes: list[str]) -> None:
    """Say which parts of the contract the DataProduct does not keep, so nobody relies on them."""
    rules = len(obj.quality or []) + sum(len(p.quality or []) for p in obj.properties or [])
    if rules:
        notes.append(f"{rules} data quality rule(s) left out: a DataProduct checks types, keys and required fields")
    for part, value in (("servers", contract.servers), ("roles", contract.roles), ("price", contract.price)):
        if value:
            notes.append(f"{part} left out: a DataProduct has no counterpart")
