"""The page of ``metaeol serve`` in headless Chromium: its screenshots, its weight, and load-to-first-result.

    python benchmarks/page.py [--model smollm2-135m] [--folder docs ...] [--searches 20] [--shots docs/img]

1. ``metaeol index`` makes a collection of the ``--folder`` paths (default: this repository's docs) with the
   default configuration of ``--model`` (``--backend fake`` for a quick run without llama.cpp), in a
   temporary folder; ``metaeol serve --collection`` serves it on 127.0.0.1 (a free port).
2. The server is warmed (one page load and one search), then ``--searches`` times: a fresh browser
   context (no HTTP cache) loads ``/``, types a query (a different one each time) and presses Enter.
   Reported: the time from the navigation's start to the first result in the page (p50, p95), and
   the search's own round trip from the submit to the results (the page's user-timing marks: the
   load-to-first-result time is load-to-ready plus the round trip, the typing taken as instant; the
   time as the automation saw it, with its own steps, is reported beside it).
3. The page's total transfer size on a cold load: its files (``/`` and ``/static/*``, bytes on the
   wire with headers, and bodies alone), and the API answers it fetched to show the first view.
4. One screenshot per view (Search, Compare, Map, Status) into ``--shots`` as small PNGs
   (``page-<view>.png``; palette-reduced with Pillow where it is installed).

Needs Debian's ``chromium``, ``playwright`` (the test extra), the ``server`` extra and issue 31's search
routes. Results go to ``benchmarks/results/page.json`` (with ``--backend fake``, nowhere but stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
RESULTS = HERE.parent / "results"
QUERIES = [
    "how do I serve embeddings over HTTP",
    "which layer gives the best sentence vectors",
    "the cache of prompt vectors",
    "quantization levels and their accuracy",
    "running on a GPU",
    "an API key for the server",
    "presets of templates and post-processing",
    "embedding a parquet file in bulk",
    "what MetaEOL does with several templates",
    "how fast is it on a laptop",
    "a reference implementation in PyTorch",
    "the models in the registry",
    "how to add my own method",
    "Ray cluster jobs",
    "what the benchmark measured",
    "STS-B accuracy",
    "token prepending",
    "errors and bad inputs",
    "Ollama and OpenAI clients",
    "the architecture of the runtime",
]


def start(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    lines = []
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("serving") and " on http://" in line:
            # Keep reading its log so that the pipe never fills.
            import threading

            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, line.strip().split(" on ")[-1]
    proc.kill()
    sys.exit("the server did not start:\n" + "".join(lines))


def first_result_ms(context, url: str, query: str) -> tuple[float, float, float]:
    """(ms from the navigation's start to the search view ready (its collections listed), ms from the
    submit to the results shown, ms from the navigation's start to the results as this script saw them).

    The first two are the page's own user-timing marks; their sum is the load-to-first-result time with the
    typing taken as instant. The third adds the automation's own steps (filling the box, pressing Enter)."""
    page = context.new_page()
    page.goto(f"{url}/#search")
    page.wait_for_selector("#search-collection option", state="attached")
    page.fill("#search-query", query)
    page.press("#search-query", "Enter")
    page.wait_for_selector("#search-results li")
    marks = page.evaluate(
        """() => Object.fromEntries(performance.getEntriesByType("mark").map(m => [m.name, m.startTime]))"""
    )
    page.close()
    ready, submit, results = marks["metaeol:ready"], marks["metaeol:submit"], marks["metaeol:results"]
    return ready, results - submit, results


def transfer(browser, url: str) -> dict[str, object]:
    """Bytes of a cold load of the Search view: the page's files and the API answers it fetched."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{url}/#search")
    page.wait_for_selector("#search-collection option", state="attached")
    page.wait_for_load_state("networkidle")
    entries = page.evaluate(
        """() => [...performance.getEntriesByType("navigation"), ...performance.getEntriesByType("resource")]
                 .map(e => ({ name: new URL(e.name).pathname, wire: e.transferSize, body: e.encodedBodySize }))"""
    )
    context.close()
    files = [e for e in entries if e["name"] == "/" or e["name"].startswith("/static/")]
    api = [e for e in entries if e not in files]
    return {
        "files": {e["name"]: e["body"] for e in files},
        "files_body_bytes": sum(e["body"] for e in files),
        "files_wire_bytes": sum(e["wire"] for e in files),
        "api_on_load": {e["name"]: e["wire"] for e in api},
        "api_wire_bytes": sum(e["wire"] for e in api),
    }


def screenshots(browser, url: str, folder: Path) -> dict[str, int]:
    folder.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1000, "height": 680})
    page = context.new_page()
    page.goto(f"{url}/#search")
    page.wait_for_selector("#search-collection option", state="attached")
    page.fill("#search-query", "how do I serve embeddings over HTTP")
    page.press("#search-query", "Enter")
    page.wait_for_selector("#search-results li")
    shots = {"search": page.screenshot()}
    page.click("#tab-compare")
    page.wait_for_selector("#compare-model option", state="attached")
    page.click("#compare-go")
    page.wait_for_selector("#compare-matrix")
    page.locator("#compare-matrix").scroll_into_view_if_needed()
    shots["compare"] = page.screenshot()
    page.click("#tab-map")
    page.wait_for_selector("#map-svg circle")
    page.click("#map-svg circle >> nth=0", force=True)
    page.wait_for_selector("#map-neighbours li")
    page.hover("#map-svg circle >> nth=1", force=True)
    page.evaluate("() => window.scrollTo(0, document.getElementById('map-note').offsetTop - 8)")
    shots["map"] = page.screenshot()
    page.click("#tab-status")
    page.wait_for_selector("#status-table")
    page.wait_for_timeout(2300)  # a second refresh: sentences per second
    shots["status"] = page.screenshot()
    context.close()
    sizes = {}
    for view, png in shots.items():
        path = folder / f"page-{view}.png"
        path.write_bytes(png)
        try:
            from PIL import Image

            with Image.open(path) as image:
                image.convert("RGB").quantize(colors=64, dither=Image.Dither.NONE).save(path, optimize=True)
        except ImportError:
            pass
        sizes[view] = path.stat().st_size
    return sizes


def percentiles(ms: list[float]) -> dict[str, float]:
    return {f"p{q}": round(float(np.percentile(ms, q)), 1) for q in (50, 95)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="registry id or .gguf (default: the registry's default)")
    ap.add_argument("--backend", default=None, help="fake: a quick run of the script, no numbers kept")
    ap.add_argument(
        "--folder", action="append", default=None, help="what the collection indexes, repeatable (default: docs/)"
    )
    ap.add_argument("--searches", type=int, default=20)
    ap.add_argument("--shots", default=str(ROOT / "docs" / "img"), help="folder of the screenshots ('' for none)")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from metaeol_edge import __version__, registry

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("needs Debian's chromium: apt-get install -y chromium")
    model = args.model or registry.default_model_id()
    tmp = Path(tempfile.mkdtemp(prefix="metaeol-page-"))
    env = {**os.environ, "METAEOL_COLLECTIONS": str(tmp), "METAEOL_CACHE": str(tmp / "cache.sqlite3")}
    options = ["--model", model, *(["--backend", args.backend] if args.backend else [])]
    t0 = time.perf_counter()
    folders = args.folder or [str(ROOT / "docs")]
    cmd = [sys.executable, "-m", "metaeol_edge", "index", "docs", *folders, "--quiet", *options]
    subprocess.run(cmd, env=env, check=True)
    index_s = time.perf_counter() - t0
    serve = [sys.executable, "-m", "metaeol_edge", "serve", "--port", "0", "--collection", "docs", *options]
    proc, url = start(serve, env)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True)
            warm = browser.new_context()
            first_result_ms(warm, url, "warming up")  # the server warm: model loaded, first query embedded
            warm.close()
            ready, search, total, seen = [], [], [], []
            for query in (QUERIES * (args.searches // len(QUERIES) + 1))[: args.searches]:
                context = browser.new_context()  # no HTTP cache: the whole page each time
                ready_ms, round_trip, seen_ms = first_result_ms(context, url, query)
                context.close()
                ready.append(ready_ms)
                search.append(round_trip)
                total.append(ready_ms + round_trip)
                seen.append(seen_ms)
            weight = transfer(browser, url)
            sizes = screenshots(browser, url, Path(args.shots)) if args.shots else {}
            browser.close()
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)
    row = {
        "command": "python benchmarks/page.py " + " ".join(sys.argv[1:]),
        "version": __version__,
        "model": model,
        "backend": args.backend or "llama.cpp",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "chromium": subprocess.run([chromium, "--version"], capture_output=True, text=True).stdout.strip(),
        "searches": len(total),
        "index_s": round(index_s, 1),
        "load_to_first_result_ms": percentiles(total),
        "load_to_ready_ms": percentiles(ready),
        "search_round_trip_ms": percentiles(search),
        "load_to_first_result_with_automation_ms": percentiles(seen),
        "transfer": weight,
        "screenshot_bytes": sizes,
    }
    print(json.dumps(row, indent=1))
    print(
        f"load to first result: p50 {row['load_to_first_result_ms']['p50']} ms over {len(total)} searches "
        f"(search round trip p50 {row['search_round_trip_ms']['p50']} ms); page files "
        f"{weight['files_body_bytes']} bytes ({weight['files_wire_bytes']} on the wire), "
        f"API answers on load {weight['api_wire_bytes']} bytes"
    )
    if args.backend is None:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "page.json").write_text(json.dumps(row, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
