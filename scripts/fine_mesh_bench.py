"""The fine (DMTet) stage's mesh path without the priors, part by part, at controlled face counts.

On one H200 the steady fine iteration was 66 ms on a short run's mesh and 97 ms at the paper's length
(1,057,960 faces; reports/speed). This script says which part of the iteration grows with the faces.
For each target face count it builds the fine stage's own objects (core.stages.fine.DMTetRepresentation
from `load_params(--preset)`: the Kuhn tet grid at `--tet-resolution`, the colour field as a copy of a
NeRFField built from the params, the rasteriser of `fine.rasterizer`) and sets the SDF from an analytic
field whose surface area is dialled: a sphere of `--radius` with a displacement
A·sin(kx)·sin(ky)·sin(kz) (A = `--amplitude`), the frequency k found by bisection so that marching
tetrahedra gives about the target's faces. k runs from 0 (the plain sphere: targets below its count get
it) to a wavelength of 5 grid cells; at the defaults and tet grid 128³ that spans ~77k to ~1.19M faces.
The grid spans ±`--grid-extent` on every axis (1.1: what the fine stage's rescale gave session 15's
paper-length run), fixed so that only the surface changes with the dial. The bumps widen the silhouette
too: the share of the reference view covered (recorded as view_coverage) grows with k, and with it the
per-pixel work (the colour field's points).

Then, timed (CUDA events on a GPU; perf_counter on the CPU, whose ops are synchronous), averaged over
`--iters` after `--warmup`:
  * one iteration as the fine stage runs a reference-view step (core.stages.engine.Stage.step) without
    the priors: extract (`before_step`: marching tetrahedra), render (`render`: the reference view at
    fine.resolution, albedo shading), losses (Magic123 eq. 1's colour and mask terms), regularisers
    (`regularisers`: normal consistency + Laplacian), backward of the total (with zero_grad), the
    optimiser's step, and their sum. Between iterations (outside the timed span) the SDF and
    deformation are put back, so every iteration sees the same mesh. Peak GPU memory (max allocated)
    over these iterations.
  * the same operations alone, forward and backward (random upstream gradients), on the same mesh
    and view: marching_tets, the rasteriser's rasterize (torch backend: of which the coverage pass,
    forward only), vertex_normals, the render's two interpolates, the colour field on the covered
    pixels, antialias (torch backend: of which opposite_vertices, forward only), and the two mesh
    regularisers. Not a partition of the iteration: each runs by itself, so the sums need not match.

    python scripts/fine_mesh_bench.py --out reports/speed/h200_fine_mesh_bench.json   # GPU, 80k–1M faces
    python scripts/fine_mesh_bench.py --device cpu --tet-resolution 32 --resolution 64 \\
        --faces 3000,12000 --iters 2 --warmup 1 --out /tmp/fine_mesh_bench.json
    python scripts/fine_mesh_bench.py --plot FILE.json   # only redraw FILE.png
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ITERATION_PARTS = ("extract", "render", "losses", "regularisers", "backward", "optimizer")
ALONE_PARTS = ("marching_tets", "rasterize", "vertex_normals", "interpolate", "colour_field", "antialias",
               "normal_consistency", "laplacian")
# torch backend, within their parent; coverage_torch: the tensors' coverage pass where the rasteriser runs the
# Triton one (fine.coverage), for the comparison
ALONE_SUBPARTS = ("rasterize.coverage", "rasterize.coverage_torch", "antialias.opposite_vertices")


# ----------------------------------------------------------------------------------------- the surface
def bumpy_sphere(radius: float, amplitude: float, frequency: float):
    """SDF-like field, positive inside: radius − |x| + A sin(kx) sin(ky) sin(kz)."""
    import torch

    def sdf(x):
        s = torch.sin(frequency * x)
        return radius - x.norm(dim=-1) + amplitude * s[:, 0] * s[:, 1] * s[:, 2]

    return sdf


def set_surface(dmtet, radius: float, amplitude: float, frequency: float) -> int:
    """The SDF of `dmtet` from the bumpy sphere; the face count marching tetrahedra gives."""
    import torch

    dmtet.init_from_sdf(bumpy_sphere(radius, amplitude, frequency))
    with torch.no_grad():
        return dmtet.extract().num_faces


def dial_faces(dmtet, target: int, radius: float, amplitude: float, k_max: float, steps: int = 14,
               tol: float = 0.02) -> tuple[float, int]:
    """Bisection on the frequency k ∈ [0, k_max] for about `target` faces (the count grows with k, not
    strictly); the SDF is left at the k returned. (k, faces)."""
    lo, hi = 0.0, k_max
    f_lo = set_surface(dmtet, radius, amplitude, lo)
    if f_lo >= target:
        return lo, f_lo
    f_hi = set_surface(dmtet, radius, amplitude, hi)
    best = min(((lo, f_lo), (hi, f_hi)), key=lambda kf: abs(kf[1] - target))
    if f_hi > target:
        for _ in range(steps):
            mid = 0.5 * (lo + hi)
            f = set_surface(dmtet, radius, amplitude, mid)
            if abs(f - target) < abs(best[1] - target):
                best = (mid, f)
            if abs(f - target) <= tol * target:
                break
            lo, hi = (mid, hi) if f < target else (lo, mid)
    set_surface(dmtet, radius, amplitude, best[0])
    return best


# ------------------------------------------------------------------------------------------- timing
class Clock:
    """Marks on the device's timeline: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch

    def mark(self):
        if self.cuda:
            e = self.torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()


