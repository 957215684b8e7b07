"""The playground page in headless Chromium (Debian's chromium + chromium-driver), driven by selenium."""

from __future__ import annotations

import openai
from browser_testing import browser, set_field  # noqa: F401  (the headless Chromium fixture)
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from serve_testing import save_tiny_model, serve_in_thread


def generate_greedy(driver, wait, prompt: str, max_tokens: int) -> None:
    """Fill the playground's form for a greedy completion, press Generate and wait until it is done."""
    set_field(driver, "prompt", prompt)
    set_field(driver, "temperature", "0")
    set_field(driver, "max_tokens", str(max_tokens))
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: "done" in d.find_element(By.ID, "status").text)


def test_playground_streams_a_completion(tmp_path, browser):  # noqa: F811
    save_tiny_model(str(tmp_path / "tiny"))
    server, _ = serve_in_thread(str(tmp_path / "tiny"))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        expected = (
            client.completions.create(model="tiny", prompt="Hello there", max_tokens=30, temperature=0).choices[0].text
        )
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: "tiny" in d.find_element(By.ID, "model-name").text)
        generate_greedy(browser, wait, "Hello there", 30)
        assert browser.find_element(By.ID, "output").text == "Hello there" + expected
        pieces = browser.find_elements(By.CSS_SELECTOR, "#output span:not(.prompt)")
        assert len(pieces) > 1 and "".join(p.text for p in pieces) == expected  # arrived as a stream of chunks

        browser.find_element(By.ID, "colour").click()  # now each piece is coloured by its probability
        browser.find_element(By.ID, "generate").click()
        wait.until(
            lambda d: (
                "done" in d.find_element(By.ID, "status").text and "tokens" in d.find_element(By.ID, "status").text
            )
        )
        coloured = browser.find_elements(By.CSS_SELECTOR, "#output span.tok")
        assert coloured and all(
            "hsla" in (span.get_attribute("style") or "") or "rgba" in (span.get_attribute("style") or "")
            for span in coloured
        )
        assert "p = " in coloured[0].get_attribute("title")
        assert browser.find_element(By.ID, "output").text == "Hello there" + expected
    finally:
        server.close()


def test_playground_sends_the_api_key(tmp_path, browser):  # noqa: F811
    save_tiny_model(str(tmp_path / "tiny"))
    server, _ = serve_in_thread(str(tmp_path / "tiny"), app_kwargs={"api_key": "sk-play"})
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-play", max_retries=0)
        expected = (
            client.completions.create(model="tiny", prompt="Hello there", max_tokens=10, temperature=0).choices[0].text
        )
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: "needs an API key" in d.find_element(By.ID, "status").text)
        set_field(browser, "api_key", "sk-play")
        browser.find_element(By.ID, "prompt").click()  # leaving the field stores the key and retries
        wait.until(lambda d: "tiny" in d.find_element(By.ID, "model-name").text)
        generate_greedy(browser, wait, "Hello there", 10)
        assert browser.find_element(By.ID, "output").text == "Hello there" + expected
        browser.refresh()  # the key was kept in this browser
        wait.until(lambda d: "tiny" in d.find_element(By.ID, "model-name").text)
        assert browser.find_element(By.ID, "api_key").get_attribute("value") == "sk-play"
    finally:
        server.close()
