"""sanitize-threads html in a real browser: headless Chromium (Debian's), driven by Playwright.

Skipped when /usr/bin/chromium is missing, except under CI=true, where it must run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_htmlreport import Report, line_of, make_report

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

if not os.path.exists(CHROMIUM) and os.environ.get("CI") != "true":
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)",
                allow_module_level=True)


def artifacts() -> Path:
    where = Path(os.environ.get("SANITIZER_TEST_ARTIFACTS")
                 or Path(__file__).resolve().parent.parent / "build" / "test-artifacts")
    where.mkdir(parents=True, exist_ok=True)
    return where


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    return make_report(tmp_path_factory.mktemp("browser"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A page that collects console errors, uncaught exceptions, dialogs and network use."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    tab = context.new_page()
    tab.problems = []
    tab.on("console", lambda m: tab.problems.append(f"console: {m.text}")
           if m.type == "error" else None)
    tab.on("pageerror", lambda e: tab.problems.append(f"pageerror: {e}"))
    tab.on("dialog", lambda d: (tab.problems.append(f"dialog: {d.message}"), d.dismiss()))
    tab.on("request", lambda r: None if r.url.startswith("file://")
           else tab.problems.append(f"request: {r.url}"))
    yield tab
    context.close()


def url(report: Report, name: str) -> str:
    return (report.out / name).as_uri()


def visible_counts(page: Any) -> list[int]:
    return [int(n) for n in page.locator("#findings tbody tr:not([hidden]) td.count")
            .all_inner_texts()]


def test_the_index_lists_sorts_and_filters(report: Report, page: Any) -> None:
    page.goto(url(report, "index.html"))
    assert page.locator("#findings tbody tr").count() == 4
    assert visible_counts(page) == [6, 2, 2, 2]  # most frequent first
    page.locator("th[data-sort] button", has_text="Count").click()
    assert visible_counts(page) == [2, 2, 2, 6]
    assert page.locator("th", has_text="Count").get_attribute("aria-sort") == "ascending"
    page.locator("th[data-sort] button", has_text="Count").click()
    assert visible_counts(page)[0] == 6
    page.locator("th[data-sort] button", has_text="Access site").click()
    sites = page.locator("#findings tbody td:nth-child(4) .site").all_inner_texts()
    assert sites == sorted(sites, key=lambda s: int(s.split(":")[1]))
    page.select_option("#filter-policy", "exclusive")
    assert page.locator("#findings tbody tr:not([hidden])").count() == 1
    assert page.locator("#no-match").is_hidden()
    page.select_option("#filter-type", "sqlite3.Connection")
    assert page.locator("#findings tbody tr:not([hidden])").count() == 0
    assert page.locator("#no-match").is_visible()
    page.select_option("#filter-policy", "")
    assert page.locator("#findings tbody tr:not([hidden])").count() == 1
    page.select_option("#filter-type", "Account")
    assert page.locator("#findings tbody tr:not([hidden])").count() == 2
    page.select_option("#filter-type", "")
    page.screenshot(path=str(artifacts() / "html-index.png"), full_page=True)
    assert page.problems == []


def test_a_violation_page_shows_both_stacks_marked_and_its_timeline(report: Report,
                                                                   page: Any) -> None:
    page.goto(url(report, "index.html"))
    page.locator("#findings tbody tr", has_text=f"app.py:{line_of('access conn')}") \
        .locator("a").click()
    page.wait_for_load_state()
    assert page.url.endswith(".html") and "/v-" in page.url
    access = page.locator("#access-stack tr.marked")
    assert access.first.inner_text().split(None, 1) == [
        str(line_of("access conn")), 'conn.execute("select 1")  # access conn']
    creation = page.locator("#creation-stack tr.marked")
    assert creation.count() == 1
    assert "# created conn" in creation.inner_text()
    # Library frames folded, and they open.
    folded = page.locator("#access-stack details").first
    assert folded.locator("tr.marked").first.is_hidden()
    folded.locator("summary").click()
    assert folded.locator("tr.marked").first.is_visible()
    svg = page.locator("svg.timeline")
    assert svg.locator("g.lane").count() == 2
    assert svg.locator(".mark.violation").count() == 3
    assert svg.locator(".mark.created").count() == 1
    assert svg.locator(".mark.access").count() >= 1
    labels = svg.locator(".lane-label").all_text_contents()
    assert labels[0].startswith("thread T0 'MainThread'")
    assert "<img src=x" in labels[1]  # the hostile thread name, shown as text
    assert svg.locator(".axis-label").count() >= 3
    assert page.problems == []


def test_the_holder_window_and_transfer_timelines(report: Report, page: Any) -> None:
    pages = {marker: url(report, f"v-{report.page(marker)[0]['fingerprint']}.html")
             for marker in ("access pool", "access account", "access after transfer")}
    page.goto(pages["access pool"])
    assert page.locator("#holder-stack tr.marked", has_text="# holder waits").count() == 1
    svg = page.locator("svg.timeline")
    assert svg.locator(".mark.holder").count() == 1
    holder_lane = svg.locator("g.lane", has_text="holder")
    assert holder_lane.count() == 1
    tip = svg.locator(".mark.holder title").text_content()
    assert "from the access history" in tip
    page.screenshot(path=str(artifacts() / "html-violation.png"), full_page=True)
    # The README's picture: the top of a violation page (message, facts, timeline, stacks).
    page.set_viewport_size({"width": 1100, "height": 820})
    page.screenshot(path=str(artifacts() / "html-report.png"))

    page.goto(pages["access account"])
    svg = page.locator("svg.timeline")
    assert svg.locator(".shared-window").count() == 1
    assert "shared by T0" in svg.locator(".shared-window title").text_content()
    assert svg.locator("g.lane").count() >= 3  # owner, sharer, late

    page.goto(pages["access after transfer"])
    svg = page.locator("svg.timeline")
    assert svg.locator(".mark.transfer").count() == 1
    assert "taker" in svg.locator(".mark.transfer title").text_content()
    assert page.problems == []
