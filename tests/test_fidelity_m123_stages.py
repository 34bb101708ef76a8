"""The stage settings of the authors' released code (docs/fidelity.md, items 5, 6, 7 and 12), each
against numbers worked out by hand from the released definition.

Released code: guochengqian/Magic123 at 4090e94 (main.py, nerf/utils.py, nerf/renderer.py,
nerf/network_grid.py) and lyk412/Consistent123 at 6df4059 (main.py, nerf/utils.py, optimizer.py).
"""
from __future__ import annotations

import math

import pytest
import torch

from core.inputs.images import Reference
from core.params import load_params
from core.rendering.batch import RenderBatch
from core.rendering.cameras import reference_cameras
from core.representations.dmtet import DMTet
from core.representations.nerf import NeRFField, render
from core.stages.coarse import NeRFRepresentation, active_levels, coarse_spec, ramp, reference_resolution
from core.stages.engine import Stage, StageSpec, composite_background
from core.stages.fine import fine_spec, sdf_level
from core.stages.losses import (entropy_loss, gaussian_blur, mesh_laplacian_loss, mesh_laplacian_loss_unnormalised,
                                normal_blur_mse_loss, normal_tv_loss)
from core.stages.optim import build_optimizer

SMALL = dict(levels=4, features_per_level=2, log2_table_size=12, base_resolution=8, max_resolution=64,
             backend="torch", hidden=16, layers=3)


# ----------------------------------------------------------------------------------- a stand-in
class FakeRep:
    """A representation whose render is a flat image (colour 0.1 premultiplied, opacity 0.25 on white:
    rgb = 0.1 + 0.75 = 0.85) that records what the loop asked for."""

    backend = "fake"

    def __init__(self):
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def param_groups(self):
        return [{"params": [self.w], "lr": 0.1}]

    def before_step(self, step, total, generator, optimizer):
        pass

    def needs_normals(self, shading):
        return False

    def render(self, cameras, resolution, *, shading, light_dir, ambient, diffuse, generator, ray_offsets=None):
        self.calls.append({"resolution": resolution, "ray_offsets": ray_offsets, "shading": shading})
        b = len(cameras)
        rgb = torch.full((b, 3, resolution, resolution), 0.85) + 0 * self.w
        op = torch.full((b, 1, resolution, resolution), 0.25) + 0 * self.w
        return RenderBatch(rgb=rgb, opacity=op, depth=torch.zeros_like(op), normal=None, cameras=cameras)

    def regularisers(self, out):
        return {}

    def progress(self):
        return {}

    def train(self, mode=True):
        return self

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class Recorder:
    def __init__(self):
        self.batches = []

    def __call__(self, batch):
        from core.guidance.base import GuidanceOutput

        self.batches.append(batch)
        return GuidanceOutput(loss=batch.rgb.mean() * 0, diagnostics={})


def _spec(**kw):
    base = dict(name="coarse", iters=200, resolution=8, checkpoint_every=1000, seed=3, rgb=1.0, mask=1.0, depth=0.0)
    base.update(kw)
    return StageSpec(**base)


def _reference(size=8):
    return Reference(rgb=torch.rand(3, size, size), mask=torch.ones(1, size, size), depth=None)


# ------------------------------------------------------------------ item 5(a): novel-view backgrounds
def test_background_composite_by_hand():
    # Σ w c = 0.1, opacity 0.25: on white 0.1 + 0.75 = 0.85; on bg 0.2: 0.1 + 0.75·0.2 = 0.25
    out = RenderBatch(rgb=torch.full((1, 3, 2, 2), 0.85), opacity=torch.full((1, 1, 2, 2), 0.25),
                      depth=torch.zeros(1, 1, 2, 2), normal=None)
    composite_background(out, torch.tensor([[0.2, 0.6, 1.0]]))
    assert out.rgb[0, :, 0, 0].tolist() == pytest.approx([0.25, 0.55, 0.85])
    assert out.background.shape == (1, 3)


