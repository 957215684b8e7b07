"""The Inspect page in headless Chromium: paste text, see coloured tokens, scores and an attention map."""

from __future__ import annotations

from browser_testing import browser, set_field  # noqa: F401  (the headless Chromium fixture)
from detect_testing import TEXT, save_tiny
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait
from serve_testing import serve_in_thread

INK = (
    "return Array.from(arguments[0].getContext('2d').getImageData(0, 0, arguments[0].width, arguments[0].height)"
    ".data).filter((v, i) => i % 4 === 2 && v > 0 && v < 255).length;"
)


def test_inspect_page_colours_tokens_and_draws_attention(tmp_path, browser):  # noqa: F811
    server, _ = serve_in_thread(save_tiny(str(tmp_path / "tiny"), block_size=64))
    try:
        browser.get(server.url + "/")
        browser.find_element(By.LINK_TEXT, "Inspect").click()  # the playground links to Inspect
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: "tiny" in d.find_element(By.ID, "model-name").text)
        text = TEXT[:80]
        set_field(browser, "text", text)
        browser.find_element(By.ID, "inspect").click()
        wait.until(lambda d: "tokens" in d.find_element(By.ID, "status").text)
        spans = browser.find_elements(By.CSS_SELECTOR, "#tokens span.tok")
        assert spans and "".join(s.get_attribute("textContent") for s in spans) == text
        colours = {s.value_of_css_property("background-color") for s in spans}
        assert colours - {"rgba(0, 0, 0, 0)"} and len(colours) >= 2  # coloured by rank bucket
        assert "fast_detectgpt" in browser.find_element(By.ID, "scores").text
        assert (
            "uncalibrated" in browser.find_element(By.ID, "verdict").text
            or "too short" in browser.find_element(By.ID, "verdict").text
        )

        canvas = browser.find_element(By.ID, "attention-map")
        assert canvas.size["width"] > 100 and browser.execute_script(INK, canvas) > 0  # a heatmap was drawn
        # scaled per row by default (absolute weights left all but the <|endoftext|> column white), and it says so
        assert "each row" in browser.find_element(By.ID, "attention-scale-note").text
        Select(browser.find_element(By.ID, "scale")).select_by_value("log")
        assert "log10" in browser.find_element(By.ID, "attention-scale-note").text
        Select(browser.find_element(By.ID, "layer")).select_by_value("1")
        Select(browser.find_element(By.ID, "head")).select_by_value("0")
        Select(browser.find_element(By.ID, "view")).select_by_value("lines")
        lines = browser.find_elements(By.CSS_SELECTOR, "#attention-lines line")
        assert lines and browser.find_element(By.ID, "attention-lines").is_displayed()
        assert max(float(line.get_attribute("stroke-width")) for line in lines) > 4  # thick where the weight is

        Select(browser.find_element(By.ID, "colour-by")).select_by_value("prob")
        assert all(
            "hsla" in (s.get_attribute("style") or "") or "rgba" in (s.get_attribute("style") or "")
            for s in browser.find_elements(By.CSS_SELECTOR, "#tokens span.tok")
        )
    finally:
        server.close()


def test_inspect_with_its_default_text_is_judged(tmp_path, browser):  # noqa: F811
    """A first click with the page's own text gets a verdict: the text is long enough for the detector
    (DEFAULT_MIN_TOKENS) and fits a small model's context."""
    from gptwo.detect import DEFAULT_MIN_TOKENS

    server, _ = serve_in_thread(save_tiny(str(tmp_path / "tiny"), block_size=64))
    try:
        browser.get(server.url + "/inspect")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: "tiny" in d.find_element(By.ID, "model-name").text)
        browser.find_element(By.ID, "inspect").click()
        wait.until(lambda d: "tokens" in d.find_element(By.ID, "status").text)
        status = browser.find_element(By.ID, "status").text
        assert "too short" not in status and "error" not in status, status
        assert len(browser.find_elements(By.CSS_SELECTOR, "#tokens span.tok")) >= DEFAULT_MIN_TOKENS
        assert "too short" not in browser.find_element(By.ID, "verdict").text
    finally:
        server.close()
