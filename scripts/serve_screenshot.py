#!/usr/bin/env python3
"""Screenshot of `xpcnn serve`'s page after drawing a "7" in headless Chromium: the README's docs/serve.png.

Serves RUN on a free port of 127.0.0.1, draws with real pointer input as tests/test_browser.py does, waits for
the prediction and saves the window.  Needs the browser extra (selenium), chromium and chromedriver.

    xpcnn train --data-dir ../shared/data/mnist --device cpu --out runs/convnet
    python scripts/serve_screenshot.py runs/convnet docs/serve.png
"""

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from browser import SEVEN, browser_problem, draw, start_chromium, wait_for_prediction  # noqa: E402

from xpcnn.apps.serve import make_server  # noqa: E402
from xpcnn.backends.backend import get_backend  # noqa: E402
from xpcnn.data.checkpoint import load_checkpoint  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory or checkpoint.npz")
    parser.add_argument("out", nargs="?", default="docs/serve.png", help="where to write the PNG")
    args = parser.parse_args()
    problem = browser_problem()
    if problem:
        sys.exit(f"error: {problem}")

    server = make_server(load_checkpoint(args.run), get_backend("numpy"), port=0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    with tempfile.TemporaryDirectory() as profile:
        driver = start_chromium(Path(profile))
        try:
            driver.get(server.url)
            draw(driver, SEVEN)
            shown = wait_for_prediction(driver)
            time.sleep(0.5)  # the bars grow in 0.15 s
            if not driver.save_screenshot(args.out):  # selenium returns False, not an error, where it cannot write
                sys.exit(f"error: could not write {args.out}")
        finally:
            driver.quit()
    server.shutdown()
    server.server_close()
    print(f"{args.out}: the page shows {shown}")


if __name__ == "__main__":
    main()
