"""The Fleet gateway forwards the Fleet API only, byte for byte, and bounds what it buffers.

The attack forms are sent as raw request targets (a hand-built ASGI scope, or the literal
request line over a socket): httpx and Starlette's TestClient remove ``..`` segments
before sending, so a test written with them would never send the attack at all.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import unquote

import pytest

pytest.importorskip("starlette")
import httpx  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response  # noqa: E402
from starlette.routing import Route  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from fedtune.deploy import gateway  # noqa: E402

# Flower 1.42's Fleet API over HTTP, as its SuperNode calls it (flwr/supernode/fleet_http_client.py) and
# its SuperLink registers it (flwr/superlink/routers/fleet/router.py).  A Flower upgrade that changes the
# Fleet API fails test_the_allowlist_is_exactly_flowers_fleet_api on purpose: check each new route (does a
# SuperNode need it? is it under node authentication?) before adding it here.
FLOWER_1_42_FLEET_PATHS = frozenset({
    "/v1/fleet/register-node", "/v1/fleet/activate-node", "/v1/fleet/deactivate-node",
    "/v1/fleet/unregister-node", "/v1/fleet/send-node-heartbeat", "/v1/fleet/pull-messages",
    "/v1/fleet/push-messages", "/v1/fleet/get-run", "/v1/fleet/get-fab", "/v1/fleet/push-object",
    "/v1/fleet/pull-object", "/v1/fleet/confirm-message-received",
})

# Ways to spell a path outside the Fleet API that a prefix check on "/v1/fleet/" lets through.
CONTROL = "control/list-nodes"
BYPASS_FORMS = [
    f"/v1/fleet/../{CONTROL}", f"/v1/fleet/%2e%2e/{CONTROL}", f"/v1/fleet/%2E%2E/{CONTROL}",
    f"/v1/fleet/..%2f{CONTROL}", f"/v1/fleet/..%2F{CONTROL}", f"/v1/fleet/%2e%2e%2f{CONTROL}",
    f"/v1/fleet//../{CONTROL}", f"/v1/fleet/.%2e/{CONTROL}", f"/v1/fleet/%2e./{CONTROL}",
    f"/v1/fleet/..\\{CONTROL}", f"/v1/fleet/..%5c{CONTROL}", f"/v1/fleet/%2e%2e%5C{CONTROL}",
    f"/v1/fleet/.\\..\\{CONTROL}", f"/v1/fleet/pull-messages/../../{CONTROL}",
    f"/v1/fleet/./../{CONTROL}", f"/v1/fleet/pull-messages;/../../{CONTROL}", "/v1/fleet/..",
]
# Fleet calls in spellings a SuperNode never sends; some layer may turn each into the real one.
NON_CANONICAL_FLEET = [
    "/v1/fleet/./pull-messages", "/v1/fleet//pull-messages", "//v1/fleet/pull-messages",
    "/v1/fleet/pull-messages/", "/v1/fleet/pull-messages/.", "/v1/fleet/pull%2dmessages",
    "/v1/fleet/pull-messages%00", "/v1/fleet/pull-messages%20", "/v1/Fleet/pull-messages",
    "/v1/fleet/PULL-MESSAGES", "/v1/fleet/", "/v1/fleet", "/v1/fleet/pull-messages#x",
    "/v1/control/start-run", "/v1/runtime/acquire-task", "/", "https://127.0.0.1/v1/control/list-nodes",
]


@dataclass
class Gateway:
    """The gateway app in front of a fake upstream, and every request that reached that upstream."""

    app: Starlette
    seen: list[tuple[bytes, bytes, dict]] = field(default_factory=list)

    def call(self, method: str, raw_path: bytes, query: bytes = b"", body: bytes = b"x",
             headers: Optional[dict[str, str]] = None) -> tuple[int, bytes]:
        """One request with exactly this request target, as uvicorn would hand it to the app."""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "https", "path": unquote(raw_path.decode("latin-1")), "raw_path": raw_path,
                 "query_string": query, "root_path": "", "client": ("203.0.113.9", 40000),
                 "server": ("gateway.test", 443),
                 "headers": [(b"host", b"gateway.test"), (b"content-length", str(len(body)).encode()),
                             *((k.encode(), v.encode()) for k, v in (headers or {}).items())]}
        incoming = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[dict] = []

        async def receive() -> dict:
            return incoming.pop(0) if incoming else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        asyncio.run(self.app(scope, receive, send))
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.fixture
def forwarded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Gateway:
    """The gateway in front of a fake upstream that records the raw path, body and headers it got."""
    fake_gateway = Gateway(app=None)  # type: ignore[arg-type]

    async def upstream(request: Request) -> Response:
        fake_gateway.seen.append((request.scope["raw_path"], await request.body(), dict(request.headers)))
        return Response(b"pong", status_code=200, media_type="application/protobuf")

    fake = Starlette(routes=[Route("/{path:path}", upstream, methods=["POST"])])
    real_client = httpx.AsyncClient

    def client_factory(*args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs.pop("verify", None)
        return real_client(*args, transport=httpx.ASGITransport(app=fake), **kwargs)

    monkeypatch.setattr(gateway.httpx, "AsyncClient", client_factory)
    monkeypatch.setattr(gateway.ssl, "create_default_context", lambda cafile=None: None)
    fake_gateway.app = gateway.make_app("https://superlink.test", tmp_path / "ca.crt", max_body_bytes=1000)
    return fake_gateway


def test_the_allowlist_is_exactly_flowers_fleet_api() -> None:
    """The allowlist, what the SuperLink's Fleet router serves and what the SuperNode calls, all agree."""
    from flwr.superlink.routers.fleet.router import router
    from flwr.supernode.fleet_http_client import FleetHttpClient

    served = {route.path for route in router.routes if getattr(route, "methods", None) == {"POST"}}
    called: list[str] = []
    client = object.__new__(FleetHttpClient)  # no connection: only the paths its methods use are recorded
    client._unary_unary = lambda path, **_: called.append(path)  # type: ignore[method-assign]
    client._unary_stream = lambda path, **_: called.append(path)  # type: ignore[method-assign]
    for name, method in vars(FleetHttpClient).items():
        if callable(method) and not name.startswith("_"):
            method(client, None)
    assert gateway.FLEET_PATHS == served == set(called) == FLOWER_1_42_FLEET_PATHS


