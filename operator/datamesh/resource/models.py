"""The DataProduct resource: pydantic models of its spec and status.

These models are the single source of truth for the resource. The CRD in ``crds/`` is
generated from them (``datamesh crd``), and every rule the API server enforces through CEL
is mirrored here by a validator, so local mode and the operator refuse exactly what
``kubectl apply`` refuses. Field names on the wire are camelCase (``by_alias``).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from datetime import date, datetime
from enum import Enum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

JsonDict = dict[str, JsonValue]

GROUP = "datamesh.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DataProduct"
PLURAL = "dataproducts"
SINGULAR = "dataproduct"
SHORT_NAMES = ["dp"]
CATEGORIES = ["datamesh"]

# all-MiniLM-L6-v2, run in-process by onnxruntime from files installed with the package
# (adapters/embeddings/onnx.py); 'builtin:ngram-384' is the tiny lexical fallback.
DEFAULT_EMBEDDING_MODEL = "onnx:all-MiniLM-L6-v2"

# Go-style durations restricted to units CEL's duration() understands, so the API server
# can both check the format and compare values.
DURATION_PATTERN = r"^([0-9]+([.][0-9]+)?(ms|s|m|h))+$"
_DURATION_RE = re.compile(DURATION_PATTERN)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
DURATION_HINT = "must be a duration such as 500ms, 30s, 15m or 24h (units ms, s, m, h: a day is 24h)"
# A leading underscore is reserved for keys the platform adds to rows (_text, _inference, ...).
FIELD_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_]*$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def qualified_name(namespace: str, name: str, limit: int) -> str:
    """``namespace.name``, or a stable shortening of it with a hash suffix when it exceeds ``limit``.

    Namespaces hold no dots, so the full form is unique; a shortened one keeps the namespace and
    the start of the name readable and stays unique by the hash of the whole.
    """
    full = f"{namespace}.{name}"
    if len(full) <= limit:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:12]
    return f"{full[: limit - len(digest) - 1].rstrip('.-')}-{digest}"


@functools.lru_cache(maxsize=1024)  # the query service reads each product's SLA once per question
def parse_duration(value: str) -> float:
    """Seconds in a duration string such as ``1h30m`` or ``500ms``."""
    if not _DURATION_RE.match(value):
        raise ValueError(f"{value!r} {DURATION_HINT}")
    total = 0.0
    for number, _, unit in re.findall(r"([0-9]+([.][0-9]+)?)(ms|s|m|h)", value):
        total += float(number) * _DURATION_UNITS[unit]
    return total


def cel(rule: str, message: str, field_path: str | None = None) -> JsonDict:
    """One ``x-kubernetes-validations`` entry."""
    entry: JsonDict = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def duration_rule() -> JsonDict:
    """The CEL rule that makes a string field a well-formed duration, quoting the value it refuses.

    Without a message expression the API server's answer shows only the field's type
    (``Invalid value: "string"``), so a user who wrote ``1d`` could not tell which value it was.
    The value is bounded (maxLength), so the expression's cost is too.
    """
    entry = cel(f"self.matches('{DURATION_PATTERN}')", DURATION_HINT)
    entry["messageExpression"] = f'"\'" + self + "\' {DURATION_HINT}"'
    return entry


class CRDModel(BaseModel):
    """Base for every model that appears in the CRD: camelCase on the wire, unknown keys refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
    )

    def wire(self) -> dict[str, Any]:
        """The object as it appears in a manifest (camelCase, unset fields left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def _check_duration(value: str) -> str:
    parse_duration(value)
    return value


DURATION_MAX_LENGTH = 64
Duration = Annotated[
    str,
    AfterValidator(_check_duration),
    Field(max_length=DURATION_MAX_LENGTH, json_schema_extra={"x-kubernetes-validations": [duration_rule()]}),
]


class FieldType(str, Enum):
    string = "string"
    integer = "integer"
    number = "number"
    boolean = "boolean"
    timestamp = "timestamp"
    date = "date"


class SchemaField(CRDModel):
    """One column of the product's rows."""

    name: str = Field(
        min_length=1, max_length=63, pattern=FIELD_NAME_PATTERN, description="Column name, as it appears in each row."
    )
    type: FieldType = Field(
        FieldType.string, description="Value type: string, integer, number, boolean, timestamp (RFC 3339) or date."
    )
    description: str | None = Field(
        None, max_length=1024, description="What the column means, shown in the discovery catalog."
    )
    primary_key: bool = Field(
        False,
        description=(
            "Part of the row's identity; point ids are derived from the primary key, so re-ingesting is idempotent."
        ),
    )
    pii: bool = Field(False, description="Holds personal data; flagged in the catalog.")
    required: bool = Field(False, description="Rows without a value for this column are rejected at ingestion.")
    filterable: bool = Field(False, description="Index the column in Qdrant so queries can filter on it.")