def test_novel_views_get_one_random_colour_each_and_reference_views_white():
    p = load_params("magic123", {"camera.ref_every": 2})
    rec, rep = Recorder(), FakeRep()
    st = Stage(_spec(novel_background="random"), rep, p, _reference(), guidance=rec)
    for _ in range(4):
        st.step()
    assert len(rec.batches) == 2  # steps 1 and 3 are novel views
    for b in rec.batches:
        bg = b.background[0]
        assert ((0 <= bg) & (bg < 1)).all()
        torch.testing.assert_close(b.rgb[0, :, 0, 0], 0.1 + 0.75 * bg)  # the released: image + (1 − α)·bg
    assert not torch.equal(rec.batches[0].background, rec.batches[1].background)
    # 'white' leaves the render as it is
    rec2 = Recorder()
    st2 = Stage(_spec(novel_background="white"), FakeRep(), p, _reference(), guidance=rec2)
    st2.step(), st2.step()
    assert rec2.batches[0].background is None and float(rec2.batches[0].rgb[0, 0, 0, 0].detach()) == pytest.approx(0.85)


def test_background_settings_of_the_presets():
    m, c, s = load_params("magic123"), load_params("consistent123"), load_params("smoke")
    assert coarse_spec(m).novel_background == "random" and fine_spec(m, 5000).novel_background == "random"
    assert coarse_spec(c).novel_background == "random"  # Consistent123 main.py:293 sets bg_radius −1 too
    assert coarse_spec(s).novel_background == "white"


def test_oracle_target_is_put_on_the_same_background():
    from core.oracle.guidance import OracleGuidance
    from core.oracle.objects import make_object

    p = load_params("smoke")
    obj = make_object("torus")
    cams = reference_cameras(p.camera)
    tgt = obj.render(cams, 16, 16, shading="albedo")
    bg = torch.tensor([[0.3, 0.0, 0.9]])
    batch = RenderBatch(rgb=tgt["rgb"].clone(), opacity=tgt["opacity"].clone(), depth=tgt["depth"], normal=None,
                        cameras=cams)
    composite_background(batch, bg)
    g = OracleGuidance(obj, p)(batch)
    assert float(g.loss) < 1e-10  # a perfect render on the same background costs nothing


# ------------------------------------------------------------------ item 5(b): reference-only warm-up
def test_reference_warmup_is_the_first_99_iterations():
    # released: do_rgbd_loss when global_step < known_iters (100) or global_step % 4 == 0, global_step =
    # step + 1 (nerf/utils.py:552-553, 1273): steps 0..98 are reference views (99 iterations)
    p = load_params("magic123")
    assert coarse_spec(p).ref_warmup == 99 and fine_spec(p, 5000).ref_warmup == 99
    st = Stage(_spec(ref_warmup=99), FakeRep(), p, _reference())
    ref = [st.is_reference_step(s) for s in range(120)]
    assert all(ref[:99]) and sum(ref[:99]) == 99
    assert ref[99:].count(True) == len([s for s in range(99, 120) if s % 4 == 0])
    c = load_params("consistent123")  # Consistent123: global_step % 4 only (its nerf/utils.py:665-666)
    assert coarse_spec(c).ref_warmup == 0 and fine_spec(c, 5000).ref_warmup == 0


# --------------------------------------------------- item 5(c): the reference at 1.5× with ray noise
def test_reference_resolution_and_ray_noise():
    p = load_params("magic123")
    assert reference_resolution(p) == 192 and coarse_spec(p).ref_resolution == 192  # int(1.5·128)
    assert coarse_spec(p).ref_ray_noise == 1e-3 and load_params("consistent123").coarse.ref_ray_noise == 2e-3
    f = fine_spec(p, 5000)
    assert f.ref_resolution is None and f.ref_ray_noise == 0.0  # DMTet: known_view_scale 1 (main.py:411)

    rep = FakeRep()
    st = Stage(_spec(resolution=8, ref_resolution=12, ref_ray_noise=1e-3, seed=5), rep, p, _reference(8))
    assert st.ref_rgb.shape[-1] == 12 and st.ref_mask.shape[-1] == 12  # the reference resized to the render
    st.step()  # step 0: the reference view
    call = rep.calls[0]
    assert call["resolution"] == 12
    g = torch.Generator().manual_seed(5)  # the stage's stream: nothing drawn before the two offsets
    do, dd = torch.randn(3, generator=g) * 1e-3, torch.randn(3, generator=g) * 1e-3
    torch.testing.assert_close(call["ray_offsets"][0], do)
    torch.testing.assert_close(call["ray_offsets"][1], dd)
    st.step()  # a novel view: its own resolution, no offsets
    assert rep.calls[1]["resolution"] == 8 and rep.calls[1]["ray_offsets"] is None


