"""Screenshot an HTML benchmark report (report.html) in headless Chromium, opened from disk as a
reader would open it (file://, offline: no network, no server).

    python scripts/report_screenshot.py REPORT.html OUT.png [--width 1280] [--height 2000]

Needs `chromium` (Debian: apt-get install chromium). WebGL runs on SwiftShader (software), so the
<model-viewer> 3D views draw without a GPU. Exit 0 when the screenshot was written, 2 when chromium
is missing or wrote nothing.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


def capture(url: str, out: Path, width: int, height: int, wait_ms: int = 20000, timeout: float = 180.0) -> Path:
    """Headless Chromium (a fresh profile, no background network, WebGL on SwiftShader) saves a
    width×height screenshot of `url` to `out`."""
    chromium = find_chromium()
    if chromium is None:
        raise RuntimeError("chromium is not installed (Debian: apt-get install chromium)")
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="lift3d-chromium-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               # WebGL in software for the 3D views (model-viewer, three.js); without these it is off under --disable-gpu
               "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
               "--hide-scrollbars", f"--virtual-time-budget={wait_ms}",
               f"--window-size={width},{height}", f"--screenshot={out}", url]
        subprocess.run(cmd, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot of {url}")
    return out


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 2000, wait_ms: int = 20000,
               timeout: float = 180.0) -> Path:
    """Load `page` from disk and save a width×height screenshot of its top to `out`."""
    return capture(Path(page).resolve().as_uri(), out, width, height, wait_ms, timeout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2000)
    ap.add_argument("--wait-ms", type=int, default=20000, help="virtual time for the page to load and draw")
    a = ap.parse_args()
    if not a.page.is_file():
        print(f"report_screenshot: no such file: {a.page}", file=sys.stderr)
        return 2
    try:
        p = screenshot(a.page, a.out, a.width, a.height, a.wait_ms)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"report_screenshot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
