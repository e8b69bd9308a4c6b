"""The built site, checked in a real browser (headless Chromium on a loopback server).

The site is built from the committed notebooks with warnings as errors, served from
127.0.0.1, and every page is loaded: no JavaScript error, every chapter reachable from
the table of contents, images load, math renders with the MathJax the site itself
serves, each chapter's Colab link points at that chapter's notebook, and search works.
"""

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urljoin, urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import sync_links  # noqa: E402

pytestmark = pytest.mark.browser
CHAPTERS = sorted(p.stem for p in (ROOT / "chapters").glob("*.ipynb"))


def find_chromium() -> str | None:
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "jupyter-book"), "build", str(ROOT), "-W", "--keep-going", "--path-output", str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, "site build failed (warnings are errors):\n" + result.stdout[-4000:] + result.stderr[-4000:]
    html = out / "_build" / "html"
    assert (html / "index.html").is_file()
    return html


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser():
    chromium = find_chromium()
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is required in CI (apt-get install chromium)")
        pytest.skip("no Chromium on this machine (install chromium or set CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        yield browser
        browser.close()


class Visit:
    """A page load that records JavaScript errors and failed local requests."""

    def __init__(self, browser, base, path):
        self.base, self.errors, self.failed, self.external = base, [], [], []
        self.page = browser.new_page()
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", lambda msg: msg.type == "error" and self.errors.append(msg.text))
        self.page.on("requestfailed", lambda req: self.failed.append(req.url))
        self.page.on("request", lambda req: self._note(req.url))
        response = self.page.goto(urljoin(base, path), wait_until="networkidle")
        self.status = response.status if response else None

    def _note(self, url):
        if not url.startswith(self.base) and not url.startswith("data:"):
            self.external.append(url)

    def close(self):
        self.page.close()


def page_paths(site):
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    files = [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]
    return [f + ".html" for f in files]


def test_every_page_loads_without_errors_and_with_its_images(site, server, browser):
    problems = []
    for path in page_paths(site):
        visit = Visit(browser, server, path)
        visit.page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        visit.page.wait_for_load_state("networkidle")
        broken = visit.page.evaluate(
            "Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)")
        n_images = visit.page.evaluate("document.images.length")
        if visit.status != 200:
            problems.append(f"{path}: HTTP {visit.status}")
        if visit.errors:
            problems.append(f"{path}: JavaScript errors {visit.errors}")
        if broken:
            problems.append(f"{path}: images that did not load {broken}")
        if visit.failed:
            problems.append(f"{path}: failed requests {visit.failed}")
        if visit.external:
            problems.append(f"{path}: requests that leave the site {visit.external}")
        if path.startswith("chapters/") and n_images < 2:
            problems.append(f"{path}: only {n_images} images (badges and figures expected)")
        visit.close()
    assert not problems, "\n".join(problems)


def test_every_chapter_is_reachable_from_the_table_of_contents(server, browser):
    visit = Visit(browser, server, "book/intro.html")
    hrefs = visit.page.eval_on_selector_all("nav.bd-docs-nav a.reference.internal", "els => els.map(e => e.href)")
    visit.close()
    reached = {urlparse(h).path.lstrip("/") for h in hrefs}
    for chapter in CHAPTERS:
        assert f"chapters/{chapter}.html" in reached, f"{chapter} is not in the sidebar"
    for href in hrefs:
        visit = Visit(browser, server, href)
        assert visit.status == 200, href
        visit.close()


def pages_with_math():
    pages = ["book/glossary.html"]
    for md in sorted((ROOT / "chapters").glob("*.md")):
        if re.search(r"\$[^$\s][^$]*\$", md.read_text(encoding="utf-8")):
            pages.append(f"chapters/{md.stem}.html")
    return pages


def test_math_renders_with_local_mathjax(server, browser):
    for path in pages_with_math():
        visit = Visit(browser, server, path)
        visit.page.wait_for_selector("mjx-container", state="attached", timeout=20_000)
        rendered = visit.page.evaluate("document.querySelectorAll('mjx-container').length")
        errors = visit.page.evaluate("document.querySelectorAll('mjx-merror').length")
        scripts = visit.page.eval_on_selector_all("script[src*=mathjax]", "els => els.map(e => e.src)")
        visit.close()
        assert rendered > 0 and errors == 0, f"{path}: {rendered} formulas rendered, {errors} errors"
        assert scripts and all(s.startswith(server) for s in scripts), scripts


def test_colab_links_point_at_each_chapters_notebook(server, browser):
    url, branch = sync_links.repository()
    for chapter in CHAPTERS:
        visit = Visit(browser, server, f"chapters/{chapter}.html")
        hrefs = visit.page.eval_on_selector_all("a[href*='colab.research.google.com']", "els => els.map(e => e.href)")
        visit.close()
        want = sync_links.expected_links(url, branch, chapter)["colab"]
        assert hrefs, f"{chapter}: no Colab link"
        assert all(h == want for h in hrefs), f"{chapter}: {hrefs} != {want}"


def test_search_finds_attention(server, browser):
    visit = Visit(browser, server, "search.html?q=attention")
    visit.page.wait_for_selector("#search-results ul.search li", timeout=20_000)
    results = visit.page.eval_on_selector_all("#search-results ul.search li a", "els => els.map(e => e.href)")
    visit.close()
    assert any("chapters/02_attention.html" in r for r in results), results
