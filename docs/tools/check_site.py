"""Check the built site in a real browser (headless Chromium driven by Playwright).

Usage (after ``python docs/tools/build_site.py``)::

    python docs/tools/check_site.py [--site docs/_build/html] [--screenshots docs/_build/screenshots]
                                    [--chromium /usr/bin/chromium]

It serves the site on 127.0.0.1 and checks, in both languages:

* the root page sends a French reader to ``fr/`` and anyone else to ``en/``;
* the language switcher of every page leads to the same page in the other language;
* coloured words have their colour (not the text colour), readable in the light and the dark theme;
* code cells have a copy button, outputs do not;
* images load, internal links lead to existing files;
* the browser console shows no error;
* the French pages are not, for the most part, the English text;
* a French page reads French: its figures are the French drawings, no number
  outside code is written the English way (3.14), and its table of contents
  and headings are not the English ones (names and code aside).

It saves screenshots of a few pages and exits with 1 and one line per failure.
Chromium comes from the system (``apt-get install chromium``); Playwright's own
browser download is not used.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

DOCS = Path(__file__).resolve().parents[1]
SITE = DOCS / "_build" / "html"
SCREENSHOTS = DOCS / "_build" / "screenshots"
LANGUAGES = ("en", "fr")
COLOURS = ("red", "green", "blue", "orange", "purple", "yellow", "gray", "pink")
# Debian's Chromium first; the Chrome preinstalled on GitHub's runners as a fallback.
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# MathJax is loaded from a CDN by the pages that contain maths. The check runs
# offline, so that request is blocked and its failure is expected; any other
# failed request or console error is reported.
EXPECTED_OFFLINE_FAILURES = ("mathjax",)
SCREENSHOT_PAGES = ("index.html", "glossary.html")
# Translated pages whose first figure is kept as a screenshot, to see what a French reader sees.
FIGURE_SCREENSHOT_PAGES = ("part1/training.html", "part2/qlora-architecture.html")
TERMINOLOGY = DOCS / "locales" / "{language}" / "terminology.yaml"
# Pages Sphinx writes itself, in its own words for each language.
GENERATED_PAGES = ("genindex.html", "search.html")
# The article's headings and the entries of its table of contents ("On this page").
HEADINGS_JS = """() => [...document.querySelectorAll('article h1, article h2, article h3, .bd-toc-nav a')]
    .map((e) => e.innerText.replace(/[#¶]/g, '').trim()).filter((t) => t)"""
MIN_CONTRAST = 4.5  # WCAG AA for normal text
SOURCE_LANGUAGE = "en"
MIN_TRANSLATED_LENGTH = 40  # characters: shorter paragraphs may well read the same in both languages


class SiteCheckError(Exception):
    """The check could not run at all (no site, no browser)."""


def find_chromium(explicit: Path | None = None) -> str:
    """Path of the system Chromium, or a clear error saying how to install it."""
    if explicit is not None:
        if not explicit.exists():
            raise SiteCheckError(f"no browser at {explicit}")
        return str(explicit)
    for candidate in CHROMIUM_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    found = shutil.which("chromium")
    if found:
        return found
    raise SiteCheckError(
        "no Chromium found at /usr/bin/chromium: install it with `apt-get install -y chromium`"
    )


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Static file handler that does not log every request."""

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass


@contextmanager
def serve(site: Path) -> Iterator[str]:
    """Serve ``site`` on a free port of 127.0.0.1 in a thread; yield the base URL."""
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def site_pages(site: Path, language: str) -> list[str]:
    """Paths (relative to the language folder) of the HTML pages of one language."""
    root = site / language
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.html") if "_static" not in p.parts)


class Checker:
    """Runs the checks on one browser and collects one line per failure."""

    def __init__(self, browser, base_url: str, site: Path, screenshots: Path):
        self.browser = browser
        self.base_url = base_url
        self.site = site
        self.screenshots = screenshots
        self.failures: list[str] = []
        self.paragraphs: dict[tuple[str, str], list[str]] = {}  # (language, path) -> prose
        self.headings: dict[tuple[str, str], list[str]] = {}  # (language, path) -> headings and TOC entries

    def fail(self, message: str) -> None:
        """Record one failure (once, however many times it is seen)."""
        if message not in self.failures:
            self.failures.append(message)

    # -- pages --------------------------------------------------------------

    def new_page(self, locale: str = "en-US", color_scheme: str = "light", javascript: bool = True):
        """A fresh page whose console errors and failed requests become failures."""
        context = self.browser.new_context(
            locale=locale,
            color_scheme=color_scheme,
            java_script_enabled=javascript,
            viewport={"width": 1280, "height": 900},
        )
        context.route(lambda url: not url.startswith(self.base_url), lambda route: route.abort())
        page = context.new_page()
        if javascript:  # without JavaScript, the browser refuses the scripts: expected
            page.on("console", lambda message: self._on_console(page, message))
            page.on("pageerror", lambda error: self.fail(f"{page.url}: JavaScript error: {error}"))
            page.on("requestfailed", lambda request: self._on_request_failed(page, request))
        return page

    def _on_console(self, page, message) -> None:
        if message.type != "error":
            return
        where = (message.location or {}).get("url", "")
        if any(name in where.lower() for name in EXPECTED_OFFLINE_FAILURES):
            return
        self.fail(f"{page.url}: console error: {message.text}")

    def _on_request_failed(self, page, request) -> None:
        if any(name in request.url.lower() for name in EXPECTED_OFFLINE_FAILURES):
            return
        if request.is_navigation_request() and request.failure == "net::ERR_ABORTED":
            return  # a navigation superseded by the next one (the root page's redirect); a missing page is a 404
        self.fail(f"{page.url}: request failed: {request.url} ({request.failure})")

    def url(self, path: str) -> str:
        """Absolute URL of a path inside the site."""
        return urljoin(self.base_url, path)

    # -- checks -------------------------------------------------------------

    def check_root_redirect(self) -> None:
        """The root page sends French readers to fr/, everyone else to en/, and works without JS."""
        for locale, javascript, expected in (
            ("fr-FR", True, "fr"),
            ("en-GB", True, "en"),
            ("de-DE", True, "en"),
            ("fr-FR", False, "en"),
        ):
            page = self.new_page(locale=locale, javascript=javascript)
            try:
                page.goto(self.url("index.html"))
                page.wait_for_url(f"**/{expected}/index.html", timeout=10_000)
            except Exception:
                self.fail(
                    f"root page: a reader with locale {locale} (JavaScript {'on' if javascript else 'off'}) "
                    f"ended at {page.url}, not {expected}/index.html"
                )
            finally:
                page.context.close()

    def check_language_switch(self, language: str, path: str, page) -> None:
        """The switcher on ``language/path`` leads to the same path in the other language."""
        other = "fr" if language == "en" else "en"
        links = page.locator("a.qg-lang-switch")
        if links.count() != 1:
            self.fail(f"{language}/{path}: {links.count()} language switchers, expected 1")
            return
        label = links.first.inner_text().strip()
        expected_label = "Français" if other == "fr" else "English"
        if label != expected_label:
            self.fail(f"{language}/{path}: switcher label {label!r}, expected {expected_label!r}")
        target = urljoin(page.url, links.first.get_attribute("href") or "")
        if target != self.url(f"{other}/{path}"):
            self.fail(
                f"{language}/{path}: switcher leads to {target}, expected {self.url(f'{other}/{path}')}"
            )
            return
        response = page.context.request.get(target)
        if response.status != 200:
            self.fail(f"{language}/{path}: switcher target {target} answers {response.status}")

    def check_colours(self, label: str, page) -> dict[str, dict]:
        """Coloured spans differ from the text colour, from each other, and are readable."""
        found = page.evaluate(
            """(colours) => {
                const rgb = (s) => (s.match(/[\\d.]+/g) || []).slice(0, 3).map(Number);
                const lum = ([r, g, b]) => {
                    const f = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4); };
                    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
                };
                const contrast = (a, b) => { const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p); return (x + 0.05) / (y + 0.05); };
                const text = getComputedStyle(document.body).color;
                const background = getComputedStyle(document.documentElement).getPropertyValue('--pst-color-background').trim();
                const probe = document.createElement('span');
                probe.style.color = background; document.body.appendChild(probe);
                const backgroundRgb = getComputedStyle(probe).color; probe.remove();
                const result = {text, theme: document.documentElement.dataset.theme, spans: {}};
                for (const colour of colours) {
                    const span = document.querySelector('span.qg-' + colour);
                    if (!span) continue;
                    const colourRgb = getComputedStyle(span).color;
                    result.spans[colour] = {colour: colourRgb, contrast: contrast(rgb(colourRgb), rgb(backgroundRgb))};
                }
                return result;
            }""",
            list(COLOURS),
        )
        spans = found["spans"]
        seen: dict[str, str] = {}
        for colour, info in spans.items():
            if info["colour"] == found["text"]:
                self.fail(f"{label}: span.qg-{colour} has the plain text colour {info['colour']}")
                continue
            if info["colour"] in seen:
                self.fail(f"{label}: span.qg-{colour} has the same colour as span.qg-{seen[info['colour']]}")
            seen.setdefault(info["colour"], colour)
            if info["contrast"] < MIN_CONTRAST:
                self.fail(
                    f"{label}: span.qg-{colour} contrast {info['contrast']:.2f} < {MIN_CONTRAST} "
                    f"in the {found['theme']} theme"
                )
        return spans

    def check_copy_buttons(self, label: str, page) -> None:
        """Every code cell has a copy button; no executed output has one."""
        cells = page.locator("div.cell_input").count()
        with_button = page.locator("div.cell_input button.copybtn").count()
        if with_button != cells:
            self.fail(f"{label}: {with_button} copy buttons for {cells} code cells")
        on_outputs = page.locator("div.cell_output button.copybtn").count()
        if on_outputs:
            self.fail(f"{label}: {on_outputs} copy buttons on cell outputs")

    def check_images(self, label: str, page) -> None:
        """Every image has loaded (naturalWidth > 0)."""
        broken = page.evaluate(
            """async () => {
                const images = [...document.images];
                await Promise.all(images.map((img) => img.decode().catch(() => null)));
                return images.filter((img) => !(img.complete && img.naturalWidth > 0)).map((img) => img.src);
            }"""
        )
        for src in broken:
            self.fail(f"{label}: image does not load: {src}")

    def check_internal_links(self, label: str, page) -> None:
        """Links inside the site lead to files that exist."""
        hrefs = page.evaluate("() => [...document.querySelectorAll('a[href]')].map((a) => a.href)")
        for href in sorted(set(hrefs)):
            if not href.startswith(self.base_url):
                continue
            relative = unquote(urlsplit(href).path)[len(urlsplit(self.base_url).path) :]
            target = self.site / relative
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                self.fail(f"{label}: broken link to {relative}")

    @staticmethod
    def long_paragraphs(page) -> list[str]:
        """Texts of the article's prose paragraphs long enough to need a translation."""
        texts = page.evaluate(
            "() => [...document.querySelectorAll('article p')].map((p) => p.innerText.trim())"
        )
        return [text for text in texts if len(text) >= MIN_TRANSLATED_LENGTH]

    def check_translated(self) -> None:
        """A page whose prose is mostly identical in both languages was not translated.

        This catches what the catalogue check cannot: a stale .mo file, or a
        catalogue that the build did not find. A few identical paragraphs (a
        quotation of an original guide) are fine; a majority is not.
        """
        for (language, path), texts in self.paragraphs.items():
            if language == SOURCE_LANGUAGE or not texts:
                continue
            english = set(self.paragraphs.get((SOURCE_LANGUAGE, path), []))
            same = [text for text in texts if text in english]
            if len(same) * 2 > len(texts):
                self.fail(
                    f"{language}/{path}: {len(same)} of {len(texts)} paragraphs are the English text "
                    f"(first: {same[0][:60]!r})"
                )

    def check_reads_translated(self, language: str, path: str, page) -> None:
        """A translated page shows its figures in its language and no English-formatted number outside code."""
        label = f"{language}/{path}"
        figures = page.evaluate(
            """() => [...document.querySelectorAll('article div.cell_output img')].map(
                (img) => ({lang: img.getAttribute('lang'), alt: img.getAttribute('alt') || ''}))"""
        )
        for figure in figures:
            if figure["lang"] != language:
                self.fail(f"{label}: a figure drawn in {figure['lang'] or 'English'} ({figure['alt'][:50]!r})")
        versioned = self.terminology(language).get("versioned", [])
        numbers = page.evaluate(
            """(versioned) => {
                const skip = 'pre, code, script, style, .math, mjx-container, .cell_input, .highlight, [lang="en"]';
                const version = new RegExp('(' + versioned.join('|') + ')[: ]?$', 'i');
                const article = document.querySelector('article');
                const found = [];
                if (!article) return found;  // the search page and the index have no article
                const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT);
                let before = '';  // the text just before this node: "CUDA" and " 11.7" may be two nodes
                for (let node = walker.nextNode(); node; node = walker.nextNode()) {
                    const text = node.textContent;
                    if (!node.parentElement.closest(skip)) {
                        for (const match of text.matchAll(/(?<![\\w.])\\d+\\.\\d[\\d.]*(?!\\w)/g)) {
                            const context = before + text.slice(0, match.index);
                            const isVersion = match[0].split('.').length > 2 || version.test(context);
                            if (!isVersion) { found.push(text.trim().slice(0, 80)); break; }
                        }
                    }
                    before = (before + text).slice(-40);
                }
                return found;
            }""",
            versioned,
        )
        for text in numbers:
            self.fail(f"{label}: an English-formatted number outside code: {text!r}")

    @staticmethod
    def terminology(language: str) -> dict:
        """The language's terminology file (names that stay as they are, versioned software), {} if none."""
        import yaml

        path = Path(str(TERMINOLOGY).format(language=language))
        return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}

    def check_headings_translated(self) -> None:
        """No heading or table-of-contents entry of a translated page is the English one, unless names or code."""
        import re

        for (language, path), headings in self.headings.items():
            if language == SOURCE_LANGUAGE or path in GENERATED_PAGES:
                continue
            names = {w.lower() for name in self.terminology(language).get("names", []) for w in re.findall(r"\w+", name)}
            english = set(self.headings.get((SOURCE_LANGUAGE, path), []))
            for heading in headings:
                words = {w.lower() for w in re.findall(r"[^\W\d_]+", heading)}
                if heading in english and words - names:
                    self.fail(f"{language}/{path}: heading or contents entry {heading!r} is the English one")

    def screenshot_first_figure(self, language: str, path: str, page) -> None:
        """Keep a screenshot of the window around the page's first figure: its text, the contents, the figure."""
        figure = page.locator("article div.cell_output:has(img)").first
        if figure.count() == 0:
            self.fail(f"{language}/{path}: no figure to screenshot")
            return
        figure.evaluate("(element) => element.scrollIntoView({block: 'center'})")
        name = f"{language}-{path.replace('/', '-').removesuffix('.html')}-figure.png"
        page.screenshot(path=str(self.screenshots / name))  # the window: contents, prose and the figure

    def check_pages(self, language: str, color_scheme: str) -> dict[str, dict]:
        """Run the per-page checks on every page of one language, in one colour scheme."""
        page = self.new_page(locale="fr-FR" if language == "fr" else "en-US", color_scheme=color_scheme)
        colours_seen: dict[str, dict] = {}
        try:
            for path in site_pages(self.site, language):
                label = f"{language}/{path} ({color_scheme})"
                response = page.goto(self.url(f"{language}/{path}"), wait_until="load")
                if response is None or response.status != 200:
                    self.fail(f"{label}: answers {response.status if response else 'nothing'}")
                    continue
                if page.get_attribute("html", "lang") != language:
                    self.fail(f"{label}: <html lang> is {page.get_attribute('html', 'lang')!r}")
                colours_seen.update(self.check_colours(label, page) or {})
                if color_scheme == "light":
                    self.paragraphs[(language, path)] = self.long_paragraphs(page)
                    self.check_language_switch(language, path, page)
                    self.check_copy_buttons(label, page)
                    self.check_images(label, page)
                    self.check_internal_links(label, page)
                    self.headings[(language, path)] = page.evaluate(HEADINGS_JS)
                    if language != SOURCE_LANGUAGE:
                        self.check_reads_translated(language, path, page)
                    if path in FIGURE_SCREENSHOT_PAGES:
                        self.screenshot_first_figure(language, path, page)
                if path in SCREENSHOT_PAGES:
                    name = f"{language}-{Path(path).stem}-{color_scheme}.png"
                    page.screenshot(path=str(self.screenshots / name), full_page=path == "index.html")
        finally:
            page.context.close()
        if not colours_seen:
            self.fail(f"{language} ({color_scheme}): no coloured span on any page")
        return colours_seen


