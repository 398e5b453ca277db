"""The console in a real browser (Debian's chromium, driven by Selenium through
chromium-driver) with every host but 127.0.0.1 unresolvable, on the session's platform:
the page asks for a key, lists every pipeline, draws each graph as the compiled graph
has it, runs `rag` from its form with the answer streaming in and opens that run's
waterfall; a key without `invoke:rag` sees the figures and is refused the run in the
page; axe-core (run offline in the page) finds no serious violation. Screenshots go to
`.artefacts/console/` (or $SERVEGRAPH_ARTEFACTS) and are checked not to be blank."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from servegraph.deploy.local_ray import LocalCluster
from servegraph.lang.discovery import discover
from servegraph.security.keys import KeyStore
from tests.servegraph.test_console import expected

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARTEFACTS = Path(os.environ.get("SERVEGRAPH_ARTEFACTS", ROOT / ".artefacts")) / "console"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT_S = 60  # for the page to show what it fetched
RUN_WAIT_S = 240  # for a rag answer from the CPU LLM


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM and CHROMEDRIVER, "chromium or chromium-driver is missing: `make install`"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",  # the suite may run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1440,1100",
        # Air-gapped: any host but this machine fails to resolve.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):
        options.add_argument(flag)
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.set_script_timeout(60)
        try:
            yield driver
        finally:
            driver.quit()


def wait(driver: Any, condition: Any, timeout_s: float = WAIT_S) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(condition)


def ready(driver: Any) -> bool:
    return bool(driver.execute_script("return document.body.dataset.ready === 'true'"))


def go(driver: Any, url: str) -> None:
    driver.execute_script("document.body.dataset.ready = ''")
    driver.get(url)
    wait(driver, ready)


def enter_key(driver: Any, key: str) -> None:
    from selenium.webdriver.common.by import By

    field = wait(driver, lambda d: d.find_element(By.ID, "key"))
    field.send_keys(key)
    driver.execute_script("document.body.dataset.ready = ''")  # set again once it has shown
    driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait(driver, lambda d: d.find_element(By.ID, "key-panel").get_attribute("hidden") is not None)
    wait(driver, ready)


def screenshot(driver: Any, name: str) -> Path:
    from PIL import Image

    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTEFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    with Image.open(path) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000) or []
    assert len(colours) > 50, f"{path}: {len(colours)} colours, the page looks blank"
    return path


def serious(driver: Any) -> list[str]:
    """axe-core's serious and critical violations on the page as it stands."""
    from axe_core_python.selenium import Axe

    results = Axe().run(driver)
    return [
        f"{v['id']}: {v['help']} ({len(v['nodes'])} nodes)"
        for v in results["violations"]
        if v["impact"] in ("serious", "critical")
    ]


def drawn_in_page(driver: Any) -> tuple[set[str], set[tuple[str, str]]]:
    ids = driver.execute_script(
        "return [...document.querySelectorAll('#graph g.node, #graph g.edge')]"
        ".map(g => [g.classList.contains('node') ? 'node' : 'edge', g.id])"
    )
    nodes = {i.removeprefix("node:") for kind, i in ids if kind == "node"}
    edges = {tuple(i.removeprefix("edge:").split("->")) for kind, i in ids if kind == "edge"}
    return nodes, edges  # type: ignore[return-value]


