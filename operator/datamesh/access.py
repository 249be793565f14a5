"""Who is calling the query service, and which products they may read.

Callers present a bearer token; the tokens file (mounted from a Secret) maps each token to an
identity and its groups. A product's ``access.consumers`` lists who may read it: ``"*"`` is
every caller (anonymous ones included, when anonymous access is on), ``group:<g>`` matches a
group, anything else matches the identity's name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from fastapi import HTTPException

from datamesh.catalog import CatalogEntry

if TYPE_CHECKING:
    from datamesh.query_service import QuerySettings

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
EVERYONE = "*"
GROUP_PREFIX = "group:"
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="datamesh"'}


@dataclass(frozen=True)
class Identity:
    """An authenticated caller (or the anonymous one)."""

    name: str
    groups: frozenset[str] = field(default_factory=frozenset)

    @property
    def anonymous(self) -> bool:
        return self.name == ANONYMOUS and not self.groups


ANONYMOUS_IDENTITY = Identity(ANONYMOUS)


def can_read(identity: Identity, entry: CatalogEntry) -> bool:
    """Whether ``identity`` may discover and query the product of ``entry``."""
    for consumer in entry.consumers:
        if consumer == EVERYONE:
            return True
        if consumer.startswith(GROUP_PREFIX):
            if consumer[len(GROUP_PREFIX) :] in identity.groups:
                return True
        elif not identity.anonymous and consumer == identity.name:
            return True
    return False


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
        self.tokens_file = Path(tokens_file) if tokens_file else None
        self._static = parse_tokens(tokens or {})
        self._from_file: dict[str, Identity] = {}
        self._file_stamp: tuple[int, int, int] | None = None
        self._lock = threading.Lock()
        if self.tokens_file is not None:
            self._reload(strict=True)  # a broken file at start-up is a configuration error

    @classmethod
    def from_settings(cls, settings: QuerySettings) -> Authenticator:
        """The authenticator the service settings describe."""
        return cls(tokens_file=settings.tokens_file, allow_anonymous=settings.allow_anonymous)

    def _reload(self, strict: bool = False) -> None:
        assert self.tokens_file is not None
        try:
            st = os.stat(self.tokens_file)
        except FileNotFoundError:
            if strict:
                raise
            return  # a Secret volume swaps its files atomically; keep the last tokens meanwhile
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._file_stamp:
            return
        with self._lock:
            try:
                text = self.tokens_file.read_text()
                doc = json.loads(text) if self.tokens_file.suffix == ".json" else yaml.safe_load(text)
                self._from_file = parse_tokens(doc)
            except (OSError, ValueError, yaml.YAMLError) as exc:
                if strict:
                    raise ValueError(f"tokens file {self.tokens_file}: {exc}") from exc
                log.error("tokens file %s is unreadable, keeping the previous tokens: %s", self.tokens_file, exc)
            self._file_stamp = stamp

    def identify(self, authorization: str | None) -> Identity:
        """The caller of a request with this Authorization header; raises HTTP 401 when refused."""
        if not authorization:
            if self.allow_anonymous:
                return ANONYMOUS_IDENTITY
            raise HTTPException(401, "a bearer token is required (Authorization: Bearer <token>)", headers=_CHALLENGE)
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(401, "the Authorization header must be 'Bearer <token>'", headers=_CHALLENGE)
        if self.tokens_file is not None:
            self._reload()
        digest = _digest(token)
        identity = self._static.get(digest) or self._from_file.get(digest)
        if identity is None:
            # An invalid token is refused even when anonymous access is on: the caller meant to be someone.
            raise HTTPException(401, "invalid bearer token", headers={"WWW-Authenticate": 'Bearer realm="datamesh", error="invalid_token"'})
        return identity