class DataSchema(CRDModel):
    """The shape of the product's rows."""

    fields: list[SchemaField] = Field(
        min_length=1,
        max_length=200,
        description="The columns of each row; names are unique.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )


class Owner(CRDModel):
    """Who answers for the product."""

    team: str = Field(min_length=1, max_length=253, description="Owning team.")
    email: str | None = Field(
        None, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$", description="Contact address of the owning team."
    )


class SLA(CRDModel):
    """Service levels the product promises; checked by the operator and shown in SLAMet."""

    freshness: Duration | None = Field(None, description="Maximum age of the newest ingestion, e.g. 24h.")
    availability: str | None = Field(
        None,
        pattern=r"^(100(\.0+)?|[0-9]{1,2}(\.[0-9]+)?)$",
        description='Target availability of the inference endpoint in percent, e.g. "99.9".',
    )
    query_latency_p99: Duration | None = Field(
        None,
        description=(
            "Target p99 latency of a query on this product, e.g. 500ms; also bounds the query service's per-product "
            "timeout."
        ),
    )


class SourceFormat(str, Enum):
    csv = "csv"
    jsonl = "jsonl"
    json = "json"
    parquet = "parquet"


class ConfigMapSource(CRDModel):
    """Rows kept in a ConfigMap key of the product's namespace."""

    name: str = Field(min_length=1, max_length=253, description="ConfigMap name, in the DataProduct's namespace.")
    key: str = Field(min_length=1, max_length=253, description="Key holding the rows.")
    format: SourceFormat = Field(SourceFormat.csv, description="Encoding of the rows: csv, jsonl or json.")

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("self.format != 'parquet'", "parquet is binary: use a url source for parquet files", ".format")
            ]
        }
    )

    @field_validator("format")
    @classmethod
    def _not_parquet(cls, value: SourceFormat) -> SourceFormat:
        if value == SourceFormat.parquet:
            raise ValueError("parquet is binary: use a url source for parquet files")
        return value


class UrlSource(CRDModel):
    """Rows fetched over HTTP(S)."""

    url: str = Field(min_length=8, max_length=2048, pattern=r"^https?://", description="http(s) URL of the file.")
    format: SourceFormat = Field(description="Encoding of the file: csv, jsonl, json or parquet.")
    max_bytes: int = Field(
        64 * 1024 * 1024, ge=1, le=1024 * 1024 * 1024, description="Refuse files larger than this many bytes."
    )


# Inline rows live in the DataProduct object itself, so they share the object's limits:
# `kubectl apply` keeps a copy of the object in its last-applied-configuration annotation, and
# all annotations of an object together may hold at most 262,144 bytes (the operator's own
# diff-base holds digests of the spec, a few hundred bytes whatever the spec). The API server
# cannot bound a serialized size, and CEL cannot see into rows whose values may be text,
# numbers or booleans, so the bound is three OpenAPI limits it enforces itself: rows
# (maxItems), columns per row (maxProperties) and characters per value (maxLength; nested lists
# and objects refused by maxItems/maxProperties 0). The largest inline spec allowed, 40 rows of
# 8 columns with 63-character names and 256-character ASCII values, is about 104 kB of JSON;
# in 4-byte characters it is about 330 kB, which `kubectl apply --server-side` stores (it keeps
# no copy) and client-side apply cannot. Larger data belongs in configMapRef or url.
INLINE_MAX_ROWS = 40
INLINE_MAX_COLUMNS = 8
INLINE_MAX_VALUE_LENGTH = 256
INLINE_HINT = (
    f"inline rows are for small products (at most {INLINE_MAX_ROWS} rows of {INLINE_MAX_COLUMNS} columns, "
    f"{INLINE_MAX_VALUE_LENGTH} characters a value, so the object stays far below the 256 KiB the API server "
    "allows its annotations): put larger data in a ConfigMap (spec.source.configMapRef) or a file served "
    "over http(s) (spec.source.url)"
)


