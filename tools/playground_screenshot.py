"""Take the README's playground screenshot: serve a trained run, ask two questions in headless chromium, save a PNG.

    .venv/bin/python tools/playground_screenshot.py RUN_DIR [--out docs/playground.png] [--question TEXT ...]

Needs Debian's chromium and chromium-driver. The server is started and stopped (its whole process group) here.
The default questions are paper4-raw's (a dialogue to summarize, a WebNLG record); ``--question`` (repeatable)
asks others, for a run trained on other tasks. The page shows the clusters' names as the run's router.json has them.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from fedrouter.deploy import free_port

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = (
    "James: I am driving there, need a ride?\nRichard: That's perfect, thanks, what time should I be ready?\n"
    "James: 6:15?\nRichard: I'll be waiting!",
    "['Nurhan_Atasoy | birthPlace | Turkey']",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "playground.png")
    parser.add_argument("--question", action="append", help="a question to ask instead of the defaults (repeatable)")
    args = parser.parse_args()
    questions = args.question or QUESTIONS
    port = free_port()
    command = [sys.executable, "-m", "fedrouter.cli", "serve", str(args.run_dir), "--port", str(port)]
    server = subprocess.Popen(command, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.5)
        options = webdriver.ChromeOptions()
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,900"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)
        try:
            driver.get(url + "/")
            wait = WebDriverWait(driver, 300)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
            for n, question in enumerate(questions, start=1):
                box = driver.find_element(By.ID, "prompt")
                for line_number, line in enumerate(question.split("\n")):
                    if line_number:
                        box.send_keys(Keys.SHIFT, Keys.ENTER)
                    box.send_keys(line)
                box.send_keys(Keys.ENTER)
                wait.until(lambda d, n=n: len(d.find_elements(By.CSS_SELECTOR, ".assistant .route")) == n)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
            print(f"wrote {args.out}")
        finally:
            driver.quit()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
