"""``emassist web`` start-up as a real process: the page and its health check answer before the model is loaded.

The model's load is held deterministically with the backend loader's test hook (``EMASSIST_TEST_HOLD_LOAD``: the
load waits until the named file exists), so "loading" is observed without any timing: health says ``loading``
(503), a classify gets 503 with a message and Retry-After, Chromium shows "loading the model"; the file is written,
and health says ``ok``, the page shows its normal header, a classify is answered. A model file that cannot be
loaded leaves the page up saying why; a model that is not there at all still ends the command with status 1.
Screenshots go to test-artifacts/screenshots/ (10-... and 11-...).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("keras")
pytest.importorskip("mlflow")

pytestmark = pytest.mark.slow

from tests import webapp_support as ws  # noqa: E402
from tests.helpers import REPO_ROOT, SmallModel  # noqa: E402
from tests.servers import free_port, server_env, stop_process  # noqa: E402

SCREENSHOTS = ws.SCREENSHOTS
HOLD_ENV = "EMASSIST_TEST_HOLD_LOAD"  # emassist.serve.backend.ENV_TEST_HOLD_LOAD (the test hook)


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory, small_model: SmallModel) -> ws.Champion:
    return ws.register_champion(tmp_path_factory.mktemp("webstart"), small_model)


def _first_answer(url: str, proc: subprocess.Popen[bytes], log_file: Path, timeout: float = 120) -> requests.Response:
    """The first answer of ``url`` (any status), polling while the process runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log_file.read_text()[-3000:]}"
        with contextlib.suppress(requests.RequestException):
            return requests.get(url, timeout=5)
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer in {timeout:.0f} s:\n{log_file.read_text()[-3000:]}")