def _check_cell(value: Any) -> Any:
    # Mirrors the API server's maxLength/maxItems/maxProperties on an untyped value: text is
    # bounded, lists and objects must be empty, numbers, booleans and null pass. YAML dates
    # and timestamps are text to kubectl, as they are here.
    text = value.isoformat() if isinstance(value, (date, datetime)) else value
    if isinstance(text, str) and len(text) > INLINE_MAX_VALUE_LENGTH:
        raise ValueError(f"Too long: may not be more than {INLINE_MAX_VALUE_LENGTH} characters (has {len(text)})")
    if isinstance(value, (list, dict)) and value:
        raise ValueError("must be a single value (text, number, true/false or null), not a nested list or object")
    return value


def _row_keys_as_text(row: Any) -> Any:
    # YAML allows keys such as 1 or true; kubectl turns every key into text.
    return {str(k): v for k, v in row.items()} if isinstance(row, dict) else row


def _check_columns(row: dict[str, Any]) -> dict[str, Any]:
    if len(row) > INLINE_MAX_COLUMNS:
        raise ValueError(f"Too many: {len(row)}: must have at most {INLINE_MAX_COLUMNS} items (columns)")
    return row


_INLINE_VALUE_SCHEMA: JsonDict = {
    "x-kubernetes-preserve-unknown-fields": True,
    "maxLength": INLINE_MAX_VALUE_LENGTH,
    "maxItems": 0,
    "maxProperties": 0,
}
InlineValue = Annotated[Any, AfterValidator(_check_cell), WithJsonSchema(_INLINE_VALUE_SCHEMA)]
InlineRow = Annotated[
    dict[str, InlineValue],
    BeforeValidator(_row_keys_as_text),
    AfterValidator(_check_columns),
    WithJsonSchema(
        {"type": "object", "maxProperties": INLINE_MAX_COLUMNS, "additionalProperties": _INLINE_VALUE_SCHEMA}
    ),
]


class Source(CRDModel):
    """Where the rows come from: exactly one of inline, configMapRef or url."""

    inline: list[InlineRow] | None = Field(
        None,
        max_length=INLINE_MAX_ROWS,
        description=(
            f"Rows written into the manifest itself, for small products and examples: at most {INLINE_MAX_ROWS} rows "
            f"of at most {INLINE_MAX_COLUMNS} columns, each value text of at most {INLINE_MAX_VALUE_LENGTH} "
            "characters, a number, true/false or null. Larger data goes in configMapRef or url."
        ),
    )
    config_map_ref: ConfigMapSource | None = Field(None, description="Rows in a ConfigMap key.")
    url: UrlSource | None = Field(None, description="Rows in a file served over http(s).")
    refresh_interval: Duration | None = Field(
        None, description="Re-ingest the source this often, e.g. 1h; unset means only on change."
    )
    max_rejected_percent: float = Field(
        10.0,
        ge=0,
        le=100,
        description=(
            "Share of the source's rows that may be refused by the schema before the ingestion fails "
            "(the previous rows then stay in place); 0 accepts no refused row, 100 any number."
        ),
    )

    # Exactly one of the three, as OpenAPI oneOf: a CEL rule cannot say has(self.inline), since
    # CEL does not see a list whose rows hold untyped values.
    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": ["inline"]}, {"required": ["configMapRef"]}, {"required": ["url"]}]}
    )

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> Source:
        if sum(x is not None for x in (self.inline, self.config_map_ref, self.url)) != 1:
            raise ValueError("source must set exactly one of inline, configMapRef or url")
        return self


class Distance(str, Enum):
    cosine = "Cosine"
    dot = "Dot"
    euclid = "Euclid"


class SearchMode(str, Enum):
    hybrid = "hybrid"
    dense = "dense"
    sparse = "sparse"


