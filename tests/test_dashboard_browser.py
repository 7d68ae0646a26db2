"""The dashboard in a real headless browser: `echosim dashboard` serves it on 127.0.0.1, the system's Chromium
(Debian's chromium + chromium-driver, driven by selenium; nothing is downloaded) loads the page, a policy is added,
the chart must change, a screenshot is saved, and a malformed upload shows its one-line error in the page.

Run with `python -m pytest -m browser tests/test_dashboard_browser.py` (CI's browser step). ECHO_SCREENSHOT_DIR
keeps the screenshots."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
pytest.importorskip("streamlit")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("needs the system chromium and chromedriver (apt-get install chromium chromium-driver)",
                allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runs = tmp_path_factory.mktemp("browser_runs")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ECHO_DASHBOARD_RUNS", None)
    log = open(runs / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "echosim.cli", "dashboard", "--port", str(port), "--runs",
                             str(runs)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=runs,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the dashboard did not start: " + (runs / "server.log").read_text()[-2000:])
        time.sleep(0.2)
    yield url, runs
    os.killpg(proc.pid, signal.SIGTERM)  # `echosim dashboard` became the server: nothing else to stop
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,1400"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def _text(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def _chart_png(driver, i: int = 0) -> bytes:
    charts = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stVegaLiteChart"]')
    return charts[i].screenshot_as_png


def _shots() -> Path | None:
    d = os.environ.get("ECHO_SCREENSHOT_DIR")
    if d:
        Path(d).mkdir(parents=True, exist_ok=True)
    return Path(d) if d else None


def test_page_loads_policy_change_updates_the_chart(server, browser, tmp_path):
    url, _ = server
    browser.get(url)
    wait = WebDriverWait(browser, 240, poll_frequency=0.25)
    wait.until(lambda d: "policies: ar, eagle3, echo | 12 cells" in _text(d))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '[data-testid="stVegaLiteChart"] canvas, '
                                                              '[data-testid="stVegaLiteChart"] svg')) >= 2)
    time.sleep(1.0)  # let vega finish drawing
    before = _chart_png(browser)
    assert "Speculation stops paying" in _text(browser)

    box = browser.find_element(By.CSS_SELECTOR, '[data-testid="stSidebar"] [data-testid="stMultiSelect"] input')
    box.click()
    box.send_keys("ddd")
    box.send_keys(Keys.ENTER)
    box.send_keys(Keys.ESCAPE)
    wait.until(lambda d: "policies: ar, eagle3, echo, ddd | 16 cells" in _text(d))
    wait.until(lambda d: _chart_png(d) != before)   # the throughput chart now draws a fourth policy
    shot = tmp_path / "dashboard.png"
    browser.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
    if _shots():
        shutil.copy(shot, _shots() / "dashboard.png")
    assert "Traceback" not in browser.page_source


def test_malformed_upload_shows_the_parse_error_in_the_page(server, browser, tmp_path):
    url, _ = server
    bad = tmp_path / "broken_trace.jsonl"
    bad.write_text('{"arrival_s": 0.0, "prompt_tokens": 10, "output_tokens": 5}\n'
                   '{"arrival_s": 1.0, "prompt_tokens": "ten", "output_tokens": 5}\n')
    wait = WebDriverWait(browser, 120, poll_frequency=0.25)
    browser.get(url)
    wait.until(lambda d: "policies: ar" in _text(d))
    wait.until(lambda d: d.find_elements(By.XPATH, '//label[.//p[text()="trace replay"]]'))[0].click()
    wait.until(lambda d: d.find_elements(By.XPATH, '//label[.//p[text()="upload"]]'))[0].click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, 'input[type="file"]'))[0].send_keys(str(bad))
    err = wait.until(lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, '[data-testid="stAlertContentError"]')
                                if "broken_trace.jsonl" in e.text])
    text = err[0].text
    # file, line and field, as the CLI prints them: "error: broken_trace.jsonl:2: field 'prompt_tokens': ..."
    assert text.startswith("error: broken_trace.jsonl:2: field 'prompt_tokens'"), text
    assert len(text.strip().splitlines()) == 1
    assert "Traceback" not in browser.page_source
    if _shots():
        browser.save_screenshot(str(_shots() / "dashboard_bad_upload.png"))
