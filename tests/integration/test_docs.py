"""The OpenAPI pages render with no network: a real headless browser (Debian's
chromium) loads them from the platform with every other host unresolvable, and the
pipeline routes appear on the page and in a screenshot."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from servegraph.deploy.local_ray import LocalCluster

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OFFLINE = [
    "--headless=new",
    "--no-sandbox",  # the suite may run as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    # Air-gapped: any host but this machine fails to resolve.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--virtual-time-budget=30000",  # let the page's scripts run to completion
]


def browse(url: str, *flags: str) -> str:
    assert CHROMIUM, "chromium is missing: run `make install`"
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [CHROMIUM, *OFFLINE, f"--user-data-dir={profile}", *flags, url],
            capture_output=True,
            text=True,
            timeout=180,
            check=True,
        )
    return done.stdout


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/pipelines/docs", ["/rag/stream", "/rag_ingest", "/triage", "Authorize"]),
        ("/index/docs", ["/search", "/delete", "/stats"]),
        ("/embedder/docs", ["/embed_one"]),
        ("/docs", ["/v1/chat/completions", "/v1/models", "Authorize"]),  # ray.serve.llm's app
    ],
)
def test_the_docs_page_renders_offline(
    pipelines: LocalCluster, path: str, expected: list[str]
) -> None:
    dom = browse(pipelines.base_url + path, "--dump-dom")
    assert 'class="swagger-ui' in dom, dom[:2000]  # Swagger UI's script ran and drew
    for text in expected:
        assert text in dom, f"{text} is not on {path}"
    assert "cdn.jsdelivr.net" not in dom and "unpkg.com" not in dom


def test_a_screenshot_of_the_pipeline_docs_is_not_blank(
    pipelines: LocalCluster, tmp_path: Path
) -> None:
    from PIL import Image

    shot = tmp_path / "docs.png"
    browse(
        pipelines.base_url + "/pipelines/docs", f"--screenshot={shot}", "--window-size=1280,1600"
    )
    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000) or []
    # A blank page (what a CDN-loaded page gives offline) is one or two colours; the
    # rendered Swagger UI has text, coloured method badges and borders.
    assert len(colours) > 100, f"{len(colours)} colours: the page looks blank"