class Quantization(str, Enum):
    none = "none"
    scalar = "scalar"
    binary = "binary"


class HnswLayout(CRDModel):
    """The HNSW graph of the collection's dense vectors."""

    m: int = Field(16, ge=4, le=128, description="Edges per node: more is better recall and more memory.")
    ef_construct: int = Field(100, ge=4, le=1000, description="Neighbours considered while building the graph.")


class CollectionLayout(CRDModel):
    """How a product's collection is laid out on a Qdrant server or cluster.

    The defaults suit a small product. Qdrant changes every field but ``shards`` in place; a new
    ``shards`` re-indexes the product into a new collection behind its alias. The embedded engine
    keeps its own layout (one shard on local disk) and says in CollectionReady what it ignored.
    """

    shards: int = Field(1, ge=1, le=64, description="Shards of the collection (a change re-indexes the product).")
    replicas: int = Field(1, ge=1, le=16, description="Copies of each shard on different Qdrant nodes.")
    write_consistency: int = Field(
        1, ge=1, le=16, description="Replicas that must acknowledge a write (at most replicas)."
    )
    on_disk_vectors: bool = Field(False, description="Keep the original vectors on disk instead of in RAM.")
    on_disk_payload: bool = Field(True, description="Keep the rows' payload on disk instead of in RAM.")
    quantization: Quantization = Field(
        Quantization.none,
        description="Compressed vectors searched in RAM: none, scalar (int8, 4x smaller) or binary (32x).",
    )
    hnsw: HnswLayout = Field(default_factory=HnswLayout, description="The HNSW index of the dense vectors.")

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.writeConsistency <= self.replicas",
                    "writeConsistency cannot exceed replicas",
                    ".writeConsistency",
                )
            ]
        }
    )

    @model_validator(mode="after")
    def _consistency_within_replicas(self) -> CollectionLayout:
        if self.write_consistency > self.replicas:
            raise ValueError("writeConsistency: writeConsistency cannot exceed replicas")
        return self

    def differences(self, other: CollectionLayout) -> dict[str, tuple[Any, Any]]:
        """Fields (wire names) whose values differ from ``other``'s: name -> (mine, theirs)."""
        mine, theirs = self.wire(), other.wire()
        return {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}


class SemanticSearch(CRDModel):
    """Embed the key fields of every row into a Qdrant collection."""

    enabled: bool = Field(True, description="Provision a collection and embed the key fields.")
    embedding_model: str = Field(
        DEFAULT_EMBEDDING_MODEL,
        min_length=1,
        max_length=253,
        description=(
            "Embedding model. The default 'onnx:all-MiniLM-L6-v2' is semantic, offline and shipped with the "
            "platform; 'builtin:ngram-<dim>' is a tiny lexical fallback (hashed n-grams); 'fastembed:<model>' and "
            "'sentence-transformers:<model>' run locally; with embeddingEndpoint set, the name is sent to that "
            "OpenAI-compatible /v1/embeddings server."
        ),
    )
    embedding_endpoint: str | None = Field(
        None,
        max_length=2048,
        pattern=r"^https?://",
        description="Base URL of an OpenAI-compatible embeddings server (TEI, vLLM, Ollama, the built-in runtime).",
    )
    key_fields: list[str] = Field(
        default_factory=list,
        max_length=20,
        description="Schema fields whose text is embedded; each must be declared in schema.fields.",
        json_schema_extra={"items": {"type": "string", "maxLength": 63}, "default": []},
    )
    distance: Distance = Field(Distance.cosine, description="Vector distance of the collection: Cosine, Dot or Euclid.")
    mode: SearchMode = Field(
        SearchMode.hybrid,
        description=(
            "How a question finds rows: hybrid (the key fields' embedding and BM25 on their words, fused by "
            "Qdrant), dense (embedding only) or sparse (BM25 only). Changing it re-indexes the product."
        ),
    )
    layout: CollectionLayout = Field(
        default_factory=CollectionLayout,
        description="Shards, replicas, on-disk storage, quantization and HNSW of the collection on a Qdrant cluster.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!self.enabled || size(self.keyFields) > 0",
                    "semanticSearch needs at least one key field to embed",
                    ".keyFields",
                )
            ]
        }
    )

    @model_validator(mode="after")
    def _key_fields_when_enabled(self) -> SemanticSearch:
        if self.enabled and not self.key_fields:
            # Named like the CEL rule's fieldPath, so both answers point at the same field.
            raise ValueError("keyFields: semanticSearch needs at least one key field to embed")
        return self


