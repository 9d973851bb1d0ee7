"""The dashboard in a real browser: Debian's headless chromium, driven by selenium,
against a real broker process. It sees a queue's count change live after a send (no
reload), is refused a dead letter's contents without the token, browses it with the
token (headers, error text), shows its body, and requeues it; the broker's statistics
confirm the queue got it.

``make test`` installs chromium and its driver where it can (root with apt-get); the test
skips, naming what is missing, only where they are not installed. With
``AIOBUS_SCREENSHOT=1`` (``make screenshot``) it also writes docs/dashboard.png, the
picture in the README.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import aiobus

from .conftest import queue_stats
from .web_broker import start_web_broker

pytestmark = pytest.mark.asyncio
TIMEOUT = 15.0
DOCS = Path(__file__).resolve().parents[2] / "docs"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed"
                                " (pip install -e '.[test]')")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip("needs Debian's chromium and chromium-driver (missing:"
                    f" {'chromium' if chromium is None else 'chromedriver'});"
                    " 'make test' installs them with apt-get when run as root")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1120", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=chromedriver,
                                      log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()  # ends chromium and chromedriver


def wait_for(driver: Any, condition: Callable[[Any], Any]) -> Any:
    return WebDriverWait(driver, TIMEOUT, poll_frequency=0.05).until(condition)


def text_of(driver: Any, css: str) -> str:
    """The text of the first element matching ``css``; "" if none (the page redraws its
    tables from each event, so an element found may be gone when read)."""
    try:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        return found[0].text if found else ""  # type: ignore[no-any-return]
    except StaleElementReferenceException:
        return ""


def click(driver: Any, css: str) -> None:
    """Click the element matching ``css``, finding it again if a redraw replaced it."""
    def clicked(d: Any) -> bool:
        try:
            d.find_element(By.CSS_SELECTOR, css).click()
        except StaleElementReferenceException:
            return False
        return True

    wait_for(driver, clicked)


async def test_dashboard_live_counts_dead_letters_and_requeue(
        broker_factory: Any, browser: Any) -> None:
    web = start_web_broker(broker_factory)
    ready = 'tr[data-queue="jobs"] td.ready'

    def until(condition: Callable[[Any], Any]) -> Any:
        return asyncio.to_thread(wait_for, browser, condition)

    async with aiobus.connect(web.broker.path, name="web-test") as bus:
        await bus.declare_queue("jobs", max_deliveries=1)
        await bus.send("jobs", {"order": 1, "item": "book"})
        await asyncio.to_thread(browser.get, web.url)
        await until(lambda d: text_of(d, ready) == "1")
        browser.execute_script("window.notReloaded = true")
        await bus.send("jobs", {"order": 2, "item": "pen"})
        await until(lambda d: text_of(d, ready) == "2")  # live, over server-sent events
        assert browser.execute_script("return window.notReloaded") is True

        async with bus.subscribe("orders.*"):
            async with bus.consume("jobs", prefetch=1) as consumer:
                msg = await asyncio.wait_for(anext(consumer), TIMEOUT)
                await msg.reject("ValueError: no stock for 'book'")
            dlq_button = 'tr[data-queue="jobs"] button.dlq-open'
            await until(lambda d: text_of(d, dlq_button) == "1 in jobs.dlq")
            click(browser, dlq_button)
            # Message contents need the token: without it the page says so.
            await until(lambda d: text_of(d, "#dlq-msg").startswith("401"))
            browser.find_element(By.ID, "token").send_keys(web.token)
            row = f'#letters tr[data-id="{msg.id}"]'
            await until(lambda d: text_of(d, row + " td.reason") == "rejected")
            assert text_of(browser, row + " td.error") == "ValueError: no stock for 'book'"
            click(browser, row + " button.show")
            await until(lambda d: '{"order": 1, "item": "book"}' in text_of(d, "#body"))
            assert "x-original-queue: jobs" in text_of(browser, "#body")
            await until(lambda d: text_of(d, "#subscriptions tbody td") == "orders.*")
            if os.environ.get("AIOBUS_SCREENSHOT") == "1":
                browser.save_screenshot(str(DOCS / "dashboard.png"))
        # Browsing changed nothing.
        dlq = await queue_stats(bus, "jobs.dlq")
        assert (dlq["ready"], dlq["delivered"]) == (1, 0)

        click(browser, row + " button.requeue")
        await until(lambda d: text_of(d, "#dlq-msg") == "requeued 1")
        assert (await queue_stats(bus, "jobs.dlq"))["ready"] == 0
        assert (await queue_stats(bus, "jobs"))["ready"] == 2
        await until(lambda d: text_of(d, ready) == "2")
