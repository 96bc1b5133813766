"""The playground page in a real headless browser (Debian's chromium + chromedriver, driven by selenium)."""

from __future__ import annotations

import openai
import pytest
from conftest import ANCHORS, Server, headless_browser, require_browser, write_tiny_router

from fedrouter.model.loading import load_base_model
from fedrouter.serving.artifact import rename_clusters

require_browser(allow_module_level=True)

# A name with markup in it: the page must show it as text.
MATH = "<b>sums</b> & numbers"
SORTING = "sorting (100%)"
SECOND = "Sort these words: kiwi, fig, pear"  # no anchor: its distances are all above zero


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run_dir = write_tiny_router(tmp_path_factory.mktemp("played"), load_base_model("tiny-random", precision="fp32"))
    rename_clusters(run_dir, {"cluster_0": SORTING, "cluster_1": MATH})
    served = Server(run_dir, tmp_path_factory.mktemp("logs") / "serve.log")
    yield served
    served.stop()


def test_the_playground_chats_and_shows_the_routing(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    expected = client.chat.completions.create(
        model="fedrouter", messages=[{"role": "user", "content": ANCHORS[1]}], max_tokens=64
    )
    second = client.chat.completions.create(
        model="fedrouter", messages=[{"role": "user", "content": SECOND}], max_tokens=1
    ).model_extra["fedrouter"]
    driver = headless_browser()
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == 7)
        assert driver.find_element(By.ID, "model").get_attribute("value") == "fedrouter"
        menu = driver.find_element(By.CSS_SELECTOR, "#model option[value='cluster_1']")
        assert menu.text == f"cluster_1 · {MATH}"
        box = driver.find_element(By.ID, "prompt")
        box.send_keys(ANCHORS[1])
        box.send_keys(Keys.ENTER)
        route = wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, ".assistant .route")))
        assert f"served by cluster_1 · {MATH} (global routing, distance" in route.text
        assert route.find_elements(By.TAG_NAME, "b") == []  # the name's markup is text, not HTML
        bars = driver.find_elements(By.CSS_SELECTOR, ".assistant .bars .bar")
        assert len(bars) == 3 and "chosen" in bars[1].get_attribute("class")
        labels = [e.text for e in route.find_elements(By.CSS_SELECTOR, ".bars .name")]
        assert labels == [f"cluster_0 · {SORTING}", f"cluster_1 · {MATH}", "cluster_2"]
        assert "nearness (longest bar: nearest cluster)" in route.text
        answer = driver.find_element(By.CSS_SELECTOR, ".assistant > span").text
        assert answer == expected.choices[0].message.content.strip()
        assert driver.find_element(By.CSS_SELECTOR, ".user").text == ANCHORS[1]
        # A prompt between the clusters: the nearest one's bar is the longest, each bar nearest distance / distance.
        box.send_keys(SECOND)
        box.send_keys(Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant .route")) == 2)
        fills = driver.find_elements(By.CSS_SELECTOR, ".assistant:nth-of-type(4) .bars .bar span")
        widths = [float(f.get_attribute("style").split("width:")[1].split("%")[0]) for f in fills]
        distances = second["distances"]
        nearest = distances.index(min(distances))
        assert widths[nearest] == 100.0 and widths.index(max(widths)) == nearest
        assert widths == pytest.approx([100 * min(distances) / d for d in distances], abs=0.06)
        assert "nearest" in fills[nearest].find_element(By.XPATH, "..").get_attribute("class")
        # A forced adapter from the menu: the next answer names it.
        driver.find_element(By.CSS_SELECTOR, "#model option[value='cluster_2']").click()
        box.send_keys("And another one?")
        box.send_keys(Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant .route")) == 3)
        third = driver.find_elements(By.CSS_SELECTOR, ".assistant .route")[2].text
        assert "served by cluster_2 (cluster routing)" in third
        shot = tmp_path / "playground.png"
        driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    finally:
        driver.quit()