def test_ray_offsets_move_the_rays():
    f = NeRFField(**SMALL, blob_scale=10.0, blob_std=0.5)
    cams = reference_cameras(load_params().camera)
    fwd = -cams.c2w()[0, :3, 2]
    zero = (torch.zeros(3), torch.zeros(3))
    with torch.no_grad():
        a = render(f, cams, 17, samples_per_ray=256, need_normals=False, early_stop=0.0)
        b = render(f, cams, 17, samples_per_ray=256, need_normals=False, early_stop=0.0, ray_offsets=zero)
        c = render(f, cams, 17, samples_per_ray=256, need_normals=False, early_stop=0.0, ray_offsets=(0.1 * fwd, zero[1]))
    torch.testing.assert_close(a.rgb, b.rgb)
    za = a.depth[0, 0, 8, 8] / a.opacity[0, 0, 8, 8]
    zc = c.depth[0, 0, 8, 8] / c.opacity[0, 0, 8, 8]
    assert float(za - zc) == pytest.approx(0.1, abs=0.01)  # the camera moved 0.1 towards the blob


# -------------------------------------------------------- item 5(d): the hash grid's level schedule
def test_magic123_level_mask_by_hand():
    # released: grid_levels_mask 8 while global_step (finished iterations) ≤ 3000 (utils.py:1266-1270)
    assert active_levels("step", 0, 5000, 16, 8, 3000) == 8
    assert active_levels("step", 3000, 5000, 16, 8, 3000) == 8
    assert active_levels("step", 3001, 5000, 16, 8, 3000) == 16
    assert active_levels("step", 0, 5000, 16, 0, 3000) == 16  # grid_levels_mask 0: off
    assert active_levels("none", 0, 5000, 16) == 16


def test_consistent123_progressive_levels_by_hand():
    # r = min(1, 0.25 + 2·g/T), g = step + 1; levels = max(1, min(L, ceil(r·L))) (gridencoder/grid.py:42)
    assert active_levels("progressive", 0, 5000, 16) == 5  # r = 0.2504: ceil(4.0064)
    assert active_levels("progressive", 1717, 5000, 16) == 15  # r = 0.9372: ceil(14.995)
    assert active_levels("progressive", 1718, 5000, 16) == 16  # r = 0.9376: ceil(15.0016)
    assert active_levels("progressive", 4999, 5000, 16) == 16


def test_masked_levels_give_zero_features_and_no_gradient():
    f = NeRFField(**SMALL, blob_scale=0.0)
    x = torch.rand(64, 3) * 2 - 1
    f.active_levels = 2  # levels 2 and 3 off: features 4..7 zeroed before the MLP
    h = f._encode(x)
    assert (h[:, 4:] == 0).all() and (h[:, :4] != 0).any()
    f.raw(x)[0].sum().backward()
    enc = f.encoding
    g = enc.table.grad
    off = enc.offsets.tolist()
    assert g[off[2]:].abs().sum() == 0 and g[:off[2]].abs().sum() > 0
    p = load_params("magic123")
    rep = NeRFRepresentation(p.model_copy(update={"coarse": p.coarse.model_copy(update={
        "grid": p.coarse.grid.model_copy(update={"backend": "torch", "log2_table_size": 12}),
        "occupancy_resolution": 8})}), torch.device("cpu"))
    opt = build_optimizer(rep.param_groups(), p.optimizer)
    rep.before_step(3000, 5000, torch.Generator().manual_seed(0), opt)
    assert rep.field.active_levels == 8
    rep.before_step(3001, 5000, torch.Generator().manual_seed(0), opt)
    assert rep.field.active_levels == 16


