"""The live page as a user sees it: the shipped demo of the fully instrumented model, run by the real daemon,
in a real browser (Debian's Chromium through Playwright), on a phone, the Pi's 7" screen and a desktop.

The pictures are saved in the test's temp dir; with SPB_UPDATE_SCREENSHOT=1 they also replace the README's
(docs/flow-page.png from the demo at 1280x720, docs/screenshots/page-WxH.png at each size), so the README
always shows what a user sees:  SPB_UPDATE_SCREENSHOT=1 ./test.sh tests/test_page_screens.py
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_web import CHROMIUM_ARGS, CHROMIUM, _browser_or_skip

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo-full-model.toml"
SCREENS = [(390, 844), (800, 480), (1280, 720)]  # a phone, the Pi's 7" screen, a desktop
MIN_TEXT_PX = 12.0

# Every visible text's rendered size (SVG text scaled by its drawing), and everything that spills out of its
# card (the unit cards of the diagram, the banner, the chart, today's totals and the key), out of its drawing or out of the
# window's width. Returns one line per problem.
LAYOUT_PROBLEMS_JS = r"""
(minPx) => {
  const problems = [];
  const say = (el) => {
    const text = (el.textContent || "").trim().replace(/\s+/g, " ").slice(0, 40);
    return `${el.tagName.toLowerCase()}${el.getAttribute("class") ? "." + el.getAttribute("class").split(" ")[0] : ""}` +
      (text ? ` "${text}"` : "");
  };
  const shown = (el) => {
    const cs = getComputedStyle(el);
    if (cs.visibility === "hidden" || cs.display === "none" || Number(cs.opacity) === 0) return false;
    const r = el.getBoundingClientRect();
    return r.width > 0 || r.height > 0;
  };
  const inside = (r, box, slack) => r.left >= box.left - slack && r.right <= box.right + slack &&
    r.top >= box.top - slack && r.bottom <= box.bottom + slack;
  const view = document.documentElement;
  if (view.scrollWidth > view.clientWidth + 1) {
    problems.push(`the page is ${view.scrollWidth} px wide in a ${view.clientWidth} px window`);
  }
  // 1. no text smaller than minPx
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const el = node.parentElement;
    if (!node.textContent.trim() || !el || el.closest("noscript, title, script, style") || !shown(el)) continue;
    let px = parseFloat(getComputedStyle(el).fontSize);
    if (el instanceof SVGElement) {
      const m = el.getScreenCTM();
      px *= Math.hypot(m.a, m.b);
    }
    if (px < minPx - 0.05) problems.push(`${say(el)} is ${px.toFixed(1)} px`);
  }
  // 2. nothing spills out of its card
  for (const unit of document.querySelectorAll("#diagram g.unit")) {
    const card = unit.querySelector("rect.card").getBoundingClientRect();
    for (const el of unit.querySelectorAll("text, rect, path, circle, line, polygon")) {
      if (el.classList.contains("card") || !shown(el)) continue;
      if (!inside(el.getBoundingClientRect(), card, 1)) problems.push(`${say(el)} spills out of the card of ${unit.dataset.unit}`);
    }
  }
  for (const box of document.querySelectorAll(".top, .status, .chart-box, .today, .key")) {
    const outer = box.getBoundingClientRect();
    for (const el of box.querySelectorAll("*")) {
      if (!shown(el) || el.closest("svg") && el.tagName.toLowerCase() !== "svg") continue;
      if (!inside(el.getBoundingClientRect(), outer, 1)) problems.push(`${say(el)} spills out of ${say(box)}`);
    }
  }
  for (const svg of document.querySelectorAll("#diagram, #chart")) {
    const outer = svg.getBoundingClientRect();
    for (const el of svg.querySelectorAll("text, circle, rect, polygon")) {
      if (!shown(el)) continue;
      if (!inside(el.getBoundingClientRect(), outer, 1)) problems.push(`${say(el)} spills out of #${svg.id}`);
    }
  }
  return problems;
}
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The real daemon running the shipped demo config (on a free port, its store in a temp dir): its URL."""
    tmp = tmp_path_factory.mktemp("demo")
    text = DEMO.read_text()
    assert 'listen = "127.0.0.1:8080"' in text and 'dir = "data-demo-full-model"' in text
    config = tmp / "demo.toml"
    config.write_text(text.replace('listen = "127.0.0.1:8080"', 'listen = "127.0.0.1:0"'))  # only the port differs
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET", "STATE_DIRECTORY")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "run", "--config", str(config)], cwd=tmp,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**env, "SOLAR_CONFIG": ""})
    url = None
    deadline = time.monotonic() + 60
    while url is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        found = re.search(r"live energy-flow page on (http://127\.0\.0\.1:\d+/)", line)
        url = found.group(1) if found else None
    try:
        assert url, "the demo did not log its page's URL"
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def _save(shot: Path, name: str) -> None:
    if os.environ.get("SPB_UPDATE_SCREENSHOT") == "1":
        target = ROOT / "docs" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)


def _open(browser, url, width, height, problems):
    tab = browser.new_page(viewport={"width": width, "height": height})
    tab.on("console", lambda m: problems.append(f"{width}x{height} console {m.type}: {m.text}")
           if m.type in ("error", "warning") else None)
    tab.on("pageerror", lambda e: problems.append(f"{width}x{height} page error: {e}"))
    tab.goto(url)
    # Energy moving: at least one arrow is animated and labelled in watts, within a minute of the start.
    tab.wait_for_function(
        "() => [...document.querySelectorAll('#diagram .flow')].some(g => g.getAttribute('visibility') !== 'hidden'"
        " && g.querySelector('.flow-line.moving'))", timeout=60_000)
    tab.wait_for_selector("#chart text, #chart path", timeout=10_000)
    tab.wait_for_timeout(300)  # the dashes move a little for the picture
    return tab


def test_the_demo_shows_energy_moving_and_is_the_readme_picture(demo, tmp_path):
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            tab = _open(browser, demo, 1280, 720, problems)
            units = tab.eval_on_selector_all("#diagram g.unit", "els => els.map(e => e.dataset.unit)")
            assert units == ["red_house", "green_house", "blue_house", "power_plant"]
            watts = tab.eval_on_selector_all(
                "#diagram .flow-label", "els => els.filter(e => e.closest('[visibility=hidden]') === null)"
                ".map(e => e.textContent)")
            assert any(w.endswith(" W") for w in watts), watts
            assert "storing on this Pi only" in tab.locator("#status-meaning").text_content()
            # Today's totals per unit beside the diagram, from the store the daemon writes.
            tab.wait_for_selector('#today tr[data-unit="power_plant"]', timeout=10_000)
            today = tab.eval_on_selector_all("#today tbody tr", "rows => rows.map(r => r.dataset.unit)")
            assert today == ["red_house", "green_house", "blue_house", "power_plant"]
            assert tab.locator('#today tr[data-unit="power_plant"] td[data-figure="sold"]').text_content() == "–"
            # The demo's points carry its simulated June day: within a few readings its panels have generated.
            tab.wait_for_function(
                "() => /^[0-9]+[.][0-9]{2}$/.test(document.querySelector("
                "'#today tr[data-unit=\"red_house\"] td[data-figure=\"generated\"]').textContent.trim())",
                timeout=30_000)
            shot = tmp_path / "flow-page.png"
            tab.screenshot(path=str(shot))
            _save(shot, "flow-page.png")
        finally:
            browser.close()
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("width,height", SCREENS, ids=[f"{w}x{h}" for w, h in SCREENS])
def test_the_page_is_readable_and_nothing_overflows_on_every_screen(demo, tmp_path, width, height):
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            tab = _open(browser, demo, width, height, problems)
            shot = tmp_path / f"page-{width}x{height}.png"
            tab.screenshot(path=str(shot), full_page=True)
            _save(shot, f"screenshots/page-{width}x{height}.png")
            problems += tab.evaluate(LAYOUT_PROBLEMS_JS, MIN_TEXT_PX)
        finally:
            browser.close()
    assert problems == [], "\n".join(problems)
