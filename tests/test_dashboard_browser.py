"""The dashboard in a real browser: Debian's chromium, headless, driven by Selenium through chromium-driver,
against a whole proxy (``inferoxy serve``). The page loads, the models appear, a request counter rises after
requests, a key is asked for once the state needs one, and a screenshot is taken and checked not blank.

Chromium, its driver or Selenium missing: a skip outside CI, a failure in it (``CI`` or
``INFEROXY_REQUIRE_CHROMIUM`` set). Selenium is given both paths, so Selenium Manager downloads nothing.
``INFEROXY_DASHBOARD_SCREENSHOT=docs/dashboard.png`` also copies the screenshot there (the README's).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from inferoxy.client import Client
from tests.support import ProxyProcess, require_program, require_service

REQUIRE = "INFEROXY_REQUIRE_CHROMIUM"
WAIT_S = 30.0
ECHO_BODY = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}


def chromium_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        require_service("chromium", REQUIRE, "is not installed (apt-get install chromium chromium-driver)")
    driver = require_program("chromedriver", REQUIRE)
    assert browser is not None
    return browser, driver


@pytest.fixture(scope="module")
def webdriver() -> Iterator[Any]:
    browser, driver = chromium_paths()
    try:
        from selenium import webdriver as selenium_webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        require_service("selenium", REQUIRE, "is not installed (pip install -e .[dev])")
        raise
    options = selenium_webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-dev-shm-usage", "--window-size=1280,860", "--hide-scrollbars"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = selenium_webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


@pytest.fixture(scope="module")
def proxy() -> Iterator[ProxyProcess]:
    # Metadata closed: the state is open while no key exists, and needs one from the first key on.
    with ProxyProcess(env={"INFEROXY_AUTH_METADATA": "true"}) as running:
        yield running


def wait_until(chrome: Any, check: Any, what: str) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    def guarded(driver: Any) -> Any:
        try:
            return check(driver)
        except StaleElementReferenceException:  # the table was redrawn under us: look again
            return False

    try:
        return WebDriverWait(chrome, WAIT_S, poll_frequency=0.1).until(guarded)
    except Exception:
        raise AssertionError(f"the page never showed {what}; it says: {chrome.find_element('tag name', 'body').text}"
                             ) from None


def cell(chrome: Any, model: str, column: str) -> str:
    return str(chrome.find_element("css selector", f'tr[data-model="{model}"] td.{column}').text)


def severe_console_messages(chrome: Any) -> list[str]:
    """Errors the page logged: a CSP violation (inline script or style, something from elsewhere) shows here."""
    return [entry["message"] for entry in chrome.get_log("browser") if entry["level"] == "SEVERE"]


def test_the_models_appear_and_the_request_counter_rises(webdriver: Any, proxy: ProxyProcess,
                                                         tmp_path: Path) -> None:
    chrome = webdriver
    chrome.get(f"{proxy.rest_url}/dashboard")
    wait_until(chrome, lambda d: d.find_elements("css selector", 'tr[data-model="echo/1"]'), "the echo model")
    for model in ("echo/1", "digits/1", "digits-onnx/1", "counter/1"):
        wait_until(chrome, lambda d, m=model: cell(d, m, "replicas").startswith("1 /"), f"{model} with its replica")
    assert "ready" in chrome.find_element("css selector", 'tr[data-model="echo/1"]').text
    # models.yaml's description of digits, behind its framework, in the "about" column.
    assert cell(chrome, "digits/1", "description").startswith("numpy: A classifier of 8x8 handwritten digits")
    replicas = chrome.find_elements("css selector", "#replicas tbody tr[data-replica]")
    assert len(replicas) == 4, [r.text for r in replicas]  # one per model of models.yaml
    before = int(cell(chrome, "echo/1", "requests"))

    n = 12
    with httpx.Client(base_url=proxy.rest_url, timeout=WAIT_S) as http:
        for _ in range(n):
            assert http.post("/v2/models/echo/infer", json=ECHO_BODY).status_code == 200
    with Client(proxy.zmq_url) as client:
        for _ in range(n):
            client.infer("digits", {"image": np.zeros((2, 64), np.float32)})

    wait_until(chrome, lambda d: int(cell(d, "echo/1", "requests")) >= before + n, f"{n} more echo requests")
    wait_until(chrome, lambda d: int(cell(d, "digits/1", "requests")) >= n, f"{n} digits requests")
    wait_until(chrome, lambda d: cell(d, "echo/1", "rate") not in ("–", "0.0"), "a request rate for echo")
    assert int(cell(chrome, "echo/1", "errors")) == 0
    assert severe_console_messages(chrome) == []

    shot = tmp_path / "dashboard.png"
    assert chrome.save_screenshot(str(shot))
    colours, inked = picture_stats(shot)
    # A blank page is one colour; text, tables, state badges and the sparkline make many, over a fair area.
    assert colours >= 20, f"the screenshot has {colours} colours: blank?"
    assert inked >= 0.02, f"only {inked:.1%} of the screenshot is not background"
    wanted = os.environ.get("INFEROXY_DASHBOARD_SCREENSHOT")
    if wanted:
        shutil.copyfile(shot, wanted)


def test_the_page_asks_for_a_key_once_the_state_needs_one(webdriver: Any, proxy: ProxyProcess) -> None:
    chrome = webdriver
    chrome.get(f"{proxy.rest_url}/dashboard")
    wait_until(chrome, lambda d: d.find_elements("css selector", 'tr[data-model="echo/1"]'), "the models")
    # The first key turns keys on (INFEROXY_AUTH=auto); with metadata closed the state then needs an observer key.
    created = httpx.post(f"{proxy.rest_url}/v2/admin/keys", json={"name": "ops", "scopes": ["admin"]}, timeout=WAIT_S)
    assert created.status_code in (200, 201), created.text
    key = created.json()["key"]
    login = chrome.find_element("id", "login")
    wait_until(chrome, lambda d: login.is_displayed(), "the key form")
    assert "401" in chrome.find_element("id", "login-why").text

    chrome.find_element("id", "key").send_keys(key)
    chrome.find_element("css selector", "#login button").click()
    wait_until(chrome, lambda d: not login.is_displayed(), "the dashboard again, with the key")
    wait_until(chrome, lambda d: d.find_elements("css selector", 'tr[data-model="echo/1"]'), "the models")
    # Kept for the tab's life (sessionStorage), never in a cookie or the URL.
    assert chrome.execute_script("return sessionStorage.getItem('inferoxy.dashboard.key')") == key
    assert key not in chrome.current_url and not chrome.get_cookies()
    chrome.refresh()
    wait_until(chrome, lambda d: d.find_elements("css selector", 'tr[data-model="echo/1"]'), "the models after reload")
    assert not chrome.find_element("id", "login").is_displayed()


def picture_stats(path: Path) -> tuple[int, float]:
    """The number of distinct colours in a PNG, and the share of pixels that differ from its commonest colour."""
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    return len(colours), 1.0 - counts.max() / len(pixels)
