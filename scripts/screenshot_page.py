"""The README's picture of the page: serve a model, open the page in headless Chromium, classify one
CIFAR-10 test image, save docs/serve-page.png.

    python scripts/screenshot_page.py --data-dir ../shared/cifar10 [--model best] [--index 0]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

from miniresnet.data import load_cifar10

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
FLAGS += ["--disable-component-update", "--disable-sync", "--no-first-run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model", default="best")
    parser.add_argument("--index", type=int, default=0, help="which test image")
    args = parser.parse_args()
    image = load_cifar10(args.data_dir).test_images[args.index]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "miniresnet", "serve", args.model, "--port", str(port)])
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
            path = Path(tmp) / f"cifar10-test-{args.index}.png"
            Image.fromarray(image.permute(1, 2, 0).numpy()).resize((128, 128), Image.Resampling.NEAREST).save(path)
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
            page = browser.new_page(viewport={"width": 760, "height": 640})
            page.goto(f"http://127.0.0.1:{port}/")
            page.set_input_files("#file", str(path))
            page.wait_for_selector("#answer:not([hidden]) #result li")
            out = ROOT / "docs" / "serve-page.png"
            out.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            print(f"wrote {out}: {page.inner_text('#status')}")
            browser.close()
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
