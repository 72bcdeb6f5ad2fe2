"""``emassist web --watch DIR``: the watcher inside the web server, its arrivals streamed (Server-Sent Events) to
the page's Live tab, shown in Debian's Chromium within a few seconds of the file landing in the folder.
Screenshot: test-artifacts/screenshots/06-live.png.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("keras")
pytest.importorskip("mlflow")
pytest.importorskip("watchdog")

pytestmark = pytest.mark.slow

from tests import watch_support as wt  # noqa: E402
from tests import webapp_support as ws  # noqa: E402
from tests.helpers import REPO_ROOT, SmallModel  # noqa: E402

SCREENSHOTS = REPO_ROOT / "test-artifacts" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, small_model: SmallModel) -> Iterator[tuple[str, Path, Path]]:
    champion = ws.register_champion(tmp_path_factory.mktemp("watch-live"), small_model)
    folder = champion.root / "microscope"
    folder.mkdir()
    out = champion.root / "live-results"
    params = wt.write_params(champion)
    with wt.web_with_watch(champion, params, folder, "--watch-out", str(out), "--watch-alert", ws.RIGHT) as url:
        yield url, folder, out


def test_live_api_and_event_stream(live: tuple[str, Path, Path]) -> None:
    url, folder, out = live
    info = requests.get(f"{url}/api/live", timeout=10).json()
    assert info["watching"] == str(folder) and info["out"] == str(out)
    (folder / "streamed.png").write_bytes(wt.png_bytes(ws.LEFT, 800))
    with requests.get(f"{url}/api/live/events", stream=True, timeout=30) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in resp.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                event = json.loads(line[len("data: ") :])
                if event["relpath"] == "streamed.png":
                    break
    assert event is not None and event["status"] == "classified" and event["label"] == ws.LEFT
    assert event["thumbnail"].startswith("data:image/png;base64,")
    assert [r["relpath"] for r in wt.results(out)] == ["streamed.png"]  # the same results file as `emassist watch`


def test_live_tab_shows_a_dropped_file_within_seconds(live: tuple[str, Path, Path]) -> None:
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing (scripts/test.sh installs Debian's chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    url, folder, _ = live
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            page: Any = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.click("#tab-live")
            page.wait_for_function("document.getElementById('live-status').dataset.connection === 'open'",
                                   timeout=15_000)  # fmt: skip
            assert "Watching" in page.inner_text("[data-testid=live-status]")
            (folder / "needle.png").write_bytes(wt.png_bytes(ws.RIGHT, 801))  # the alert class
            item = page.locator("[data-testid=live-item][data-relpath='needle.png']")
            item.wait_for(timeout=10_000)  # within a few seconds of the file landing
            assert item.locator("[data-testid=live-label]").inner_text() == ws.RIGHT
            assert "alert" in (item.get_attribute("class") or "")
            assert item.locator("img.live-thumb").count() == 1
            # newest first: the earlier arrival (the stream test's file) is below it
            first = page.locator("[data-testid=live-item]").first
            assert first.get_attribute("data-relpath") == "needle.png"
            page.screenshot(path=str(SCREENSHOTS / "06-live.png"), full_page=True)
        finally:
            browser.close()