def time_alone(clock: Clock, forward, leaves: list, iters: int, warmup: int) -> dict:
    """Forward ms of `forward()` and, when `leaves` is non-empty, backward ms of its output(s) with fixed
    random upstream gradients into `leaves`; means over `iters` after `warmup`."""
    import torch

    out = forward()
    outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o.requires_grad]
    gen = torch.Generator(device=outs[0].device if outs else "cpu").manual_seed(0)
    grads = [torch.randn(o.shape, generator=gen, device=o.device, dtype=o.dtype) for o in outs]
    del out, outs
    spans = []
    for i in range(warmup + iters):
        for leaf in leaves:
            leaf.grad = None
        a = clock.mark()
        out = forward()
        b = clock.mark()
        if leaves:
            outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o.requires_grad]
            torch.autograd.backward(outs, grads)
            c = clock.mark()
        else:
            c = None
        if i >= warmup:
            spans.append((a, b, c))
        del out
    clock.sync()
    fwd = sum(clock.ms(a, b) for a, b, _ in spans) / len(spans)
    bwd = sum(clock.ms(b, c) for _, b, c in spans) / len(spans) if leaves else None
    return {"forward": fwd, "backward": bwd}


def bench_iteration(rep, optimizer, cams, resolution: int, ref: dict, params, clock: Clock, iters: int,
                    warmup: int) -> dict:
    """ms per part of one reference-view iteration as core.stages.engine.Stage.step runs it, no priors."""
    import torch

    from core.stages.losses import reference_mask_loss, reference_rgb_loss

    f, s = params.fine, params.coarse.shading
    sdf0, deform0 = rep.dmtet.sdf.detach().clone(), rep.dmtet.deform.detach().clone()
    gen = torch.Generator().manual_seed(0)
    spans = []
    for i in range(warmup + iters):
        marks = [clock.mark()]
        rep.before_step(i, warmup + iters, gen, optimizer)  # marching tetrahedra
        marks.append(clock.mark())
        out = rep.render(cams, resolution, shading="albedo", light_dir=None, ambient=s.ambient, diffuse=s.diffuse)
        marks.append(clock.mark())
        loss = f.losses.rgb * reference_rgb_loss(out.rgb, ref["rgb"], ref["mask_eroded"]) \
            + f.losses.mask * reference_mask_loss(out.opacity, ref["mask"])  # eq. 1
        marks.append(clock.mark())
        for w, term in rep.regularisers(out).values():
            loss = loss + w * term
        marks.append(clock.mark())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(clock.mark())
        optimizer.step()
        marks.append(clock.mark())
        if i >= warmup:
            spans.append(marks)
        with torch.no_grad():  # the same mesh every iteration (outside the timed span)
            rep.dmtet.sdf.copy_(sdf0)
            rep.dmtet.deform.copy_(deform0)
        del out, loss
    clock.sync()
    ms = {p: sum(clock.ms(m[j], m[j + 1]) for m in spans) / len(spans) for j, p in enumerate(ITERATION_PARTS)}
    ms["iteration"] = sum(clock.ms(m[0], m[-1]) for m in spans) / len(spans)
    return ms


