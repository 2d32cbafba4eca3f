"""The sites' only way in: a TLS gateway that forwards Flower's Fleet API and nothing else.

Why: flwr 1.42's SuperLink serves its Fleet API (what SuperNodes need), its Control API
(register nodes, submit runs) and its Runtime API on one port, and the Control API has
no authentication in the open-source build.  Exposing that port to the sites would let
anyone who can reach it enrol their own node key or submit code.  So ``fedtune server``
binds the SuperLink to 127.0.0.1 only, and this gateway, on the address the sites dial,
terminates TLS with the SuperLink's certificate and forwards ``POST /v1/fleet/*``
unchanged (node-auth signature headers included) to the SuperLink over TLS verified
against the federation CA.  Every other path gets 404 and a log line.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from pathlib import Path
from typing import Optional

import httpx

log = logging.getLogger(__name__)

FLEET_PREFIX = "/v1/fleet/"
# Hop-by-hop and connection-specific headers are not forwarded (RFC 9110 §7.6.1).
_HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer",
                "upgrade", "proxy-authorization", "proxy-authenticate"}


DEFAULT_MAX_BODY_BYTES = 512 * 1024 * 1024


def make_app(upstream: str, ca_file: Path, timeout_s: float = 300.0,  # type: ignore[no-untyped-def]
             max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    """A Starlette app forwarding Fleet API calls to ``upstream`` (``https://127.0.0.1:PORT``).

    A request body over ``max_body_bytes`` is refused (413) before it is buffered: the
    gateway faces the network and must not be made to hold an arbitrary upload in memory.
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    client = httpx.AsyncClient(base_url=upstream, verify=ssl.create_default_context(cafile=str(ca_file)),
                               timeout=timeout_s)
    refused: dict[str, float] = {}

    async def forward(request: Request) -> Response:
        path = request.url.path
        if request.method != "POST" or not path.startswith(FLEET_PREFIX):
            peer = request.client.host if request.client else "?"
            # One line per (peer, path) a minute: a scanner must not flood the operator's log.
            key = f"{peer} {request.method} {path}"
            if time.monotonic() - refused.get(key, -1e9) > 60:
                refused[key] = time.monotonic()
                log.warning("gateway: refused %s from %s (only the Fleet API is exposed to sites)",
                            f"{request.method} {path}", peer)
            return Response(status_code=404)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            log.warning("gateway: refused a %s-byte %s (limit %d bytes)", declared, path, max_body_bytes)
            return Response(status_code=413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                log.warning("gateway: refused %s: body over %d bytes", path, max_body_bytes)
                return Response(status_code=413)
            chunks.append(chunk)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        try:
            upstream_response = await client.post(path, content=b"".join(chunks), headers=headers)
        except httpx.HTTPError as exc:
            log.warning("gateway: the SuperLink did not answer %s: %s", path, exc)
            return Response(status_code=502)
        out_headers = {k: v for k, v in upstream_response.headers.items()
                       if k.lower() not in _HOP_HEADERS and k.lower() != "content-encoding"}
        return Response(content=upstream_response.content, status_code=upstream_response.status_code,
                        headers=out_headers)

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])])


class FleetGateway:
    """Runs the gateway in a background thread of the ``fedtune server`` process."""

    def __init__(self, host: str, port: int, upstream: str, certfile: Path, keyfile: Path, ca_file: Path) -> None:
        import uvicorn

        config = uvicorn.Config(make_app(upstream, ca_file), host=host, port=port, ssl_certfile=str(certfile),
                                ssl_keyfile=str(keyfile), log_level="warning", access_log=False)
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
        log.info("Fleet gateway for sites on https://%s:%d (TLS; only /v1/fleet/* is forwarded)", self.host, self.port)

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
