"""The app in a real browser: Debian's Chromium driven by Playwright, the server started through
`nsa-explorer app` exactly as a user starts it. Open it, visit every page, click a heatmap cell and
see the inspector follow, run a needle demo and see the answer.

Set NSA_E2E_SCREENSHOTS=DIR to keep element screenshots of the main views (docs/images holds the
ones the README shows).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

playwright = pytest.importorskip("playwright.sync_api")
expect = playwright.expect

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
TOKENS = 256
# The first chart waits for Streamlit's lazily loaded Plotly bundle; a cold 2-core machine needs time.
TIMEOUT_MS = 90_000
SHOTS = os.environ.get("NSA_E2E_SCREENSHOTS")

if not Path(CHROMIUM).exists():
    pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run does it)", pytrace=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nsa_core.cli",
            "app",
            "--port",
            str(port),
            "--address",
            "127.0.0.1",
            "--headless",
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the app exited with {proc.returncode}: {proc.stdout.read().decode()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the app did not open its port within 60 s")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    yield pg
    context.close()


def _settle(page) -> None:
    """Wait until the app is connected and its script has finished running."""
    page.wait_for_selector("[data-testid='stApp'][data-test-connection-state='CONNECTED']")
    page.wait_for_timeout(300)
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']")


def _shot(locator, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        locator.screenshot(path=str(Path(SHOTS) / f"{name}.png"))


def _chart(page, index: int):
    chart = page.locator("[data-testid='stPlotlyChart']").nth(index)
    chart.locator(".main-svg").first.wait_for()
    return chart


def test_open_the_app_and_visit_every_page(server, page):
    page.goto(f"{server}/?tokens={TOKENS}")
    _settle(page)
    page.get_by_role("heading", name="Explorer", exact=True).wait_for()
    atlas = _chart(page, 0)
    _shot(atlas, "gate-atlas")
    _shot(page.locator("[data-testid='stSidebar']"), "run-panel")
    for title, heading in (
        ("Model", "Model"),
        ("Gates", "Gates"),
        ("Needle", "Needle in a haystack"),
        ("Performance", "Performance"),
        ("Explorer", "Explorer"),
    ):
        page.get_by_role("link", name=title).first.click()
        _settle(page)
        page.get_by_role("heading", name=heading, exact=True).first.wait_for()
        assert not page.locator("[data-testid='stException']").count(), title
        if title in ("Gates", "Performance"):
            _shot(_chart(page, 0), title.lower())


def test_clicking_a_heatmap_cell_opens_that_query_in_the_inspector(server, page):
    page.goto(f"{server}/?tokens={TOKENS}")
    _settle(page)
    query = page.get_by_label("Query position")
    expect(query).to_have_value(str(TOKENS - 1))
    selection = _chart(page, 1)
    plot = selection.locator(".nsewdrag").first
    plot.scroll_into_view_if_needed()
    box = plot.bounding_box()
    x, y = box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.55  # a cell about 55 % down the map
    # A click only selects what the pointer hovers, so hover first (the chart may still be mounting).
    for _ in range(20):
        page.mouse.move(x - 6, y - 6)
        page.mouse.move(x, y, steps=4)
        page.wait_for_timeout(250)
        if selection.locator(".hoverlayer .hovertext").count():
            break
    page.mouse.click(x, y)
    page.wait_for_function(
        f"() => document.querySelector('input[aria-label=\"Query position\"]').value !== '{TOKENS - 1}'"
    )
    _settle(page)
    clicked = int(query.input_value())
    assert 0.4 * TOKENS < clicked < 0.7 * TOKENS  # the row under the pointer, not the default last query
    page.get_by_text(re.compile(rf"^Query {clicked} ")).first.wait_for()
    assert f"query={clicked}" in page.url  # the permalink follows the click
    _shot(selection, "selection-map")
    inspector = (
        page.locator("[data-testid='stVerticalBlock']")
        .filter(has=page.get_by_role("heading", name="Query inspector"))
        .last
    )
    _shot(inspector, "query-inspector")


def test_a_needle_demo_shows_the_models_answer(server, page):
    page.goto(f"{server}/needle?len=256&depth=0.5")
    _settle(page)
    page.get_by_role("button", name="Ask the model").click()
    _settle(page)
    answer = page.locator("[data-testid='stMetric']").filter(has_text="answers").first
    answer.wait_for()
    assert re.search(r"answers", answer.inner_text())
    page.get_by_text("needle's block was chosen").wait_for()
    _shot(page.locator("[data-testid='stMain']"), "needle")


def test_a_permalink_opens_the_view_and_a_box_selection_zooms_the_map(server, page):
    page.goto(f"{server}/?tokens={TOKENS}&layer=1&head=5&query=100")
    _settle(page)
    expect(page.get_by_label("Query position")).to_have_value("100")
    page.get_by_text("layer 1 · KV head 1: blocks chosen per query block").wait_for()
    selection = _chart(page, 1)
    selection.scroll_into_view_if_needed()
    selection.hover()
    selection.locator(".modebar-btn[data-title='Box Select']").click()
    plot = selection.locator(".nsewdrag").first
    box = plot.bounding_box()
    x0, y0 = box["x"] + box["width"] * 0.05, box["y"] + box["height"] * 0.5
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x0 + box["width"] * 0.4, y0 + box["height"] * 0.45, steps=10)
    page.mouse.up()
    page.get_by_text(re.compile(r"^Zoomed to queries \d+–\d+, keys \d+–\d+\.$")).wait_for()
    _settle(page)
    assert "zoom=" in page.url
    page.get_by_role("button", name="Reset zoom").click()
    _settle(page)
    page.get_by_text("Click a cell to inspect its query", exact=False).wait_for()


def test_the_sidebar_serves_the_model_under_the_other_selection_rule(server, page):
    page.goto(f"{server}/?tokens={TOKENS}")
    _settle(page)
    sidebar = page.locator("[data-testid='stSidebar']")
    expect(sidebar.get_by_role("radio", name="free (forced blocks left out)")).to_be_checked()
    sidebar.get_by_text("paper (Eq. 10)").click()
    _settle(page)
    sidebar.get_by_text(re.compile(r"· paper scores")).wait_for()
    expect(sidebar.get_by_role("radio", name="paper (Eq. 10)")).to_be_checked()
    assert "scores%3Dpaper" in page.url or "scores=paper" in page.url  # the permalink carries the rule
    _chart(page, 1)  # the Explorer ran again on the model under that rule
    assert not page.locator("[data-testid='stException']").count()
