"""NeRF field and volume renderer sanity."""
import pytest
import torch

from core.rendering.cameras import reference_cameras
from core.representations.nerf import NeRFField, OccupancyGrid, render
from core.params import load_params

SMALL = dict(levels=4, features_per_level=2, log2_table_size=12, base_resolution=8, max_resolution=64,
             backend="torch", hidden=16, layers=3)


def test_empty_field_renders_white():
    f = NeRFField(**SMALL, blob_scale=0.0)
    with torch.no_grad():
        f.mlp[-1].bias[0] = -30.0  # raw density −30: softplus ≈ 1e-13
    cams = reference_cameras(load_params().camera)
    out = render(f, cams, 16, samples_per_ray=16, need_normals=True, shading="lambertian")
    assert out.opacity.max() < 1e-6
    assert torch.allclose(out.rgb, torch.ones_like(out.rgb), atol=1e-5)
    assert out.depth.abs().max() < 1e-5


def test_blob_is_opaque_at_the_centre_and_depth_is_sensible():
    f = NeRFField(**SMALL, blob_scale=10.0, blob_std=0.5)
    cams = reference_cameras(load_params().camera)
    out = render(f, cams, 17, samples_per_ray=64, need_normals=True, shading="normal")
    assert out.opacity[0, 0, 8, 8] > 0.99  # the centre ray crosses the whole blob
    assert out.opacity[0, 0, 0, 0] < 0.05  # a corner ray misses it
    z = out.depth[0, 0, 8, 8] / out.opacity[0, 0, 8, 8]
    assert 1.8 - 0.5 < z < 1.8  # in front of the origin, behind the blob's front
    # the blob's normals at the centre face the camera (+z)
    n = out.normal[0, :, 8, 8]
    assert n[2] > 0.8 * n.norm()
    # density and albedo queries for the fine stage's hand-over
    x = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.9]])
    d = f.density(x)
    assert d.shape == (2,) and d[0] > 9.0 and d[1] < 0.1
    a = f.albedo(x)
    assert a.shape == (2, 3) and (a >= 0).all() and (a <= 1).all()


def test_occupancy_grid_skips_empty_space_and_gradients_flow():
    f = NeRFField(**SMALL, blob_scale=10.0, blob_std=0.3)
    occ = OccupancyGrid(16, 1.0, 0.01)
    assert occ.fraction() == 1.0
    occ.update(f, 2.0 / 32, torch.Generator().manual_seed(0))
    frac = occ.fraction()
    assert 0.0 < frac < 0.3
    assert occ.lookup(torch.tensor([[0.0, 0.0, 0.0]])).item()
    assert not occ.lookup(torch.tensor([[0.9, 0.9, 0.9]])).item()
    cams = reference_cameras(load_params().camera)
    full = render(f, cams, 16, samples_per_ray=48, need_normals=False)
    skip = render(f, cams, 16, samples_per_ray=48, occupancy=occ, need_normals=False)
    # skipping empty cells (and the tighter sampling box) changes the image only a little
    assert (full.opacity - skip.opacity).abs().max() < 0.1
    # each render says how many samples the field evaluated (at most 16² × 48; early termination
    # behind the blob drops some), fewer where the grid's empty cells are skipped
    assert 0 < full.active_samples <= 16 * 16 * 48 and isinstance(full.active_samples, int)
    assert 0 < skip.active_samples < full.active_samples  # the grid's empty cells cost nothing
    out = render(f, cams, 16, samples_per_ray=32, occupancy=occ, perturb=True,
                 generator=torch.Generator().manual_seed(1), shading="lambertian")
    (out.rgb.mean() + out.normal.mean()).backward()
    assert f.encoding.table.grad.abs().sum() > 0
    assert all(p.grad is not None for p in f.mlp.parameters())


def _lit_blob():
    f = NeRFField(**SMALL, blob_scale=10.0, blob_std=0.5, density_activation="trunc_exp")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in f.mlp.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cams = reference_cameras(load_params().camera)
    return f, cams, torch.tensor([[0.3, 0.5, 0.8]])