def bench_alone(rep, cams, resolution: int, clock: Clock, iters: int, warmup: int) -> dict:
    """Forward and backward ms of each mesh-path operation by itself, on the current mesh and view."""
    import torch

    from core.rendering.mesh_render import clip_positions, vertex_normals
    from core.rendering.raster import _coverage, opposite_vertices
    from core.stages.losses import mesh_laplacian_loss, mesh_laplacian_loss_unnormalised, mesh_normal_consistency

    d, r, H = rep.dmtet, rep.rasterizer, int(resolution)
    with torch.no_grad():
        mesh = d.extract()
        faces = mesh.faces
        tri = faces.int() if r.backend == "nvdiffrast" else faces  # as render_mesh passes them
        verts = mesh.verts.detach()
        pos = clip_positions(verts, cams).detach()
        rast = r.rasterize(pos, tri, (H, H)).detach()
        vn = vertex_normals(verts, faces)
        attrs = torch.cat([verts, vn], -1)
        interp = r.interpolate(attrs, rast, tri)
        covered = rast[..., 3] > 0
        xyz = interp[..., :3][covered].detach()
        colour_mask = torch.cat([torch.rand(*rast.shape[:3], 3, device=rast.device), covered[..., None].float()], -1)
    leaf = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    v_l, pos_l, attrs_l, rast_l, xyz_l, cm_l = map(leaf, (verts, pos, attrs, rast, xyz, colour_mask))
    w_l = leaf(pos[..., 3:4].contiguous())
    lap = mesh_laplacian_loss_unnormalised if rep.f.laplacian_form == "unnormalised" else mesh_laplacian_loss
    colour_params = [p for p in rep.colour.parameters() if p.requires_grad]
    ms = {
        "marching_tets": time_alone(clock, lambda: d.extract().verts,
                                    [d.sdf, d.deform], iters, warmup),
        "rasterize": time_alone(clock, lambda: r.rasterize(pos_l, tri, (H, H)), [pos_l], iters, warmup),
        "vertex_normals": time_alone(clock, lambda: vertex_normals(v_l, faces), [v_l], iters, warmup),
        "interpolate": time_alone(clock, lambda: (r.interpolate(attrs_l, rast_l, tri), r.interpolate(w_l, rast_l, tri)),
                                  [attrs_l, rast_l, w_l], iters, warmup),
        "colour_field": time_alone(clock, lambda: rep.colour(xyz_l), [xyz_l, *colour_params], iters, warmup),
        "antialias": time_alone(clock, lambda: r.antialias(cm_l, rast, pos_l, tri), [cm_l, pos_l], iters, warmup),
        "normal_consistency": time_alone(clock, lambda: mesh_normal_consistency(v_l, faces), [v_l], iters, warmup),
        "laplacian": time_alone(clock, lambda: lap(v_l, faces), [v_l], iters, warmup),
    }
    if r.backend == "torch":
        ms["rasterize.coverage"] = time_alone(clock, lambda: _coverage(pos, faces, H, H, r.coverage), [], iters, warmup)
        if r.coverage != "torch":
            ms["rasterize.coverage_torch"] = time_alone(clock, lambda: _coverage(pos, faces, H, H), [], iters, warmup)
        ms["antialias.opposite_vertices"] = time_alone(clock, lambda: opposite_vertices(faces, verts.shape[0]), [],
                                                       iters, warmup)
    for p in [d.sdf, d.deform, *colour_params]:
        p.grad = None
    return ms


