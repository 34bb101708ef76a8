"""`lift3d bench speed`: ms per coarse iteration with both priors at full size, seconds per 100
textual-inversion steps, peak GPU memory. Writes DIR/speed.json and prints a table.

The real architectures (SD 1.5 UNet / VAE / text encoder, Zero-1-to-3's 8-channel UNet and CLIP
ViT-L/14 image encoder, cc_projection) are built from the configs in core/testmodels/fullsize/ with random
weights: they cost exactly what the real weights cost (DESIGN.md, "How we know it works"). The
prompt goes through a small stand-in tokenizer (token ids only; the cost is the text encoder's).
`--tiny` uses the tiny random priors instead (a CPU check of this code path, not a benchmark).
"""
from __future__ import annotations

import json
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from core.errors import Lift3DError
from core.params import load_params, resolve_device
from core.testmodels.fullsize_priors import build_fullsize_parts, sd_arch_of

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def build_tiny_parts(device: torch.device, dtype: torch.dtype, params):
    from core.guidance.sd import load_stable_diffusion
    from core.guidance.zero123 import load_zero123
    from core.testmodels import tiny_root
    from core.testmodels.priors import ensure_tiny_models

    paths = ensure_tiny_models(tiny_root(params))
    return (load_stable_diffusion(paths["sd"], device, dtype), load_zero123(paths["zero123"], device, dtype))


class _Scene:
    """What the priors guide: a NeRF (core.representations.nerf) rendered at the coarse resolution when
    available, else a learnable image of that size."""

    def __init__(self, params, device: torch.device, kind: str = "auto"):
        self.params, self.device = params, device
        self.res = params.coarse.resolution
        try:
            if kind == "image":
                raise RuntimeError("a learnable image was asked for")
            from core.representations.nerf import NeRFField, render

            self.field = NeRFField.from_params(params, device=device)
            self._render = render
            self.kind = f"NeRF (core.representations.nerf), {self.res}x{self.res}, {params.coarse.samples_per_ray} samples/ray, lambertian"
            self.opt = torch.optim.Adam(self.field.parameters(), lr=params.coarse.lr)
        except Exception as e:  # noqa: BLE001 - say which stand-in was used
            log.warning("bench speed: no NeRF renderer (%s); a learnable image stands in", e)
            self.field = None
            self.image = torch.nn.Parameter(torch.rand(1, 3, self.res, self.res, device=device))
            self.kind = f"learnable image {self.res}x{self.res} (core.representations.nerf unavailable)"
            self.opt = torch.optim.Adam([self.image], lr=params.coarse.lr)
        self.gen = torch.Generator().manual_seed(0)

    def batch(self, step: int, total: int):
        from core.rendering.cameras import sample_cameras
        from core.guidance.base import RenderBatch

        cams = sample_cameras(self.params.camera, 1, self.gen, device=self.device)
        if self.field is not None:
            light = torch.nn.functional.normalize(cams.centers, dim=-1)
            try:
                r = self._render(self.field, cams, self.res, samples_per_ray=self.params.coarse.samples_per_ray,
                                 shading="lambertian", light_dir=light, perturb=True, generator=self.gen)
                return RenderBatch(rgb=r.rgb, opacity=r.opacity, depth=r.depth, normal=r.normal, cameras=cams,
                                   shading="lambertian", light_dir=light, step=step, total_steps=total)
            except Exception as e:  # noqa: BLE001 - fall back to the stand-in, and say so
                log.warning("bench speed: the NeRF render failed (%s); a learnable image stands in", e)
                self.field = None
                self.image = torch.nn.Parameter(torch.rand(1, 3, self.res, self.res, device=self.device))
                self.kind = (f"learnable image {self.res}x{self.res} (core.representations.nerf render failed: "
                             f"{type(e).__name__}: {str(e)[:200]})")
                self.opt = torch.optim.Adam([self.image], lr=self.params.coarse.lr)
        rgb = torch.sigmoid(self.image)
        return RenderBatch(rgb=rgb, opacity=torch.ones_like(rgb[:, :1]), depth=torch.zeros_like(rgb[:, :1]),
                           normal=None, cameras=cams, shading="albedo", light_dir=None, step=step, total_steps=total)


