"""The gateway's pages in a real headless chromium (selenium): chat with a streamed answer, the swarm page
listing every server. A 2-block random Llama with SmolLM2's tokenizer keeps the swarm quick to start."""

from __future__ import annotations

import shutil
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


def _shot(driver, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


def test_chat_page_streams_an_answer_and_swarm_page_lists_servers(browser, gateway, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    server, swarm = gateway
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
    _shot(browser, tmp_path, "chat")

    browser.get(f"{server.url}/swarm")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#servers tr.server")) == 2)
    rows = browser.find_elements(By.CSS_SELECTOR, "#servers tr.server")
    spans = sorted(row.find_elements(By.TAG_NAME, "td")[3].text for row in rows)
    assert spans == ["0:1", "1:2"]
    assert all(row.find_elements(By.TAG_NAME, "td")[1].text == "online" for row in rows)
    assert "0:1" in browser.find_element(By.ID, "route").text
    _shot(browser, tmp_path, "swarm")
