"""The page at ``/`` of ``metaeol serve`` (metaeol_edge/faces/web), driven in a real headless Chromium.

Against a real ``metaeol serve`` subprocess on 127.0.0.1 with the fake backend (conftest ``fake_model``):
compare's matrix against ``MetaEOL.encode``, the status against ``/metrics``, the key form with and
without ``--api-key``, documents holding ``<script>`` and ``<img onerror>`` shown as characters and
running nothing, the security headers, and no console error.

Search and map run on a collection of ``DOCS`` made by ``metaeol index`` and served by ``metaeol serve
--collection`` (issue 31's routes: ``POST /v1/search``, ``GET /v1/collections``, the map route).

Needs Debian's ``chromium`` and the ``playwright`` package (the test extra); browsers are not downloaded.
Without them every test here skips and says the install line. One browser for the module."""

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FAKE, fake

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

INSTALL = "apt-get install -y chromium && pip install playwright  (or: pip install -e '.[test]')"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

if sync_playwright is None or CHROMIUM is None:
    missing = "the playwright package" if sync_playwright is None else "Debian's chromium"
    print(f"\ntests/test_web.py: {missing} is missing; to run the browser tests: {INSTALL}", file=sys.stderr)
    pytest.skip(f"needs {missing} for the browser tests: {INSTALL}", allow_module_level=True)

KEY = "page-key-0451"
XSS = ['<script>window.__pwned = "script"</script>', "<img src=x onerror=\"window.__pwned = 'img'\">"]
COMPARE = ["A cat sleeps on the mat.", "A kitten is napping on a rug.", "The stock market fell sharply today.", *XSS]
DOCS = {
    "notes/cats.md": "# Cats\n\nA cat sleeps on the warm mat all afternoon.\n\nKittens nap often and play at night.\n",
    "notes/money.md": "Markets\n\nThe stock market fell sharply today after the report.\n\nBonds rose.\n",
    "code/tricky.html": f"Odd document\n\n{XSS[0]}\n\n{XSS[1]} a cat on a mat\n",
    "recipes/tea.txt": "Boil water, pour it on the leaves and wait three minutes.\n",
    "recipes/bread.txt": "Knead the dough, let it rise for an hour, then bake it.\n",
    "notes/garden.md": "The tomatoes need water every morning in summer.\n",
    "notes/trip.md": "The train to the coast leaves at nine.\n",
    "code/hello.py": "def hello():\n    return 'a greeting for the user'\n",
}


# -- servers ------------------------------------------------------------------------------------------


class Serve:
    """``metaeol serve`` in a subprocess on a free port of 127.0.0.1; its log lines kept."""

    def __init__(self, model: Path, tmp: Path, *args: str):
        env = {**os.environ, "METAEOL_CACHE": str(tmp / "cache.sqlite3"), "METAEOL_COLLECTIONS": str(tmp / "coll")}
        cmd = [sys.executable, "-m", "metaeol_edge", "serve", *FAKE, "--port", "0", "--model", str(model), *args]
        self.proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.url = None
        deadline = time.time() + 120
        while time.time() < deadline and self.url is None:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            if line.startswith("serving") and " on http://" in line:
                self.url = line.strip().split(" on ")[-1]
        assert self.url, "".join(self.lines)
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)


def _has_search() -> bool:
    """Whether this tree's ``metaeol`` has issue 31's collections (``index``, ``serve --collection``)."""
    import contextlib
    import io

    from metaeol_edge.cli import _parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            _parser().parse_args(["serve", "--collection", "x"])
            _parser().parse_args(["index", "x", "."])
    except SystemExit:
        return False
    return True