# --------------------------------------------------------------------- item 5(e): the density blob
def test_gaussian_blob_by_hand():
    # released (exp activation): blob_density · exp(−|x|²/(2·blob_radius²)), 10 and 0.2 (renderer.py:733-745)
    f = NeRFField(**SMALL, blob_scale=10.0, blob_std=0.2, blob_kind="gaussian")
    x = torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.0, 0.0], [0.2, 0.2, 0.0]])
    assert f.density_blob(x).tolist() == pytest.approx([10.0, 6.0653066, 3.6787944], rel=1e-6)
    lin = NeRFField(**SMALL, blob_scale=10.0, blob_std=0.5, blob_kind="linear")  # Magic3D: 10·(1 − |x|/0.5)
    assert lin.density_blob(torch.tensor([[0.25, 0.0, 0.0]])).tolist() == pytest.approx([5.0])
    p = load_params("magic123")
    assert (p.coarse.density_blob, p.coarse.density_blob_scale, p.coarse.density_blob_std) == ("gaussian", 10.0, 0.2)
    assert NeRFField.from_params(p.model_copy(update={"coarse": p.coarse.model_copy(update={
        "grid": p.coarse.grid.model_copy(update={"backend": "torch", "log2_table_size": 12})})})).blob_kind == "gaussian"


# ----------------------------------------------------------------------- item 6: normal smoothness
def test_normal_tv_by_hand():
    # one channel [[0, 1], [2, 3]]: vertical (2−0)², (3−1)² → mean 4; horizontal (1−0)², (3−2)² → mean 1
    n = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).expand(1, 3, 2, 2)
    assert float(normal_tv_loss(n)) == pytest.approx(5.0)


def test_blur_is_torchvisions_9x9_gaussian():
    import torchvision.transforms.functional as TF

    # σ = 0.3·((9 − 1)·0.5 − 1) + 0.8 = 1.7; a unit impulse keeps k[4]² at the centre,
    # k[4] = 1 / Σ_{x=−4..4} exp(−x²/(2·1.7²)) = 1 / (1 + 2·(0.841131 + 0.500553 + 0.210765 + 0.062766))
    img = torch.zeros(1, 1, 9, 9)
    img[0, 0, 4, 4] = 1.0
    assert float(gaussian_blur(img, 9, padding="reflect")[0, 0, 4, 4]) == pytest.approx((1 / 4.230430) ** 2, rel=1e-5)
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(gaussian_blur(x, 9, padding="reflect"), TF.gaussian_blur(x, kernel_size=9))
    torch.testing.assert_close(normal_blur_mse_loss(x), torch.nn.functional.mse_loss(x, TF.gaussian_blur(x, kernel_size=9)))


def test_blur_gradient_magic123_flows_consistent123_stops():
    import torchvision.transforms.functional as TF

    x0 = torch.rand(1, 3, 12, 12)
    a = x0.clone().requires_grad_(True)
    normal_blur_mse_loss(a, 9, blur_grad=True).backward()
    b = x0.clone().requires_grad_(True)
    torch.nn.functional.mse_loss(b, TF.gaussian_blur(b, kernel_size=9)).backward()  # Magic123 utils.py:812-813
    torch.testing.assert_close(a.grad, b.grad)
    c = x0.clone().requires_grad_(True)
    normal_blur_mse_loss(c, 9, blur_grad=False).backward()
    torch.testing.assert_close(c.grad, 2 * (x0 - TF.gaussian_blur(x0, kernel_size=9)) / x0.numel())
    assert load_params("magic123").coarse.normal_smooth_blur_grad
    assert not load_params("consistent123").coarse.normal_smooth_blur_grad


def test_released_normal_image_uses_the_detached_density():
    f = NeRFField(**SMALL, blob_scale=10.0, blob_std=0.4, density_activation="trunc_exp")
    cams = reference_cameras(load_params().camera)
    out = render(f, cams, 12, samples_per_ray=32, shading="lambertian")
    # Σ sg(w)(n + 1)/2 = (Σ w n + Σ w)/2 in value
    torch.testing.assert_close(out.normal_sg, (out.normal + out.opacity) / 2, atol=1e-5, rtol=1e-5)
    ga = torch.autograd.grad(out.normal_sg.sum(), f.mlp[0].weight, retain_graph=True)[0]
    gb = torch.autograd.grad(((out.normal + out.opacity) / 2).sum(), f.mlp[0].weight)[0]
    assert not torch.allclose(ga, gb)  # … but the weights carry no gradient in the released image