# --------------------------------------------------------------------------------------------- plot
def plot(path: Path) -> Path:
    """Stacked bars per face count: the iteration's parts (left), the operations alone, forward +
    backward (right): `path` with .png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = json.loads(Path(path).read_text())
    rows = r["rows"]
    x = list(range(len(rows)))
    labels = [f"{row['faces']:,} faces\n{row['view_coverage']:.0%} of the view" for row in rows]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.4))
    bottom = [0.0] * len(rows)
    for part in ITERATION_PARTS:
        ms = [row["iteration_ms"][part] for row in rows]
        ax0.bar(x, ms, 0.6, bottom=bottom, label=part)
        bottom = [b + m for b, m in zip(bottom, ms)]
    for i, row in enumerate(rows):
        ax0.text(i, bottom[i], f"{row['iteration_ms']['iteration']:.1f}", ha="center", va="bottom", fontsize=8)
    ax0.set_title("one iteration (reference view, no priors)", fontsize=9)
    bottom = [0.0] * len(rows)
    for part in ALONE_PARTS:
        ms = [row["alone_ms"][part]["forward"] + (row["alone_ms"][part]["backward"] or 0.0) for row in rows]
        ax1.bar(x, ms, 0.6, bottom=bottom, label=part)
        bottom = [b + m for b, m in zip(bottom, ms)]
    ax1.set_title("each operation alone, forward + backward", fontsize=9)
    for ax in (ax0, ax1):
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylabel("ms")
        ax.legend(fontsize=7)
    cov = f" ({r['coverage']} coverage pass)" if r.get("coverage") not in (None, "torch") else ""
    fig.suptitle(f"fine stage mesh path — {r['device_name']}, {r['rasterizer']} rasteriser{cov}, "
                 f"{r['resolution']}², tet grid {r['tet_resolution']}³", fontsize=10)
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------- main
def _fmt_table(rows: list[dict]) -> str:
    head = (f"{'target':>9} {'faces':>9} {'verts':>8} {'k':>6} {'cover':>5} "
            + " ".join(f"{p[:8]:>8}" for p in ITERATION_PARTS) + f" {'iter':>8} {'peak GiB':>8}")
    lines = ["ms per part of one iteration", head]
    for row in rows:
        m = row["iteration_ms"]
        peak = row["peak_memory_gib"]
        lines.append(f"{row['target_faces']:>9,} {row['faces']:>9,} {row['verts']:>8,} {row['frequency']:>6.1f} "
                     f"{row['view_coverage']:>5.0%} " + " ".join(f"{m[p]:>8.2f}" for p in ITERATION_PARTS)
                     + f" {m['iteration']:>8.2f}"
                     + (f" {peak:>8.2f}" if peak is not None else f" {'-':>8}"))
    parts = [p for p in ALONE_PARTS + ALONE_SUBPARTS if p in rows[0]["alone_ms"]]
    short = {"marching_tets": "mtets", "rasterize": "raster", "vertex_normals": "vnormal", "interpolate": "interp",
             "colour_field": "colour", "antialias": "aa", "normal_consistency": "nc", "laplacian": "lap",
             "rasterize.coverage": "⊂cover", "rasterize.coverage_torch": "⊂cover(t)", "antialias.opposite_vertices": "⊂opp"}
    lines += ["", "ms of each operation alone, forward/backward (⊂: within the one before, forward only)",
              f"{'faces':>9} " + " ".join(f"{short[p]:>13}" for p in parts)]
    for row in rows:
        cells = []
        for p in parts:
            a = row["alone_ms"][p]
            bwd = f"{a['backward']:.2f}" if a["backward"] is not None else "-"
            cells.append(f"{a['forward']:.2f}/{bwd}")
        lines.append(f"{row['faces']:>9,} " + " ".join(f"{c:>13}" for c in cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="JSON file to write (and its .png)")
    ap.add_argument("--plot", type=Path, help="only draw the .png of a JSON this script wrote")
    ap.add_argument("--faces", default="80000,300000,1000000", help="target face counts, comma-separated (default: %(default)s)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    ap.add_argument("--preset", default="magic123", help="params preset (core.params.load_params)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params override (repeatable)")
    ap.add_argument("--tet-resolution", type=int, default=128, help="fine.tet_resolution (default: %(default)s)")
    ap.add_argument("--resolution", type=int, help="render size (default: the params' fine.resolution)")
    ap.add_argument("--rasterizer", choices=("auto", "torch", "nvdiffrast"),
                    help="fine.rasterizer (default: the params')")
    ap.add_argument("--grid-extent", type=float, default=1.1, help="the tet grid spans ±this on every axis (default: %(default)s)")
    ap.add_argument("--radius", type=float, default=0.45, help="the sphere's radius (default: %(default)s)")
    ap.add_argument("--amplitude", type=float, default=0.45, help="the displacement's amplitude A (default: %(default)s)")
    ap.add_argument("--iters", type=int, default=20, help="timed repetitions (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed repetitions first (default: %(default)s)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also torch.profiler's table of N iterations at each face count, to OUT_profile_FACES.txt")
    ap.add_argument("--profile-by", default="op", metavar="op,shape,stack",
                    help="the profile's tables: by operator, by its inputs' shapes, by the Python lines that "
                         "called it (comma-separated; default: %(default)s)")
    ap.add_argument("--profile-rows", type=int, default=40, help="rows of each profile table (default: %(default)s)")
    a = ap.parse_args(argv)
    if a.plot:
        print(f"wrote {plot(a.plot)}")
        return 0
    if not a.out:
        ap.error("--out is required (or --plot JSON)")
    if a.iters < 1 or a.warmup < 0:
        ap.error("--iters must be ≥ 1 and --warmup ≥ 0")
    targets = sorted(int(float(t)) for t in a.faces.split(","))

    import torch

    from core.params import load_params, parse_override
    from core.perf import peak_memory, profile_table, reset_peak_memory
    from core.rendering.cameras import reference_cameras
    from core.representations.nerf import NeRFField
    from core.stages.engine import erode_mask
    from core.stages.fine import DMTetRepresentation
    from core.stages.optim import build_optimizer

    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       "cpu" if a.device == "auto" else a.device)
    # the grid is scaled below, not to the random NeRF's density (fine.tet_rescale)
    over = {"fine.tet_resolution": a.tet_resolution, "fine.tet_rescale": False}
    if a.resolution:
        over["fine.resolution"] = a.resolution
    if a.rasterizer:
        over["fine.rasterizer"] = a.rasterizer
    over.update(dict(parse_override(s) for s in a.set))
    params = load_params(a.preset, over)
    res = params.fine.resolution
    torch.manual_seed(params.seed)
    field = NeRFField.from_params(params, device=dev)
    rep = DMTetRepresentation(params, field, dev)  # the fine stage's mesh, colour field and rasteriser
    rep.dmtet.set_scale(torch.full((3,), a.grid_extent / rep.dmtet.bound))
    optimizer = build_optimizer(rep.param_groups(), params.optimizer)
    cams = reference_cameras(params.camera, device=dev)
    clock = Clock(dev)
    # the highest frequency dialled: a wavelength of 5 grid cells (finer, the grid aliases the displacement
    # and the face count stops growing with k)
    k_max = 2.0 * math.pi / (5.0 * 2.0 * a.grid_extent / a.tet_resolution)
    print(f"fine_mesh_bench: {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}), "
          f"rasteriser {rep.backend}, hash grid {rep.colour.field.encoding.backend}, {res}², "
          f"tet grid {a.tet_resolution}³ over ±{a.grid_extent}", flush=True)

    rows = []
    for target in targets:
        t0 = time.perf_counter()
        k, faces = dial_faces(rep.dmtet, target, a.radius, a.amplitude, k_max)
        if faces == 0:
            print(f"fine_mesh_bench: no surface in the tet grid (--radius {a.radius}, --grid-extent {a.grid_extent})",
                  file=sys.stderr)
            return 2
        with torch.no_grad():
            mesh = rep.dmtet.extract()
            out = rep.render(cams, res, shading="albedo", light_dir=None, ambient=params.coarse.shading.ambient,
                             diffuse=params.coarse.shading.diffuse, mesh=mesh)
            mask = (out.opacity > 0.5).float()
            ref = {"rgb": torch.full_like(out.rgb, 0.5), "mask": mask,
                   "mask_eroded": erode_mask(mask, params.fine.mask_erode_px)}
        coverage = float(mask.mean())
        verts = int(mesh.verts.shape[0])
        del mesh, out
        print(f"  target {target:,}: k = {k:.2f} → {faces:,} faces, {verts:,} vertices, "
              f"{coverage:.0%} of the view covered ({time.perf_counter() - t0:.1f} s to dial)", flush=True)
        reset_peak_memory(dev)
        it = bench_iteration(rep, optimizer, cams, res, ref, params, clock, a.iters, a.warmup)
        gib, kind = peak_memory(dev)
        faces_after = rep.mesh.num_faces
        if a.profile > 0:
            table = profile_table(lambda: bench_iteration(rep, optimizer, cams, res, ref, params, clock, a.profile, 0), dev,
                                  rows=a.profile_rows, group=tuple(a.profile_by.split(",")), steps=a.profile)
            where = a.out.with_name(f"{a.out.stem}_profile_{faces}.txt")
            where.parent.mkdir(parents=True, exist_ok=True)
            where.write_text(f"fine_mesh_bench: {a.profile} iterations at {faces:,} faces, {res}², {dev}\n{table}\n")
            print(f"    profile: {where}", flush=True)
        alone = bench_alone(rep, cams, res, clock, a.iters, a.warmup)
        rows.append(dict(target_faces=target, faces=faces, faces_timed=faces_after, verts=verts, frequency=k,
                         view_coverage=coverage, iteration_ms={p: round(v, 4) for p, v in it.items()},
                         alone_ms={p: {kk: (round(vv, 4) if vv is not None else None) for kk, vv in m.items()}
                                   for p, m in alone.items()},
                         peak_memory_gib=round(gib, 3) if dev.type == "cuda" else None,
                         memory_kind=kind if dev.type == "cuda" else "not measured on the CPU"))
        print(f"    iteration {it['iteration']:.2f} ms: " + ", ".join(f"{p} {it[p]:.2f}" for p in ITERATION_PARTS),
              flush=True)
    result = dict(what="the fine stage's mesh path without the priors: one reference-view iteration part by part, "
                       "and each operation alone (forward/backward), at dialled face counts",
                  device=str(dev), device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                  torch=torch.__version__, rasterizer=rep.backend,
                  coverage=rep.rasterizer.coverage if rep.backend == "torch" else None, hash_grid=rep.colour.field.encoding.backend,
                  preset=a.preset, overrides=a.set, resolution=res, tet_resolution=a.tet_resolution,
                  grid_extent=a.grid_extent, radius=a.radius, amplitude=a.amplitude, k_max=k_max, iters=a.iters,
                  warmup=a.warmup, timer="CUDA events" if dev.type == "cuda" else "time.perf_counter", rows=rows)
    print()
    print(_fmt_table(rows))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out} and {plot(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
