"""The Fleet gateway forwards the Fleet API only, and bounds what it buffers."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("starlette")
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response  # noqa: E402
from starlette.routing import Route  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from fedtune.deploy import gateway  # noqa: E402


@pytest.fixture
def forwarded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The gateway in front of a fake upstream that records what reached it."""
    import httpx

    seen: list[tuple[str, bytes, dict]] = []

    async def upstream(request: Request) -> Response:
        seen.append((request.url.path, await request.body(), dict(request.headers)))
        return Response(b"pong", status_code=200, media_type="application/protobuf")

    fake = Starlette(routes=[Route("/{path:path}", upstream, methods=["POST"])])
    real_client = httpx.AsyncClient

    def client_factory(*args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs.pop("verify", None)
        return real_client(*args, transport=httpx.ASGITransport(app=fake), **kwargs)

    monkeypatch.setattr(gateway.httpx, "AsyncClient", client_factory)
    monkeypatch.setattr(gateway.ssl, "create_default_context", lambda cafile=None: None)
    app = gateway.make_app("https://superlink.test", tmp_path / "ca.crt", max_body_bytes=1000)
    return TestClient(app), seen


def test_fleet_calls_pass_through_with_their_auth_headers(forwarded) -> None:
    client, seen = forwarded
    response = client.post("/v1/fleet/pull-messages", content=b"\x01\x02", headers={"x-flwr-signature": "sig"})
    assert response.status_code == 200 and response.content == b"pong"
    assert seen[0][0] == "/v1/fleet/pull-messages" and seen[0][1] == b"\x01\x02"
    assert seen[0][2]["x-flwr-signature"] == "sig"


@pytest.mark.parametrize("method,path", [("POST", "/v1/control/start-run"), ("POST", "/v1/runtime/acquire-task"),
                                         ("GET", "/v1/fleet/pull-messages"), ("POST", "/")])
def test_everything_but_the_fleet_api_is_refused_and_logged(forwarded, caplog, method: str, path: str) -> None:
    client, seen = forwarded
    assert client.request(method, path, content=b"x").status_code == 404
    assert seen == []
    assert "only the Fleet API is exposed" in caplog.text


def test_an_oversized_body_is_refused_before_forwarding(forwarded, caplog) -> None:
    client, seen = forwarded
    assert client.post("/v1/fleet/push-object", content=b"x" * 1001).status_code == 413
    assert seen == [] and "refused" in caplog.text
    assert client.post("/v1/fleet/push-object", content=b"x" * 1000).status_code == 200