def test_the_console_in_a_browser_offline(pipelines: LocalCluster, browser: Any) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By

    console = f"{pipelines.base_url}/pipelines/console"
    graphs = discover("pipelines")
    store = KeyStore(Path(os.environ["SERVEGRAPH_AUTH_KEYS"]))
    viewer = store.create("console-viewer", ["invoke:rag_search"])

    # No key: the page asks for one.
    go(browser, console)
    assert browser.find_element(By.ID, "key-panel").get_attribute("hidden") is None
    enter_key(browser, os.environ["SERVEGRAPH_API_KEY"])

    listed = browser.execute_script(
        "return [...document.querySelectorAll('#pipelines tbody th a')].map(a => a.textContent)"
    )
    assert sorted(listed) == sorted(graphs)
    # The model servers: replicas now from Serve; the history needs a Prometheus, and
    # none runs at the session's address yet (test_observe starts one): the page says so.
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#servers tr[data-deployment]"))
    running = browser.execute_script(
        "return document.querySelector('#servers tr[data-deployment=\"embedder/Embedder\"]')"
        ".children[3].textContent"
    )
    assert int(running) >= 1
    assert "Prometheus is not answering" in browser.find_element(By.ID, "servers-note").text
    assert not serious(browser), serious(browser)
    screenshot(browser, "home")

    for name, graph in graphs.items():  # every graph, as compiled
        go(browser, f"{console}#/p/{name}")
        want = expected(graph)
        with contextlib.suppress(TimeoutException):  # then the assertion shows the difference
            wait(browser, lambda d, want=want: drawn_in_page(d) == want)
        assert drawn_in_page(browser) == want, name
        if name == "triage":  # its loop's body in view (a switch inside), for the README
            browser.execute_script(
                "document.getElementById('node:work/body/act')"
                ".scrollIntoView({block: 'center', inline: 'center'})"
            )
            screenshot(browser, "triage")

    # Run rag from its form: the answer streams in, then its waterfall.
    go(browser, f"{console}#/p/rag")
    question = browser.find_element(By.ID, "field-question")
    question.clear()
    question.send_keys("How long do refunds take?")
    browser.find_element(By.CSS_SELECTOR, "#run-form button[type=submit]").click()
    wait(browser, lambda d: d.find_element(By.ID, "answer").text.strip(), RUN_WAIT_S)
    wait(
        browser,
        lambda d: d.find_element(By.ID, "run-status").get_attribute("data-done"),
        RUN_WAIT_S,
    )
    answer = browser.find_element(By.ID, "answer")
    assert answer.text.strip() and int(answer.get_attribute("data-chunks")) >= 1  # streamed
    streamed = {
        e.get_attribute("data-node")
        for e in browser.find_elements(By.CSS_SELECTOR, "#run-waterfall li.attempt")
    }
    assert {"embed", "retrieve"} <= streamed, streamed
    assert not serious(browser), serious(browser)
    screenshot(browser, "rag-run")

    # That run is in the recent list (this replica's, or the other's: the list is per
    # replica) and opens as a waterfall of the same nodes.
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#recent tbody a[data-request]"))
    browser.find_element(By.CSS_SELECTOR, "#recent tbody a[data-request]").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#request-detail li.attempt"))
    opened = {
        e.get_attribute("data-node")
        for e in browser.find_elements(By.CSS_SELECTOR, "#request-detail li.attempt")
    }
    assert {"embed", "retrieve"} <= opened, opened
    # The embedder's call: the dynamic batch it rode in, as its replica noted it.
    embed = browser.find_element(By.CSS_SELECTOR, '#request-detail li[data-node="embed"] .facts')
    assert "batch of" in embed.text, embed.text
    # The graph's call nodes: their model server's replicas now.
    replicas = re.compile(r"replicas [1-9]\d* ·")
    wait(browser, lambda d: replicas.search(d.find_element(By.ID, "node:embed").text))
    screenshot(browser, "rag-waterfall")

    # A key without invoke:rag: the figures, and the run refused in the page.
    browser.find_element(By.ID, "forget").click()
    enter_key(browser, viewer)
    go(browser, f"{console}#/p/rag")
    assert "figures" in browser.find_element(By.ID, "run-status").text
    browser.find_element(By.ID, "field-question").send_keys("How long do refunds take?")
    browser.find_element(By.CSS_SELECTOR, "#run-form button[type=submit]").click()
    wait(browser, lambda d: "403" in d.find_element(By.ID, "run-status").text)
