"""The sites' only way in: a TLS gateway that forwards Flower's Fleet API and nothing else.

Why: flwr 1.42's SuperLink serves its Fleet API (what SuperNodes need), its Control API
(register nodes, submit runs) and its Runtime API on one port, and the Control API has
no authentication in the open-source build.  Exposing that port to the sites would let
anyone who can reach it enrol their own node key or submit code.  So ``fedtune server``
binds the SuperLink to 127.0.0.1 only, and this gateway, on the address the sites dial,
terminates TLS with the SuperLink's certificate and forwards the Fleet API calls a
SuperNode makes (node-auth signature headers included) to the SuperLink over TLS verified
against the federation CA.  Every other request gets 404 and a log line.

"The Fleet API" is an exact list of paths (:data:`FLEET_PATHS`), checked against the raw
request target, never a prefix of the decoded path: a prefix check let
``POST /v1/fleet/../control/register-node`` (and its ``%2e%2e`` spellings) through, and
httpx then removed the dot segments and delivered it to the Control API.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Iterable, Optional

import httpx

if TYPE_CHECKING:
    from starlette.requests import Request

log = logging.getLogger(__name__)

FLEET_PREFIX = "/v1/fleet/"
# Hop-by-hop and connection-specific headers are not forwarded (RFC 9110 §7.6.1).
_HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer",
                "upgrade", "proxy-authorization", "proxy-authenticate"}
DEFAULT_MAX_BODY_BYTES = 512 * 1024 * 1024
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"]
# At most this many (peer, reason) entries are remembered for rate-limiting refusal log lines.
_REFUSAL_MEMORY = 4096


def _syntax_refusal(raw_path: bytes, query_string: bytes) -> Optional[str]:
    """Why a request target is not a plain path a SuperNode would send, or None.

    Each of these forms is one that some layer between here and the SuperLink's router
    (httpx, uvicorn's percent-decoding, a future proxy) may rewrite into a different path
    than the one checked, so none is forwarded.  Flower's Fleet paths contain none of them.
    """
    if query_string:
        return "a query string"
    if b"%" in raw_path:
        return "percent-encoding"
    if b"\\" in raw_path:
        return "a backslash"
    if b"//" in raw_path:
        return "an empty path segment"
    segments = raw_path.split(b"/")
    if b"." in segments or b".." in segments:
        return "a dot segment"
    if not raw_path.startswith(FLEET_PREFIX.encode()) or not raw_path.isascii():
        return "not a Fleet API path"
    return None


def _allowlist(paths: Iterable[str]) -> frozenset[str]:
    """The Fleet paths, each checked to be a plain path: fail closed if Flower ever ships another."""
    checked = frozenset(paths)
    for path in checked:
        reason = _syntax_refusal(path.encode("ascii", "replace"), b"")
        if reason is not None:
            raise RuntimeError(f"Flower's Fleet route {path!r} has {reason}; the gateway refuses to forward it")
    if not checked:
        raise RuntimeError("no Fleet API routes found in Flower; the gateway would forward nothing")
    return checked


def _flower_fleet_paths() -> frozenset[str]:
    """Every ``POST /v1/fleet/...`` route of Flower's protobuf-over-HTTP Fleet API.

    Taken from Flower's own route table (``flwr.supercore.protobuf.translation``), the one
    its SuperLink uses to decode each Fleet request; tests/test_gateway.py checks it equals
    what the SuperLink's Fleet router registers and what the SuperNode's HTTP client calls.
    For flwr 1.42 these are register-, activate-, deactivate-, unregister-node,
    send-node-heartbeat, pull-/push-messages, get-run, get-fab, push-/pull-object and
    confirm-message-received.
    """
    from flwr.supercore.protobuf.translation import PROTOBUF_REQUEST_TYPES

    return _allowlist(path for method, path in PROTOBUF_REQUEST_TYPES if method == "POST"
                      and path.startswith(FLEET_PREFIX))


FLEET_PATHS: frozenset[str] = _flower_fleet_paths()
_FLEET_RAW_PATHS = frozenset(path.encode("ascii") for path in FLEET_PATHS)


def refusal(method: str, raw_path: bytes, query_string: bytes = b"") -> Optional[str]:
    """Why a request must not reach the SuperLink, or None for a Fleet API call.

    ``raw_path`` is the request target as it arrived (ASGI ``raw_path``), not the decoded
    path: the decision is made on the bytes that will be sent upstream.
    """
    if method != "POST":
        return f"method {method}"
    reason = _syntax_refusal(raw_path, query_string)
    if reason is None and raw_path not in _FLEET_RAW_PATHS:
        reason = "not a Fleet API call"
    return reason


def upstream_url(upstream: httpx.URL, raw_path: bytes) -> httpx.URL:
    """``upstream`` with the path ``raw_path``, refusing any URL on which httpx would rewrite it.

    httpx removes dot segments from every absolute URL, ``copy_with(raw_path=...)``
    included, so it cannot be told to send a path verbatim.  The gateway only ever gives
    it allowlisted paths (on which that rewriting is the identity), and this check keeps
    it so: a path httpx would change is never sent.
    """
    url = upstream.copy_with(raw_path=raw_path)
    if url.raw_path != raw_path:
        raise ValueError(f"httpx would send {url.raw_path!r} for {raw_path!r}")
    return url


class _RefusalLog:
    """One warning per (peer, reason) a minute: a scanner must not flood the operator's log.

    The memory is bounded: a scanner sending a million distinct paths must not grow it.
    """

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self.last: dict[tuple[str, str], float] = {}

    def warn(self, peer: str, method: str, raw_path: bytes, reason: str) -> None:
        now = time.monotonic()
        key = (peer, reason)
        if now - self.last.get(key, -1e18) <= self.interval_s:
            return
        if len(self.last) >= _REFUSAL_MEMORY:
            self.last = {k: t for k, t in self.last.items() if now - t <= self.interval_s}
            if len(self.last) >= _REFUSAL_MEMORY:
                self.last.clear()
        self.last[key] = now
        # repr of the raw bytes, truncated: the target is attacker-controlled and goes into the log.
        log.warning("gateway: refused %s %r from %s (%s; only the Fleet API is exposed to sites)",
                    method, raw_path[:200], peer, reason)


def _raw_path(scope: dict) -> bytes:
    """The request target's path as it arrived (uvicorn always sets ``raw_path``; ASGI makes it optional)."""
    raw = scope.get("raw_path")
    return raw if raw else scope["path"].encode("utf-8")


async def _read_body(request: Request, max_body_bytes: int) -> Optional[bytes]:
    """The request body, or None (logged) when it is over ``max_body_bytes``, before buffering it all."""
    path = request.url.path
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        log.warning("gateway: refused a %s-byte %s (limit %d bytes)", declared, path, max_body_bytes)
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            log.warning("gateway: refused %s: body over %d bytes", path, max_body_bytes)
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _relay(client: httpx.AsyncClient, url: httpx.URL, body: bytes, headers: dict[str, str]):  # type: ignore[no-untyped-def]
    """POST one Fleet call upstream and hand back the SuperLink's answer (502 if it gives none)."""
    from starlette.responses import Response

    try:
        upstream_response = await client.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        log.warning("gateway: the SuperLink did not answer %s: %s", url.raw_path[:80], exc)
        return Response(status_code=502)
    out_headers = {k: v for k, v in upstream_response.headers.items()
                   if k.lower() not in _HOP_HEADERS and k.lower() != "content-encoding"}
    return Response(content=upstream_response.content, status_code=upstream_response.status_code,
                    headers=out_headers)


def make_app(upstream: str, ca_file: Path, timeout_s: float = 300.0,  # type: ignore[no-untyped-def]
             max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    """A Starlette app forwarding Fleet API calls to ``upstream`` (``https://127.0.0.1:PORT``).

    Every request is decided on its raw request target (see :func:`refusal`), and a Fleet
    call is sent upstream with exactly that target.  A request body over
    ``max_body_bytes`` is refused (413) before it is buffered: the gateway faces the
    network and must not be made to hold an arbitrary upload in memory.
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    client = httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca_file)), timeout=timeout_s)
    base = httpx.URL(upstream)
    refused = _RefusalLog()

    def refuse(request: Request) -> Optional[Response]:
        """A logged 404 for anything but a Fleet API call (None for a Fleet call)."""
        raw_path = _raw_path(request.scope)
        reason = refusal(request.method, raw_path, request.scope.get("query_string", b""))
        if reason is None:
            return None
        refused.warn(request.client.host if request.client else "?", request.method, raw_path, reason)
        return Response(status_code=404)

    async def unrouted(request: Request, exc: Exception) -> Response:
        # A target Starlette cannot route (absolute-form, an unlisted method) is refused like any other.
        return refuse(request) or Response(status_code=404)

    async def forward(request: Request) -> Response:
        refusal_response = refuse(request)
        if refusal_response is not None:
            return refusal_response
        raw_path = _raw_path(request.scope)
        try:
            url = upstream_url(base, raw_path)
        except ValueError as exc:
            log.error("gateway: refused %r: %s", raw_path, exc)
            return Response(status_code=404)
        body = await _read_body(request, max_body_bytes)
        if body is None:
            return Response(status_code=413)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        return await _relay(client, url, body, headers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()  # the upstream connections, on the loop that opened them

    # Every standard method and path reaches `forward`; whatever Starlette itself cannot route
    # (404/405) reaches `unrouted`.  Either way, a refusal is logged and nothing is forwarded.
    return Starlette(routes=[Route("/{path:path}", forward, methods=_ALL_METHODS)],
                     exception_handlers={404: unrouted, 405: unrouted}, lifespan=lifespan)


class FleetGateway:
    """Runs the gateway in a background thread of the ``fedtune server`` process."""

    def __init__(self, host: str, port: int, upstream: str, certfile: Path, keyfile: Path, ca_file: Path) -> None:
        import uvicorn

        # ws="none": no WebSocket upgrades; the Fleet API is plain POSTs.
        config = uvicorn.Config(make_app(upstream, ca_file), host=host, port=port, ssl_certfile=str(certfile),
                                ssl_keyfile=str(keyfile), log_level="warning", access_log=False, ws="none")
        self.server = uvicorn.Server(config)
        self.thread: Optional[threading.Thread] = None
        self.host, self.port = host, port

    def start(self, timeout_s: float = 30.0) -> None:
        self.thread = threading.Thread(target=self.server.run, name="fleet-gateway", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the Fleet gateway could not listen on {self.host}:{self.port} "
                                   "(port in use?)")
            time.sleep(0.05)
        log.info("Fleet gateway for sites on https://%s:%d (TLS; only the %d Fleet API calls are forwarded)",
                 self.host, self.port, len(FLEET_PATHS))

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
