"""The rendered book, opened page by page in headless Chromium, as a reader sees it.

Needs Chromium and its driver (Debian: ``apt install chromium chromium-driver``;
``.ci/run`` installs them when they are missing). Without them the test is skipped,
and pytest says why. Pages are read from disk (``file://``), with no network: the
math must typeset from the book's own MathJax.

Asserted on every page: no console errors; every formula typeset; every local image
loaded, with real alt text; no code cell or output wider than its column at 1280 px.
From the HTML itself: the sidebar lists every chapter in the order of ``_toc.yml``, and
every internal link and anchor resolves.
"""

import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
HASHED = re.compile(r"^[0-9a-f]{16,}(\.\w+)?$|\.(png|svg|jpe?g)$")  # a file name as alt text


def chapters() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]


@pytest.fixture(scope="module")
def pages(built_book):
    result, html = built_book
    assert result.returncode == 0, "the book does not build; see test_book.py"
    return html, [html / f"{name}.html" for name in chapters()]


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("the browser test needs Chromium and chromedriver (Debian: apt install chromium "
                    "chromium-driver; .ci/run installs them when missing)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                 "--allow-file-access-from-files"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


# What a page looks like once MathJax is done; one script, so one round trip per page.
INSPECT = """
const done = arguments[arguments.length - 1];
const ready = (window.MathJax && MathJax.startup) ? MathJax.startup.promise : Promise.resolve();
ready.then(() => {
  const math = [...document.querySelectorAll('.math')];
  const images = [...document.querySelectorAll('article img')];
  const wide = [...document.querySelectorAll('article div.highlight pre, article .cell_output pre')]
    .filter(e => e.scrollWidth > e.clientWidth + 1)
    .map(e => e.textContent.split('\\n').find(l => l.length > 0).slice(0, 60));
  done({
    math: math.length,
    untypeset: math.filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 60)),
    images: images.filter(i => i.src.startsWith('file:')).map(i => ({
      src: i.src.split('/').pop(), loaded: i.complete && i.naturalWidth > 0, alt: i.alt || ''})),
    wide: wide,
  });
}).catch(error => done({error: String(error)}));
"""


def test_every_page_reads_well_in_a_browser(browser, pages):
    html, paths = pages
    problems = []
    for path in paths:
        browser.get(path.as_uri())
        seen = browser.execute_async_script(INSPECT)
        page = path.relative_to(html)
        if "error" in seen:
            problems.append(f"{page}: the page script failed: {seen['error']}")
            continue
        errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"
                  and not e["message"].startswith("http")]  # offline: the Colab badge's image cannot load
        problems += [f"{page}: console error: {m[:200]}" for m in errors]
        problems += [f"{page}: formula not typeset: {t!r}" for t in seen["untypeset"]]
        for image in seen["images"]:
            if not image["loaded"]:
                problems.append(f"{page}: image {image['src']} did not load")
            if not image["alt"].strip() or HASHED.search(image["alt"].strip()):
                problems.append(f"{page}: image {image['src']} has no real alt text ({image['alt']!r})")
        problems += [f"{page}: wider than the column: {first!r}" for first in seen["wide"]]
    assert not problems, "\n".join(problems)


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.hrefs = set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("href"):
            self.hrefs.append(attrs["href"])


def parse(path: Path) -> _Links:
    links = _Links()
    links.feed(path.read_text())
    return links


def test_the_sidebar_lists_every_chapter_in_order(pages):
    html, paths = pages
    expected = [html / f"{name}.html" for name in chapters()[1:]]
    for path in paths:
        text = path.read_text()
        nav = text[text.index('bd-sidenav__home-link'):]
        nav = nav[: nav.index("</nav>")]
        hrefs = re.findall(r'<a class="[^"]*reference internal[^"]*" href="([^"]*)"', nav)
        listed = [(path.parent / unquote(urlsplit(h).path)).resolve() if urlsplit(h).path else path for h in hrefs]
        assert [p for p in listed if p in expected] == expected, path.relative_to(html)


def test_every_internal_link_and_anchor_resolves(pages):
    html, paths = pages
    parsed = {}
    broken = []
    for path in paths:
        for href in parse(path).hrefs:
            parts = urlsplit(href)
            if parts.scheme or href.startswith(("mailto:", "javascript:")):
                continue
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{path.relative_to(html)}: {href} (no such file)")
                continue
            if parts.fragment and target.suffix == ".html":
                ids = parsed.setdefault(target, parse(target).ids)
                if unquote(parts.fragment) not in ids:
                    broken.append(f"{path.relative_to(html)}: {href} (no such anchor)")
    assert not broken, "\n".join(broken)
