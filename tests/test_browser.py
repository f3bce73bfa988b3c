"""The gateway's pages in a real headless chromium (selenium): chat with a streamed answer; the swarm page's
block map with a bar over every server's span, its charts with points after a few generations, and its
blocks table behind the details toggle. A 2-block random Llama with SmolLM2's tokenizer keeps the swarm
quick to start. The screenshots go to docs/screenshots/ (committed; README "Three ways in" shows them)."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import pytest

from shardnet import ShardedModel
from shardnet.gateway import GatewayServer, create_app
from shardnet.gateway.serving import load_tokenizer
from shardnet.launch import LocalSwarm

from .conftest import make_llama

pytestmark = pytest.mark.timeout(240)

INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"


def _browser_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip(f"no chromium/chromedriver found; install them with: {INSTALL}")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = _browser_paths()
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the pages' console, read by _no_errors
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    yield driver
    driver.quit()  # also stops the chromedriver process


@pytest.fixture(scope="module")
def gateway(smollm2_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_chat")
    tokenizer = load_tokenizer(smollm2_path)
    make_llama(path, num_hidden_layers=2, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(path)
    swarm = LocalSwarm(
        path, [(0, 1), (1, 2)], log_dir=tmp_path_factory.mktemp("browser_logs"), torch_threads=1
    )
    swarm.start(timeout_s=180)
    try:
        with ShardedModel.from_pretrained(path, initial_peers=swarm.initial_peers) as model:
            with GatewayServer(create_app(model, tokenizer, "tiny")) as server:
                yield server, swarm
    finally:
        swarm.stop()


SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"  # committed: README shows them


def _shot(driver, name: str) -> None:
    """A screenshot of the whole page (the window grown to its height) into docs/screenshots/."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1200, max(900, int(height) + 140))  # + the window's frame
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


def _no_errors(driver) -> None:
    """Nothing went wrong in the page's scripts (or its fetches) since the last call."""
    errors = [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def _chat(base_url: str, question: str, max_tokens: int) -> dict:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_chat_page_streams_an_answer(browser, gateway):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    server, _ = gateway
    browser.set_window_size(1200, 900)
    browser.get(f"{server.url}/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "model-name").text == "tiny")
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("12")
    browser.find_element(By.ID, "prompt").send_keys("Hello there")
    browser.find_element(By.ID, "send").click()
    answer = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".msg.assistant[data-done='1']")))
    assert answer.get_attribute("data-finish") in ("length", "stop")
    assert answer.text.strip(), "the streamed answer is empty"
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    _no_errors(browser)
    _shot(browser, "chat")


def _read(driver, selector: str, expression: str) -> list:
    """`expression` (JavaScript over `e`) for every element matching `selector`, read in one script: the page
    redraws its map and tables every refresh, so elements found in one call may be gone by the next."""
    return driver.execute_script(
        f"return Array.from(document.querySelectorAll(arguments[0]), e => {expression});", selector
    )


def _points(driver, chart: str) -> int:
    return int((_read(driver, f"#{chart}", "e.getAttribute('data-points')") or [0])[0] or 0)


def test_swarm_page_maps_every_server_and_charts_recent_generations(browser, gateway):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, _ = gateway
    answers = [_chat(server.url, question, 6) for question in ("Hi", "What is a block?", "Count to three.")]
    tokens = [a["usage"]["completion_tokens"] for a in answers]
    assert all(t >= 2 for t in tokens), tokens  # each answer has a decode phase: a tokens/s point
    status = _get_json(f"{server.url}/api/swarm")
    spans = {s["peer_id"]: s["span"] for s in status["servers"]}
    assert sorted(spans.values()) == ["0:1", "1:2"]

    browser.set_window_size(1200, 900)
    browser.get(f"{server.url}/swarm")
    wait = WebDriverWait(browser, 60)

    def bars(driver) -> list[list[str]]:  # [peer, span, state] per bar
        attributes = "['data-peer', 'data-span', 'data-state'].map(name => e.getAttribute(name))"
        return _read(driver, "#blockmap rect.bar", attributes)

    wait.until(lambda d: {peer: span for peer, span, _ in bars(d)} == spans)
    assert {state for _, _, state in bars(browser)} == {"online"}
    assert not _read(browser, "#blockmap rect.gap", "1")  # every block is held
    wait.until(lambda d: _points(d, "chart-tokens") >= 3 and _points(d, "chart-ttft") >= 3)
    wait.until(lambda d: _points(d, "chart-hops") >= 2 * 3)  # a line per span, a point per answer
    assert _read(browser, "#steps tr.step", "1")
    for hop in _read(browser, "#steps .hop", "e.textContent"):
        assert "pending" in hop or " / " in hop or "failover" in hop, hop
    assert "0:1" in browser.find_element(By.ID, "route").text
    assert len(_read(browser, "#servers tr.server", "1")) == 2
    assert not browser.find_element(By.ID, "blocks").is_displayed()  # behind the details toggle
    _shot(browser, "swarm")

    browser.find_element(By.CSS_SELECTOR, "#block-details summary").click()
    wait.until(lambda d: d.find_element(By.ID, "blocks").is_displayed())
    assert _read(browser, "#blocks tr.block", "e.cells[2].textContent.trim()") == ["yes", "yes"]
    _no_errors(browser)
    _shot(browser, "swarm-details")
