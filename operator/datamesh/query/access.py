"""Who is calling the query service, and which products they may read.

Callers present a bearer token; the tokens file (mounted from a Secret) maps each token to an
identity and its groups. A product's ``access.consumers`` lists who may read it: ``"*"`` is
every caller (anonymous ones included, when anonymous access is on), ``group:<g>`` matches a
group, anything else matches the identity's name.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datamesh.adapters.files import WatchedFile
from datamesh.resource.catalog import CatalogEntry

ANONYMOUS = "anonymous"
EVERYONE = "*"
GROUP_PREFIX = "group:"
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="datamesh"'}
_INVALID = {"WWW-Authenticate": 'Bearer realm="datamesh", error="invalid_token"'}


class Unauthenticated(Exception):
    """The request is refused (HTTP 401); ``challenge`` is the WWW-Authenticate header to send."""

    def __init__(self, message: str, challenge: Mapping[str, str]) -> None:
        super().__init__(message)
        self.challenge = dict(challenge)


@dataclass(frozen=True)
class Identity:
    """An authenticated caller (or the anonymous one)."""

    name: str
    groups: frozenset[str] = field(default_factory=frozenset)

    @property
    def anonymous(self) -> bool:
        return self.name == ANONYMOUS and not self.groups


ANONYMOUS_IDENTITY = Identity(ANONYMOUS)


def _admitted(identity: Identity, grants: list[str]) -> bool:
    for grant in grants:
        if grant == EVERYONE:
            return True
        if grant.startswith(GROUP_PREFIX):
            if grant[len(GROUP_PREFIX) :] in identity.groups:
                return True
        elif not identity.anonymous and grant == identity.name:
            return True
    return False


def can_read(identity: Identity, entry: CatalogEntry) -> bool:
    """Whether ``identity`` may discover and query the product of ``entry``."""
    return _admitted(identity, entry.consumers)


def can_read_pii(identity: Identity, entry: CatalogEntry) -> bool:
    """Whether ``identity`` sees the values of the product's PII fields (else they are masked)."""
    return _admitted(identity, entry.pii_readers)


def _digest(token: str) -> str:
    # Tokens are kept and looked up by hash: lookup timing then reveals nothing usable about a token.
    return hashlib.sha256(token.encode()).hexdigest()


def parse_tokens(doc: Any) -> dict[str, Identity]:
    """``{token: {identity, groups}}`` as identities by token hash; raises ValueError on a bad shape."""
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise ValueError("the tokens file must map each token to {identity: ..., groups: [...]}")
    tokens: dict[str, Identity] = {}
    for token, spec in doc.items():
        if not isinstance(token, str) or not token.strip():
            raise ValueError("tokens must be non-empty strings")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("identity"), str) or not spec["identity"]:
            raise ValueError(f"token ending in ...{token[-4:]}: needs an 'identity' string")
        groups = spec.get("groups") or []
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise ValueError(f"token ending in ...{token[-4:]}: 'groups' must be a list of strings")
        if spec["identity"] == ANONYMOUS:
            raise ValueError(f"token ending in ...{token[-4:]}: the identity name '{ANONYMOUS}' is reserved")
        tokens[_digest(token)] = Identity(spec["identity"], frozenset(groups))
    return tokens


def read_tokens_file(path: Path) -> dict[str, Identity]:
    """Identities by token hash from a YAML (or ``.json``) tokens file; raises ValueError on a bad shape."""
    text = path.read_text()
    try:
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from exc
    return parse_tokens(doc)


class Authenticator:
    """Maps ``Authorization: Bearer <token>`` to an identity; re-reads the tokens file when it changes."""

    def __init__(
        self,
        tokens: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        tokens_file: str | Path | None = None,
        allow_anonymous: bool = False,
    ) -> None:
        self.allow_anonymous = allow_anonymous
        self._static = parse_tokens(tokens or {})
        self._file = WatchedFile(tokens_file, read_tokens_file, "tokens file") if tokens_file else None
        if self._file is not None:
            self._file.refresh(strict=True)  # a broken file at start-up is a configuration error

    def identify(self, authorization: str | None) -> Identity:
        """The caller of a request with this Authorization header; raises Unauthenticated when refused."""
        if not authorization:
            if self.allow_anonymous:
                return ANONYMOUS_IDENTITY
            raise Unauthenticated("a bearer token is required (Authorization: Bearer <token>)", _CHALLENGE)
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("the Authorization header must be 'Bearer <token>'", _CHALLENGE)
        from_file = (self._file.refresh() if self._file is not None else None) or {}
        digest = _digest(token)
        identity = self._static.get(digest) or from_file.get(digest)
        if identity is None:
            # An invalid token is refused even when anonymous access is on: the caller meant to be someone.
            raise Unauthenticated("invalid bearer token", _INVALID)
        return identity
