"""The playground page in a real headless browser (Debian's chromium + chromedriver, driven by selenium)."""

from __future__ import annotations

import openai
import pytest
from conftest import ANCHORS, Server, headless_browser, require_browser, write_tiny_router

from fedrouter.model.loading import load_base_model

require_browser(allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run_dir = write_tiny_router(tmp_path_factory.mktemp("played"), load_base_model("tiny-random", precision="fp32"))
    served = Server(run_dir, tmp_path_factory.mktemp("logs") / "serve.log")
    yield served
    served.stop()


def test_the_playground_chats_and_shows_the_routing(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    expected = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0).chat.completions.create(
        model="fedrouter", messages=[{"role": "user", "content": ANCHORS[1]}], max_tokens=64
    )
    driver = headless_browser()
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == 7)
        assert driver.find_element(By.ID, "model").get_attribute("value") == "fedrouter"
        box = driver.find_element(By.ID, "prompt")
        box.send_keys(ANCHORS[1])
        box.send_keys(Keys.ENTER)
        route = wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, ".assistant .route")))
        assert "served by cluster_1 (global routing, distance" in route.text
        bars = driver.find_elements(By.CSS_SELECTOR, ".assistant .bars .bar")
        assert len(bars) == 3 and "chosen" in bars[1].get_attribute("class")
        answer = driver.find_element(By.CSS_SELECTOR, ".assistant > span").text
        assert answer == expected.choices[0].message.content.strip()
        assert driver.find_element(By.CSS_SELECTOR, ".user").text == ANCHORS[1]
        # A forced adapter from the menu: the next answer names it.
        driver.find_element(By.CSS_SELECTOR, "#model option[value='cluster_2']").click()
        box.send_keys("And another one?")
        box.send_keys(Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant .route")) == 2)
        second = driver.find_elements(By.CSS_SELECTOR, ".assistant .route")[1].text
        assert "served by cluster_2 (cluster routing)" in second
        shot = tmp_path / "playground.png"
        driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    finally:
        driver.quit()