def _health_until(url: str, status: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = requests.get(f"{url}/api/health", timeout=5).json()
        if body["status"] == status:
            return body
        time.sleep(0.2)
    raise AssertionError(f"health never said {status!r}; last {body}")


@contextlib.contextmanager
def started(champion: ws.Champion, *extra: str, **env: str) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """``emassist web`` as a process; yields as soon as its health check answers at all (url, process, log)."""
    port = free_port()
    log_file = champion.root / f"web-{port}.log"
    cmd = [sys.executable, "-m", "emassist.cli.main", "--params", str(champion.params_file), "web",
           "--host", "127.0.0.1", "--port", str(port), *extra]  # fmt: skip
    full_env = server_env(MLFLOW_TRACKING_URI=champion.tracking_uri, PYTHONPATH=str(REPO_ROOT), **env)
    full_env.pop("EMASSIST_MONITORING_DB_URI", None)
    with open(log_file, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env, cwd=champion.root,
                                start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _first_answer(f"{url}/api/health", proc, log_file)
        yield url, proc, log_file
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def held(champion: ws.Champion) -> Iterator[tuple[str, Path]]:
    """A page whose model load waits for the gate file (url, gate)."""
    gate = champion.root / "release-the-model"
    with started(champion, **{HOLD_ENV: str(gate)}) as (url, _, _):
        yield url, gate


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with ws.chromium() as b:
        yield b


def _png(champion: ws.Champion) -> bytes:
    path = champion.root / "fibres.png"
    if not path.exists():
        ws.png_file(path, ws.demo_image(ws.LEFT, 300, 256))
    return path.read_bytes()


def test_while_loading_health_says_so_the_page_is_served_and_model_requests_get_503(
    held: tuple[str, Path], champion: ws.Champion
) -> None:
    url, gate = held
    assert not gate.exists()
    health = requests.get(f"{url}/api/health", timeout=5)
    assert health.status_code == 503 and health.json()["status"] == "loading", health.text
    assert health.headers["Retry-After"].isdigit()
    page = requests.get(url, timeout=5)
    assert page.status_code == 200 and "Electron Microscope Assistant" in page.text
    assert "loading the model" in page.text
    r = requests.post(f"{url}/api/classify", params={"filename": "fibres.png"}, data=_png(champion), timeout=10)
    assert r.status_code == 503, r.text
    assert r.json()["status"] == "loading" and "the model is still loading" in r.json()["error"]
    assert r.headers["Retry-After"].isdigit()
    for path in ("/api/info", "/api/live", "/api/results.csv", "/api/gradcam/x"):
        r = requests.get(f"{url}{path}", timeout=10)
        assert r.status_code == 503 and "still loading" in r.json()["error"], (path, r.text)
    r = requests.post(f"{url}/api/scan", params={"filename": "x.png", "class": ws.RIGHT}, data=b"x", timeout=10)
    assert r.status_code == 503 and "Traceback" not in r.text


def test_page_shows_loading_then_the_normal_header(browser: Any, held: tuple[str, Path], champion: ws.Champion) -> None:
    url, gate = held
    context = browser.new_context(viewport={"width": 1280, "height": 700})
    pg = context.new_page()
    pg.set_default_timeout(120_000)
    try:
        pg.goto(url)
        pg.wait_for_function("document.getElementById('model-status').dataset.state === 'loading'")
        assert "loading the model" in pg.inner_text("[data-testid=model-status]")
        assert "loading the model" in pg.inner_text("[data-testid=model-info]")
        pg.screenshot(path=str(SCREENSHOTS / "10-loading-the-model.png"), full_page=True)
        gate.write_text("go\n")  # the model may load now
        pg.wait_for_selector("[data-testid=model-version]")
        assert f"version {champion.version}" in pg.inner_text("#model-info")
        assert not pg.is_visible("[data-testid=model-status]")
        assert "not meant for real micrographs" in pg.inner_text("[data-testid=training-notice]")
        pg.screenshot(path=str(SCREENSHOTS / "11-model-ready.png"), full_page=True)
    finally:
        context.close()


def test_once_loaded_health_is_ok_and_classify_answers(held: tuple[str, Path], champion: ws.Champion) -> None:
    url, gate = held
    gate.write_text("go\n")  # (already, when the browser test ran)
    assert _health_until(url, "ok") == {"status": "ok"}
    assert requests.get(f"{url}/api/health", timeout=5).status_code == 200
    r = requests.post(f"{url}/api/classify", params={"filename": "fibres.png"}, data=_png(champion), timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["label"] == ws.LEFT
    assert requests.get(f"{url}/api/info", timeout=10).json()["model"]["version"] == champion.version


def test_a_model_that_cannot_load_leaves_the_page_up_saying_why(browser: Any, champion: ws.Champion) -> None:
    broken = champion.root / "broken.keras"
    broken.write_bytes(b"this is not a Keras file\n")
    with started(champion, "--model", str(broken)) as (url, proc, _):
        body = _health_until(url, "error")
        assert "broken.keras" in body["error"] or "zip" in body["error"].lower(), body
        r = requests.post(f"{url}/api/classify", params={"filename": "fibres.png"}, data=_png(champion), timeout=10)
        assert r.status_code == 503 and "the model could not be loaded" in r.json()["error"], r.text
        assert "Traceback" not in r.text
        context = browser.new_context(viewport={"width": 1280, "height": 700})
        try:
            pg = context.new_page()
            pg.set_default_timeout(60_000)
            pg.goto(url)
            pg.wait_for_function("document.getElementById('model-status').dataset.state === 'error'")
            assert "The model could not be loaded" in pg.inner_text("[data-testid=model-status]")
            pg.screenshot(path=str(SCREENSHOTS / "12-model-load-error.png"), full_page=True)
        finally:
            context.close()
        assert proc.poll() is None  # still up
        assert requests.get(url, timeout=5).status_code == 200


def test_a_model_that_is_not_there_still_ends_the_command_with_status_1(champion: ws.Champion) -> None:
    missing = champion.root / "no-such-model.keras"
    env = server_env(MLFLOW_TRACKING_URI=champion.tracking_uri)
    done = subprocess.run([sys.executable, "-m", "emassist.cli.main", "--params", str(champion.params_file), "web",
                           "--port", str(free_port()), "--model", str(missing)], capture_output=True, text=True,
                          env=env, cwd=champion.root, timeout=120)  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"error: cannot load {missing}: no such file or folder" in done.stderr