def test_fleet_calls_pass_through_with_their_auth_headers(forwarded: Gateway) -> None:
    client = TestClient(forwarded.app)
    response = client.post("/v1/fleet/pull-messages", content=b"\x01\x02", headers={"x-flwr-signature": "sig"})
    assert response.status_code == 200 and response.content == b"pong"
    raw_path, body, headers = forwarded.seen[0]
    assert raw_path == b"/v1/fleet/pull-messages" and body == b"\x01\x02"
    assert headers["x-flwr-signature"] == "sig" and headers["host"] == "superlink.test"


@pytest.mark.parametrize("path", sorted(FLOWER_1_42_FLEET_PATHS))
def test_every_fleet_call_is_forwarded_with_its_raw_path_unchanged(forwarded: Gateway, path: str) -> None:
    assert forwarded.call("POST", path.encode(), body=b"\x08\x01") == (200, b"pong")
    assert [(raw, body) for raw, body, _ in forwarded.seen] == [(path.encode(), b"\x08\x01")]


@pytest.mark.parametrize("path", BYPASS_FORMS + NON_CANONICAL_FLEET)
def test_every_other_spelling_is_refused_logged_and_never_forwarded(
        forwarded: Gateway, caplog: pytest.LogCaptureFixture, path: str) -> None:
    caplog.set_level(logging.WARNING, logger=gateway.__name__)
    assert forwarded.call("POST", path.encode("latin-1")) == (404, b"")
    assert forwarded.seen == []
    assert "only the Fleet API is exposed" in caplog.text