class ResourceRequirements(CRDModel):
    """Kubernetes resource requests and limits of the inference container."""

    requests: dict[str, int | str] | None = Field(None, description="e.g. {cpu: 100m, memory: 256Mi}")
    limits: dict[str, int | str] | None = Field(None, description="e.g. {cpu: '1', memory: 1Gi}")


class InferenceRuntime(str, Enum):
    builtin = "builtin"
    tei = "tei"
    openai = "openai"


class Inference(CRDModel):
    """AI inference for the product: an existing endpoint, or a model the operator deploys."""

    enabled: bool = Field(False, description="Provide an inference endpoint for this product.")
    endpoint: str | None = Field(
        None,
        max_length=2048,
        pattern=r"^https?://",
        description="An existing model endpoint (checked for reachability).",
    )
    model: str | None = Field(
        None, max_length=253, description="A model the operator deploys for this product, served by the runtime below."
    )
    runtime: InferenceRuntime = Field(
        InferenceRuntime.builtin,
        description="What serves the model: builtin (datamesh inference-server), tei or openai-compatible.",
    )
    image: str | None = Field(
        None, max_length=512, description="Container image; defaults to the operator's configured runtime image."
    )
    command: list[str] | None = Field(
        None, max_length=64, description="Container command; defaults to the runtime's own."
    )
    replicas: int = Field(1, ge=0, le=50, description="Replicas of the inference Deployment.")
    port: int = Field(8080, ge=1, le=65535, description="Port the runtime listens on.")
    resources: ResourceRequirements | None = Field(
        None, description="Resource requests and limits; defaults from operator settings."
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!self.enabled || (has(self.endpoint) != has(self.model))",
                    "inference needs exactly one of endpoint (an existing server) or model (deployed by the operator)",
                )
            ]
        }
    )

    @model_validator(mode="after")
    def _endpoint_xor_model(self) -> Inference:
        if self.enabled and (self.endpoint is None) == (self.model is None):
            raise ValueError(
                "inference needs exactly one of endpoint (an existing server) or model (deployed by the operator)"
            )
        return self


class Access(CRDModel):
    """Who may discover and query the product."""

    consumers: list[str] = Field(
        default_factory=lambda: ["*"],
        max_length=100,
        description="Identities or 'group:<name>' entries allowed to read the product; '*' means every caller.",
        json_schema_extra={"items": {"type": "string", "maxLength": 253}, "default": ["*"]},
    )
    pii_readers: list[str] = Field(
        default_factory=list,
        max_length=100,
        description=(
            "Identities or 'group:<name>' entries that see the values of `pii: true` fields in answers; "
            "everyone else gets them masked. Empty (the default) masks them for every caller."
        ),
        json_schema_extra={"items": {"type": "string", "maxLength": 253}, "default": []},
    )


class DeletionPolicy(str, Enum):
    delete = "Delete"
    retain = "Retain"


SPEC_RULES: list[JsonValue] = [
    cel(
        "!has(self.semanticSearch) || self.semanticSearch.keyFields.all(k, self.schema.fields.exists(f, f.name == k))",
        "semanticSearch.keyFields must name fields declared in schema.fields",
        ".semanticSearch.keyFields",
    ),
    cel(
        "!has(self.source) || self.schema.fields.exists(f, has(f.primaryKey) && f.primaryKey)",
        "a product with a source needs a primaryKey field in schema.fields",
        ".schema.fields",
    ),
]


