"""Analytic priors (core/testmodels/analytic.py): exact denoisers of known objects, loaded through
the one loader, that make the whole SDS path measurable (issue 11)."""
from __future__ import annotations

import math

import pytest
import torch

from core.guidance.factory import build_sd_guidance, build_zero123_guidance
from core.models.loader import load_pretrained
from core.oracle.bench import oracle_reference
from core.oracle.objects import make_object
from core.params import load_params
from core.rendering.cameras import Cameras
from core.testmodels.analytic import (
    AnalyticStableDiffusionUNet,
    analytic_vae,
    grid_cameras,
    object_names,
    posterior_mean,
)
from core.testmodels.priors import SD_SCHEDULER

RES = 32  # 4×4 latents: enough to tell views apart, seconds to build


@pytest.fixture(scope="module")
def analytic_params(tmp_path_factory):
    root = tmp_path_factory.mktemp("analytic-root")
    mp = pytest.MonkeyPatch()
    mp.setenv("LIFT3D_TINY_DIR", str(root))
    params = load_params("smoke", ["sd.model=analytic:torus+blocks", "zero123.model=analytic:torus+blocks",
                                   "prompt.text=torus", f"sd.resolution={RES}", f"zero123.resolution={RES}",
                                   "coarse.resolution=32"])
    yield params
    mp.undo()


@pytest.fixture(scope="module")
def priors(analytic_params):
    ref = oracle_reference(make_object("torus"), analytic_params)
    sd, _ = build_sd_guidance(analytic_params, ref, "cpu")
    z123 = build_zero123_guidance(analytic_params, ref, "cpu")
    return sd, z123


def _alphas():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD_SCHEDULER).alphas_cumprod


def test_epsilon_is_the_closed_form_on_two_images(tmp_path):
    """ε̂ = (x_t − √ᾱ x̂0)/√(1−ᾱ), x̂0 = Σ N(x_t; √ᾱ x_i, (1−ᾱ)I) x_i / Σ N(…), on a two-image data
    set, computed here from the Gaussian densities themselves — after a save_pretrained / loader
    round trip of the module."""
    g = torch.Generator().manual_seed(3)
    data = torch.randn(1, 2, 4, 2, 2, generator=g)
    unet = AnalyticStableDiffusionUNet(sample_size=2, num_objects=1, views_per_object=2, cross_attention_dim=8,
                                       text_length=3, object_names=["a"], key_objects=[0], key_prompts=["a"])
    with torch.no_grad():
        unet.data.copy_(data)
        unet.log_alphas_cumprod.copy_(_alphas().log())
    unet.save_pretrained(tmp_path / "unet")
    (tmp_path / "model_index.json").write_text(
        '{"unet": ["core.testmodels.analytic", "AnalyticStableDiffusionUNet"]}')
    from diffusers import UNet2DConditionModel

    loaded = load_pretrained(UNet2DConditionModel, str(tmp_path), subfolder="unet")
    assert isinstance(loaded, AnalyticStableDiffusionUNet)
    x1, x2 = data[0, 0].double(), data[0, 1].double()
    for t in (20, 300, 900):
        a = _alphas()[t].double()
        x_t = (a.sqrt() * (0.3 * x1 + 0.7 * x2) + (1 - a).sqrt() * torch.randn(4, 2, 2, generator=g)).float()
        dens = torch.stack([torch.distributions.Normal(a.sqrt() * xi, (1 - a).sqrt()).log_prob(x_t.double()).sum()
                            for xi in (x1, x2)])
        w = torch.softmax(dens, 0)
        x0 = w[0] * x1 + w[1] * x2
        want = (x_t.double() - a.sqrt() * x0) / (1 - a).sqrt()
        got = loaded(x_t[None], torch.tensor([t]), torch.zeros(1, 3, 8)).sample[0]
        assert torch.allclose(got.double(), want, atol=1e-5), t
    # at t → 0 the posterior mean is the nearer image
    a = _alphas()[0].double()
    near = posterior_mean((a.sqrt() * (x1 + 0.1 * (x2 - x1))).float().flatten(), data[0].flatten(1), a)
    assert torch.allclose(near, x1.flatten(), atol=1e-4)