def test_segmented_march_changes_nothing():
    """The gradient-free pass marching 4 samples at a time gives the one-pass render exactly."""
    f, cams, light = _lit_blob()
    kw = dict(samples_per_ray=32, shading="lambertian", light_dir=light, need_normals=True)
    a = render(f, cams, 16, segment=4, **kw)
    b = render(f, cams, 16, segment=32, **kw)
    assert torch.equal(a.rgb, b.rgb) and torch.equal(a.opacity, b.opacity) and torch.equal(a.normal, b.normal)


def test_normals_only_where_weight_counts():
    """Normals computed for samples of weight ≥ 1e-4 only: each pixel's shading moves by at most
    the weight left out (samples × 1e-4), and fewer normals are evaluated."""
    f, cams, light = _lit_blob()
    kw = dict(samples_per_ray=32, shading="lambertian", light_dir=light, need_normals=True)
    full = render(f, cams, 16, normal_min_weight=0.0, **kw)
    gated = render(f, cams, 16, normal_min_weight=1e-4, **kw)
    assert torch.allclose(full.opacity, gated.opacity)
    assert (full.rgb - gated.rgb).abs().max() <= 32 * 1e-4
    assert int((gated.sample_normals.abs().sum(-1) > 0).sum()) < int((full.sample_normals.abs().sum(-1) > 0).sum())