@pytest.mark.parametrize("raw_path", [b"/v1/fleet/pull-messages\xc0\xae",
                                      b"/v1/fleet/\xc0\xae\xc0\xae/control/list-nodes"])
def test_non_ascii_bytes_in_the_target_are_refused(forwarded: Gateway, raw_path: bytes) -> None:
    assert forwarded.call("POST", raw_path) == (404, b"")
    assert forwarded.seen == []


@pytest.mark.parametrize("query", [b"x=1", b"path=/v1/control/list-nodes", b"%2e%2e"])
def test_a_query_string_is_refused(forwarded: Gateway, query: bytes) -> None:
    assert forwarded.call("POST", b"/v1/fleet/pull-messages", query=query) == (404, b"")
    assert forwarded.seen == []


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
def test_only_post_is_forwarded(forwarded: Gateway, caplog: pytest.LogCaptureFixture, method: str) -> None:
    caplog.set_level(logging.WARNING, logger=gateway.__name__)
    assert forwarded.call(method, b"/v1/fleet/pull-messages")[0] == 404
    assert forwarded.seen == [] and f"method {method}" in caplog.text


def test_httpx_would_rewrite_a_dot_path_so_the_gateway_never_hands_it_one() -> None:
    """httpx drops dot segments even from ``copy_with(raw_path=...)``: the old gateway's hole."""
    base = httpx.URL("https://127.0.0.1:9094")
    assert base.copy_with(raw_path=b"/v1/fleet/../control/list-nodes").raw_path == b"/v1/control/list-nodes"
    with pytest.raises(ValueError, match="httpx would send"):
        gateway.upstream_url(base, b"/v1/fleet/../control/list-nodes")
    for path in sorted(gateway.FLEET_PATHS):
        assert gateway.upstream_url(base, path.encode()).raw_path == path.encode()


def test_an_oversized_body_is_refused_before_forwarding(forwarded: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    client = TestClient(forwarded.app)
    assert client.post("/v1/fleet/push-object", content=b"x" * 1001).status_code == 413
    assert forwarded.seen == [] and "refused" in caplog.text
    assert client.post("/v1/fleet/push-object", content=b"x" * 1000).status_code == 200


def test_a_scanner_gets_one_log_line_a_minute_and_bounded_memory(forwarded: Gateway,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=gateway.__name__)
    for i in range(50):
        assert forwarded.call("POST", f"/v1/fleet/%2e%2e/control/x{i}".encode())[0] == 404
    assert caplog.text.count("only the Fleet API is exposed") == 1
    refusals = gateway._RefusalLog()
    for i in range(3 * gateway._REFUSAL_MEMORY):
        refusals.warn(f"198.51.100.{i}", "POST", b"/", "not a Fleet API call")
    assert len(refusals.last) <= gateway._REFUSAL_MEMORY


def raw_request(port: int, target: bytes, body: bytes = b"", context: Optional[ssl.SSLContext] = None,
                method: bytes = b"POST") -> tuple[int, bytes]:
    """Send exactly ``METHOD target HTTP/1.1`` to 127.0.0.1:port (TLS if ``context``); (status, body)."""
    request = (method + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
               b"Content-Type: application/protobuf\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
               % (port, len(body))) + body
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as plain:
        sock = context.wrap_socket(plain, server_hostname="127.0.0.1") if context else plain
        with sock:
            sock.sendall(request)
            try:
                while chunk := sock.recv(65536):
                    reply += chunk
            except (ssl.SSLEOFError, ConnectionResetError):
                pass  # the server closed after its reply; what arrived is the reply
    head, _, payload = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), payload


