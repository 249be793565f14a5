"""Generate the DataProduct CustomResourceDefinition from the pydantic models.

Pydantic emits JSON Schema with ``$defs``/``$ref``, ``anyOf`` for optionals and titles;
the API server wants a structural OpenAPI v3 schema: every node typed, everything inlined.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from datamesh.resource import models

CRD_FILE = "datamesh.io_dataproducts.yaml"

# Keywords a structural schema may carry; pydantic's others (title, $defs, ...) are dropped.
_KEEP = {
    "type",
    "description",
    "default",
    "enum",
    "pattern",
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "required",
    "nullable",
    # Only value validations (such as `required`) inside: the structural schema allows them there.
    "oneOf",
}


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _resolve(merged, defs)
    return node


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = _resolve(node, defs)
    any_of = node.get("anyOf")
    if any_of is not None:
        # Optional[X] is anyOf[X, null]; an absent field already means "unset" in Kubernetes.
        options = [o for o in any_of if o.get("type") != "null"]
        if len(options) == 1:
            outer = {k: v for k, v in node.items() if k != "anyOf"}
            if outer.get("default", 0) is None:
                outer.pop("default")
            return _structural({**_resolve(options[0], defs), **outer}, defs)
        if {o.get("type") for o in options} == {"integer", "string"}:
            return {k: v for k, v in node.items() if k in ("description",)} | {"x-kubernetes-int-or-string": True}
        raise ValueError(f"cannot express anyOf {options} in a structural schema")

    out: dict[str, Any] = {k: v for k, v in node.items() if k in _KEEP}
    out.update({k: v for k, v in node.items() if k.startswith("x-kubernetes-")})
    if "const" in node:
        out["enum"] = [node["const"]]
    if "enum" in node and "type" not in out:
        out["type"] = "string"
    kind = out.get("type")
    if kind == "object":
        if "properties" in node:
            out["properties"] = {name: _structural(sub, defs) for name, sub in node["properties"].items()}
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and "properties" not in node:
            out["additionalProperties"] = (
                _structural(extra, defs) if extra else {"x-kubernetes-preserve-unknown-fields": True}
            )
        elif "properties" not in node and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        items = node.get("items", {})
        out["items"] = (
            _structural(items, defs)
            if items.get("type") != "object" or {"properties", "additionalProperties", "$ref"} & items.keys()
            else {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        )
    if node.get("format") == "date-time":
        out["format"] = "date-time"
    return out


def _schema_of(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(raw, raw.get("$defs", {}))


def _printer_columns() -> list[dict[str, Any]]:
    return [
        {"name": "Domain", "type": "string", "jsonPath": ".spec.domain"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Records", "type": "integer", "jsonPath": ".status.records"},
        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status', "priority": 1},
        {"name": "Collection", "type": "string", "jsonPath": ".status.collection", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition object for DataProduct."""
    spec = _schema_of(models.DataProductSpec)
    status = _schema_of(models.DataProductStatus)
    status.pop("required", None)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{models.PLURAL}.{models.GROUP}",
            "annotations": {
                "datamesh.io/generated-by": "datamesh crd (from datamesh.resource.models); do not edit by hand"
            },
        },
        "spec": {
            "group": models.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": models.KIND,
                "listKind": f"{models.KIND}List",
                "plural": models.PLURAL,
                "singular": models.SINGULAR,
                "shortNames": models.SHORT_NAMES,
                "categories": models.CATEGORIES,
            },
            "versions": [
                {
                    "name": models.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": _printer_columns(),
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": (
                                "A data product of the mesh: schema, SLA, source, semantic search, inference and "
                                "access."
                            ),
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def render_crd() -> str:
    """The CRD as the YAML committed under ``crds/``."""
    header = "# Generated by `datamesh crd --write` from operator/datamesh/resource/models.py. Do not edit.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


def write_crd(directory: Path) -> Path:
    """Write the CRD into ``directory`` and return the file's path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CRD_FILE
    path.write_text(render_crd())
    return path


def crd_is_current(directory: Path) -> bool:
    """Whether the CRD file in ``directory`` matches what the models generate."""
    path = directory / CRD_FILE
    return path.exists() and path.read_text() == render_crd()