def test_recomputed_normals_give_the_same_render_and_gradients():
    """coarse.normals_recompute: the finite-difference normals under activation checkpointing give
    the same image and the same parameter gradients as the plain evaluation (it only moves memory);
    the control: a different normal step changes the gradients, so the comparison can fail."""
    def grads(recompute, eps=1e-2):
        f, cams, light = _lit_blob()
        f.normals_recompute = recompute
        out = render(f, cams, 16, samples_per_ray=32, shading="lambertian", light_dir=light, normal_eps=eps)
        (out.rgb.mean() + out.normal.mean()).backward()
        return out.rgb.detach(), [q.grad.clone() for q in f.parameters()]

    rgb0, g0 = grads(False)
    rgb1, g1 = grads(True)
    assert torch.equal(rgb0, rgb1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    _, g2 = grads(False, eps=2e-2)
    assert any(not torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(g0, g2))


def test_bf16_mlp_renders_and_trains_as_fp32():
    """coarse.mlp.precision bf16: the MLP under bf16 autocast gives the fp32 render to bf16's ~3
    significant digits and gradients pointing the same way (per parameter tensor, cosine > 0.99);
    the mode is really on: the images are not bit-equal, and a gradient ÷ 65536 (the released SDS
    balance) still reaches the hash table (bf16 keeps fp32's exponent)."""
    import torch.nn.functional as F

    def run(precision, scale=1.0):
        f, cams, light = _lit_blob()
        f.mlp_precision = precision
        out = render(f, cams, 16, samples_per_ray=32, shading="lambertian", light_dir=light)
        ((out.rgb.mean() + out.normal.mean()) * scale).backward()
        return out.rgb.detach(), [q.grad.clone() for q in f.parameters()]

    rgb32, g32 = run("fp32")
    rgb16, g16 = run("bf16")
    assert rgb16.dtype == torch.float32 and not torch.equal(rgb32, rgb16)
    assert (rgb32 - rgb16).abs().max() < 0.02
    for a, b in zip(g32, g16):
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    _, tiny = run("bf16", scale=2.0 ** -16)
    table = dict(zip([n for n, _ in _lit_blob()[0].named_parameters()], tiny))["encoding.table"]
    assert table.abs().max() > 0 and torch.isfinite(table).all()


def test_occupancy_rules_by_hand():
    """The released bitfield (occupancy_rule density): σ > min(mean σ of the grid, 10). A fog of
    σ = 1 with one cell of 50: mean (63 + 50)/64 = 1.77, so only that cell; the alpha rule (σ·step ≥
    0.01 at step 2/128) keeps the whole fog. Everything at 20 but one empty cell: mean 19.69, capped
    at 10, so the 63 others."""
    step = 2.0 / 128
    dens = OccupancyGrid(4, 1.0, 0.01, rule="density")
    alpha = OccupancyGrid(4, 1.0, 0.01, rule="alpha")
    for g in (dens, alpha):
        g.values.fill_(1.0)
        g.values[1, 2, 3] = 50.0
    assert dens.occupied_cells(step).sum() == 1 and dens.occupied_cells(step)[1, 2, 3]
    assert alpha.occupied_cells(step).all()
    dens.values.fill_(20.0)
    dens.values[0, 0, 0] = 0.0
    assert dens.occupied_cells(step).sum() == 63 and not dens.occupied_cells(step)[0, 0, 0]
    with pytest.raises(ValueError, match="alpha or density"):
        OccupancyGrid(4, 1.0, 0.01, rule="other")


def test_random_ambient_range():
    from core.rendering.shading import sample_ambient

    s = load_params().coarse.shading
    g = torch.Generator().manual_seed(0)
    draws = [sample_ambient(s, "lambertian", g) for _ in range(200)]
    assert all(s.ambient <= a <= 1.0 and abs(a + d - 1.0) < 1e-9 for a, d in draws)
    assert max(a for a, _ in draws) > 0.9 and min(a for a, _ in draws) < 0.2
    fixed = s.model_copy(update={"random_ambient": False})
    assert sample_ambient(fixed, "lambertian", g) == (s.ambient, s.diffuse)
    assert sample_ambient(s, "albedo", g) == (s.ambient, s.diffuse)  # unshaded views draw nothing


def test_spread_permutation_is_a_bijection():
    from core.representations.nerf import _spread_permutation

    for n in (2, 7, 4096, 1_000_003, 1_000_003 * 3):
        p = _spread_permutation(n, "cpu")
        assert torch.equal(torch.sort(p).values, torch.arange(n))
    p = _spread_permutation(4096, "cpu")
    assert int((p[1:] - p[:-1]).abs().min()) > 1  # neighbours are moved apart


def test_rand_on_cpu_is_the_generator_stream():
    from core.representations.nerf import rand_on

    a = rand_on((5, 3), torch.Generator().manual_seed(3), "cpu")
    b = torch.rand(5, 3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_the_points_are_spread_unless_the_triton_grid_sums_their_runs():
    """coarse.grid.spread: 'auto' (the default) evaluates the points in the renderer's order for the
    Triton grid's 'runs' atomics (spread, a ray's samples no longer make runs) and spread for the
    other backends' per-point atomics; 'always' and 'never' as said. The fine stage's colour field (a copy
    of the coarse field) takes the setting again from the params, as it does the atomics; off a GPU,
    or without gradients, nothing is spread."""
    from core.representations.nerf import spread_wanted

    assert load_params("magic123").coarse.grid.spread == "auto"
    assert not spread_wanted("auto", "triton", "runs")
    assert spread_wanted("auto", "triton", "scalar") and spread_wanted("auto", "torch", "runs")
    assert spread_wanted("auto", "tcnn", None)
    assert spread_wanted("always", "triton", "runs") and not spread_wanted("never", "torch", "runs")
    field = NeRFField.from_params(load_params("smoke", ["coarse.grid.spread=always"]))
    assert field.spread == "always" and not field.spreads(torch.rand(8, 3))  # a CPU tensor
    from core.stages.fine import DMTetRepresentation

    p = load_params("smoke", ["coarse.grid.spread=never"])
    rep = DMTetRepresentation(p, NeRFField.from_params(load_params("smoke")), torch.device("cpu"))
    assert rep.colour.field.spread == "never"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_spread_evaluation_gives_the_same_field_and_gradients_on_cuda():
    field = NeRFField(levels=4, log2_table_size=12, max_resolution=64, device="cuda", backend="torch")
    x = torch.rand(5000, 3, device="cuda") * 2 - 1
    outs = []
    for spread in ("never", "always"):  # coarse.grid.spread
        field.spread = spread
        field.zero_grad()
        raw, logits = field.raw(x)
        (raw.sum() + logits.square().sum()).backward()
        outs.append((raw.detach(), logits.detach(), field.encoding.table.grad.clone()))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_compiled_renderer_gives_the_eager_images_and_gradients():
    """coarse.compile: the renderer's arithmetic between the field's evaluations under torch.compile
    (here Inductor's CPU backend; on a GPU, tests/test_gpu_backends.py) gives the eager images and
    the eager gradients to every parameter, for each shading mode, the reference rays' offsets and
    views of different active-sample counts (the weights' and images' functions compile once for any
    count: a fifth render, lambertian again from other views, compiles nothing new)."""
    from torch._dynamo.utils import counters

    from core.rendering.cameras import Cameras
    from core.stages.coarse import NeRFRepresentation

    rep = NeRFRepresentation(load_params("smoke"), torch.device("cpu"))
    rep.occupancy.update(rep.field, rep.step_size, torch.Generator().manual_seed(3))
    views = [Cameras.make([60.0, 80.0], [10.0, -40.0], 1.8, 40.0)] * 4 + [Cameras.make([95.0, 70.0], [150.0, 60.0], 2.0, 40.0)]
    offsets = (torch.tensor([0.01, 0.0, -0.02]), torch.tensor([0.0, 0.003, 0.0]))
    runs, counts = {}, []
    for compiled in (False, True):
        rep.compiled = compiled
        g = torch.Generator().manual_seed(5)
        runs[compiled] = []
        for i, (cams, shading) in enumerate(zip(views, ("lambertian", "albedo", "normal", "textureless", "lambertian"))):
            if compiled and i == 4:
                frames = counters["stats"]["unique_graphs"]
            rep.field.zero_grad(set_to_none=True)
            out = rep.render(cams, 24, shading=shading, light_dir=None, ambient=0.1 + 0.2 * i, diffuse=0.8,
                             generator=g, ray_offsets=offsets if shading == "albedo" else None)
            loss = out.rgb.square().sum() + out.opacity.sum() + out.depth.sum()
            if out.normal is not None:
                loss = loss + out.normal.sum() + out.normal_sg.sum()
            loss.backward()
            counts.append(out.sample_weights.numel())
            runs[compiled].append([out.rgb, out.opacity, out.depth, out.albedo, out.normal, out.normal_sg,
                                   out.sample_weights] + [q.grad.clone() for q in rep.field.parameters()])
        assert not compiled or counters["stats"]["unique_graphs"] == frames
    for a, b in zip(runs[False], runs[True]):
        assert len(a) == len(b) and a[-1] is not None
        for x, y in zip(a, b):
            assert (x is None) == (y is None)
            if x is not None:
                assert x.shape == y.shape and torch.allclose(x, y, rtol=1e-4, atol=1e-5), float((x - y).abs().max())
    assert runs[False][0][1].sum() > 1.0  # the blob is seen: the images are not all background
    assert counts[4] != counts[0]  # the fifth render's active samples are another count


_SAMPLES_CHILD = r"""
import sys, torch
from core.rendering.cameras import Cameras
from core.representations.nerf import _ray_samples
from core.representations.samples_triton import triton_ray_samples

g = torch.Generator().manual_seed(0)
cams = Cameras.make(torch.tensor([70.0, 95.0]), torch.tensor([30.0, -120.0]), torch.tensor([1.8, 2.2]),
                    torch.tensor([40.0, 55.0]))
H, W, S, bound = 12, 10, 16, 1.0
occ = torch.rand(16, 16, 16, generator=g) < 0.4
lo, hi = torch.tensor([-0.7, -0.6, -0.8]), torch.tensor([0.5, 0.7, 0.6])
jit = torch.rand(2 * H * W, S, generator=g)
off = (torch.randn(3, generator=g) * 0.05, torch.randn(3, generator=g) * 0.05)
res = {}
for name, kw in {"plain": dict(jitter=None, offset_o=None, offset_d=None, lo=-bound, hi=bound, occupied=None),
                 "all": dict(jitter=jit, offset_o=off[0], offset_d=off[1], lo=lo, hi=hi, occupied=occ)}.items():
    args = (cams.c2w(), cams.focal(H), H, W, S, kw["jitter"], kw["offset_o"], kw["offset_d"], kw["lo"], kw["hi"],
            kw["occupied"], bound)
    res[name] = dict(torch=_ray_samples(*args), triton=triton_ray_samples(*args))
torch.save(res, sys.argv[1])
"""


def test_triton_samples_give_the_tensor_passes_rays_and_samples(tmp_path):
    """coarse.samples triton (one kernel; the default on a GPU) against the tensors' pass, under Triton's
    interpreter on the CPU: two cameras of different fields of view at 12×10, 16 samples a ray, with and
    without the jitter, the reference rays' offsets, a box and an occupancy grid: rays, cosines, sample
    distances, spacings and positions within a few float units, the same active samples."""
    from _interpreted import run_interpreted

    res = run_interpreted(_SAMPLES_CHILD, tmp_path / "samples.pt")
    names = ("o", "d", "cos", "t", "delta", "pts", "active")
    for case, r in res.items():
        for name, a, b in zip(names, r["torch"], r["triton"]):
            assert a.shape == b.shape and a.dtype == b.dtype, (case, name, a.shape, b.shape)
            if name == "active":
                assert torch.equal(a, b), (case, int((a != b).sum()))
            else:
                assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (case, name, float((a - b).abs().max()))
    active = res["all"]["torch"][-1]
    assert 0.05 < active.float().mean() < 0.6  # the box and the grid leave some samples, not all
    assert res["plain"]["torch"][-1].float().mean() > 0.3


def test_samples_setting_picks_the_tensor_pass_off_a_gpu_and_refuses_triton_there():
    from core.errors import Lift3DError
    from core.representations.hashgrid import triton_kind

    assert triton_kind("auto", "cpu", "coarse.samples") == "torch"
    with pytest.raises(Lift3DError, match="coarse.samples is 'triton' but the device is not CUDA"):
        triton_kind("triton", "cpu", "coarse.samples")
    p = load_params("smoke", {"coarse.samples": "triton"})
    from core.stages.coarse import NeRFRepresentation

    with pytest.raises(Lift3DError, match="coarse.samples"):
        NeRFRepresentation(p, torch.device("cpu"))


def test_positive_cumprod_is_torchs_cumprod_forward_and_backward_bit_for_bit(monkeypatch):
    """The transmittance's cumprod with torch's no-zero backward taken without asking the device
    (torch's asks the host whether an input is 0: a GPU sync each coarse backward): the same values
    and gradients as torch.cumprod, bit for bit, on factors 1 − α + 1e-10 down to 1e-10, and a whole
    render's every parameter gradient the same as with torch.cumprod."""
    import core.representations.nerf as nerf

    g = torch.Generator().manual_seed(0)
    a = torch.rand(200, 64, generator=g)
    a[a > 0.85] = 1.0  # opaque samples: the factor is 1e-10
    x = torch.cat([torch.ones(200, 1), 1.0 - a + 1e-10], 1).requires_grad_(True)
    w = torch.randn(200, 65, generator=g)
    grads = []
    for f in (lambda t: torch.cumprod(t, 1), nerf.positive_cumprod):
        x.grad = None
        y = f(x)
        (y * w).sum().backward()
        grads.append((y.detach(), x.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])

    f = NeRFField(**SMALL, blob_scale=10.0, blob_std=0.5)
    cams = reference_cameras(load_params().camera)
    res = []
    for cp in (lambda t: torch.cumprod(t, 1), nerf.positive_cumprod):
        monkeypatch.setattr(nerf, "positive_cumprod", cp)
        f.zero_grad(set_to_none=True)
        out = render(f, cams, 12, samples_per_ray=32, need_normals=True, shading="lambertian", perturb=True,
                     generator=torch.Generator().manual_seed(1))
        (out.rgb.square().sum() + out.depth.sum() + out.opacity.sum()).backward()
        res.append([q.grad.clone() for q in f.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(*res))


def test_compaction_gives_the_nonzeros_indices():
    """The render's compaction (both sizes read in one wait for the device): the active samples'
    indices and, within them, the positions of those of weight ≥ the normals' threshold, as two
    nonzeros give them; with no weights, no positions."""
    from core.representations.nerf import _compaction

    g = torch.Generator().manual_seed(0)
    for p_active in (0.0, 0.3, 1.0):
        active = torch.rand(64, 48, generator=g) < p_active
        w0 = torch.rand(64 * 48, generator=g) * 2e-4
        idx, nsel = _compaction(active, w0, 1e-4)
        ref = active.reshape(-1).nonzero(as_tuple=True)[0]
        assert torch.equal(idx, ref)
        assert torch.equal(nsel, (w0[ref] >= 1e-4).nonzero(as_tuple=True)[0])
        assert idx.dtype == nsel.dtype == torch.long
        if p_active == 0.3:
            assert 0 < len(nsel) < len(idx)
        idx2, none = _compaction(active, None, 1e-4)
        assert torch.equal(idx2, ref) and none is None