class DataProductSpec(CRDModel):
    """What a domain team declares about one data product."""

    domain: str = Field(
        min_length=1,
        max_length=63,
        pattern=DNS_LABEL_PATTERN,
        description="Owning domain, a DNS label such as sales or support.",
    )
    description: str = Field(
        min_length=10,
        max_length=4096,
        description="What the product holds, in plain words; used to route questions to it.",
    )
    owner: Owner | None = Field(None, description="Owning team and contact.")
    tags: list[str] = Field(
        default_factory=list,
        max_length=32,
        description="Free-form keywords for discovery.",
        json_schema_extra={"items": {"type": "string", "maxLength": 63}},
    )
    data_schema: DataSchema = Field(alias="schema", description="Columns of the product's rows.")
    sla: SLA | None = Field(None, description="Service levels: freshness, availability, query latency.")
    source: Source | None = Field(None, description="Where the rows come from.")
    semantic_search: SemanticSearch | None = Field(None, description="Semantic search over the key fields.")
    inference: Inference | None = Field(None, description="AI inference endpoint of the product.")
    access: Access = Field(
        default_factory=Access, description="Who may discover and query the product.", json_schema_extra={"default": {}}
    )
    deletion_policy: DeletionPolicy = Field(
        DeletionPolicy.delete, description="Delete drops the collection with the product; Retain keeps it."
    )

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": SPEC_RULES})

    @model_validator(mode="after")
    def _cross_field_rules(self) -> DataProductSpec:
        names = [f.name for f in self.data_schema.fields]
        duplicates = [(i, n) for i, n in enumerate(names) if n in names[:i]]
        if duplicates:
            # As the API server says it for a list-map keyed by name: the later entries, by index.
            (first, name), more = duplicates[0], [f"[{i}] {n}" for i, n in duplicates[1:]]
            also = f" (also {', '.join(more)})" if more else ""
            raise ValueError(f'schema.fields[{first}]: Duplicate value: {{"name":"{name}"}}{also}')
        if self.semantic_search is not None:
            unknown = [k for k in self.semantic_search.key_fields if k not in names]
            if unknown:
                raise ValueError(
                    "semanticSearch.keyFields: must name fields declared in schema.fields (unknown: "
                    f"{', '.join(unknown)})"
                )
        if self.source is not None and not self.primary_key:
            raise ValueError("schema.fields: a product with a source needs a primaryKey field")
        return self

    @property
    def primary_key(self) -> list[str]:
        """Names of the primary-key fields, in schema order."""
        return [f.name for f in self.data_schema.fields if f.primary_key]

    @property
    def key_fields(self) -> list[str]:
        """Fields whose text is embedded (empty when semantic search is off)."""
        if self.semantic_search is None or not self.semantic_search.enabled:
            return []
        return list(self.semantic_search.key_fields)


class ConditionStatus(str, Enum):
    true = "True"
    false = "False"
    unknown = "Unknown"