@pytest.fixture(scope="module")
def served(fake_model, tmp_path_factory):
    """The open server (no key); with a collection of ``DOCS`` where this tree can index one."""
    tmp = tmp_path_factory.mktemp("web")
    args: list[str] = []
    if _has_search():
        folder = tmp / "docs"
        for path, text in DOCS.items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_text(text, encoding="utf-8")
        env = {**os.environ, "METAEOL_CACHE": str(tmp / "cache.sqlite3"), "METAEOL_COLLECTIONS": str(tmp / "coll")}
        cmd = [sys.executable, "-m", "metaeol_edge", "index", "notes", str(folder), *FAKE, "--model", str(fake_model)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        args = ["--collection", "notes"]
    server = Serve(fake_model, tmp, *args)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def search_server(served):
    """The open server's URL, where it serves the collection (issue 31's routes)."""
    if httpx.get(f"{served.url}/v1/collections", timeout=30).status_code != 200:
        pytest.skip("this tree's `metaeol serve` has no search routes (issue 31): nothing to search or map")
    return served.url


@pytest.fixture(scope="module")
def keyed(fake_model, tmp_path_factory):
    server = Serve(fake_model, tmp_path_factory.mktemp("web-key"), "--api-key", KEY)
    yield server
    server.stop()


# -- the browser ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


class Page:
    """One tab, with its console errors, uncaught exceptions and requested URLs recorded."""

    def __init__(self, browser, url: str, view: str = "search"):
        self.context = browser.new_context(viewport={"width": 1200, "height": 900})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(f"{url}/#{view}")
        self.page.wait_for_selector("body[data-ready='1']")

    def close(self):
        self.context.close()


def _compare(page, sentences):
    page.fill("#compare-input", "\n".join(sentences))
    page.click("#compare-go")
    page.wait_for_selector(f"#compare-matrix tbody tr:nth-child({len(sentences)})")
    cells = page.eval_on_selector_all(
        "#compare-matrix tbody tr", "rows => rows.map(r => [...r.querySelectorAll('td')].map(c => c.dataset.value))"
    )
    return np.asarray(cells, dtype=np.float64)


def test_headers_tabs_keyboard_and_no_console_error(served, browser):
    r = httpx.get(f"{served.url}/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "http" not in csp
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"
    # Nothing inline and nothing remote in the files themselves.
    html = r.text
    assert not re.search(r"<script(?![^>]*src=\"/static/)", html), "inline script"
    assert not re.search(r"\son\w+=", html) and "style=" not in html and "//" not in html.replace("http://www.w3", "")
    js = httpx.get(f"{served.url}/static/app.js", timeout=30).text
    assert "innerHTML" not in js and "eval(" not in js and "new Function" not in js and "https:" not in js

    p = Page(browser, served.url, "compare")
    try:
        page = p.page
        assert not page.is_visible("#key-dialog"), "an open server must not ask for a key"
        # Tabs are buttons; the arrow keys move between them and show each view.
        page.focus("#tab-compare")
        page.keyboard.press("ArrowRight")
        assert page.get_attribute("#tab-map", "aria-selected") == "true" and page.is_visible("#view-map")
        page.keyboard.press("ArrowRight")
        assert page.evaluate("document.activeElement.id") == "tab-status" and page.is_visible("#view-status")
        page.wait_for_selector("#status-table")
        page.keyboard.press("Home")
        assert page.is_visible("#view-search") and not page.is_visible("#view-status")
        page.click("#tab-compare")
        _compare(page, COMPARE[:3])
        for label in ("search-query", "compare-input", "search-k", "compare-model", "map-colour"):
            assert page.evaluate(f"document.getElementById('{label}').labels.length") == 1, label
        # Every request stays on this origin.
        assert all(u.startswith(served.url) for u in p.requests), p.requests
        wanted_404 = [e for e in p.errors if "404" in e]  # /v1/collections on a tree without the search routes
        if httpx.get(f"{served.url}/v1/collections", timeout=30).status_code == 200:
            assert not p.errors, p.errors
        else:
            assert p.errors == wanted_404, p.errors
    finally:
        p.close()


def test_compare_matrix_is_the_models_cosines_and_documents_stay_text(served, browser, fake_model):
    p = Page(browser, served.url, "compare")
    try:
        page = p.page
        got = _compare(page, COMPARE)
        with fake(fake_model, cache=False) as model:
            v = np.asarray(model.encode(COMPARE), dtype=np.float64)
        unit = v / np.linalg.norm(v, axis=1, keepdims=True)
        np.testing.assert_allclose(got, unit @ unit.T, atol=1e-5)
        # The shown numbers are the values, rounded.
        shown = page.eval_on_selector_all("#compare-matrix td", "cells => cells.map(c => c.textContent)")
        assert shown == [f"{x:.2f}" for x in got.ravel()]
        # The markup went in as characters, and nothing ran.
        items = page.eval_on_selector_all("#compare-out ol.sentences li", "li => li.map(x => x.textContent)")
        assert items == COMPARE
        assert page.evaluate("window.__pwned") is None
        assert page.query_selector("#compare-out img") is None and page.query_selector("#compare-out script") is None
        assert "Most alike: " in page.text_content("#compare-note")
    finally:
        p.close()


def test_status_shows_the_metrics_numbers(served, browser):
    p = Page(browser, served.url, "compare")
    try:
        page = p.page
        _compare(page, ["one sentence here", "and another one"])
        page.click("#tab-status")
        page.click("#status-refresh")
        metrics = httpx.get(f"{served.url}/metrics", timeout=30).text
        status = httpx.get(f"{served.url}/v1/status", timeout=30).json()
        (model,) = status["models"]
        sentences = sum(
            float(m.group(1))
            for m in re.finditer(rf'^metaeol_sentences_total\{{model="{model["id"]}"\}} (\S+)$', metrics, re.M)
        )
        row = f"#status-table tr[data-model='{model['id']}']"
        expect(page.locator(f"{row} td[data-col=Sentences]")).to_have_text(f"{sentences:g}")
        cell = lambda col: page.text_content(f"{row} td[data-col='{col}']")  # noqa: E731
        from metaeol_edge import __version__

        assert page.text_content("dd[data-key=version]") == __version__
        assert cell("Dim") == "576" and cell("Templates") == "metaeol (8)" and cell("Layer") == "final (-1)"
        assert cell("Preset") == "none (the paper's)" and cell("Queue") == "0"
        hits = float(re.search(rf'^metaeol_cache_hits_total\{{model="{model["id"]}"\}} (\S+)$', metrics, re.M)[1])
        misses = float(re.search(rf'^metaeol_cache_misses_total\{{model="{model["id"]}"\}} (\S+)$', metrics, re.M)[1])
        assert cell("Cache hit rate") == f"{100 * hits / (hits + misses):.1f}% of {hits + misses:g}"
        expect(page.locator(f"{row} td[data-col='Sentences/s']")).not_to_have_text("—")
    finally:
        p.close()


def test_the_key_is_asked_once_kept_in_the_tab_and_never_in_a_url_or_log(keyed, browser):
    assert httpx.get(f"{keyed.url}/", timeout=30).status_code == 200  # the page's files need no key
    assert httpx.get(f"{keyed.url}/static/app.js", timeout=30).status_code == 200
    assert httpx.get(f"{keyed.url}/v1/status", timeout=30).status_code == 401  # its data does
    p = Page(browser, keyed.url, "compare")
    try:
        page = p.page
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-input", "not-the-key")
        page.click("#key-save")
        expect(page.locator("#key-why")).to_contain_text("refused")
        assert page.is_visible("#key-dialog")
        page.fill("#key-input", KEY)
        page.keyboard.press("Enter")
        page.wait_for_selector("#key-dialog", state="hidden")
        got = _compare(page, COMPARE[:2])
        assert got.shape == (2, 2)
        assert page.evaluate("sessionStorage.getItem('metaeol-edge.api-key')") == KEY
        page.click("#tab-status")
        page.wait_for_selector("#status-table")
        assert not page.is_visible("#key-dialog"), "asked twice"
        # Another tab of the same browser context keeps its own session storage: asked again there.
        assert all(KEY not in u for u in p.requests)
        assert not any(KEY in line for line in keyed.lines)
        assert not [e for e in p.errors if "401" not in e and "Unauthorized" not in e], p.errors
    finally:
        p.close()


def test_search_from_the_keyboard_and_its_top_result(search_server, browser):
    url = search_server
    p = Page(browser, url, "search")
    try:
        page = p.page
        page.wait_for_selector("#search-collection option", state="attached")
        page.click("h1")
        page.keyboard.press("/")
        assert page.evaluate("document.activeElement.id") == "search-query"
        page.keyboard.type("a cat on a mat")
        page.keyboard.press("Enter")
        page.wait_for_selector("#search-results li")
        collection = page.input_value("#search-collection")
        want = httpx.post(f"{url}/v1/search", json={"collection": collection, "query": "a cat on a mat", "k": 10},
                          timeout=60).json()["data"]  # fmt: skip
        hits = page.query_selector_all("#search-results > li")
        assert len(hits) == len(want), (page.input_value("#search-query"), page.text_content("#search-note"))
        assert page.text_content("#search-note").startswith(f"{len(want)} results for “a cat on a mat”"), (
            page.text_content("#search-note")
        )
        top = hits[0]
        assert top.query_selector(".score").text_content() == f"{want[0]['score']:.3f}"
        assert top.query_selector(".where").text_content().startswith(f"{want[0]['path']}:{want[0]['line']}")
        assert top.query_selector("pre").text_content() == want[0]["text"]
        marks = {m.lower() for m in page.eval_on_selector_all("#search-results mark", "m => m.map(x => x.textContent)")}
        assert marks == {"cat", "mat"}, marks
        # The document holding markup is among the results, as characters, and ran nothing.
        texts = page.eval_on_selector_all("#search-results pre", "p => p.map(x => x.textContent)")
        assert any(XSS[0] in t for t in texts) and any(XSS[1] in t for t in texts), texts
        assert page.evaluate("window.__pwned") is None and page.query_selector("#search-results img") is None
        # k is the user's choice (the collection has more than 5 chunks).
        page.select_option("#search-k", "5")
        page.click("#search-go")
        expect(page.locator("#search-results > li")).to_have_count(5)
    finally:
        p.close()


def test_map_point_count_hover_and_neighbours(search_server, browser):
    url = search_server
    p = Page(browser, url, "map")
    try:
        page = p.page
        page.wait_for_selector("#map-svg circle")
        collection = page.input_value("#map-collection")
        answer = httpx.get(f"{url}/v1/collections/{collection}/map", params={"limit": 10000}, timeout=60).json()
        assert page.eval_on_selector_all("#map-svg circle", "c => c.length") == len(answer["points"])
        note = page.text_content("#map-note")
        assert ("sample" in note) == answer["sampled"], note
        legend = page.eval_on_selector_all("#map-legend li", "li => li.map(x => x.textContent)")
        assert any(item.startswith("notes (") for item in legend), legend
        page.hover("#map-svg circle >> nth=0")
        page.wait_for_selector("#map-tip:not([hidden])")
        assert page.text_content("#map-tip code") == f"{answer['points'][0]['path']}:{answer['points'][0]['line']}"
        page.click("#map-svg circle >> nth=0", force=True)
        page.wait_for_selector("#map-neighbours li")
        assert page.evaluate("window.__pwned") is None and page.query_selector("#map-plot img") is None
    finally:
        p.close()
