"""The released Magic123 code's SDS balance, measured (docs/fidelity.md "SDS balance (item 1)").

guochengqian/Magic123 trains under fp16 autocast with a torch.cuda.amp.GradScaler (nerf/utils.py:292,
:1275-1298, :875). Its guidance applies the SDS gradient inside `train_step` with
`latents.backward(gradient=grad, retain_graph=True)` (guidance/sd_utils.py:378,
guidance/zero123_utils.py:241) and returns a *detached* loss, so the SDS gradient lands in `.grad`
unscaled, while the reference losses and regularisers go through `scaler.scale(loss).backward()`.
`scaler.unscale_` (post_train_step) then divides every gradient by the loss scale S.

Part 1 (`--iters 5000`, CPU, always): a small model trained along exactly that gradient path — an
fp16-autocast "renderer" shared by a reference view and a novel view, a frozen fp16 "encoder" to
latents, a synthetic SDS gradient injected with `latents.backward(gradient=g)`, a reference MSE and a
novel-view regulariser through torch.amp.GradScaler (the torch defaults the released code uses:
init 2^16, growth ×2 every 2000 finite steps, backoff ×0.5), Adam(betas (0.9, 0.99), eps 1e-15).
A probe added to the latents (a parameter the optimiser holds at lr 0) receives exactly the SDS
gradient, so after `unscale_` its gradient / g is the effective multiplier, measured at every
novel-view iteration. The same run with the SDS as a surrogate loss through the scaler (as
Consistent123's code and lift3d do) is the face-value control. It also measures the SDS's share of
Adam's step (Adam's first moment is linear in the gradients, so the step splits exactly into an
SDS part and the rest) for a parameter the reference view shares and for one only the novel view
reaches (SDS + a regulariser), for a sweep of face-value SDS:reference gradient ratios.

Part 2 (`--headroom`, optional; best on a GPU): fp16 overflow of the *reference* side. With lift3d's
coarse NeRF (the magic123 preset's sizes: 128², hash grid 16 × 2^19) on a benchmark image, trained
on the reference view and the regularisers alone, it records the largest gradient element of the
tensors the released code holds in fp16 (hash-table entries, MLP weights and activations) at loss
scale 1. The scaled value overflows fp16 (65504) once S × max|g| > 65504: the scale at which the
GradScaler would halve.

Writes reports/fidelity/sds_balance.json, sds_balance.csv, sds_balance.png (and
sds_headroom.json with --headroom).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.guidance.sds import loss_scale_at, sds_gradient_multiplier  # noqa: E402

FP16_MAX = 65504.0


# ------------------------------------------------------------------------------------------- part 1
class TinyScene(nn.Module):
    """A stand-in for the NeRF: an MLP from fixed per-pixel codes to rgb, shared by both views, plus
    a per-view colour offset ('ref_only' is seen by the reference view only, 'sds_only' by the
    novel view only)."""

    def __init__(self, pixels: int = 64, code: int = 16, hidden: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("codes_ref", torch.randn(pixels, code, generator=g))
        self.register_buffer("codes_novel", torch.randn(pixels, code, generator=g))
        self.shared = nn.Sequential(nn.Linear(code, hidden), nn.ReLU(), nn.Linear(hidden, 3))
        self.ref_only = nn.Parameter(torch.zeros(3))
        self.sds_only = nn.Parameter(torch.zeros(pixels, 3))
        self.side = int(math.isqrt(pixels))

    def render(self, view: str) -> torch.Tensor:
        codes = self.codes_ref if view == "ref" else self.codes_novel
        rgb = self.shared(codes) + (self.ref_only if view == "ref" else self.sds_only)
        return torch.sigmoid(rgb.float()).t().reshape(1, 3, self.side, self.side)


def train_tiny(iters: int, released: bool, sds_to_ref: float, ref_every: int = 4, known_iters: int = 100,
               seed: int = 0, lr: float = 1e-3) -> dict:
    """One run along the released gradient path (released=True) or with the SDS as a surrogate loss
    through the scaler (released=False). The synthetic SDS gradient pulls the novel view's latents
    towards a target: g = c·(z − z*)/rms(z − z*), c = `sds_to_ref` × the reference loss's gradient
    RMS on its render at the start (the toy's knob for the face-value balance).

    Per iteration it records the loss scale, the measured multiplier (probe gradient / g after
    unscale_) and, per parameter class, the SDS share of Adam's step: Adam's first moment is linear
    in the gradients, so m = m_SDS + m_other and the step lr·m̂/(√v̂ + ε) splits exactly into an SDS
    part and the rest; share = |u_SDS| / (|u_SDS| + |u_other|)."""
    torch.manual_seed(seed)
    scene = TinyScene(seed=seed)
    encoder = nn.Conv2d(3, 4, 2, stride=2)  # frozen, like the VAE encoder (fp16 under autocast)
    encoder.requires_grad_(False)
    probe = nn.Parameter(torch.zeros(1, 4, scene.side // 2, scene.side // 2))
    opt = torch.optim.Adam([{"params": scene.parameters()}, {"params": [probe], "lr": 0.0}],
                           lr=lr, betas=(0.9, 0.99), eps=1e-15)
    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0, growth_factor=2.0, backoff_factor=0.5,
                                  growth_interval=2000)
    gen = torch.Generator().manual_seed(seed + 1)
    target = torch.rand(1, 3, scene.side, scene.side, generator=gen)
    with torch.no_grad():
        z_star = encoder(torch.rand(1, 3, scene.side, scene.side, generator=gen))  # what the "prior" wants
    tracked = {"shared": scene.shared[0].weight, "sds_only": scene.sds_only}
    m_sds = {k: torch.zeros_like(v) for k, v in tracked.items()}
    m_oth = {k: torch.zeros_like(v) for k, v in tracked.items()}
    ref_rms = None
    rows = []
    for global_step in range(1, iters + 1):  # the released trainer counts from 1 (nerf/utils.py:1271)
        opt.zero_grad(set_to_none=True)
        scale_used = scaler.get_scale()
        is_ref = global_step < known_iters or global_step % ref_every == 0  # nerf/utils.py:552-553
        g_rms, sds_raw = 0.0, None
        with torch.autocast("cpu", dtype=torch.float16):
            if is_ref:
                img = scene.render("ref")
                loss = 5.0 * F.mse_loss(img, target)  # λ_rgb · MSE
                if ref_rms is None:
                    with torch.autocast("cpu", enabled=False):
                        gi = torch.autograd.grad(5.0 * F.mse_loss(img.float(), target), img, retain_graph=True)[0]
                    ref_rms = float(gi.pow(2).mean().sqrt())
            else:
                img = scene.render("novel")
                latents = encoder(img) + probe  # the encoder in fp16; the probe adds exactly 0
                d = (latents.detach().float() - z_star)
                g = d / d.pow(2).mean().sqrt().clamp_min(1e-12) * (sds_to_ref * ref_rms)
                g_rms = float(g.pow(2).mean().sqrt())
                reg = 1e-3 * img.pow(2).mean()  # a novel-view regulariser (entropy/orientation stand-in)
                if released:
                    # the released guidance: the gradient goes in here, outside the scaler, and the
                    # returned SDS loss is detached (guidance/sd_utils.py:378-379)
                    latents.backward(gradient=g.to(latents.dtype), retain_graph=True)
                    sds_raw = {k: v.grad.detach().clone() for k, v in tracked.items()}  # × 1, not × S
                    loss = reg
                else:
                    # the SDS as a surrogate loss whose gradient is g, through the scaler
                    surrogate = (g.to(latents.dtype) * latents).sum()
                    scaler.scale(surrogate).backward(retain_graph=True)
                    sds_raw = {k: v.grad.detach().clone() for k, v in tracked.items()}  # S × the SDS part
                    loss = reg
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # post_train_step (nerf/utils.py:875)
        mult = None
        parts = {}
        if not is_ref:
            pg = probe.grad
            mult = float((pg.float() * g).sum() / g.pow(2).sum()) if pg is not None else 0.0
        for k, v in tracked.items():
            total = v.grad.detach().clone() if v.grad is not None else torch.zeros_like(v)
            # after unscale_: (S·SDS)/S face value; (raw SDS)/S released
            sds = sds_raw[k] / scale_used if sds_raw is not None else torch.zeros_like(v)
            parts[k] = (sds, total - sds)
        scaler.step(opt)
        scaler.update()
        skipped = scaler.get_scale() < scale_used
        row = {"iteration": global_step - 1, "loss_scale": scale_used, "reference_view": int(is_ref),
               "measured_multiplier": mult, "schedule_multiplier": sds_gradient_multiplier(global_step - 1),
               "sds_grad_rms": g_rms, "skipped": int(skipped)}
        for k, v in tracked.items():
            if not skipped:
                m_sds[k].mul_(0.9).add_(parts[k][0], alpha=0.1)
                m_oth[k].mul_(0.9).add_(parts[k][1], alpha=0.1)
            st = opt.state.get(v, {})
            denom = st["exp_avg_sq"].sqrt() + 1e-15 if "exp_avg_sq" in st else torch.ones_like(v)
            us, uo = float((m_sds[k] / denom).norm()), float((m_oth[k] / denom).norm())
            row[f"sds_share_{k}"] = us / (us + uo) if us + uo > 0 else 0.0
        rows.append(row)
    return {"rows": rows, "ref_grad_rms": ref_rms}


def summarise_schedule(rows: list[dict]) -> dict:
    novel = [r for r in rows if r["measured_multiplier"] is not None]
    rel_err = max(abs(r["measured_multiplier"] * r["loss_scale"] - 1.0) for r in novel)
    changes = [(r["iteration"], r["loss_scale"]) for i, r in enumerate(rows)
               if i == 0 or r["loss_scale"] != rows[i - 1]["loss_scale"]]
    by_phase = {}
    for it, s in changes:
        by_phase[str(it)] = {"loss_scale": s, "multiplier": 1.0 / s}
    mults = [r["measured_multiplier"] for r in novel]
    return {"scale_changes": by_phase, "max_rel_error_measured_vs_1_over_scale": rel_err,
            "skipped_steps": sum(r["skipped"] for r in rows),
            "measured_multiplier_min": min(mults), "measured_multiplier_max": max(mults),
            "mean_multiplier_over_novel_views": sum(mults) / len(mults),
            "schedule_check": {str(i): sds_gradient_multiplier(i) for i in (0, 1999, 2000, 3999, 4000, 4999)}}


def adam_sweep(iters: int, ratios: list[float]) -> list[dict]:
    """The SDS share of Adam's step (iterations 1000–1999 and 4000–4999, mean) for the shared and
    the SDS-only parameters, face value vs released, for face-value SDS:reference gradient ratios."""
    out = []
    for ratio in ratios:
        row = {"sds_to_ref": ratio}
        for name, released in (("face_value", False), ("released", True)):
            rows = train_tiny(iters, released, ratio)["rows"]
            row[f"{name}_skipped_steps"] = sum(r["skipped"] for r in rows)
            for lo, hi in ((1000, 2000), (4000, 5000)):
                if hi > iters:
                    continue
                sel = [r for r in rows if lo <= r["iteration"] < hi]
                for k in ("shared", "sds_only"):
                    row[f"{name}_sds_share_{k}_{lo}"] = sum(r[f"sds_share_{k}"] for r in sel) / len(sel)
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def transient(rows: list[dict], at: int, key: str = "sds_share_sds_only") -> dict:
    """The SDS share of the step in 50-iteration windows around a doubling of the scale at `at`."""
    out = {}
    for lo in range(at - 100, at + 300, 50):
        sel = [r[key] for r in rows if lo <= r["iteration"] < lo + 50]
        if sel:
            out[f"{lo}-{lo + 49}"] = sum(sel) / len(sel)
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [r["iteration"] for r in rows if r["measured_multiplier"] is not None]
    meas = [r["measured_multiplier"] for r in rows if r["measured_multiplier"] is not None]
    sched = [r["schedule_multiplier"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot([r["iteration"] for r in rows], sched, color="k", lw=1, label="1 / loss scale (GradScaler schedule)")
    ax.scatter(it[::10], meas[::10], s=4, color="tab:red", label="measured: SDS gradient reaching the parameters / g")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("iteration of the stage")
    ax.set_ylabel("effective SDS multiplier")
    ax.set_title("Magic123 released code: SDS gradient ÷ fp16 loss scale")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- part 2
def headroom(image: str, depth: str | None, iters: int, every: int, device: str, preset: str = "magic123") -> dict:
    """Largest fp16-held gradient element of the reference loss and the novel-view regularisers at
    loss scale 1, along a lift3d coarse run without guidance (the magic123 preset's sizes)."""
    from core.inputs.images import load_reference
    from core.params import load_params
    from core.rendering.cameras import reference_cameras, sample_cameras
    from core.stages.coarse import make_coarse_stage
    from core.stages.losses import pearson_depth_loss, reference_mask_loss, reference_rgb_loss

    p = load_params(preset, {"guidance.kind": "none", "device": device, "coarse.iters": max(iters, 1)})
    dev = torch.device(device)
    ref = load_reference(image, depth, size=p.coarse.resolution, object_scale=p.segment.object_scale, params=p)
    stage = make_coarse_stage(p, ref, guidance=None, device=dev)
    rep = stage.rep
    lin = [m for m in rep.field.mlp if isinstance(m, nn.Linear)]
    acts: list[torch.Tensor] = []

    def hook(_m, _i, o):
        if o.requires_grad:  # not in the occupancy grid's no-grad queries
            o.retain_grad()
            acts.append(o)

    handles = [m.register_forward_hook(hook) for m in lin]
    gen = torch.Generator().manual_seed(0)
    snaps = []
    c = p.coarse

    def census(kind: str) -> dict:
        acts.clear()
        rep.field.zero_grad(set_to_none=True)
        if kind == "reference":
            out = rep.render(stage.ref_cameras, c.resolution, shading="albedo", light_dir=None, ambient=1.0,
                             diffuse=0.0, generator=gen)
            loss = c.losses.rgb * reference_rgb_loss(out.rgb, stage.ref_rgb, stage.ref_mask_eroded) + \
                c.losses.mask * reference_mask_loss(out.opacity, stage.ref_mask)
            if stage.ref_depth is not None:
                loss = loss + c.losses.depth * pearson_depth_loss(-out.depth, stage.ref_depth, stage.ref_mask)
        else:
            cams = sample_cameras(p.camera, 1, gen, device=dev)
            out = rep.render(cams, c.resolution, shading="lambertian",
                             light_dir=cams.centers / cams.centers.norm(dim=-1, keepdim=True), ambient=0.1,
                             diffuse=0.9, generator=gen)
            loss = sum(w * t for w, t in rep.regularisers(out).values())
        if not loss.requires_grad:
            return {}
        loss.backward()
        table = max(float(q.grad.abs().max()) for q in rep.field.encoding.parameters() if q.grad is not None)
        weights = max(float(m.weight.grad.abs().max()) for m in lin if m.weight.grad is not None)
        act = max((float(a.grad.abs().max()) for a in acts if a.grad is not None), default=0.0)
        worst = max(table, weights, act)
        return {"table": table, "mlp_weights": weights, "mlp_activations": act, "max": worst,
                "overflow_scale": FP16_MAX / worst if worst > 0 else float("inf")}

    t0 = time.time()
    for step in range(iters + 1):
        if step % every == 0 or step == iters:
            snaps.append({"step": step, "reference": census("reference"), "novel_regularisers": census("novel")})
            print(f"headroom step {step}: {snaps[-1]}", flush=True)
        if step < iters:
            stage.step()
    for h in handles:
        h.remove()
    worst = min(min(s["reference"].get("overflow_scale", float("inf")),
                    s["novel_regularisers"].get("overflow_scale", float("inf"))) for s in snaps)
    return {"image": image, "preset": preset, "iters": iters, "device": device, "seconds": round(time.time() - t0, 1),
            "snapshots": snaps, "lowest_overflow_scale": worst,
            "largest_schedule_scale": loss_scale_at(4999),
            "would_overflow_within_5000": worst < loss_scale_at(4999)}


# ------------------------------------------------------------------------------------------- part 3
def score_run(run_dir: str) -> dict:
    """A coarse run folder's reference-view PSNR (renders/reference.png against reference_rgba.png,
    both alpha-composited on white) and its mesh.obj's largest connected component's share of faces."""
    import numpy as np
    from PIL import Image

    d = Path(run_dir)

    def on_white(path: Path) -> np.ndarray:
        a = np.asarray(Image.open(path).convert("RGBA"), dtype=np.float64) / 255.0
        return a[..., :3] * a[..., 3:] + (1.0 - a[..., 3:])

    ren, ref = on_white(d / "renders" / "reference.png"), on_white(d / "reference_rgba.png")
    if ren.shape != ref.shape:
        ref = np.asarray(Image.fromarray((ref * 255).round().astype(np.uint8)).resize(ren.shape[1::-1], Image.BICUBIC),
                         dtype=np.float64) / 255.0
    mse = float(((ren - ref) ** 2).mean())
    out = {"run": str(d), "psnr_reference": 10 * math.log10(1.0 / max(mse, 1e-12))}
    try:
        import trimesh

        mesh = trimesh.load(d / "mesh.obj", force="mesh", process=False)
        parts = mesh.split(only_watertight=False)
        n = int(len(mesh.faces))
        largest = max((int(len(q.faces)) for q in parts), default=0)
        out.update({"faces": n, "components": len(parts), "largest_component_share": largest / n if n else 0.0})
    except Exception as e:  # noqa: BLE001 - a missing/empty mesh is a result too
        out["mesh_error"] = f"{type(e).__name__}: {e}"
    return out


def render_checkpoint(run_dir: str, image: str, depth: str | None) -> str:
    """A coarse run's checkpoint (e.g. of a run still under way) → renders/, reference_rgba.png and
    mesh.obj in RUN/at_STEP, as the stage writes them at its end; returns that folder."""
    from core.inputs.images import load_reference
    from core.params import Params
    from core.stages.coarse import NeRFRepresentation, write_outputs
    from core.stages.engine import read_state

    state = read_state(Path(run_dir) / "checkpoint.pt", "coarse")
    p = Params.model_validate(state.params)
    ref = load_reference(image, depth, size=p.coarse.resolution, max_pixels=p.segment.max_input_pixels,
                         object_scale=p.segment.object_scale, recenter=p.segment.recenter, params=p)
    rep = NeRFRepresentation(p, torch.device("cpu"))
    rep.load_state_dict(state.representation)
    out = Path(run_dir) / f"at_{state.step}"
    write_outputs(rep, p, ref, out)
    return str(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=5000)
    ap.add_argument("--sds-to-ref", type=float, default=100.0,
                    help="face-value SDS gradient RMS on the latents / reference-loss gradient RMS on the render")
    ap.add_argument("--sweep", type=float, nargs="*", default=[1.0, 1e2, 1e3, 1e4, 1e5, 1e6])
    ap.add_argument("--out", default=str(ROOT / "reports" / "fidelity"))
    ap.add_argument("--headroom", action="store_true")
    ap.add_argument("--image", default="/work/shared/benchmarks/realfusion15/teddy_bear/rgba.png")
    ap.add_argument("--depth", default="/work/shared/benchmarks/realfusion15/teddy_bear/depth.png")
    ap.add_argument("--headroom-iters", type=int, default=2000)
    ap.add_argument("--headroom-every", type=int, default=250)
    ap.add_argument("--headroom-preset", default="magic123")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-part1", action="store_true")
    ap.add_argument("--score", nargs="*", default=[], help="coarse run folders to score (part 3)")
    ap.add_argument("--from-checkpoint", action="store_true",
                    help="score the runs' latest checkpoints (written to RUN/at_STEP first)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not a.skip_part1:
        torch.set_num_threads(1)
        run = train_tiny(a.iters, True, a.sds_to_ref)
        rows = run["rows"]
        control = train_tiny(a.iters, False, a.sds_to_ref)["rows"]
        ctrl = [r["measured_multiplier"] for r in control if r["measured_multiplier"] is not None]
        summary = summarise_schedule(rows)
        summary["control_surrogate_through_scaler"] = {"multiplier_min": min(ctrl), "multiplier_max": max(ctrl)}
        summary["adam_sds_share_around_scale_growth"] = {
            k: {str(at): transient(rows, at, f"sds_share_{k}") for at in (2000, 4000) if at < a.iters}
            for k in ("shared", "sds_only")}
        summary["adam_sweep"] = adam_sweep(a.iters, a.sweep)
        summary["setup"] = {"iters": a.iters, "sds_to_ref": a.sds_to_ref, "ref_every": 4, "known_iters": 100,
                            "adam": {"betas": [0.9, 0.99], "eps": 1e-15, "lr": 1e-3},
                            "grad_scaler": {"init_scale": 65536, "growth_factor": 2, "backoff_factor": 0.5,
                                            "growth_interval": 2000}, "torch": torch.__version__}
        (out / "sds_balance.json").write_text(json.dumps(summary, indent=2))
        with open(out / "sds_balance.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        plot(rows, out / "sds_balance.png")
        print(json.dumps({k: v for k, v in summary.items() if k != "adam_sweep"}, indent=2))
        print(json.dumps(summary["adam_sweep"], indent=2))
    if a.headroom:
        h = headroom(a.image, a.depth, a.headroom_iters, a.headroom_every, a.device, a.headroom_preset)
        (out / "sds_headroom.json").write_text(json.dumps(h, indent=2))
        print(json.dumps({k: v for k, v in h.items() if k != "snapshots"}, indent=2))
    if a.score:
        dirs = [render_checkpoint(d, a.image, a.depth) for d in a.score] if a.from_checkpoint else a.score
        scores = [score_run(d) for d in dirs]
        (out / ("teddy_scores_checkpoints.json" if a.from_checkpoint else "teddy_scores.json")).write_text(
            json.dumps(scores, indent=2))
        print(json.dumps(scores, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
