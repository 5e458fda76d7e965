"""Screenshots of Snakemake's report of this workflow in a real headless browser, to see
what a reader sees: the figure groups, a figure, its readable provenance, the claims.

Needs Playwright (`pip install playwright`, not a project dependency) and a Chromium,
e.g. Debian's (`apt-get install chromium`); Playwright's own download is not needed:

    snakemake --report report.html
    python scripts/report_screenshots.py report.html shots/ --chromium /usr/bin/chromium
"""
from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path, help="the report's HTML file (snakemake --report report.html)")
    ap.add_argument("out", type=Path, help="folder for the PNGs")
    ap.add_argument("--chromium", default="/usr/bin/chromium", help="the browser (default: %(default)s)")
    ap.add_argument("--figure", default="Figure 2", help="the figure to open (default: %(default)s)")
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(args.report.resolve().as_uri())
        page.wait_for_timeout(1500)

        def shot(name: str) -> None:
            page.wait_for_timeout(800)
            page.screenshot(path=str(args.out / name))
            print(args.out / name)

        def open_figures(group: str):
            page.goto(args.report.resolve().as_uri())
            page.wait_for_timeout(1000)
            page.get_by_text("Figures", exact=True).first.click()
            page.get_by_text(group, exact=True).first.click()
            return page.locator("tr", has_text=args.figure).first

        page.get_by_text("Figures", exact=True).first.click()
        shot("1-figure-groups.png")
        row = open_figures("Paper figures")
        row.locator("a").first.click()                  # the eye: show the figure
        shot("2-figure-list.png")
        page.locator("h1 a").first.click()              # hide the menu: the figure, full width
        shot("3-figure.png")
        row = open_figures("Paper figures")
        row.locator("a").first.click()
        page.locator("label[for='toggle-view-provenance']").click()
        page.locator("h1 a").first.click()
        shot("4-provenance.png")
        page.mouse.wheel(0, 1400)
        shot("5-provenance-runs.png")
        row = open_figures("Paper figures")
        row.locator("a").nth(1).click()                 # the information: caption, link
        shot("6-figure-caption.png")
        page.goto(args.report.resolve().as_uri())
        page.wait_for_timeout(1000)
        page.get_by_text("Claims", exact=True).first.click()
        page.locator("tr", has_text="verdicts").first.locator("a").first.click()
        shot("7-claims.png")
        browser.close()


if __name__ == "__main__":
    main()
