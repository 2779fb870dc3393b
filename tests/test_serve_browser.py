"""The chat page at `/`, driven in headless Chromium (Debian `chromium` + `chromium-driver`)."""

from __future__ import annotations

import contextlib
import re
import threading
from pathlib import Path

import httpx
import pytest

from ling.serve.server import ServeArgs
from tests.serving import live_server, make_checkpoint

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WAIT = 30  # seconds a condition may take before the test fails (not a timing assertion)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("browser") / "tiny-chat", context_length=2048)
    with live_server(ServeArgs(ckpt=str(ckpt), max_batch_size=2)) as (url, state):
        yield url, state


@contextlib.contextmanager
def held_after(state, tokens: int):
    """Let a reply stream `tokens` tokens, then hold the engine until the block ends: the test
    acts on a reply that is surely still running, whatever the machine's speed."""
    release = threading.Event()
    engine = state.scheduler.engine
    step = engine.step

    def held_step():
        if any(h.generated >= tokens for h in list(state.scheduler.handles.values())):
            release.wait()
        return step()

    engine.step = held_step
    try:
        yield
    finally:
        release.set()
        del engine.step


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("headless Chromium is missing: apt-get install -y chromium chromium-driver (make test does it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--disable-crash-reporter", "--disable-breakpad",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def wait_for(driver, condition, message):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.05).until(lambda d: condition(d), message)


def test_page_has_no_external_resources(server):
    html = httpx.get(server[0] + "/").text
    assert "<script>" in html and "<style>" in html
    assert not re.search(r"""(src|href)\s*=|@import|https?://|//cdn""", html)


@pytest.mark.timeout(120)
def test_chat_page_streams_a_reply_and_the_stop_button_ends_it(server, browser):
    from selenium.webdriver.common.by import By

    url, state = server
    browser.get(url + "/")
    wait_for(browser, lambda d: d.find_element(By.ID, "model").text == "tiny-chat", "the page did not list the model")
    system, temperature = browser.find_element(By.ID, "system"), browser.find_element(By.ID, "temperature")
    system.send_keys("You are a tiny test model.")
    temperature.clear()
    temperature.send_keys("0")
    browser.find_element(By.ID, "max-tokens").send_keys("24")

    browser.find_element(By.ID, "input").send_keys("Speak, speak.")
    browser.find_element(By.ID, "send").click()
    reply = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, ".message.assistant[data-state=done]"),
                     "no finished reply appeared")
    assert browser.find_element(By.CSS_SELECTOR, ".message.user").text == "Speak, speak."
    expected = httpx.post(url + "/v1/chat/completions", json={
        "messages": [{"role": "system", "content": "You are a tiny test model."},
                     {"role": "user", "content": "Speak, speak."}],
        "temperature": 0, "max_tokens": 24}).json()["choices"][0]["message"]["content"]
    # The page renders the streamed deltas; it must have the same text as the whole answer.
    assert browser.execute_script("return arguments[0].firstChild.textContent", reply) == expected
    assert "(stopped: the reply reached its limit of 24 tokens, set in Max tokens)" in reply.text

    # A long reply (no token limit): stop it while it streams; the server sees the client go away.
    browser.find_element(By.ID, "max-tokens").clear()
    with held_after(state, tokens=40):
        browser.find_element(By.ID, "input").send_keys("Again, at length.")
        browser.find_element(By.ID, "send").click()
        streaming = wait_for(browser, lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, ".message.assistant")
                                                 if e.get_attribute("data-state") == "streaming" and e.text.strip()],
                             "the second reply did not start streaming")[0]
        browser.find_element(By.ID, "stop").click()
        wait_for(browser, lambda d: streaming.get_attribute("data-state") == "done", "stop did not end the reply")
    assert "(stopped)" in streaming.text
    assert browser.find_element(By.ID, "send").is_enabled() and not browser.find_element(By.ID, "stop").is_enabled()
    wait_for(browser, lambda d: 'ling_sequences_finished_total{reason="abort"} 1.0' in httpx.get(url + "/metrics").text,
             "the server did not abort the stopped reply")


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("browser") / "tiny-plain", context_length=128, chat_template=False)
    with live_server(ServeArgs(ckpt=str(ckpt), max_batch_size=1)) as (url, state):
        yield url, state


def continuation(url, prompt, max_tokens):
    return httpx.post(url + "/v1/completions", json={"prompt": prompt, "temperature": 0,
                                                      "max_tokens": max_tokens}).json()["choices"][0]["text"]


@pytest.mark.timeout(120)
def test_without_a_chat_template_the_page_continues_text_as_ling_chat_does(plain_server, browser):
    from selenium.webdriver.common.by import By

    url, _ = plain_server
    card = httpx.get(url + "/v1/models").json()["data"][0]
    assert (card["chat_template"], card["max_model_len"]) == (False, 128)
    refused = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    # the API stays OpenAI's: no template, no chat
    assert refused.status_code == 400 and "chat template" in refused.json()["error"]["message"]

    browser.get(url + "/")
    plain = "tiny-plain · plain continuation (no chat template)"
    wait_for(browser, lambda d: d.find_element(By.ID, "model").text == plain,
             "the page did not say it runs in plain continuation mode")
    assert "plain continuation mode, as ling chat does" in browser.find_element(By.ID, "mode").text
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")

    def send(text, n):
        browser.find_element(By.ID, "input").send_keys(text)
        browser.find_element(By.ID, "send").click()
        finished = ".message.assistant[data-state=done]"
        return wait_for(browser, lambda d: len(done := d.find_elements(By.CSS_SELECTOR, finished)) == n and done[-1],
                        f"reply {n} did not finish")

    first = send("Speak, speak.", 1)
    text = browser.execute_script("return arguments[0].firstChild.textContent", first)
    assert text == continuation(url, "Speak, speak.", 64)  # half the 128-token context
    assert "error" not in first.get_attribute("class")
    assert "(stopped: the reply reached its limit of 64 tokens, half the context" in first.text
    # The transcript (message + reply, then the next message) no longer leaves 64 tokens: the
    # oldest exchange is dropped, as `ling chat` does, and the page says so.
    second = send("Again.", 2)
    assert "(context full: dropped the 1 oldest exchange(s) to make room)" in second.text
    text = browser.execute_script("return arguments[0].firstChild.textContent", second)
    assert text == continuation(url, "Again.", 64)
