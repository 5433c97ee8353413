"""The report's in-page decoder: page size and the time of one decode in headless Chromium.

    python benchmarks/page_decode.py <run dir>/report.html [...]

Median of 7 rounds of 50 decodes of z = 0.3 in every dimension (``window.explorer.decode``),
after 20 warm-up decodes; Debian's chromium, driven by Playwright.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

TIMING = """() => {
  const z = new Array(window.explorer.latentDim).fill(0.3), times = [];
  for (let i = 0; i < 20; i++) window.explorer.decode(z);
  for (let r = 0; r < 7; r++) {
    const t = performance.now();
    for (let i = 0; i < 50; i++) window.explorer.decode(z);
    times.push((performance.now() - t) / 50);
  }
  return times.sort((a, b) => a - b)[3];
}"""


def main(pages: list[str]) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        for page_path in map(Path, pages):
            page = browser.new_page()
            page.goto(page_path.resolve().as_uri())
            ms = page.evaluate(TIMING)
            print(f"{page_path}: {page_path.stat().st_size / 1e6:.2f} MB, one decode {ms:.2f} ms")
            page.close()
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1:])