def test_coarse_regularisers_released_form():
    p = load_params("magic123")
    w = p.coarse.losses
    assert (p.coarse.normal_smooth_form, w.normal_smooth, w.normal_smooth_tv) == ("released", 0.5, 0.5)
    c = load_params("consistent123").coarse.losses  # lambda_2d_normal_smooth 10 for both terms
    assert (c.normal_smooth, c.normal_smooth_tv, c.entropy) == (10.0, 10.0, 1.0)


# --------------------------------------------------------------------------------- item 6: entropy
def test_entropy_on_sample_weights_by_hand():
    # H(0.5) = 1 bit; H(0.25) = 0.5 + 0.75·log2(4/3) = 0.811278; mean 0.905639
    assert float(entropy_loss(torch.tensor([0.5, 0.25]))) == pytest.approx(0.905639, rel=1e-5)


def test_entropy_ramp_by_hand():
    # released λ·min(1, 2·global_step/iters), global_step = step + 1 (nerf/utils.py:794-795)
    assert ramp(0, 5000, 0.5) == pytest.approx(0.0004)
    assert ramp(1249, 5000, 0.5) == pytest.approx(0.5)
    assert ramp(2499, 5000, 0.5) == pytest.approx(1.0)
    assert ramp(4000, 5000, 0.5) == 1.0 and ramp(0, 5000, 0.0) == 1.0


def test_entropy_weight_and_values_in_the_coarse_representation():
    p = load_params("magic123", {"coarse.grid.backend": "torch", "coarse.grid.log2_table_size": 12,
                                 "coarse.occupancy_resolution": 8})
    rep = NeRFRepresentation(p, torch.device("cpu"))
    opt = build_optimizer(rep.param_groups(), p.optimizer)
    rep.before_step(1249, 5000, torch.Generator().manual_seed(0), opt)
    out = rep.render(reference_cameras(p.camera), 8, shading="albedo", light_dir=None, ambient=1.0, diffuse=0.0,
                     generator=torch.Generator().manual_seed(0))
    regs = rep.regularisers(out)
    wt, val = regs["entropy"]
    assert wt == pytest.approx(1e-3 * 0.5)
    torch.testing.assert_close(val, entropy_loss(out.sample_weights))  # per sample, not per ray
    assert "normal_smooth_tv" in regs


# ---------------------------------------------------------------------------------- item 7: fine stage
def test_fine_stage_settings():
    p = load_params("magic123")
    # the DMTet stage's t range [0.02, 0.5] (main.py:413) is sd/zero123.fine_t_range (docs/fidelity.md)
    assert tuple(p.sd.fine_t_range) == tuple(p.zero123.fine_t_range) == (0.02, 0.5)
    assert p.fine.losses.depth == 0.0 and fine_spec(p, 5000).depth == 0.0  # main.py:415-417
    assert p.fine.laplacian_form == "unnormalised" and p.fine.sdf_scale == "unit" and p.fine.tet_rescale


def test_sdf_threshold_is_min_of_mean_density_and_10():
    from core.stages.engine import StageState

    p = load_params("magic123")
    low = StageState(stage="coarse", params={}, params_digest="",
                     representation={"occupancy": {"values": torch.tensor([0.0, 2.0, 4.0, 6.0])}})
    high = StageState(stage="coarse", params={}, params_digest="",
                      representation={"occupancy": {"values": torch.tensor([0.0, 40.0])}})
    assert sdf_level(p, low) == pytest.approx(3.0)  # min(3, 10)
    assert sdf_level(p, high) == pytest.approx(10.0)  # min(20, 10)
    assert sdf_level(p, None) == 10.0
    q = load_params("magic123", {"fine.sdf_threshold": "mesh_threshold"})
    assert sdf_level(q, low) == 10.0


