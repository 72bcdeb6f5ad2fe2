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
from tests.helpers import SmallModel  # noqa: E402

SCREENSHOTS = ws.SCREENSHOTS


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
    event, event_id = _first_event(f"{url}/api/live/events", "streamed.png")
    rows = wt.results(out)
    assert [r["relpath"] for r in rows] == ["streamed.png"]  # the same results file as `emassist watch`
    # the streamed answer is the results file's (the small model is not always right, so not the true class)
    assert event["status"] == "classified" and event["label"] == rows[0]["label"]
    assert event["thumbnail"].startswith("data:image/png;base64,")
    epoch, _, seq = event_id.partition("-")
    assert len(epoch) == 8 and int(epoch, 16) >= 0 and int(seq) >= 1  # <server epoch>-<n>
    # a browser coming back from another server's stream (an id of another epoch) gets the arrivals again
    again, _ = _first_event(f"{url}/api/live/events", "streamed.png", headers={"Last-Event-ID": "deadbeef-999"})
    assert again["relpath"] == "streamed.png"


def _first_event(url: str, relpath: str, headers: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
    """The first Server-Sent Event about ``relpath`` and its id."""
    fields: dict[str, str] = {}
    with requests.get(url, stream=True, timeout=30, headers=headers or {}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines(decode_unicode=True):
            if line:  # one event's lines (id, event, data in any order), up to the blank line that ends it
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
                continue
            if "data" in fields:
                event = json.loads(fields["data"])
                if event["relpath"] == relpath:
                    return event, fields.get("id", "")
            fields = {}
    raise AssertionError(f"no event for {relpath}")


def test_live_tab_shows_a_dropped_file_within_seconds(live: tuple[str, Path, Path]) -> None:
    url, folder, out = live
    with ws.chromium() as browser:
        page: Any = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.click("#tab-live")
        page.wait_for_function("document.getElementById('live-status').dataset.connection === 'open'",
                               timeout=15_000)  # fmt: skip
        assert "Watching" in page.inner_text("[data-testid=live-status]")
        (folder / "needle.png").write_bytes(wt.png_bytes(ws.RIGHT, 801))  # the alert class
        item = page.locator("[data-testid=live-item][data-relpath='needle.png']")
        item.wait_for(timeout=10_000)  # within a few seconds of the file landing
        answer = next(r for r in wt.results(out) if r["relpath"] == "needle.png")
        assert item.locator("[data-testid=live-label]").inner_text() == answer["label"]
        alert = answer["label"] == ws.RIGHT and float(answer["confidence"]) >= wt.FAST_WATCH["min_confidence"]
        assert ("alert" in (item.get_attribute("class") or "")) == alert  # highlighted exactly when it alerts
        assert item.locator("img.live-thumb").count() == 1
        # newest first: the earlier arrival (the stream test's file) is below it
        first = page.locator("[data-testid=live-item]").first
        assert first.get_attribute("data-relpath") == "needle.png"
        page.screenshot(path=str(SCREENSHOTS / "06-live.png"), full_page=True)