def test_the_model_name_selects_the_analytic_priors(analytic_params, priors):
    """`--set sd.model=analytic:OBJ+OBJ` goes through core.models.sources and the one loader; the
    text names the object, the empty (unconditional) prompt the mixture; the VAE's posterior is
    pinned as a trained one's is."""
    sd, z123 = priors
    assert object_names(analytic_params.sd.model) == ["torus", "blocks"]
    assert type(sd.parts.unet).__name__ == "AnalyticStableDiffusionUNet"
    assert type(z123.parts.unet).__name__ == "AnalyticZero123UNet"
    keys = torch.cat([sd.uncond_embeddings, sd.text_embeddings, sd.view_embeddings]).float()
    assert sd.parts.unet.select_objects(keys).tolist() == [-1, 0, 0, 0, 0]
    assert torch.allclose(sd.parts.unet.log_alphas_cumprod.exp(), sd.parts.scheduler.alphas_cumprod)
    post = sd.parts.vae.encode(torch.zeros(1, 3, RES, RES)).latent_dist
    assert float(post.std.max()) < 1e-3
    # the reference image names the object for Zero-1-to-3
    assert z123.parts.unet.select_objects(z123.reference_latent).tolist() == [0]


@pytest.mark.parametrize("target", [(60.0, 40.0), (120.0, -90.0), (90.0, 180.0), (30.0, 150.0), (90.0, 0.0)])
def test_zero123_recovers_the_delta_camera(priors, target):
    """Zero-1-to-3's condition [Δθ, sin Δφ, cos Δφ, Δr], through the real cc_projection, is read back
    as the reference camera moved by Δ; and with no information from the noisy input (x_t = 0 at
    t = T − 1) the prior's x̂0 is the object's view at that camera. A mirrored azimuth is not."""
    _, z123 = priors
    unet = z123.parts.unet
    cam = Cameras.make(*target, 1.8, 40)
    cond = z123.condition(cam)
    polar, azimuth, radius, on = unet.target_cameras(cond)
    assert bool(on[0])
    assert float(polar[0]) == pytest.approx(target[0], abs=1e-3)
    assert math.remainder(float(azimuth[0]) - target[1], 360.0) == pytest.approx(0.0, abs=1e-3)
    assert float(radius[0]) == pytest.approx(1.8, abs=1e-5)

    T = z123.num_train_timesteps - 1
    a = unet.log_alphas_cumprod[T].exp()

    def x0_view(c):
        x_in = torch.cat([torch.zeros(1, 4, RES // 8, RES // 8), z123.reference_latent], 1)
        eps = unet(x_in, torch.tensor([T]), c).sample
        x0 = -(1 - a).sqrt() * eps / a.sqrt()
        j = int(torch.cdist(x0.flatten(1).double(), unet.data[0].flatten(1).double()).argmin())
        return unet.config.view_polar[j], unet.config.view_azimuth[j]

    got = x0_view(cond)
    assert got[0] == pytest.approx(target[0]) and math.remainder(got[1] - target[1], 360.0) == pytest.approx(0.0)
    if target[1] % 180.0 != 0.0:  # a mirrored azimuth convention asks for another view
        mirrored = Cameras.make(target[0], -target[1], 1.8, 40)
        assert x0_view(z123.condition(mirrored)) != got


def _truth_and_render(params, polar=90.0, azimuth=30.0):
    """The torus's render at a grid camera (the truth) and a damaged render of it (the 'NeRF')."""
    obj = make_object("torus")
    cam = Cameras.make(polar, azimuth, params.camera.radius, params.camera.fovy)
    truth = obj.render(cam, RES)["rgb"]
    other = obj.render(Cameras.make(polar, azimuth + 40.0, params.camera.radius, params.camera.fovy), RES)["rgb"]
    return cam, truth, 0.8 * truth + 0.2 * other


@pytest.mark.parametrize("which", ["sd", "zero123"])
def test_sds_at_small_t_points_from_the_render_to_the_truth(analytic_params, priors, which):
    """SDS through the real guidance code (CFG, w(t), the VAE encoder's Jacobian) with t → 0: the
    gradient on the latent is ∝ z − x̂0 with x̂0 the truth's latent, and the descent direction on
    the image points towards the true image."""
    sd, z123 = priors
    cam, truth, render = _truth_and_render(analytic_params)
    guidance = sd if which == "sd" else z123
    image = render.clone().requires_grad_(True)
    from core.guidance.sd import encode_images

    latents = encode_images(guidance.parts.vae, image)
    t, noise = torch.tensor([2]), torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    if which == "sd":
        loss, _ = guidance.sds(latents, t=t, noise=noise, cameras=cam)
    else:
        guidance.angle_weighting = False
        loss, _ = guidance.sds(latents, cam, t=t, noise=noise)
    z_grad, = torch.autograd.grad(loss, latents, retain_graph=True)
    with torch.no_grad():
        z_truth = encode_images(guidance.parts.vae, truth)
    step = -z_grad.flatten()
    towards = (z_truth - latents.detach()).flatten()
    assert float(torch.nn.functional.cosine_similarity(step, towards, dim=0)) > 0.99
    img_grad, = torch.autograd.grad(loss, image)
    assert float((-img_grad * (truth - render)).sum()) > 0.0


def test_grid_contains_the_reference_view():
    cams = grid_cameras(15.0, [1.8], 40.0)
    pairs = set(zip(cams.polar.tolist(), cams.azimuth.tolist()))
    assert (90.0, 0.0) in pairs and (90.0, 180.0) in pairs and len(cams) == 11 * 24


def test_analytic_vae_posterior_is_pinned():
    vae = analytic_vae()
    with torch.no_grad():
        post = vae.encode(torch.rand(2, 3, 16, 16) * 2 - 1).latent_dist
    assert float(post.std.max()) < 1e-3 and float(post.mean.std()) > 1e-3



def test_a_textured_mesh_file_is_a_known_object(tmp_path):
    """A GLB (trimesh) renders like the procedural objects: texture where the file puts it (the blue
    door on the front, +z; the yellow window on the +x side only), a binary mask, z-depth, surface
    samples inside the fitted radius; make_object takes its path."""
    from core.oracle.meshes import FIT_RADIUS, MeshObject, write_example_house

    path = write_example_house(tmp_path / "house.glb")
    obj = make_object(str(path))
    assert isinstance(obj, MeshObject) and obj.name == "house" and obj.texture is not None
    cams = Cameras.make([90.0, 90.0, 90.0], [0.0, 90.0, -90.0], 1.8, 40.0)
    r = obj.render(cams, 64)
    rgb, mask = r["rgb"], r["opacity"]
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and float(mask.mean()) > 0.1
    assert bool((r["depth"][mask > 0] > 1.0).all()) and bool((r["depth"][mask == 0] == 0).all())
    blue = lambda im: ((im[2] > 0.5) & (im[0] < 0.3)).float().sum()  # noqa: E731
    yellow = lambda im: ((im[0] > 0.8) & (im[1] > 0.7) & (im[2] < 0.4)).float().sum()  # noqa: E731
    assert blue(rgb[0]) > 20 and yellow(rgb[0]) == 0  # front: the door
    assert yellow(rgb[1]) > 10 and yellow(rgb[2]) == 0  # +x side: the window; −x side: none
    assert float(obj.sample_surface(500).norm(dim=-1).max()) <= FIT_RADIUS + 1e-5
    lit = obj.render(cams[:1], 32, shading="textureless")["rgb"]
    assert float(lit[:, :, 8:24, 8:24].std()) > 0.0


def test_bench_analytic_runs_one_object_of_several(analytic_params, tmp_path):
    """`scripts/analytic_bench.py --only blocks` (one process per object on the GPU machine): the run
    covers blocks alone, under priors that still know torus and blocks, so the 2D prior's CFG has the
    all-object mixture to push against; an object not among them is one clear error."""
    import json

    from core.oracle.bench_analytic import bench_analytic
    from core.params import load_params

    tree = analytic_params.to_dict()
    params = load_params("tiny", [f"sd.resolution={RES}", f"zero123.resolution={RES}", "coarse.iters=3",
                                  "fine.iters=2", "evaluate.novel_views=2", "device=cpu"])
    assert tree["sd"]["resolution"] == params.sd.resolution
    rep = bench_analytic(params, ["torus", "blocks"], tmp_path, "cpu", progress=False, only=["blocks"])
    assert list(rep["objects"]) == ["blocks"]
    m = rep["objects"]["blocks"]
    assert m["sd_model"] == m["zero123_model"] == "analytic:torus+blocks"
    assert 0 < m["psnr_novel"] < 60 and 0 <= m["mask_iou"] <= 1
    assert json.loads((tmp_path / "analytic.json").read_text())["objects"].keys() == {"blocks"}
    with pytest.raises(ValueError, match="--only snowman is not among the objects torus, blocks"):
        bench_analytic(params, ["torus", "blocks"], tmp_path, "cpu", progress=False, only=["snowman"])