def test_tet_grid_rescaled_to_the_occupied_extent_plus_margin():
    # σ = 20 inside |x| ≤ 0.3, |y| ≤ 0.5, |z| ≤ 0.2, 0 outside; grid vertices at multiples of 0.1:
    # scale = (0.3, 0.5, 0.2) + 0.1 (renderer.py:1565-1572)
    def box(x):
        inside = (x[:, 0].abs() <= 0.3 + 1e-6) & (x[:, 1].abs() <= 0.5 + 1e-6) & (x[:, 2].abs() <= 0.2 + 1e-6)
        return inside.float() * 20.0

    dm = DMTet(20, 1.0)
    scale = dm.rescale_to_density(box, 10.0, 0.1)
    assert scale.tolist() == pytest.approx([0.4, 0.6, 0.3], abs=1e-6)
    assert dm.grid_verts.abs().amax(0).tolist() == pytest.approx([0.4, 0.6, 0.3], abs=1e-6)
    # SDF = clamp(σ − τ, −1, 1) at the scaled vertices (renderer.py:1573-1574); σ = 10.2 − 3x here
    dm.init_from_density(lambda x: 10.2 - 3 * x[:, 0], 10.0, sdf_scale="unit")
    torch.testing.assert_close(dm.sdf, (0.2 - 3 * dm.grid_verts[:, 0]).clamp(-1, 1))
    assert dm.sdf.min() == -1.0  # x = 0.4: 0.2 − 1.2 clamped
    dm.init_from_density(lambda x: 10.2 - 3 * x[:, 0], 10.0, sdf_scale="threshold")  # lift3d's earlier reading
    torch.testing.assert_close(dm.sdf, ((0.2 - 3 * dm.grid_verts[:, 0]) / 10.0).clamp(-1, 1))
    # nothing above τ: the grid stays as it was
    assert DMTet(8, 1.0).rescale_to_density(lambda x: torch.zeros(len(x)), 10.0).tolist() == [1, 1, 1]


def test_tet_counts_match_the_released_quartet_grids():
    # released data/tets: 64 → 192,492 tets, 128 → 1,524,684 (renderer.py:312-316): ≈ 6·r³ with r = 32, 64,
    # so "256" ≈ Kuhn 128 (6·128³ = 12,582,912 tets, 129³ = 2,146,689 vertices)
    assert 6 * 32 ** 3 == pytest.approx(192_492, rel=0.03) and 6 * 64 ** 3 == pytest.approx(1_524_684, rel=0.04)
    assert load_params("magic123").fine.tet_resolution == 128


def test_unnormalised_laplacian_by_hand():
    # one triangle (0,0,0), (1,0,0), (0,1,0), every vertex of degree 2:
    # (Lv)_0 = 2v0 − v1 − v2 = (−1, −1, 0), (Lv)_1 = (2, −1, 0), (Lv)_2 = (−1, 2, 0): (√2 + 2√5)/3
    v = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    f = torch.tensor([[0, 1, 2]])
    assert float(mesh_laplacian_loss_unnormalised(v, f)) == pytest.approx((math.sqrt(2) + 2 * math.sqrt(5)) / 3)
    assert float(mesh_laplacian_loss(v, f)) == pytest.approx((math.sqrt(0.5) + 2 * math.sqrt(1.25)) / 3)


# ------------------------------------------------------------------------------- item 12: optimiser
def test_magic123_adam_as_released():
    p = load_params("magic123")
    w = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer([{"params": [w], "lr": 1e-3}], p.optimizer)
    assert type(opt) is torch.optim.Adam  # main.py:554-555
    g = opt.param_groups[0]
    assert g["betas"] == (0.9, 0.99) and g["eps"] == 1e-15 and g["weight_decay"] == 0.0 and g["lr"] == 1e-3
    # optimizer.fused (default true) applies on a GPU only: on the CPU the same foreach/for-loop Adam as
    # before, so CPU runs keep their numbers (tests/test_gpu_backends.py: fused against foreach on a GPU)
    assert p.optimizer.fused and not opt.defaults["fused"]
    w.grad = torch.tensor([1.0, -2.0])
    opt.step()  # the released update's first step: −lr·sign(g) (m̂ = g, v̂ = g², eps 1e-15)
    assert w.detach().tolist() == pytest.approx([-1e-3, 1e-3])