@pytest.fixture
def listening(forwarded: Gateway) -> Iterator[tuple[int, Gateway]]:
    """The gateway app served by uvicorn (plain HTTP) on 127.0.0.1, so requests go through its parser."""
    import uvicorn

    from localhost import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(forwarded.app, host="127.0.0.1", port=port, log_level="warning",
                                               ws="none"))
    thread = threading.Thread(target=server.run, name="test-gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield port, forwarded
    server.should_exit = True
    thread.join(timeout=10)


def test_attack_bytes_on_the_wire_never_reach_the_upstream(listening: tuple[int, Gateway]) -> None:
    """Through uvicorn's own HTTP parser: what it puts in ``raw_path`` is what the gateway checks."""
    port, fake = listening
    for target in BYPASS_FORMS + NON_CANONICAL_FLEET:
        if "#" in target:
            continue  # uvicorn's parser drops a fragment; the ASGI-level test covers it
        assert raw_request(port, target.encode()) == (404, b""), target
    assert raw_request(port, b"/v1/fleet/pull-messages?x=1")[0] == 404
    assert fake.seen == []
    assert raw_request(port, b"/v1/fleet/get-run", b"\x08\x07") == (200, b"pong")
    assert [(raw, body) for raw, body, _ in fake.seen] == [(b"/v1/fleet/get-run", b"\x08\x07")]


def _control(superlink, context: ssl.SSLContext, call: str, request, response_type):  # type: ignore[no-untyped-def]
    """A Control API call made the operator's way: straight to the SuperLink's port on 127.0.0.1."""
    reply = httpx.post(f"https://127.0.0.1:{superlink.fed.control_port}/v1/control/{call}", verify=context,
                       content=request.SerializeToString(), headers={"content-type": "application/protobuf"},
                       timeout=30)
    assert reply.status_code == 200, reply.text
    response = response_type()
    response.ParseFromString(reply.content)
    return response


def _nodes(superlink, context: ssl.SSLContext) -> list:  # type: ignore[no-untyped-def]
    """The SuperLink's nodes (NodeInfo), as its own Control API lists them."""
    from flwr.proto.control_pb2 import ListNodesRequest, ListNodesResponse

    return list(_control(superlink, context, "list-nodes", ListNodesRequest(), ListNodesResponse).nodes_info)


def _counts(superlink, context: ssl.SSLContext) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """(enrolled nodes, submitted runs) as the SuperLink's own Control API reports them."""
    from flwr.proto.control_pb2 import ListRunsRequest, ListRunsResponse

    runs = _control(superlink, context, "list-runs", ListRunsRequest(), ListRunsResponse)
    return len(_nodes(superlink, context)), len(runs.run_dict)


@dataclass
class RealSuperLink:
    superlink: object  # fedtune.deploy.operator.SuperLink
    context: ssl.SSLContext  # verifies the SuperLink (and gateway) certificate against the federation CA
    private_keys: dict[str, Path]  # each enrolled site's own key, for a real SuperNode


@pytest.fixture
def real_superlink(tmp_path: Path) -> Iterator[RealSuperLink]:
    """``flower-superlink`` (TLS, node auth) on 127.0.0.1 with two enrolled sites, and the gateway in front.

    Started as ``fedtune server`` starts it; every process it started is stopped by its pid afterwards.
    """
    import psutil

    from fedtune.deploy.federation import init_federation, load_federation
    from localhost import free_port
    from fedtune.deploy.operator import SuperLink
    from fedtune.deploy.pki import node_auth_keypair, write_secret

    # Each site makes its own key (as `fedtune client keygen` does); the operator gets the public half only.
    pairs = {site: node_auth_keypair() for site in ("hosp-a", "hosp-b")}
    private_keys = {site: tmp_path / f"{site}.key" for site in pairs}
    for site, (private, _) in pairs.items():
        write_secret(private_keys[site], private)
    init_federation(tmp_path / "fed", site_keys={site: public for site, (_, public) in pairs.items()},
                    port=free_port(), control_port=free_port())
    superlink = SuperLink(*load_federation(tmp_path / "fed"))
    superlink.start()
    children: list[psutil.Process] = []
    try:
        superlink.register_sites()
        assert superlink.process is not None
        children = psutil.Process(superlink.process.pid).children(recursive=True)
        yield RealSuperLink(superlink, ssl.create_default_context(cafile=str(superlink.paths.superlink_ca)),
                            private_keys)
    finally:
        superlink.stop()
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.mark.slow
def test_a_real_superlinks_control_api_is_out_of_reach_through_the_gateway(real_superlink: RealSuperLink,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Every bypass form, over TLS to the gateway, for list/register/start calls: 404, and nothing changed."""
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key
    from flwr.proto.control_pb2 import ListNodesRequest, RegisterNodeRequest, StartRunRequest
    from flwr.proto.fleet_pb2 import RegisterNodeFleetRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    from fedtune.deploy.pki import node_auth_keypair

    caplog.set_level(logging.WARNING, logger=gateway.__name__)
    superlink, context = real_superlink.superlink, real_superlink.context
    before = _counts(superlink, context)
    assert before == (2, 0)
    outsider = public_key_to_bytes(load_ssh_public_key(node_auth_keypair()[1]))
    enrol = RegisterNodeRequest(public_key=outsider, name="outsider").SerializeToString()
    attacks = {"list-nodes": ListNodesRequest().SerializeToString(), "register-node": enrol,
               "start-run": StartRunRequest().SerializeToString()}
    sites_port = superlink.fed.superlink_port  # type: ignore[attr-defined]
    for form in (f for f in BYPASS_FORMS if CONTROL in f):
        for call, body in attacks.items():
            target = form.replace(CONTROL, f"control/{call}").encode()
            assert raw_request(sites_port, target, body, context) == (404, b""), target
    assert _counts(superlink, context) == before
    assert "only the Fleet API is exposed" in caplog.text  # the gateway's refusals (its thread's log is seen)

    # The gateway does reach this SuperLink: a Fleet call gets the SuperLink's own refusal (node auth is on) ...
    status, reply = raw_request(sites_port, b"/v1/fleet/register-node",
                                RegisterNodeFleetRequest(public_key=outsider).SerializeToString(), context)
    assert status == 401 and reply, (status, reply)
    assert _counts(superlink, context) == before
    # ... and the refused requests were real attacks: sent straight to the SuperLink, the same one enrols the key.
    control_port = superlink.fed.control_port  # type: ignore[attr-defined]
    assert raw_request(control_port, b"/v1/control/register-node", enrol, context)[0] == 200
    assert _counts(superlink, context) == (before[0] + 1, before[1])


@pytest.mark.slow
def test_a_real_supernode_comes_online_through_the_gateway_and_nothing_it_sends_is_refused(
        real_superlink: RealSuperLink, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """The allowlist is not too tight: Flower's own SuperNode activates, heartbeats and polls through it."""
    import os
    import signal
    import subprocess

    from localhost import free_port
    from fedtune.deploy.processes import flower_env, tool

    caplog.set_level(logging.WARNING, logger=gateway.__name__)
    superlink, context = real_superlink.superlink, real_superlink.context
    fed = superlink.fed  # type: ignore[attr-defined]
    with open(tmp_path / "supernode.log", "wb") as out:
        supernode = subprocess.Popen(
            [tool("flower-supernode"), "--superlink", f"127.0.0.1:{fed.superlink_port}",
             "--root-certificates", str(superlink.paths.superlink_ca),  # type: ignore[attr-defined]
             "--auth-supernode-private-key", str(real_superlink.private_keys["hosp-a"]),
             "--port", str(free_port())],
            stdout=out, stderr=subprocess.STDOUT, env=flower_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not any(n.status == "online" for n in _nodes(superlink, context)):
            assert supernode.poll() is None, (tmp_path / "supernode.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "supernode.log").read_text()
            time.sleep(0.5)
        time.sleep(3)  # a few of its message polls and a heartbeat, through the gateway
        assert supernode.poll() is None, (tmp_path / "supernode.log").read_text()
    finally:
        try:
            os.killpg(supernode.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        supernode.wait(timeout=30)
    assert "only the Fleet API is exposed" not in caplog.text
