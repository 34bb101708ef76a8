"""Render a GLB in a real viewer: three.js (GLTFLoader, PBR material) in headless Chromium, served
from localhost, and save a screenshot.

    python scripts/glb_screenshot.py MESH.glb OUT.png [--size 800] [--azimuth 30]

Needs `chromium` (Debian: apt-get install chromium) and npm (three.js is installed from the npm
registry into a cache folder: LIFT3D_CACHE or ~/.cache/lift3d, viewer/). WebGL runs on
SwiftShader (software), so no GPU is needed. Exit status 0 when the screenshot was written.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_screenshot import capture, find_chromium  # noqa: E402,F401 - one Chromium launch for both scripts

THREE_VERSION = "0.187.0"

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>loading</title>
<style>html,body{margin:0;background:#fff;overflow:hidden}</style>
<script type="importmap">{"imports": {"three": "./node_modules/three/build/three.module.js",
  "three/addons/": "./node_modules/three/examples/jsm/"}}</script>
</head><body>
<script type="module">
import * as THREE from 'three';
import { GLTFLoader } from 'three/addons/loaders/GLTFLoader.js';
const W = __SIZE__, H = __SIZE__;
const renderer = new THREE.WebGLRenderer({antialias: true, preserveDrawingBuffer: true});
renderer.setSize(W, H);
renderer.setClearColor(0xffffff, 1);
renderer.outputColorSpace = THREE.SRGBColorSpace;
document.body.appendChild(renderer.domElement);
const scene = new THREE.Scene();
scene.add(new THREE.HemisphereLight(0xffffff, 0x888888, 2.0));
const sun = new THREE.DirectionalLight(0xffffff, 1.5);
sun.position.set(1, 2, 3);
scene.add(sun);
const camera = new THREE.PerspectiveCamera(40, W / H, 0.01, 100);
new GLTFLoader().load('model.glb', (gltf) => {
  const obj = gltf.scene;
  scene.add(obj);
  const box = new THREE.Box3().setFromObject(obj);
  const c = box.getCenter(new THREE.Vector3());
  const r = box.getSize(new THREE.Vector3()).length() * 0.5;
  const az = __AZIMUTH__ * Math.PI / 180, el = 20 * Math.PI / 180;
  const d = r / Math.sin(20 * Math.PI / 180);
  camera.position.set(c.x + d * Math.cos(el) * Math.sin(az), c.y + d * Math.sin(el), c.z + d * Math.cos(el) * Math.cos(az));
  camera.lookAt(c);
  let textured = 0;
  obj.traverse((m) => { if (m.isMesh && m.material && m.material.map) textured += 1; });
  renderer.render(scene, camera);
  document.title = 'ready textured=' + textured;
}, undefined, (e) => { document.title = 'error ' + e; });
</script></body></html>
"""


def cache_dir() -> Path:
    root = os.environ.get("LIFT3D_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "lift3d") / "viewer"


def ensure_three(root: Path) -> None:
    if (root / "node_modules" / "three" / "build" / "three.module.js").is_file():
        return
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(root), f"three@{THREE_VERSION}"],
                   check=True, stdout=subprocess.DEVNULL)


def screenshot(glb: Path, out: Path, size: int = 800, azimuth: float = 30.0, timeout: float = 120.0) -> Path:
    root = cache_dir()
    ensure_three(root)
    shutil.copy(glb, root / "model.glb")
    (root / "view.html").write_text(PAGE.replace("__SIZE__", str(size)).replace("__AZIMUTH__", str(float(azimuth))))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # quiet
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        out = capture(f"http://127.0.0.1:{port}/view.html", out, size, size, timeout=timeout)
    finally:
        server.shutdown()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("glb", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", type=int, default=800)
    ap.add_argument("--azimuth", type=float, default=30.0)
    a = ap.parse_args()
    if not a.glb.is_file():
        print(f"glb_screenshot: no such file: {a.glb}", file=sys.stderr)
        return 2
    path = screenshot(a.glb, a.out, a.size, a.azimuth)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
