"""Install Google's <model-viewer> (npm @google/model-viewer) for the HTML benchmark report.

    python scripts/install_model_viewer.py [--dest DIR]

Fetches the pinned version's package with `npm pack` (the npm registry checks its integrity hash)
and keeps two files of it: dist/model-viewer-umd.min.js (the self-contained build, three.js
inside, a classic script that a page opened from disk may load) and LICENSE (BSD-3-Clause). They go
to core.evaluation.report_html.viewer_cache() ($LIFT3D_CACHE or ~/.cache/lift3d, then
model-viewer/<version>/), where the report finds them and copies the script next to report.html.
Exit 0 when the script is there (also when it already was), 2 when npm is missing or fails.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.evaluation.report_html import VIEWER_FILE, VIEWER_PACKAGE, VIEWER_VERSION, viewer_cache  # noqa: E402


def install(dest: Path) -> Path:
    target = dest / VIEWER_FILE
    if target.is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed (Debian: apt-get install npm)")
    with tempfile.TemporaryDirectory() as tmp:
        spec = f"{VIEWER_PACKAGE}@{VIEWER_VERSION}"
        r = subprocess.run([npm, "pack", spec, "--silent", "--pack-destination", tmp], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"npm pack {spec} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        tgz = next(Path(tmp).glob("*.tgz"))
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tgz) as tar:
            for member, name in ((f"package/dist/{VIEWER_FILE}", VIEWER_FILE), ("package/LICENSE", "LICENSE")):
                data = tar.extractfile(member).read()
                part = dest / (name + ".part")
                part.write_bytes(data)
                part.replace(dest / name)
    return target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=None, help="folder for the script (default: the report's cache)")
    a = ap.parse_args()
    try:
        p = install(a.dest or viewer_cache())
    except (RuntimeError, OSError, KeyError) as e:
        print(f"install_model_viewer: {e}", file=sys.stderr)
        return 2
    print(f"model-viewer {VIEWER_VERSION}: {p} ({p.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
