"""Kubernetes label selectors, as an operator shard's scope: parsed, checked and matched locally.

The API server applies the same selector to the shard's list and watch of DataProducts, so a
shard never sees another's products; the local match is for what the server cannot filter (an
inference child's owner, read by name). The grammar is the API server's, without ``<`` and ``>``:
``key``, ``!key``, ``key=value`` (or ``==``), ``key!=value``, ``key in (a,b)``, ``key notin (a,b)``,
joined by commas; every requirement must hold.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_PREFIX = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*"
_KEY = rf"(?:{_PREFIX}/)?{_NAME}"
_VALUE = rf"(?:{_NAME})?"
_KEY_RE = re.compile(_KEY)
_VALUE_RE = re.compile(_VALUE)
_SET_RE = re.compile(r"(?P<key>\S+)\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)")
_CMP_RE = re.compile(r"(?P<key>[^\s=!]+)\s*(?P<op>==|=|!=)\s*(?P<value>\S*)")
_EXISTS_RE = re.compile(r"(?P<neg>!?)\s*(?P<key>[^\s=!(),<>]+)")


class SelectorError(ValueError):
    """A label selector that the API server would refuse, with the part that is wrong."""


class Operator(Enum):
    """How a requirement tests its key."""

    IN = "in"
    NOT_IN = "notin"
    EXISTS = "exists"
    DOES_NOT_EXIST = "!"


@dataclass(frozen=True)
class Requirement:
    """One comma-separated part of a selector."""

    key: str
    operator: Operator
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether ``labels`` satisfy this requirement (``!=`` and ``notin`` hold when the key is absent)."""
        present = self.key in labels
        if self.operator is Operator.EXISTS:
            return present
        if self.operator is Operator.DOES_NOT_EXIST:
            return not present
        if self.operator is Operator.IN:
            return present and labels[self.key] in self.values
        return not present or labels[self.key] not in self.values

    def __str__(self) -> str:
        if self.operator is Operator.EXISTS:
            return self.key
        if self.operator is Operator.DOES_NOT_EXIST:
            return f"!{self.key}"
        values = sorted(self.values)
        if len(values) == 1:
            return f"{self.key}{'=' if self.operator is Operator.IN else '!='}{values[0]}"
        return f"{self.key} {self.operator.value} ({','.join(values)})"


@dataclass(frozen=True)
class LabelSelector:
    """A parsed label selector: all of its requirements must hold."""

    requirements: tuple[Requirement, ...]

    @classmethod
    def parse(cls, text: str) -> LabelSelector:
        """Parse ``text``; SelectorError names the part the API server would refuse."""
        parts = _split(text)
        if not all(parts):
            raise SelectorError(f"label selector {text!r} is empty or has an empty requirement")
        return cls(tuple(_requirement(p) for p in parts))

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        """Whether an object with ``labels`` is selected."""
        found = labels or {}
        return all(r.matches(found) for r in self.requirements)

    def __str__(self) -> str:
        return ",".join(map(str, self.requirements))


def _split(text: str) -> list[str]:
    """The comma-separated parts of ``text``, stripped; commas inside "(...)" separate values, not parts."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth not in (0, 1):
            raise SelectorError(f"label selector {text!r} has unbalanced parentheses")
        if char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    if depth:
        raise SelectorError(f"label selector {text!r} has unbalanced parentheses")
    return [*parts, text[start:].strip()]


def _requirement(part: str) -> Requirement:
    if m := _SET_RE.fullmatch(part):
        values = [v.strip() for v in m["values"].split(",")]
        if not all(values):
            raise SelectorError(f"label selector part {part!r}: empty value in the set")
        op = Operator.IN if m["op"] == "in" else Operator.NOT_IN
        return Requirement(_key(m["key"], part), op, frozenset(_value(v, part) for v in values))
    if m := _CMP_RE.fullmatch(part):
        op = Operator.NOT_IN if m["op"] == "!=" else Operator.IN
        return Requirement(_key(m["key"], part), op, frozenset({_value(m["value"], part)}))
    if m := _EXISTS_RE.fullmatch(part):
        op = Operator.DOES_NOT_EXIST if m["neg"] else Operator.EXISTS
        return Requirement(_key(m["key"], part), op)
    raise SelectorError(
        f"label selector part {part!r} is not one of key, !key, key=value, key!=value, key in (...), key notin (...)"
    )


def _key(key: str, part: str) -> str:
    if not _KEY_RE.fullmatch(key) or len(key) > 317:
        raise SelectorError(f"label selector part {part!r}: {key!r} is not a label key ([prefix/]name)")
    return key


def _value(value: str, part: str) -> str:
    if not _VALUE_RE.fullmatch(value):
        raise SelectorError(f"label selector part {part!r}: {value!r} is not a label value")
    return value


_GLOB_CHARS = frozenset("*?[!,")


@dataclass(frozen=True)
class NamespacePatterns:
    """An operator's ``--namespace`` values as kopf reads them: names or globs, ``!`` excluding, commas joining.

    A namespace is in scope when it matches an including pattern (any, if there are only exclusions)
    and no excluding one; matched locally where the API server cannot filter (the catalog rebuild).
    """

    patterns: tuple[str, ...]

    @property
    def names_only(self) -> bool:
        """Whether every pattern is a plain namespace name (nothing to resolve against the cluster)."""
        return not any(_GLOB_CHARS & set(p) for p in self.patterns)

    def matches(self, namespace: str) -> bool:
        """Whether ``namespace`` is in scope."""
        parts = [part.strip() for p in self.patterns for part in p.split(",") if part.strip()]
        excluding = [p[1:] for p in parts if p.startswith("!")]
        including = [p for p in parts if not p.startswith("!")]
        if any(fnmatch.fnmatchcase(namespace, p) for p in excluding):
            return False
        return not including or any(fnmatch.fnmatchcase(namespace, p) for p in including)
