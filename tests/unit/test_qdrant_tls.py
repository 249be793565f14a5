"""An https Qdrant whose certificate a private CA signed: trusted with DATAMESH_QDRANT_CA_FILE, refused without.

The server is a real TLS endpoint on 127.0.0.1 (uvicorn with a certificate made here) answering the
one REST call the test makes the way Qdrant does; the client side is the project's QdrantStore.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from datamesh.adapters.qdrant import QdrantStore
from datamesh.core.ports import VectorStoreError
from datamesh.settings import StoreSettings
from tests.httpserver import LoopThread


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None, signer: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )
    if issuer is None:  # the CA
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return builder.sign(signer, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A private CA (ca.pem) and a server certificate for 127.0.0.1 that it signed (cert.pem, key.pem)."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("datamesh test CA", ca_key, None, ca_key)
    server = _cert("qdrant", key, ca.subject, ca_key)
    paths = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


async def _exists(request: Request) -> JSONResponse:
    # Qdrant's answer to GET /collections/{name}/exists; the API key is checked as Qdrant does.
    if request.headers.get("api-key") != "k3y":
        return JSONResponse({"status": {"error": "Must provide an API key"}}, status_code=401)
    return JSONResponse({"result": {"exists": True}, "status": "ok", "time": 0.0})


async def _root(request: Request) -> JSONResponse:
    return JSONResponse({"title": "qdrant - vector search engine", "version": "1.19.1"})


@pytest.fixture(scope="module")
def https_qdrant(pki: dict[str, Path]) -> Iterator[str]:
    app = Starlette(routes=[Route("/", _root), Route("/collections/{name}/exists", _exists)])
    with (
        LoopThread("tls-qdrant") as loop,
        loop.serving(app, ssl_certfile=str(pki["cert"]), ssl_keyfile=str(pki["key"])) as url,
    ):
        yield url.replace("http://", "https://", 1)


def _exists_via_store(settings: StoreSettings) -> bool:
    async def ask() -> bool:
        store = QdrantStore.connect(settings)
        try:
            return await store.exists("sales.churn")
        finally:
            await store.close()

    with LoopThread("client") as loop:
        return loop.call(ask())


def test_the_ca_file_makes_a_private_ca_trusted(https_qdrant: str, pki: dict[str, Path]) -> None:
    settings = StoreSettings(url=https_qdrant, api_key="k3y", ca_file=str(pki["ca"]))
    assert _exists_via_store(settings) is True


def test_without_the_ca_file_the_certificate_is_refused(https_qdrant: str) -> None:
    with pytest.raises(VectorStoreError, match="CERTIFICATE_VERIFY_FAILED"):
        _exists_via_store(StoreSettings(url=https_qdrant, api_key="k3y"))


def test_a_missing_ca_file_is_refused_at_start_with_the_variable_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATAMESH_QDRANT_CA_FILE", str(tmp_path / "nope.pem"))
    with pytest.raises(ValidationError, match="DATAMESH_QDRANT_CA_FILE"):
        StoreSettings()