def check_site(site: Path = SITE, screenshots: Path = SCREENSHOTS, chromium: Path | None = None) -> list[str]:
    """Run every check; return one line per failure (empty when the site is fine)."""
    from playwright.sync_api import sync_playwright

    if not (site / "index.html").exists() or not all(
        (site / lang / "index.html").exists() for lang in LANGUAGES
    ):
        raise SiteCheckError(f"no built site in {site}: run `python docs/tools/build_site.py` first")
    browser_path = find_chromium(chromium)
    screenshots.mkdir(parents=True, exist_ok=True)
    with serve(site) as base_url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=CHROMIUM_FLAGS)
        try:
            checker = Checker(browser, base_url, site, screenshots)
            checker.check_root_redirect()
            for language in LANGUAGES:
                for color_scheme in ("light", "dark"):
                    checker.check_pages(language, color_scheme)
            checker.check_translated()
            checker.check_headings_translated()
        finally:
            browser.close()
    return checker.failures


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 when every check passes, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--site", type=Path, default=SITE, help="the published tree (default: docs/_build/html)"
    )
    parser.add_argument("--screenshots", type=Path, default=SCREENSHOTS, help="where to save screenshots")
    parser.add_argument(
        "--chromium", type=Path, default=None, help="browser to drive (default: /usr/bin/chromium)"
    )
    args = parser.parse_args(argv)
    try:
        failures = check_site(args.site.resolve(), args.screenshots.resolve(), args.chromium)
    except SiteCheckError as error:
        print(f"check_site: error: {error}", file=sys.stderr)
        return 1
    for failure in failures:
        print(f"FAIL {failure}")
    if failures:
        print(f"check_site: {len(failures)} failure(s)", file=sys.stderr)
        return 1
    pages = sum(len(site_pages(args.site.resolve(), lang)) for lang in LANGUAGES)
    print(
        f"check_site: all checks passed ({pages} pages, light and dark themes); "
        f"screenshots in {args.screenshots}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
