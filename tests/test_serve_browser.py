"""serve.py's page in a real browser (Debian's chromium through selenium, headless): text streams in
as it is made, Stop stops it and frees the model, and a greedy completion is inference.generate's
text.

SERVE_SCREENSHOT=docs/serve.png python -m pytest tests/test_serve_browser.py   # refreshes the
README's picture"""

import json
import os
import shutil
import urllib.request

import pytest
from conftest import start_server
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from inference import generate
from serve import MAX_TOKENS
from train_gpt2 import get_tokenizer, load_model

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def page(serve_run, tmp_path_factory):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail(
            "needs Debian's chromium and chromium-driver: apt-get install -y chromium "
            "chromium-driver"
        )
    proc, url = start_server(serve_run.dir, tmp_path_factory.mktemp("browser") / "log")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=900,640",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.get(url)
    yield driver, url
    driver.quit()
    proc.terminate()
    proc.wait(timeout=10)


def fill(driver, **values):
    for name, value in values.items():
        box = driver.find_element(By.ID, name)
        box.clear()
        box.send_keys(str(value))


def completion(driver):
    # exact, spaces and all
    return driver.find_element(By.ID, "completion").get_attribute("textContent")


def test_text_streams_in_and_stop_stops_it(page):
    driver, url = page
    fill(driver, prompt="The cat sat on the", max_tokens=MAX_TOKENS, temperature=1)
    driver.find_element(By.ID, "generate").click()
    stop = driver.find_element(By.ID, "stop")
    wait = WebDriverWait(driver, 30)
    # text shows while it is being made
    wait.until(lambda d: len(completion(d)) > 20 and stop.is_enabled())
    seen = completion(driver)
    wait.until(lambda d: len(completion(d)) > len(seen) + 20)  # and keeps coming
    stop.click()
    wait.until(lambda d: d.find_element(By.ID, "status").text == "stopped")
    wait.until(lambda d: running(url) == 0)  # the server saw the page hang up: the model is free


def running(url):
    with urllib.request.urlopen(f"{url}/health") as r:
        return json.load(r)["running"]


def test_a_greedy_completion_is_generates_text(page, serve_run, tmp_path):
    driver, _ = page
    fill(driver, prompt="Hello, I'm a language model,", max_tokens=40, temperature=0)
    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, 30).until(
        lambda d: "finish_reason: length" in d.find_element(By.ID, "status").text
    )
    enc = get_tokenizer()
    prompt = enc.encode("Hello, I'm a language model,")
    assert completion(driver) == enc.decode(
        generate(load_model(serve_run.checkpoint), prompt, 40, temperature=0)[0]
    )
    shot = tmp_path / "serve.png"
    driver.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("SERVE_SCREENSHOT"):
        shutil.copy(shot, os.environ["SERVE_SCREENSHOT"])
