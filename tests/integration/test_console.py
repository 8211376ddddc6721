"""The web console in Debian's Chromium, driven by Selenium, against a real `colstream run all`.

A user with an admin key uploads a PDF through the page and watches it reach
"complete", searches and sees thumbnails of that document, opens a page large,
sees a failed upload's reason and its dead letter, and deletes the document.
Each view is saved as a screenshot under .colstream/test/artifacts/console/;
the search view is also copied to docs/img/console-search.png for the README.
The browser log must hold no error at all.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from colstream.infra.settings import ColstreamSettings
from tests.fixtures.docs import make_encrypted_pdf, make_pdf
from tests.harness import REPO, wait_for
from tests.integration.test_user_flows import on_free_port, run_all

pytestmark = pytest.mark.kafka

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = REPO / ".colstream" / "test" / "artifacts" / "console"
README_SCREENSHOT = REPO / "docs" / "img" / "console-search.png"
ADMIN_KEY = "console-admin-key-0123456789abcdef"


def _driver() -> Any:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/bootstrap.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    # The system browser and driver, named explicitly, so Selenium Manager never downloads one.
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,960",
                     "--disable-gpu", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))


@pytest.fixture
def browser() -> Iterator[Any]:
    driver = _driver()
    try:
        yield driver
    finally:
        driver.quit()


def _screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"could not save {path}"
    return path


# Basic accessibility rules checked in the page itself: every form control has a label,
# every button and link a name, every image an alt attribute, every visible text run
# WCAG AA contrast against its effective background (4.5:1; 3:1 for large text).
_AUDIT_JS = """
const problems = [];
const visible = (el) => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
const name = (el) => (el.getAttribute('aria-label') || el.textContent || el.title || '').trim();
for (const el of document.querySelectorAll('input, select, textarea')) {
  if (el.type === 'hidden') continue;
  const labelled = (el.labels && el.labels.length) || el.getAttribute('aria-label')
    || el.getAttribute('aria-labelledby');
  if (!labelled) problems.push(`control without a label: #${el.id || el.name}`);
}
for (const el of document.querySelectorAll('button, a[href], [role=tab]')) {
  if (visible(el) && !name(el)) problems.push(`unnamed ${el.tagName.toLowerCase()}: ${el.outerHTML.slice(0, 80)}`);
}
for (const el of document.querySelectorAll('img')) {
  if (!el.hasAttribute('alt')) problems.push(`image without alt: ${el.outerHTML.slice(0, 80)}`);
}
const rgba = (c) => {
  const m = c.match(/[\\d.]+/g) || ['0', '0', '0', '0'];
  return m.map(Number).concat([1]).slice(0, 4);
};
const lum = ([r, g, b]) => {
  const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
  return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
};
const background = (el) => {
  for (let node = el; node && node.nodeType === 1; node = node.parentElement) {
    const c = rgba(getComputedStyle(node).backgroundColor);
    if (c[3] > 0.5) return c;
  }
  return [255, 255, 255, 1];
};
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
for (let text = walker.nextNode(); text; text = walker.nextNode()) {
  const el = text.parentElement;
  if (!text.textContent.trim() || !el || !visible(el) || el.closest('.visually-hidden')) continue;
  const style = getComputedStyle(el);
  if (style.visibility === 'hidden' || Number(style.opacity) === 0) continue;
  const fg = rgba(style.color), bg = background(el);
  const [hi, lo] = [lum(fg), lum(bg)].sort((a, b) => b - a);
  const ratio = (hi + 0.05) / (lo + 0.05);
  const size = parseFloat(style.fontSize), bold = Number(style.fontWeight) >= 700;
  const needed = size >= 24 || (bold && size >= 18.66) ? 3 : 4.5;
  const what = text.textContent.trim().slice(0, 40);
  if (ratio < needed) problems.push(`contrast ${ratio.toFixed(2)} < ${needed} for "${what}"`);
}
return [...new Set(problems)];
"""


def _accessibility_problems(driver: Any) -> list[str]:
    return list(driver.execute_script(_AUDIT_JS))


def _errors(driver: Any) -> list[dict[str, Any]]:
    return [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]


def test_upload_search_dead_letters_and_delete_through_the_console(
    pipeline_settings: ColstreamSettings, tmp_path: Path, browser: Any
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    settings = pipeline_settings
    report = tmp_path / "console-report.pdf"
    report.write_bytes(make_pdf(3, text_prefix="Quarterly revenue page"))
    locked = tmp_path / "locked.pdf"
    locked.write_bytes(make_encrypted_pdf(1, user_password="pw"))
    keys = f'[{{"key": "{ADMIN_KEY}", "scopes": ["admin"], "name": "console-test"}}]'
    driver = browser
    by_css = By.CSS_SELECTOR

    def css(selector: str) -> Any:
        return driver.find_element(by_css, selector)

    def show(view: str) -> None:
        css(f"#tab-{view}").click()
        wait_for(lambda: css(f"#view-{view}").is_displayed(), 10, what=f"{view} view")

    settings = on_free_port(settings)
    with run_all(settings, tmp_path / "run-all.log", extra_env={"COLSTREAM_API__KEYS": keys}) as url:
        driver.get(f"{url}/")
        load_ms = driver.execute_script(
            "const n = performance.getEntriesByType('navigation')[0]; return n.loadEventEnd - n.startTime;")
        assert 0 < load_ms < 1000, f"console took {load_ms:.0f} ms to load"

        # the key is asked for once, and kept for the tab
        wait_for(lambda: css("#key-dialog").is_displayed(), 10, what="key dialog")
        css("#api-key").send_keys(ADMIN_KEY, Keys.ENTER)
        wait_for(lambda: css("#random-weights").is_displayed(), 30, what="random-weights banner")
        assert driver.execute_script("return sessionStorage.getItem('colstream.apiKey')") == ADMIN_KEY

        # keyboard alone: the arrow keys move between the view tabs, Enter opens one
        css("#tab-search").send_keys(Keys.ARROW_RIGHT)
        assert driver.switch_to.active_element.get_attribute("id") == "tab-documents"
        driver.switch_to.active_element.send_keys(Keys.ENTER)
        wait_for(lambda: css("#view-documents").is_displayed(), 10, what="documents view by keyboard")

        # upload: the file input is what the drop zone feeds too
        show("upload")
        css("#file-input").send_keys(f"{report}\n{locked}")
        doc_id, locked_id = "console-report.pdf", "locked.pdf"
        wait_for(lambda: css(f'#uploads li[data-document-id="{doc_id}"]').get_attribute("data-state") == "complete",
                 180, what="upload complete")
        item = css(f'#uploads li[data-document-id="{doc_id}"]')
        assert "3 of 3 pages indexed" in item.text
        assert item.find_element(by_css, "progress").get_attribute("value") == "100"
        wait_for(lambda: css(f'#uploads li[data-document-id="{locked_id}"]').get_attribute("data-state") == "failed",
                 120, what="encrypted upload failed")
        _screenshot(driver, "upload")

        # documents: live state, pages of total, the failed one's reason
        show("documents")
        row = css(f'#documents-body tr[data-document-id="{doc_id}"]')
        assert row.get_attribute("data-state") == "complete" and "3 of 3" in row.text
        failed = css(f'#documents-body tr[data-document-id="{locked_id}"]')
        assert "EncryptedDocument" in failed.text
        assert _accessibility_problems(driver) == []
        _screenshot(driver, "documents")

        # search: cards of the right document with loaded thumbnails, one opened large
        show("search")
        css("#query").send_keys("quarterly revenue")
        css("#search-form button[type=submit]").click()
        wait_for(lambda: len(driver.find_elements(by_css, "#results .card")) >= 3, 180, what="search results")
        cards = driver.find_elements(by_css, "#results .card")
        assert {card.get_attribute("data-document-id") for card in cards} == {doc_id}
        assert {card.get_attribute("data-page") for card in cards} == {"1", "2", "3"}
        wait_for(lambda: driver.execute_script(
            "return [...document.querySelectorAll('#results .card img')].every(i => i.complete && i.naturalWidth > 0)"),
            60, what="thumbnails loaded")
        widths = driver.execute_script(
            "return [...document.querySelectorAll('#results .card img')].map(i => i.naturalWidth)")
        assert set(widths) == {320}
        assert "random" in cards[0].find_element(by_css, ".model").text.lower()
        assert _accessibility_problems(driver) == []
        search_png = _screenshot(driver, "search")
        README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(search_png, README_SCREENSHOT)
        cards[0].find_element(by_css, "button.thumb").click()
        wait_for(lambda: driver.execute_script(
            "const i = document.getElementById('page-large'); return i.complete && i.naturalWidth > 600"),
            60, what="large page")
        _screenshot(driver, "page-large")
        # Escape closes a modal dialog wherever the focus is (an <img> itself takes no keys).
        ActionChains(driver).send_keys(Keys.ESCAPE).perform()
        wait_for(lambda: not css("#page-dialog").is_displayed(), 10, what="dialog closed")

        # dead letters: the encrypted upload, with a redrive button for the admin
        show("dead-letters")
        wait_for(lambda: "EncryptedDocument" in css("#dlq-body").text, 60, what="dead letter listed")
        letter = next(r for r in driver.find_elements(by_css, "#dlq-body tr") if locked_id in r.text)
        assert "splitter" in letter.text and "password" in letter.text.lower()
        assert letter.find_element(by_css, "button").text == "Redrive"
        assert _accessibility_problems(driver) == []
        _screenshot(driver, "dead-letters")

        # delete: the row goes once the sink has applied the tombstone
        show("documents")
        css(f'#documents-body tr[data-document-id="{doc_id}"] button.danger').click()
        driver.switch_to.alert.accept()
        wait_for(lambda: not driver.find_elements(by_css, f'#documents-body tr[data-document-id="{doc_id}"]'),
                 120, what="deleted document gone")
        _screenshot(driver, "documents-after-delete")

        assert _errors(driver) == []
