"""The screenshots in docs/playground.md: the playground page in headless Chromium (Debian's
`chromium`, through Playwright) against a running `freelunch serve`, in compare mode with Token
Recycling, then with guidance. Speeds in them are single runs, not benchmarks (bench_engines.py).

    freelunch serve &   # the default model
    python bench/playground_screenshots.py --base http://127.0.0.1:8000 --out docs

Each picture's results panel, as the page shows it, goes to bench/results/playground_screenshots.json
(the figures docs/playground.md quotes).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from pathlib import Path

from PIL import Image
from playwright.sync_api import Page, sync_playwright

STORY = (
    "Retell this in one sentence: Every morning the baker opens his shop at six. He bakes fresh bread and sells it "
    "to the people who walk past on their way to work. In the afternoon he cleans the ovens and prepares the dough "
    "for the next day."
)
# (option, {field: value}, system prompt, prompt, file). Token Recycling as a user gets it: the tree
# the server picks; shot on its second run, after the first has measured the verify cost.
SHOTS = [
    ("speculative", {}, "", STORY, "playground.png"),
    ("guidance", {"scale": "3"}, "Answer like a pirate.", "Describe the weather at sea today.", "playground-guidance.png"),
]


def shoot(page: Page, base: str, option: str, fields: dict[str, str], system: str, prompt: str) -> tuple[bytes, str]:
    page.goto(base + "/")
    method = page.locator(f'.method[data-option="{option}"]')
    method.locator(".toggle").check()
    for name, value in fields.items():
        method.locator(f'[data-field="{name}"]').fill(value)
    page.fill("#system", system)
    page.fill("#prompt", prompt)
    page.fill("#max_tokens", "96")
    page.click("#run")
    page.wait_for_selector("body[data-done]", state="attached", timeout=300_000)
    results = page.inner_text("#results")
    print(results)
    return page.screenshot(full_page=True), results


def small_png(png: bytes) -> Image.Image:
    """The screenshot in 64 colours (a page of flat colours: a tenth of the bytes, looks the same)."""
    return Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="http://127.0.0.1:8000")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--browser", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--results", default="bench/results/playground_screenshots.json")
    args = parser.parse_args()
    from freelunch.cpu_features import cpu_features, cpu_name

    record = {"command": "python " + " ".join(sys.argv), "cpu": cpu_name(), "cpu_features": cpu_features(), "shots": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.browser, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        _, first = shoot(page, args.base, *SHOTS[0][:4])  # the server's first Token Recycling request measures its verify cost
        record["shots"].append({"file": None, "option": SHOTS[0][0], "note": "the server's first run, not pictured", "results": first})
        for option, fields, system, prompt, name in SHOTS:
            png, results = shoot(page, args.base, option, fields, system, prompt)
            small_png(png).save(Path(args.out) / name, optimize=True)
            record["shots"].append({"file": f"{args.out}/{name}", "option": option, "fields": fields, "system": system,
                                    "prompt": prompt, "results": results})
        browser.close()
    Path(args.results).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