def test_consistent123_adan_settings():
    p = load_params("consistent123")
    o = p.optimizer
    assert (o.name, o.lr_scale, tuple(o.betas), o.eps, o.weight_decay, o.max_grad_norm) == \
        ("adan", 5.0, (0.98, 0.92, 0.99), 1e-8, 2e-5, 5.0)  # main.py:457-460, optimizer.py defaults
    rep = NeRFRepresentation(load_params("consistent123", {"coarse.grid.backend": "torch",
                                                           "coarse.grid.log2_table_size": 12}), torch.device("cpu"))
    opt = build_optimizer(rep.param_groups(), o)
    # get_params(5·lr): the hash grid at 10× (network_grid.py:160-161)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-2, 5e-3])


def test_adan_two_steps_by_hand():
    # lr 0.1, betas (0.98, 0.92, 0.99), eps 1e-8, wd 0.02, no_prox=False, θ0 = 1, g1 = 2, g2 = 1.
    # step 1: m = 0.02·2 = 0.04, diff = 0, n = 0.01·2² = 0.04; bias corr. 0.02, 0.08, 0.01;
    #   denom = √0.04/√0.01 + eps = 2 + 1e-8; θ = (1 − (0.1/0.02)·0.04/denom) / (1 + 0.1·0.02) ≈ 0.9/1.002
    # step 2: g2 − g1 = −1; m = 0.0392 + 0.02 = 0.0592; diff = 0.08·(−1) = −0.08;
    #   u = g2 + 0.92·(g2 − g1) = 0.08; n = 0.99·0.04 + 0.01·0.0064 = 0.039664;
    #   bias corr. 0.0396, 0.1536, 0.0199; denom = √0.039664/√0.0199 + 1e-8;
    #   θ = (θ1 − (0.1/0.0396)·0.0592/denom − (0.1·0.92/0.1536)·(−0.08)/denom) / 1.002
    from core.params import OptimizerParams

    p = OptimizerParams(name="adan", betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02)
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = build_optimizer([{"params": [w], "lr": 0.1}], p)
    w.grad = torch.tensor([2.0], dtype=torch.float64)
    opt.step()
    t1 = (1 - (0.1 / 0.02) * 0.04 / (2 + 1e-8)) / 1.002
    assert w.item() == pytest.approx(t1, rel=1e-12)
    w.grad = torch.tensor([1.0], dtype=torch.float64)
    opt.step()
    denom = math.sqrt(0.039664) / math.sqrt(0.0199) + 1e-8
    t2 = (t1 - (0.1 / 0.0396) * 0.0592 / denom - (0.1 * 0.92 / 0.1536) * (-0.08) / denom) / 1.002
    assert w.item() == pytest.approx(t2, rel=1e-10)


def test_adan_clips_the_global_gradient_norm_first():
    # released: clip = min(1, max_grad_norm / (‖g‖ + eps)), every gradient scaled in place (optimizer.py);
    # gradients (3, 4): ‖g‖ = 5, max 1 → (0.6, 0.8)
    p = load_params("consistent123").optimizer.model_copy(update={"max_grad_norm": 1.0})
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-3}], p)
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([4.0])
    opt.step()
    assert a.grad.item() == pytest.approx(0.6) and b.grad.item() == pytest.approx(0.8)


def test_lr_schedule_scales_the_scaled_lr():
    p = load_params("smoke", {"coarse.lr_final": 0.1, "coarse.iters": 5, "optimizer.lr_scale": 2.0,
                              "coarse.grid.log2_table_size": 12, "coarse.occupancy_resolution": 8})
    rep = NeRFRepresentation(p, torch.device("cpu"))
    opt = build_optimizer(rep.param_groups(), p.optimizer)
    rep.before_step(4, 5, torch.Generator().manual_seed(0), opt)
    c = p.coarse
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2 * c.lr * c.grid_lr_scale * 0.1, 2 * c.lr * 0.1])


