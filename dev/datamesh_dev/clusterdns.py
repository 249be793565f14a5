"""A tiny cluster DNS server for the real-node e2e tier (no CoreDNS image can be pulled here).

Pods of the e2e node get it as their nameserver (the kubelet's ``clusterDNS``). It answers
``A`` queries for ``<service>.<namespace>.svc.<domain>`` with the Service's ClusterIP (or, for
a headless Service, the ready addresses of its EndpointSlices), read from the API server with
the admin credentials (cached for a second); other names in the cluster domain get NXDOMAIN
(that is how the resolver's search list finds the right one), other queries of any type
(``AAAA`` of a Service: an empty answer) are forwarded to the machine's own nameserver. UDP
only: answers are small. It runs as a thread of the process that runs the node.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import ssl
import struct
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["ClusterDNS", "upstream_nameserver"]

_A, _AAAA = 1, 28
_NOERROR, _SERVFAIL, _NXDOMAIN = 0, 2, 3
TTL = 5


def upstream_nameserver(resolv_conf: Path = Path("/etc/resolv.conf")) -> str | None:
    """The first nameserver of the machine's resolver configuration."""
    try:
        for line in resolv_conf.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                return parts[1]
    except OSError:
        pass
    return None


def _parse_question(packet: bytes) -> tuple[int, int, str, int, int] | None:
    """(id, flags, name, qtype, end of question) of a one-question query, or None."""
    if len(packet) < 12:
        return None
    qid, flags, qdcount = struct.unpack("!HHH", packet[:6])
    if qdcount != 1 or flags & 0x8000:
        return None
    labels, pos = [], 12
    while True:
        if pos >= len(packet):
            return None
        length = packet[pos]
        pos += 1
        if length == 0:
            break
        if length & 0xC0 or pos + length > len(packet):
            return None
        labels.append(packet[pos : pos + length].decode("ascii", "replace"))
        pos += length
    if pos + 4 > len(packet):
        return None
    qtype, _qclass = struct.unpack("!HH", packet[pos : pos + 4])
    return qid, flags, ".".join(labels).lower(), qtype, pos + 4


def _reply(query: bytes, end: int, rcode: int, addresses: list[str]) -> bytes:
    qid, flags = struct.unpack("!HH", query[:4])
    rd = flags & 0x0100
    header = struct.pack("!HHHHHH", qid, 0x8000 | 0x0400 | rd | 0x0080 | rcode, 1, len(addresses), 0, 0)
    answers = b"".join(
        struct.pack("!HHHIH", 0xC00C, _A, 1, TTL, 4) + ipaddress.IPv4Address(a).packed for a in addresses
    )
    return header + query[12:end] + answers


class ClusterDNS:
    """Service names of one API server, served on ``address:port`` (UDP) from a thread."""

    def __init__(
        self,
        address: str,
        server: str,
        context: ssl.SSLContext,
        *,
        port: int = 53,
        domain: str = "cluster.local",
        upstream: str | None = None,
    ) -> None:
        self.address, self.port, self.domain = address, port, domain.strip(".").lower()
        self._server = server.rstrip("/")
        self._context = context
        self._upstream = upstream if upstream is not None else upstream_nameserver()
        self._cache: dict[tuple[str, str], tuple[float, list[str] | None]] = {}
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.answered = 0

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((self.address, self.port))
        sock.settimeout(0.5)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name=f"cluster-dns {self.address}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
        self._sock = self._thread = None

    # ---- serving

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                packet, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                answer = self.answer(packet)
            except Exception:  # one bad query must not stop the server
                log.exception("cluster DNS: query from %s failed", peer)
                answer = None
            if answer:
                try:
                    self._sock.sendto(answer, peer)
                    self.answered += 1
                except OSError:
                    pass

    def answer(self, packet: bytes) -> bytes | None:
        """The reply to one query packet (None: drop it)."""
        parsed = _parse_question(packet)
        if parsed is None:
            return None
        _qid, _flags, name, qtype, end = parsed
        suffix = f".svc.{self.domain}"
        if name.endswith(suffix):
            parts = name[: -len(suffix)].split(".")
            found = self._lookup(parts[1], parts[0]) if len(parts) == 2 else None
            if found is None:
                return _reply(packet, end, _NXDOMAIN, [])
            return _reply(packet, end, _NOERROR, found if qtype == _A else [])
        if name == self.domain or name.endswith(f".{self.domain}"):
            return _reply(packet, end, _NXDOMAIN, [])
        return self._forward(packet, end)

    def _forward(self, packet: bytes, end: int) -> bytes:
        if not self._upstream:
            return _reply(packet, end, _SERVFAIL, [])
        with socket.socket(socket.AF_INET6 if ":" in self._upstream else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3.0)
            try:
                s.sendto(packet, (self._upstream, 53))
                return s.recvfrom(4096)[0]
            except OSError:
                return _reply(packet, end, _SERVFAIL, [])

    # ---- the API server

    def _lookup(self, namespace: str, service: str) -> list[str] | None:
        key = (namespace, service)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < 1.0:
            return hit[1]
        found = self._resolve(namespace, service)
        self._cache[key] = (now, found)
        return found

    def _get(self, path: str) -> dict[str, object] | None:
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=self._context)
        )
        try:
            with opener.open(f"{self._server}{path}", timeout=5) as r:
                data = json.loads(r.read())
                return data if isinstance(data, dict) else None
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def _resolve(self, namespace: str, service: str) -> list[str] | None:
        svc = self._get(f"/api/v1/namespaces/{namespace}/services/{service}")
        if svc is None:
            return None
        spec = svc.get("spec") or {}
        assert isinstance(spec, dict)
        cluster_ip = spec.get("clusterIP")
        if cluster_ip and cluster_ip != "None":
            return [str(cluster_ip)]
        slices = self._get(
            f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
            f"?labelSelector=kubernetes.io%2Fservice-name%3D{service}"
        )
        addresses: list[str] = []
        for item in (slices or {}).get("items", []) or []:  # type: ignore[attr-defined]
            if item.get("addressType") != "IPv4":
                continue
            for endpoint in item.get("endpoints") or []:
                if (endpoint.get("conditions") or {}).get("ready", True):
                    addresses += endpoint.get("addresses") or []
        return sorted(set(addresses))
