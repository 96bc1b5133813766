"""Take the docs' screenshot of a run report: the whole page in headless chromium, saved as a small PNG.

    .venv/bin/fedrouter run --config configs/demo.toml --name report-demo
    .venv/bin/python tools/report_screenshot.py runs/report-demo [--out docs/report.png] [--width 1200]

Writes the run's report again (as `fedrouter report RUN` does, into RUN/report), opens it from disk, and saves the
page from top to bottom in 256 colours (charts and tables lose nothing visible; the file shrinks several times).
Needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from fedrouter.run_report import write_report

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "report.png")
    parser.add_argument("--width", type=int, default=1200, help="window width in pixels")
    args = parser.parse_args()
    page = write_report([args.run_dir])
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={args.width},800")
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    try:
        driver.get(page.resolve().as_uri())
        driver.execute_script("return Promise.all([...document.images].map(i => i.decode()))")  # every chart drawn
        height = driver.execute_script("return document.documentElement.scrollHeight")
        metrics = {"width": args.width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)  # a viewport as tall as the page
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
    finally:
        driver.quit()
    with Image.open(args.out) as shot:
        shot.convert("RGB").quantize(colors=256).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
