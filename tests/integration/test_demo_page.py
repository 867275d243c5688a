"""The demo page in headless Chromium: rows with titles and reasons; "Not interested" and
"Watched" change them. Saves a screenshot (bench/results/demo-page.png) as evidence."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from bench.services import start_command, stop
from tests.integration.conftest import EventProcess, RunningRanking

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a closed network (no background connections) and a root user (no sandbox).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture()
def browser_page():  # type: ignore[no-untyped-def]
    """A page in headless Chromium (Debian's). Skipped where it is not installed, unless
    FRESHREC_REQUIRE_BROWSER is set (CI installs it and sets it)."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("FRESHREC_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing (install Debian's chromium)")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1100})
        finally:
            browser.close()


def test_the_demo_page_shows_reasons_and_changes_on_a_click(
        events_process: EventProcess, ranking: RunningRanking, browser_page) -> None:  # type: ignore[no-untyped-def]
    demo, port = start_command(
        [sys.executable, str(REPO / "examples" / "demo_app.py"), "--events",
         f"127.0.0.1:{events_process.port}", "--ranking", f"127.0.0.1:{ranking.port}",
         "--port", "0"], {**os.environ, "PYTHONPATH": str(REPO)})
    page = browser_page
    try:
        page.goto(f"http://127.0.0.1:{port}/?user=u4")
        rows = page.locator("section.row")
        assert rows.count() >= 3
        assert page.locator("section.row h2").first.inner_text().startswith("Because you watched")
        reasons = page.locator(".reason").all_inner_texts()
        assert reasons and all(reasons)

        def shown() -> list[str]:
            return [str(i.get_attribute("data-item")) for i in page.locator("li.item").all()]

        picks = page.locator('section[data-row="top_picks"] li.item')
        dismissed = picks.first.get_attribute("data-item")
        with page.expect_navigation():
            picks.first.get_by_role("button", name="Not interested").click()
        assert dismissed not in shown()  # gone from every row at once
        watched = page.locator('section[data-row="top_picks"] li.item').first
        title = watched.locator(".title").inner_text()
        watched_id = watched.get_attribute("data-item")
        with page.expect_navigation():
            watched.get_by_role("button", name="Watched").click()
        assert page.locator("section.row h2").first.inner_text() == \
            f"Because you watched {title}"
        assert watched_id not in shown() and dismissed not in shown()
        results = REPO / "bench" / "results"
        results.mkdir(parents=True, exist_ok=True)
        shot = page.screenshot(path=str(results / "demo-page.png"), full_page=True)
        assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000
    finally:
        assert stop([demo]) == [0]