def _time_iterations(scene: _Scene, guidance, iters: int, warmup: int, device) -> dict[str, Any]:
    def one(step: int) -> None:
        batch = scene.batch(step, iters + warmup)
        out = guidance(batch)
        out.loss.backward()
        scene.opt.step()
        scene.opt.zero_grad(set_to_none=True)

    for i in range(warmup):
        one(i)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        one(warmup + i)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000.0)
    res = {"median_ms": round(statistics.median(times), 2), "mean_ms": round(statistics.fmean(times), 2),
           "min_ms": round(min(times), 2), "iters": iters, "warmup": warmup}
    if device.type == "cuda":
        res["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    return res


def _time_textual_inversion(sd_parts, params, steps: int, device) -> dict[str, Any]:
    from core.guidance.textual_inversion import learn_token

    ti = params.textual_inversion
    rgb = torch.ones(3, 256, 256)
    rgb[:, 64:192, 80:176] = torch.tensor([0.7, 0.3, 0.2])[:, None, None]
    mask = torch.zeros(1, 256, 256)
    mask[:, 64:192, 80:176] = 1
    stamps: list[float] = []

    def cb(step: int, loss: float) -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    learn_token(sd_parts, rgb, mask, token="<bench>", initializer="object", steps=steps, lr=ti.lr,
                batch_size=ti.batch_size, resolution=params.sd.resolution, seed=0, callback=cb)
    warm = min(3, steps - 2)
    per_step = (stamps[-1] - stamps[warm - 1]) / (len(stamps) - warm)
    res = {"seconds_per_100_steps": round(per_step * 100.0, 2), "steps_timed": len(stamps) - warm,
           "warmup_steps": warm, "batch_size": ti.batch_size, "resolution": params.sd.resolution}
    if device.type == "cuda":
        res["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    return res


def run_speed_bench(params, device: torch.device, *, iters: int = 20, tiny: bool = False,
                    compile_modes: tuple[str, ...] = (), ti_steps: int = 23, out: Path | None = None,
                    time_budget_s: float = 480.0, scene: str = "auto") -> dict[str, Any]:
    from core.guidance.priors import JointPrior
    from core.guidance.sd import StableDiffusionGuidance, weights_dtype
    from core.guidance.zero123 import Zero123Guidance
    from core.rendering.cameras import reference_cameras

    t_start = time.perf_counter()
    dtype = weights_dtype(device, params.sd.fp16)
    t0 = time.perf_counter()
    sd_parts, z_parts = (build_tiny_parts(device, dtype, params) if tiny
                        else build_fullsize_parts(device, dtype, sd_arch_of(params.sd.model)))
    build_s = time.perf_counter() - t0
    prompt = params.prompt.template.replace("{text}", "a chair").replace(params.textual_inversion.placeholder, "a chair")
    sd = StableDiffusionGuidance(sd_parts, prompt, guidance_scale=params.sd.guidance_scale, t_range=params.sd.t_range,
                                 resolution=params.sd.resolution, seed=params.seed,
                                 view_dependent=params.sd.view_dependent_prompt,
                                 reference_azimuth=params.camera.ref_azimuth)
    ref = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(1))
    z = Zero123Guidance(z_parts, ref, reference_cameras(params.camera), guidance_scale=params.zero123.guidance_scale,
                        t_range=params.zero123.t_range, resolution=params.zero123.resolution, seed=params.seed,
                        angle_weighting=params.zero123.angle_weighting)
    w = params.guidance.coarse
    scene = _Scene(params, device, scene)
    result: dict[str, Any] = {
        "command": "lift3d bench speed", "stage": "coarse", "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
        "models": "tiny random (core.testmodels.priors)" if tiny else "full-size random weights (core/testmodels/fullsize/*.json)",
        "parameters_millions": {k: round(_n_params(m) / 1e6, 1) for k, m in {
            "sd_unet": sd_parts.unet, "sd_vae": sd_parts.vae, "sd_text_encoder": sd_parts.text_encoder,
            "zero123_unet": z_parts.unet, "zero123_image_encoder": z_parts.image_encoder,
            "zero123_vae": z_parts.vae}.items()},
        "render": scene.kind, "sd_resolution": params.sd.resolution, "zero123_resolution": params.zero123.resolution,
        "guidance_scales": {"sd": params.sd.guidance_scale, "zero123": params.zero123.guidance_scale},
        "lambdas": {"lambda_2d": w.lambda_2d, "lambda_3d": w.lambda_3d}, "build_seconds": round(build_s, 1),
        "coarse_iteration": {}, "prior_only": {},
    }

    def save() -> None:
        if out is not None:
            (out / "speed.json").write_text(json.dumps(result, indent=2))

    warm = 3
    result["coarse_iteration"]["eager"] = _time_iterations(scene, JointPrior(sd, z, w.lambda_2d, w.lambda_3d), iters,
                                                           warm, device)
    result["prior_only"]["eager_sd"] = _time_iterations(scene, JointPrior(sd, None, w.lambda_2d, 0.0), iters, warm, device)
    result["prior_only"]["eager_zero123"] = _time_iterations(scene, JointPrior(None, z, 0.0, w.lambda_3d), iters, warm,
                                                             device)
    result["render"] = scene.kind
    save()
    result["textual_inversion"] = _time_textual_inversion(sd_parts, params, ti_steps, device)
    save()
    eager_unets = (sd_parts.unet, z_parts.unet)
    for mode in compile_modes:
        if time.perf_counter() - t_start > time_budget_s:
            result["coarse_iteration"][f"compile-{mode}"] = "skipped: time budget"
            break
        torch._dynamo.reset()
        sd_parts.unet = torch.compile(eager_unets[0], mode=mode, dynamic=False)
        z_parts.unet = torch.compile(eager_unets[1], mode=mode, dynamic=False)
        t0 = time.perf_counter()
        try:
            r = _time_iterations(scene, JointPrior(sd, z, w.lambda_2d, w.lambda_3d), iters, warm, device)
            r["warmup_incl_compile_s"] = round(time.perf_counter() - t0, 1)
            result["coarse_iteration"][f"compile-{mode}"] = r
        except Exception as e:  # noqa: BLE001 - a compile failure is a finding, not a crash
            result["coarse_iteration"][f"compile-{mode}"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
        save()
    sd_parts.unet, z_parts.unet = eager_unets
    result["render"] = scene.kind
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    save()
    return result


def format_table(r: dict[str, Any]) -> str:
    lines = [f"bench speed — {r['gpu']} ({r['device']}), {r['dtype']}, {r['models']}", f"render: {r['render']}", "",
             f"{'what':44s} {'median ms':>10s} {'mean ms':>10s} {'peak GiB':>9s}"]
    rows = [(f"coarse iteration, both priors ({k})", v) for k, v in r["coarse_iteration"].items()]
    rows += [(f"coarse iteration, {k.split('_', 1)[1]} prior only (eager)", v) for k, v in r["prior_only"].items()]
    for name, v in rows:
        if isinstance(v, dict):
            lines.append(f"{name:44s} {v['median_ms']:10.1f} {v['mean_ms']:10.1f} {v.get('peak_memory_gib', float('nan')):9.2f}")
        else:
            lines.append(f"{name:44s} {v}")
    ti = r.get("textual_inversion")
    if ti:
        lines.append(f"textual inversion: {ti['seconds_per_100_steps']:.1f} s per 100 steps (batch {ti['batch_size']}, "
                     f"{ti['resolution']}², peak {ti.get('peak_memory_gib', float('nan')):.2f} GiB)")
    return "\n".join(lines)


def cli_bench_speed(args) -> int:
    params = load_params(args.preset, args.overrides, getattr(args, "params", None))
    device = resolve_device(params)
    tiny = bool(getattr(args, "tiny", False))
    if device.type != "cuda" and not tiny:
        raise Lift3DError("bench speed measures full-size priors on a GPU; no CUDA device here "
                          "(use --tiny to check the code path on the CPU)")
    out = Path(args.out)
    if args.stage == "asset":  # run_asset_bench checks --stages before it makes OUT
        from flows.bench_asset import STAGES, format_asset_table, format_assets_in_process, run_assets_in_process

        if tiny:
            from core.params import apply_overrides

            params = apply_overrides(params, ["models.tiny=true"])
        models = getattr(args, "models_dir", None)
        stages = tuple(x.strip() for x in (getattr(args, "stages", None) or ",".join(STAGES)).split(",") if x.strip())
        cache = getattr(args, "compile_cache", None)
        rs = run_assets_in_process(int(getattr(args, "assets", 1)), params, device, out,
                                   models_dir=Path(models) if models else None,
                                   image=Path(args.image) if getattr(args, "image", None) else None,
                                   depth=Path(args.depth) if getattr(args, "depth", None) else None, tiny=tiny,
                                   profile_steps=getattr(args, "profile", 0) or 0,
                                   profile_after=getattr(args, "profile_after", 0) or 0,
                                   profile_by=tuple(x.strip() for x in (getattr(args, "profile_by", None) or "op").split(",")),
                                   sync_audit=bool(getattr(args, "sync_audit", False)),
                                   metrics_callback=bool(getattr(args, "metrics_callback", False)),
                                   stages=stages, compile_cache=Path(cache) if cache else None)
        for r in rs:
            print(format_asset_table(r))
        if len(rs) > 1:
            print(format_assets_in_process(rs[0]))
        print(f"wrote {out / 'speed.json'}" + (f" (and asset_2 … asset_{len(rs)}/speed.json)" if len(rs) > 1 else ""))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    modes = tuple(m for m in (getattr(args, "compile", "") or "").split(",") if m)
    r = run_speed_bench(params, device, iters=args.iters, tiny=tiny, compile_modes=modes,
                        ti_steps=getattr(args, "ti_steps", 23), out=out)
    print(format_table(r))
    print(f"wrote {out / 'speed.json'}")
    return 0
