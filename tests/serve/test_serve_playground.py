"""The playground page in headless Chromium (Debian's chromium + chromium-driver), driven by selenium."""

from __future__ import annotations

import openai
from browser_testing import browser, set_field  # noqa: F401  (the headless Chromium fixture)
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from serve_testing import save_tiny_model, serve_in_thread, tiny_model

from gptwo import Tokenizer
from gptwo.weights import save_pretrained

GLTR = {
    "rgba(107, 214, 107, 1)",
    "rgba(242, 225, 76, 1)",
    "rgba(242, 139, 130, 1)",
    "rgba(201, 160, 255, 1)",
}  # top 10 … beyond


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
        browser.find_element(By.ID, "colour").click()  # colouring is on by default: first the plain stream
        generate_greedy(browser, wait, "Hello there", 30)
        assert browser.find_element(By.ID, "output").text == "Hello there" + expected
        pieces = browser.find_elements(By.CSS_SELECTOR, "#output span:not(.prompt)")
        assert len(pieces) > 1 and "".join(p.text for p in pieces) == expected  # arrived as a stream of chunks
        assert "30 tokens in" in browser.find_element(By.ID, "status").text
        assert "tokens/s" in browser.find_element(By.ID, "status").text

        browser.find_element(By.ID, "colour").click()  # now the text is coloured by GLTR's rank buckets
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: "done" in d.find_element(By.ID, "status").text)
        coloured = browser.find_elements(By.CSS_SELECTOR, "#output span.tok")
        backgrounds = {span.value_of_css_property("background-color") for span in coloured}
        assert coloured and backgrounds <= GLTR, backgrounds
        assert "rank" in coloured[0].get_attribute("title") and "p = " in coloured[0].get_attribute("title")
        assert browser.find_element(By.ID, "legend").is_displayed()
        assert browser.find_element(By.ID, "output").text == "Hello there" + expected  # prompt included, as read
    finally:
        server.close()


def test_playground_caps_the_length_at_the_context_left(tmp_path, browser):  # noqa: F811
    """On a model of context 128, the page's defaults work at once, and a length past the context is cut to what
    the prompt leaves (it used to fail: 'maximum context length is 128 tokens, however you requested 135')."""
    save_pretrained(tiny_model(block_size=128), str(tmp_path / "small"), tokenizer=Tokenizer.gpt2())
    server, _ = serve_in_thread(str(tmp_path / "small"), name="small")
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: "context 128" in d.find_element(By.ID, "model-name").text)
        browser.find_element(By.ID, "generate").click()  # the defaults, as a new user finds them
        wait.until(lambda d: any(word in d.find_element(By.ID, "status").text for word in ("done", "error")))
        assert "error" not in browser.find_element(By.ID, "status").text

        prompt = "The module provides functions to read and write files. " * 4  # 41 tokens
        wait.until(lambda d: "prompt 2 of 128 tokens" in d.find_element(By.ID, "room").text)
        generate_greedy(browser, wait, prompt, 500)
        status = browser.find_element(By.ID, "status").text
        assert "length capped at 87 (context 128 − 41 prompt tokens)" in status, status
        assert "87 tokens in" in status or "done (stop)" in status
        assert browser.find_element(By.ID, "max_tokens").get_attribute("value") == "87"
        assert "prompt 41 of 128 tokens" in browser.find_element(By.ID, "room").text

        set_field(browser, "prompt", "word " * 130)  # a prompt that fills the context: said, not sent
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: "shorten it" in d.find_element(By.ID, "status").text)
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
