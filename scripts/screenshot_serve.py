"""Screenshot of the `catdog serve` page after uploading photos (the README's docs/serve.png).

    python scripts/screenshot_serve.py RUN docs/serve.png PHOTO...

Serves RUN on 127.0.0.1, opens / in Debian's headless Chromium, picks the photos and waits for every label and
class activation map before taking the picture.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    run, out, photos = argv[0], Path(argv[1]), [str(Path(p).resolve()) for p in argv[2:]]
    spec = importlib.util.spec_from_file_location("load_test", REPO / "benchmarks" / "load_test.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from playwright.sync_api import sync_playwright

    with bench.running_server(run) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1100, "height": 700}, device_scale_factor=1)
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('px input')")
        page.set_input_files("#files", photos)
        page.wait_for_function(f"document.querySelectorAll('.label[data-cls]').length === {len(photos)}", timeout=120_000)
        page.wait_for_function("[...document.querySelectorAll('img.cam')].every(i => i.complete && i.naturalWidth > 0)")
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        browser.close()
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