def test_optimizer_betas_must_fit_the_name():
    from core.params import ParamsError

    with pytest.raises(ParamsError, match="optimizer"):
        load_params("magic123", {"optimizer.name": "adan"})  # Adam's two betas


def test_fine_colour_field_levels_and_scale_in_the_checkpoint():
    from core.stages.fine import DMTetRepresentation

    f = NeRFField(**SMALL, blob_scale=10.0, blob_std=0.4, density_activation="trunc_exp", blob_kind="gaussian")
    c = load_params("consistent123", {"fine.tet_resolution": 8, "fine.rasterizer": "torch"})
    rep = DMTetRepresentation(c, f, torch.device("cpu"))
    assert rep.colour.field.active_levels is None
    rep.before_step(0, 5000, torch.Generator().manual_seed(0), None)
    assert rep.colour.field.active_levels == 2  # ceil((0.25 + 2/5000)·4), Consistent123 keeps progressive_level
    m = load_params("magic123", {"fine.tet_resolution": 8, "fine.rasterizer": "torch"})
    rep_m = DMTetRepresentation(m, f, torch.device("cpu"))
    rep_m.before_step(0, 5000, torch.Generator().manual_seed(0), None)
    assert rep_m.colour.field.active_levels is None  # Magic123: grid_levels_mask −1 in DMTet (main.py:412)
    # σ ≈ exp(10·e^(−r²/0.32)) > 10 inside r ≈ 0.69: the grid shrinks; its scale is saved and restored
    assert (rep_m.dmtet.scale < 1).all()
    state = rep_m.state_dict()
    again = DMTetRepresentation(m.model_copy(update={"fine": m.fine.model_copy(update={"tet_rescale": False})}), f,
                                torch.device("cpu"))
    assert torch.equal(again.dmtet.scale, torch.ones(3))
    again.load_state_dict(state)
    torch.testing.assert_close(again.dmtet.scale, rep_m.dmtet.scale)
    torch.testing.assert_close(again.dmtet.vertices(), rep_m.dmtet.vertices())


def test_occupancy_grid_as_released():
    """Row 5f: the released ray marcher's density grid — 128³, updated every 16 iterations with
    decay 0.95, occupied where σ > min(mean σ, density_thresh 10) — in both paper presets; the smoke
    preset keeps its alpha rule. The stage builds its grid from these."""
    for preset in ("magic123", "consistent123"):
        c = load_params(preset).coarse
        assert (c.occupancy_rule, c.occupancy_density_threshold, c.occupancy_resolution, c.occupancy_every,
                c.occupancy_decay) == ("density", 10.0, 128, 16, 0.95), preset
    assert load_params("smoke").coarse.occupancy_rule == "alpha"
    p = load_params("tiny", ["coarse.occupancy_rule=density", "coarse.occupancy_density_threshold=7"])
    occ = NeRFRepresentation(p, torch.device("cpu")).occupancy
    assert (occ.rule, occ.density_threshold) == ("density", 7.0)


def test_released_occupancy_marches_the_blob_not_the_fog():
    """Why row 5f matters: at the magic123 start the gaussian blob (5e) leaves σ ≈ e^0 = 1 over the
    whole box. The earlier alpha rule (σ·step ≥ 0.01) marched all of it; the released rule only the
    blob's core (at 128³: 100% against 2.6% of the cells, docs/fidelity.md)."""
    frac = {}
    for rule in ("alpha", "density"):
        p = load_params("magic123", ["device=cpu", "coarse.grid.backend=torch", "coarse.occupancy_resolution=32",
                                     f"coarse.occupancy_rule={rule}"])
        rep = NeRFRepresentation(p, torch.device("cpu"))
        rep.before_step(0, p.coarse.iters, torch.Generator().manual_seed(0), None)
        assert 0.5 < float(rep.occupancy.values.median()) < 1.5  # the fog
        frac[rule] = rep.occupancy.occupied_cells(rep.step_size).float().mean().item()
    assert frac["alpha"] == 1.0 and frac["density"] < 0.05, frac
