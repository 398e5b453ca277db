"""The LLM's OpenAI app (built inside `ray.serve.llm`) serves its docs pages as the
platform's other apps do: offline by default, and not at all with
SERVEGRAPH_AUTH_OPEN_DOCS=false. Ray's own app factory, wrapped as `app()` wraps it
during the build; no Ray cluster, no model."""

from __future__ import annotations

import httpx
import pytest

from deployments.llm.ingress import offline_docs_during_build

DOCS = ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect")


def openai_app():
    from ray.llm._internal.serve.core.ingress import ingress as ray_ingress

    with offline_docs_during_build():
        return ray_ingress.init()


async def status_of(app, path: str) -> int:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://llm") as client:
        return (await client.get(path)).status_code


async def test_the_docs_pages_are_served_offline_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SERVEGRAPH_AUTH_OPEN_DOCS", raising=False)
    app = openai_app()
    assert [await status_of(app, path) for path in DOCS[:3]] == [200, 200, 200]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://llm") as client:
        page = (await client.get("/docs")).text
    assert "/static-offline-docs/swagger-ui-bundle.js" in page and "cdn" not in page


@pytest.mark.parametrize("setting", ["false", "0", "FALSE"])
async def test_open_docs_false_serves_no_docs_pages(
    monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    monkeypatch.setenv("SERVEGRAPH_AUTH_OPEN_DOCS", setting)
    app = openai_app()
    assert [await status_of(app, path) for path in DOCS] == [404] * len(DOCS)
    assert app.openapi_url is None and app.docs_url is None and app.redoc_url is None
