"""How long the dashboard's default view takes to render after start-up, in a real headless browser.

    python benchmarks/bench_dashboard.py

Starts `echosim dashboard` on 127.0.0.1 with an empty runs folder, waits for its health endpoint, then loads the
page in the system Chromium (selenium) and times it until the default view is drawn (the policy caption and the
throughput and goodput charts with their canvases). Three cases: cold (nothing simulated yet: the 12 cells run),
reload (the same server: Streamlit's in-memory cache), restart (a new server on the same runs folder: the cells
come from disk)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[1]
CHARTS = '[data-testid="stVegaLiteChart"] canvas, [data-testid="stVegaLiteChart"] svg'


def start(runs: Path) -> tuple[subprocess.Popen, str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "echosim.cli", "dashboard", "--port", str(port), "--runs",
                             str(runs)], env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return proc, url, time.perf_counter() - t0
        except OSError:
            time.sleep(0.05)


def view_s(driver, url: str) -> tuple[float, float]:
    """(seconds to the page's title, seconds to the default view drawn) from the request."""
    t0 = time.perf_counter()
    driver.get(url)
    wait = WebDriverWait(driver, 300, poll_frequency=0.05)
    wait.until(lambda d: "What-if" in d.find_element(By.TAG_NAME, "body").text)
    shell = time.perf_counter() - t0
    wait.until(lambda d: "policies: ar, eagle3, echo | 12 cells" in d.find_element(By.TAG_NAME, "body").text
               and len(d.find_elements(By.CSS_SELECTOR, CHARTS)) >= 2)
    return shell, time.perf_counter() - t0


def main() -> None:
    opts = Options()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1400"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runs = Path(tmp)
            proc, url, up = start(runs)
            cold = view_s(driver, url)
            reload = view_s(driver, url)
            proc.terminate()
            proc.wait()
            proc, url, up2 = start(runs)
            restart = view_s(driver, url)
            proc.terminate()
            proc.wait()
    finally:
        driver.quit()
    print(f"server start-up to health: {up:.2f} s (restart {up2:.2f} s)")
    for name, (shell, view) in (("cold", cold), ("reload", reload), ("restart on the same runs folder", restart)):
        print(f"{name}: page title after {shell:.2f} s, default view drawn after {view:.2f} s")
    print(f"load average: {os.getloadavg()}, CPUs: {os.cpu_count()}")


if __name__ == "__main__":
    main()
