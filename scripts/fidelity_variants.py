"""docs/fidelity.md items 2–7 side by side: the `--set` overrides of each variant.

    released   every item as the released code has it (Magic123@4090e94), scaled to the smoke run
    paper      every item as the papers read (or, where neither paper says, lift3d's earlier choice)
    paperK     released, with item group K (2, 3, 4, 5, 6 or 7) flipped to the paper's reading

The released run lengths are scaled to the smoke preset's 300 iterations and 6 grid levels: the
99-of-5,000 reference-only warm-up becomes 6 iterations, the finest 8 of 16 levels masked for 3,000 of
5,000 iterations becomes 3 of 6 for 180. Usage (reports/fidelity/items_2_7_smoke.json):

    python scripts/analytic_bench.py --out DIR --presets smoke --objects torus blocks snowman house.glb \\
        --no-oracle --tag released $(python scripts/fidelity_variants.py released)
    python scripts/fidelity_variants.py            # every variant's overrides as JSON

At the paper's lengths (`--size magic123`: the magic123 preset's own warm-up and level mask), on the
GPU machine (reports/analytic/gpu_analytic_magic123_s9.json, one process per object with --only):

    python scripts/analytic_bench.py --out DIR --presets magic123 --objects torus blocks snowman house.glb \\
        --no-oracle --tag paper --set device=cuda $(python scripts/fidelity_variants.py --size magic123 paper)
"""
from __future__ import annotations

import json
import sys

SMOKE_ITERS, SMOKE_LEVELS = 300, 6
# the released run's lengths (Magic123@4090e94: known_iters 100, progressive level mask of the finest
# 8 of 16 levels over 3,000 of 5,000 iterations) and the smoke run's share of them
LENGTHS = {"magic123": {"warmup": 99, "masked_levels": 8, "mask_iters": 3000},
           "smoke": {"warmup": round(99 / 5000 * SMOKE_ITERS),             # 6
                     "masked_levels": SMOKE_LEVELS * 8 // 16,              # 3
                     "mask_iters": round(3000 / 5000 * SMOKE_ITERS)}}      # 180
SIZES = tuple(LENGTHS)


def items(size: str = "smoke") -> dict[str, list[tuple[str, object, object]]]:
    """Item group → (key, released value, paper value), the lengths at `size` ('smoke' or 'magic123')."""
    n = LENGTHS[size]
    return {
        "2": [("sd.view_dependent_prompt", "true", "false")],
        "3": [("zero123.angle_weighting", "true", "false")],
        "4": [("camera.uniform_sphere_rate", 0.5, 0)],
        "5": [("coarse.novel_background", "random", "white"), ("fine.novel_background", "random", "white"),
              ("coarse.ref_warmup", n["warmup"], 0), ("fine.ref_warmup", n["warmup"], 0),
              ("coarse.ref_scale", 1.5, 1.0), ("coarse.ref_ray_noise", 0.001, 0.0),
              ("coarse.level_mask", "step", "none"),
              ("coarse.level_mask_levels", n["masked_levels"], n["masked_levels"]),
              ("coarse.level_mask_iters", n["mask_iters"], n["mask_iters"]), ("coarse.density_blob", "gaussian", "linear"),
              ("coarse.density_blob_std", 0.2, 0.5), ("coarse.density_blob_scale", 10, 10)],
        "6": [("coarse.normal_smooth_form", "released", "paper"), ("coarse.normal_smooth_blur_grad", "true", "true"),
              ("coarse.entropy_on", "samples", "opacity"), ("coarse.entropy_ramp", 0.5, 0)],
        "7": [("sd.fine_t_range", "[0.02,0.5]", "null"), ("zero123.fine_t_range", "[0.02,0.5]", "null"),
              ("fine.losses.depth", 0.0, 0.01), ("fine.tet_rescale", "true", "false"),
              ("fine.sdf_threshold", "mean_density", "mesh_threshold"), ("fine.sdf_scale", "unit", "threshold"),
              ("fine.laplacian_form", "unnormalised", "normalised")],
    }


def readings(size: str = "smoke") -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(released, paper): item group → its `--set KEY=VALUE` overrides in each reading."""
    it = items(size)
    return ({g: [f"{k}={r}" for k, r, _ in rows] for g, rows in it.items()},
            {g: [f"{k}={p}" for k, _, p in rows] for g, rows in it.items()})


ITEMS = items("smoke")
GROUPS = tuple(ITEMS)
RELEASED, PAPER = readings("smoke")
# the released values that are scaled to the smoke run rather than taken from the magic123 preset
SCALED = {"coarse.ref_warmup", "fine.ref_warmup", "coarse.level_mask_levels", "coarse.level_mask_iters"}


def variants(size: str = "smoke") -> dict[str, list[str]]:
    released, paper = readings(size)
    out = {"released": [s for g in GROUPS for s in released[g]], "paper": [s for g in GROUPS for s in paper[g]]}
    for g in GROUPS:
        out[f"paper{g}"] = [s for h in GROUPS for s in (paper if h == g else released)[h]]
    return out


def main(argv: list[str]) -> int:
    size = "smoke"
    if argv[:1] == ["--size"] and len(argv) > 1:
        size, argv = argv[1], argv[2:]
    if size not in SIZES:
        print(f"fidelity_variants: unknown size '{size}' (known: {', '.join(SIZES)})", file=sys.stderr)
        return 2
    v = variants(size)
    if not argv:
        print(json.dumps(v, indent=1))
        return 0
    if argv[0] not in v:
        print(f"fidelity_variants: unknown variant '{argv[0]}' (known: {', '.join(v)})", file=sys.stderr)
        return 2
    print(" ".join(f"--set {s}" for s in v[argv[0]]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
