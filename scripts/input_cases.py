"""Issue 14's bad-input cases against one or more checkouts' CLI: command, exit code, seconds, the
one line it prints, and what it left behind. For the before/after evidence of the input fixes.

    python scripts/input_cases.py --root before=/tmp/l3/before --root after=/work/main \
        --work /tmp/l3/cases --out reports/inputs/cases.md [--only gray16,exif] [--timeout 600]

Each checkout's CLI runs as `PYTHON -m flows.cli …` from that checkout's root (its own code, the one
virtual environment). Every case is small: the `tiny` preset, the guidance off where the case is
about the inputs, a few iterations. The cases (issue 14, "These did not"):

  gray16     a 16-bit grayscale photo (no alpha) through `prepare`
  exif       an RGBA photo stored sideways with an EXIF orientation through `coarse`: is the
             reference it trained on upright?
  noalpha    a photo without alpha through `coarse` under `tiny`, with no network and no cached
             segmentation model: does it reach for the real one?
  opaque     an RGBA photo whose alpha is 255 everywhere through `prepare`: segmented, or the whole
             frame taken as the object?
  readonly   `coarse --out` inside a read-only file system (a read-only tmpfs mounted here; root
             ignores a folder's write bits)
  blocked    `coarse --out FILE/sub`, where FILE is a file
  truncated  `coarse` resuming a checkpoint.pt cut to 1,000 bytes (after a good run into the folder)
  nan        `coarse` whose loss is not finite (λ_rgb = inf; λ_2D = inf is no test: the SDS
             gradient is finite whatever its weight): is non-finite state checkpointed? (That the
             last good checkpoint is kept is tests/test_stage_engine.py's; a folder holding one from
             other parameters is no test here, as the old code resumed it whatever the parameters.)
  nomodel    `coarse --preset magic123` with no network (an unreachable proxy, no HF_HUB_OFFLINE)
             and no cached weights: how long until it says the model is missing?

Without the network the runs reach nothing: HTTP(S)_PROXY points at a closed local port for every
case. Writes the markdown table to --out and the raw outputs under --work/<root>/<case>/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks"
if not BENCH.is_dir():
    BENCH = Path("/work/shared/benchmarks")
CHAIR = BENCH / "nerf4" / "chair"
DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens, a connection is refused at once
TINY_FAST = ["--preset", "tiny", "--set", "guidance.kind=none"]


@dataclass
class Case:
    name: str
    what: str
    argv: Callable[[Path], list[str]]  # the case folder → the CLI's arguments
    setup: Callable[[Path, "Runner"], None] = lambda d, r: None
    check: Callable[[Path], str] = lambda d: ""
    env: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ inputs
def chair_rgba() -> Image.Image:
    return Image.open(CHAIR / "rgba.png").convert("RGBA")


def on_white(im: Image.Image) -> Image.Image:
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, im).convert("RGB")


def make_gray16(d: Path, r) -> None:
    g = np.asarray(on_white(chair_rgba()).convert("L"), dtype=np.float64) / 255.0
    Image.fromarray((g * 65535).round().astype(np.uint16)).save(d / "gray16.png")  # mode I;16


def make_exif(d: Path, r) -> None:
    """The chair stored turned 90° counter-clockwise, with EXIF orientation 6 (display: turn it 90°
    clockwise), i.e. upright for a viewer that honours the tag."""
    stored = chair_rgba().transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(d / "exif.png", exif=exif.tobytes())


def make_photo(d: Path, r) -> None:
    on_white(chair_rgba()).save(d / "photo.jpg", quality=95)


def make_opaque(d: Path, r) -> None:
    on_white(chair_rgba()).convert("RGBA").save(d / "opaque.png")


def make_readonly(d: Path, r) -> None:
    ro = d / "ro"
    ro.mkdir(exist_ok=True)
    if not os.path.ismount(ro):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)


def make_blocked(d: Path, r) -> None:
    (d / "blocker").write_text("a file where --out wants a folder\n")


def make_truncated(d: Path, r) -> None:
    out = d / "run"
    rc, _, _ = r.cli(["coarse", str(CHAIR / "rgba.png"), "--out", str(out), *TINY_FAST], d / "setup.log")
    ck = out / "checkpoint.pt"
    if rc != 0 or not ck.is_file():
        raise RuntimeError(f"truncated: the good run before the case failed (exit {rc}; see {d / 'setup.log'})")
    ck.write_bytes(ck.read_bytes()[:1000])


# ------------------------------------------------------------------------------------------ checks
def mask_share(path: Path) -> Optional[float]:
    if not path.is_file():
        return None
    return float((np.asarray(Image.open(path).convert("L")) > 127).mean())


def check_prepare(d: Path) -> str:
    out = d / "out"
    share = mask_share(out / "mask.png")
    if share is None:
        return "no mask.png written"
    rec = json.loads((out / "prepare.json").read_text()) if (out / "prepare.json").is_file() else {}
    src = rec.get("alpha", "?")
    rgba = np.asarray(Image.open(out / "rgba.png").convert("RGBA"))
    obj = rgba[..., 3] > 127
    grey = float(rgba[..., :3][obj].mean()) if obj.any() else float("nan")
    return (f"mask covers {100 * share:.0f}% of the frame (alpha: {src}); the object's mean value "
            f"{grey:.0f}/255")


def _crop_alpha(a: np.ndarray, size: int = 64) -> np.ndarray:
    ys, xs = np.nonzero(a > 127)
    a = a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    return np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BILINEAR)) > 127


def check_exif(d: Path) -> str:
    ref = d / "out" / "reference_rgba.png"
    if not ref.is_file():
        return "no reference_rgba.png"
    got = _crop_alpha(np.asarray(Image.open(ref).convert("RGBA"))[..., 3])
    upright = np.asarray(chair_rgba())[..., 3]
    ious = {}
    for k in range(4):  # the output's alpha against the upright chair turned k·90° counter-clockwise
        want = _crop_alpha(np.rot90(upright, k).copy())
        ious[k * 90] = float((got & want).sum() / max(1, (got | want).sum()))
    best = max(ious, key=ious.get)
    return ("trained on it upright" if best == 0 else f"trained on it turned {best}°") + f" (IoU {ious[best]:.2f})"


def check_stage(d: Path) -> str:
    out = d / "out"
    done = (out / "result.json").is_file()
    return "stage finished (result.json)" if done else "no result.json"


def check_truncated(d: Path) -> str:
    out = d / "run"
    left = [n for n in ("result.json", "mesh.obj", "renders") if (out / n).exists()]
    return "left in the folder: " + (", ".join(left) if left else "none of result.json, mesh.obj, renders")


def check_nan(d: Path) -> str:
    import torch

    ck = d / "out" / "checkpoint.pt"
    if not ck.is_file():
        return "no checkpoint.pt written"
    state = torch.load(ck, map_location="cpu", weights_only=False)
    bad, seen = [], [0]

    def walk(x):  # every floating tensor anywhere in the checkpoint (any version's layout)
        if torch.is_tensor(x) and x.is_floating_point():
            seen[0] += 1
            if not torch.isfinite(x).all():
                bad.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(state)
    step = state.get("step") if isinstance(state, dict) else None
    return (f"checkpoint.pt at step {step}: "
            + (f"{len(bad)} of {seen[0]} tensors non-finite" if bad else f"all {seen[0]} tensors finite"))


def check_out_made(d: Path) -> str:
    return ""


CASES = [
    Case("gray16", "16-bit grayscale photo → prepare",
         lambda d: ["prepare", str(d / "gray16.png"), "--out", str(d / "out"), "--preset", "tiny"],
         make_gray16, check_prepare),
    Case("exif", "EXIF-rotated photo → coarse",
         lambda d: ["coarse", str(d / "exif.png"), "--out", str(d / "out"), *TINY_FAST, "--set", "coarse.iters=2"],
         make_exif, check_exif),
    Case("noalpha", "photo without alpha → coarse under tiny (no network, no cached rembg model)",
         lambda d: ["coarse", str(d / "photo.jpg"), "--out", str(d / "out"), *TINY_FAST, "--set", "coarse.iters=2"],
         make_photo, check_stage, env={"U2NET_HOME": "{case}/u2net_empty"}),
    Case("opaque", "fully opaque RGBA → prepare",
         lambda d: ["prepare", str(d / "opaque.png"), "--out", str(d / "out"), "--preset", "tiny"],
         make_opaque, check_prepare),
    Case("readonly", "read-only --out (a read-only file system) → coarse",
         lambda d: ["coarse", str(CHAIR / "rgba.png"), "--out", str(d / "ro" / "sub"), *TINY_FAST],
         make_readonly),
    Case("blocked", "file-blocked --out → coarse",
         lambda d: ["coarse", str(CHAIR / "rgba.png"), "--out", str(d / "blocker" / "sub"), *TINY_FAST],
         make_blocked),
    Case("truncated", "truncated checkpoint.pt on resume → coarse",
         lambda d: ["coarse", str(CHAIR / "rgba.png"), "--out", str(d / "run"), *TINY_FAST],
         make_truncated, check_truncated),
    Case("nan", "a non-finite loss (λ_rgb = inf) → coarse",
         lambda d: ["coarse", str(CHAIR / "rgba.png"), "--out", str(d / "out"), *TINY_FAST,
                    "--set", "coarse.losses.rgb=.inf"],
         check=check_nan),
    Case("nomodel", "missing model, no network (magic123 preset) → coarse",
         lambda d: ["coarse", str(CHAIR / "rgba.png"), "--out", str(d / "out"), "--preset", "magic123",
                    "--embeds", str(CHAIR / "learned_embeds.bin"), "--set", "coarse.iters=2"],
         env={"HF_HOME": "{case}/hf_empty", "HUGGINGFACE_HUB_CACHE": "{case}/hf_empty/hub"}),
]


# ------------------------------------------------------------------------------------------ running
class Runner:
    def __init__(self, root: Path, python: str, timeout: float):
        self.root, self.python, self.timeout = root, python, timeout
        self.env = {**os.environ, "HTTP_PROXY": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY, "http_proxy": DEAD_PROXY,
                    "https_proxy": DEAD_PROXY, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
                    "PYTHONUNBUFFERED": "1"}
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            self.env.pop(k, None)

    def cli(self, argv: list[str], log: Path, extra_env: Optional[dict] = None) -> tuple[int, float, tuple[str, str]]:
        """(exit code, seconds, (stdout, stderr)); 124 when it ran past the timeout."""
        env = {**self.env, **(extra_env or {})}
        t0 = time.perf_counter()

        def text(x) -> str:
            return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")

        try:
            p = subprocess.run([self.python, "-m", "flows.cli", *argv], cwd=self.root, env=env, capture_output=True,
                               text=True, timeout=self.timeout)
            rc, out, err = p.returncode, p.stdout or "", p.stderr or ""
        except subprocess.TimeoutExpired as e:
            rc, out, err = 124, text(e.stdout), text(e.stderr) + f"\n(timed out after {self.timeout:g} s)"
        log.write_text(f"$ {' '.join(argv)}\n--- stdout\n{out}\n--- stderr\n{err}")
        return rc, time.perf_counter() - t0, (out, err)


PROGRESS = ("coarse:", "fine:", "textual inversion:", "turntable:", "Loading weights:", "Writing model shards:")


def _lines(text: str) -> list[str]:
    lines = [ln.rstrip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return [ln for ln in lines if not ln.lstrip().startswith(PROGRESS)]  # progress-bar redraws


def one_line(out: str, err: str) -> tuple[str, int]:
    """The line a person reads: `lift3d: error: …` if there is one, else a traceback's last line
    (marked), else the command's last line on stdout (or stderr); and how many lines were printed
    in all (progress-bar redraws not counted)."""
    o, e = _lines(out), _lines(err)
    errors = [ln for ln in e + o if ln.startswith("lift3d: error")]
    if errors:
        return errors[-1], len(o) + len(e)
    if any(ln.startswith("Traceback") for ln in e):
        return f"(traceback) {e[-1]}", len(o) + len(e)
    if e and e[-1].startswith("(timed out"):
        return e[-1], len(o) + len(e)
    return ((o or e or ["(nothing)"])[-1]), len(o) + len(e)


def run_case(case: Case, runner: Runner, work: Path) -> dict:
    d = work / case.name
    if d.exists():
        for sub in d.iterdir():
            if sub.is_dir() and os.path.ismount(sub):
                subprocess.run(["umount", str(sub)], check=False)
        shutil.rmtree(d)
    d.mkdir(parents=True)
    try:
        case.setup(d, runner)
    except Exception as e:  # noqa: BLE001 - the case cannot be set up here: say so in the table
        return {"case": case.name, "rc": None, "seconds": 0.0, "line": f"(not run: {e})", "lines": 0, "check": ""}
    env = {k: v.replace("{case}", str(d)) for k, v in case.env.items()}
    rc, secs, (out, err) = runner.cli(case.argv(d), d / "output.log", env)
    line, n = one_line(out, err)
    try:
        check = case.check(d)
    except Exception as e:  # noqa: BLE001
        check = f"(check failed: {type(e).__name__}: {e})"
    for sub in d.iterdir():
        if sub.is_dir() and os.path.ismount(sub):
            subprocess.run(["umount", str(sub)], check=False)
    return {"case": case.name, "rc": rc, "seconds": round(secs, 1), "line": line, "lines": n, "check": check,
            "argv": case.argv(d)}


def commit_of(root: Path) -> str:
    p = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    return p.stdout.strip()[:90] or "?"


def md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def write_markdown(results: dict[str, list[dict]], roots: dict[str, Path], out: Path, work: Path) -> None:
    lines = ["# Issue 14's bad inputs, before and after", "",
             "Written by `scripts/input_cases.py`. Each case runs the checkout's CLI "
             "(`.venv/bin/python -m flows.cli …` from the checkout's root) with no network (HTTP(S)_PROXY at a "
             f"closed local port) and the `tiny` preset; the command below shows the arguments with the case folder "
             f"as `CASE` (under `{work}/<label>/<case>`) and the benchmark's chair as `CHAIR`.", ""]
    for label, root in roots.items():
        lines.append(f"- **{label}**: `{root}` at {commit_of(root)}")
    lines.append("")
    by_case = {c.name: c for c in CASES}
    for name in [c.name for c in CASES if any(r["case"] == c.name for rs in results.values() for r in rs)]:
        case = by_case[name]
        lines += [f"## {name}: {case.what}", ""]
        argv = next(r["argv"] for rs in results.values() for r in rs if r["case"] == name and "argv" in r)
        d = str(work)
        shown = " ".join(a.replace(str(CHAIR), "CHAIR") for a in argv)
        for label in results:
            shown = shown.replace(f"{d}/{label}/{name}", "CASE")
        lines += [f"`lift3d {shown}`", "", "| run | exit | seconds | lines printed | the line it prints | outcome |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for label, rs in results.items():
            r = next((r for r in rs if r["case"] == name), None)
            if r is None:
                continue
            lines.append(f"| {label} | {r['rc']} | {r['seconds']} | {r['lines']} | {md_escape(r['line'][:300])} "
                         f"| {md_escape(r['check'])} |")
        lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", action="append", required=True, metavar="LABEL=PATH",
                    help="a checkout to run the cases against (repeatable, in the table's order)")
    ap.add_argument("--work", type=Path, required=True, help="where the cases' inputs and outputs go")
    ap.add_argument("--out", type=Path, required=True, help="the markdown table")
    ap.add_argument("--python", default=sys.executable, help="the interpreter (default: this one)")
    ap.add_argument("--only", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per case")
    a = ap.parse_args()
    roots = dict(r.split("=", 1) for r in a.root)
    roots = {k: Path(v).resolve() for k, v in roots.items()}
    only = {s for s in a.only.split(",") if s}
    cases = [c for c in CASES if not only or c.name in only]
    results: dict[str, list[dict]] = {}
    for label, root in roots.items():
        runner = Runner(root, a.python, a.timeout)
        earlier = a.work / f"{label}.json"  # a partial rerun (--only) keeps the other cases' rows
        results[label] = [r for r in (json.loads(earlier.read_text()) if only and earlier.is_file() else [])
                          if r["case"] not in {c.name for c in cases}]
        for case in cases:
            r = run_case(case, runner, a.work / label)
            results[label].append(r)
            results[label].sort(key=lambda r: [c.name for c in CASES].index(r["case"]))
            print(f"{label:>8} {case.name:<10} exit {r['rc']}  {r['seconds']:>6} s  {r['line'][:140]}  [{r['check']}]",
                  flush=True)
            (a.work / f"{label}.json").write_text(json.dumps(results[label], indent=2))
            write_markdown(results, roots, a.out, a.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