class Condition(CRDModel):
    """A standard Kubernetes condition (the shape kstatus, Argo CD and kubectl wait read)."""

    type: str = Field(max_length=316, description="Condition type, e.g. Ready.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(max_length=1024, description="One CamelCase word for the last transition.")
    message: str = Field("", max_length=32768, description="Human-readable detail.")
    last_transition_time: datetime = Field(description="When status last changed.")
    observed_generation: int | None = Field(
        None, ge=0, description="metadata.generation the condition was computed for."
    )


class Phase(str, Enum):
    pending = "Pending"
    provisioning = "Provisioning"
    ready = "Ready"
    degraded = "Degraded"
    failed = "Failed"


class SLAStatus(CRDModel):
    """Result of the last SLA check."""

    met: bool | None = Field(None, description="Every declared objective is met.")
    freshness_met: bool | None = Field(None, description="The newest ingestion is within sla.freshness.")
    availability_met: bool | None = Field(None, description="The inference endpoint answered the last check.")
    last_checked_at: datetime | None = Field(None, description="When the SLA was last checked.")
    message: str | None = Field(None, max_length=4096, description="Which objective is breached, and by how much.")


class ScoreCalibration(CRDModel):
    """How similar a product's rows are to each other: turns its similarities into comparable scores."""

    mean: float = Field(description="Mean cosine similarity between pairs of the product's rows.")
    std: float = Field(ge=0, description="Standard deviation of those similarities.")


class IngestionProgress(CRDModel):
    """How far a running ingestion got (only while one runs)."""

    rows_done: int = Field(0, ge=0, description="Rows embedded and written so far.")
    rows_total: int = Field(0, ge=0, description="Rows of the source that passed validation.")
    job: str | None = Field(
        None, description="The Job ingesting the source (namespace/name), when a Job runs the ingestion."
    )


class DataProductStatus(CRDModel):
    """What the operator reports about one product."""

    # Status is written by the operator only; tolerate fields from newer operator versions.
    model_config = ConfigDict(extra="ignore")

    phase: Phase | None = Field(None, description="Pending, Provisioning, Ready, Degraded or Failed.")
    observed_generation: int | None = Field(None, ge=0, description="metadata.generation the status reflects.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="CollectionReady, Ingested, InferenceReady, Cataloged, SLAMet and Ready.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    message: str | None = Field(None, max_length=4096, description="Summary of the most important condition.")
    collection: str | None = Field(None, description="Qdrant alias queries use for this product.")
    index_collection: str | None = Field(None, description="Physical Qdrant collection the alias points at.")
    vector_size: int | None = Field(None, description="Dimension of the product's vectors.")
    inference_endpoint: str | None = Field(None, description="URL of the product's inference endpoint.")
    records: int | None = Field(None, ge=0, description="Points in the collection after the last ingestion.")
    rejected_records: int | None = Field(
        None, ge=0, description="Rows of the last ingestion refused by schema validation."
    )
    last_ingested_at: datetime | None = Field(None, description="When the source was last ingested.")
    ingested_digest: str | None = Field(
        None, description="Digest of source rows and embedding settings of the last ingestion."
    )
    sla: SLAStatus | None = Field(None, description="Result of the last SLA check.")
    ingestion: IngestionProgress | None = Field(None, description="Progress of a running ingestion.")
    layout: CollectionLayout | None = Field(
        None,
        description="The collection's layout as the store applied it (the embedded engine keeps its own).",
    )
    routing_collection: str | None = Field(
        None, description="The mesh's routing collection holding the product's rows and card (one per model)."
    )
    score_calibration: ScoreCalibration | None = Field(
        None, description="Similarity statistics of the rows, for merging with products of other models."
    )

    def wire_status(self) -> dict[str, Any]:
        """Every field as written to the API, None included, so a merge patch removes cleared values."""
        return self.model_dump(by_alias=True, mode="json")


_NAMED_FIELD = re.compile(r"^[A-Za-z][A-Za-z0-9]*(\[[0-9]+\])?(\.[A-Za-z][A-Za-z0-9]*(\[[0-9]+\])?)*: ")


def _apiserver_wording(err: Any) -> str | None:
    """The API server's words for a size limit pydantic reports in its own."""
    ctx = err.get("ctx") or {}
    if err["type"] == "too_long" and "max_length" in ctx:
        return f"Too many: {ctx.get('actual_length')}: must have at most {ctx['max_length']} items"
    if err["type"] == "string_too_long" and "max_length" in ctx:
        return f"Too long: may not be more than {ctx['max_length']} characters"
    return None


def spec_error_message(exc: ValidationError) -> str:
    """A validation error as one line per offending field, with kubectl-style paths (spec.a.b[1].c)."""
    parts = []
    for err in exc.errors():
        path = "spec"
        for part in err["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            elif not str(part).startswith(("function-", "model-")):
                path += f".{part}"
        message = _apiserver_wording(err) or err["msg"].removeprefix("Value error, ")
        # Cross-field rules name their field at the start of the message, relative to their model.
        named = _NAMED_FIELD.match(message) if err["type"] == "value_error" else None
        if named:
            parts.append(f"{path}.{message}" if path != "spec" else f"spec.{message}")
        else:
            parts.append(f"spec.{message}" if path == "spec" and ":" in message else f"{path}: {message}")
    if any(p.startswith("spec.source.inline") for p in parts):
        parts.append(INLINE_HINT)
    return "; ".join(parts)


def parse_spec(body: Mapping[str, Any]) -> DataProductSpec | None:
    """The spec of an object as the API server stored it, or None when it does not validate."""
    try:
        return DataProductSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        return None


def parse_status(body: Mapping[str, Any]) -> DataProductStatus:
    """The status of an object (empty when it has none yet)."""
    return DataProductStatus.model_validate(body.get("status") or {})
