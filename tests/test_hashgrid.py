"""The PyTorch hash grid against tiny-cuda-nn's formulas, computed by hand point by point; the
Triton backend against the PyTorch one (on the CPU through Triton's interpreter)."""
import math

import pytest
import torch
from _interpreted import run_interpreted

from core.representations.hashgrid import HashGrid, copy_hashgrid_params, level_layout, per_level_scale, tcnn_available


def naive_encode(g: HashGrid, x: torch.Tensor) -> torch.Tensor:
    """tiny-cuda-nn's GridEncoding for one point at a time, in Python integers and floats."""
    u = ((x + g.bound) / (2 * g.bound)).clamp(0, 1)
    table = g.table.detach()
    rows = []
    for p in u.tolist():
        feats = []
        for lvl in range(g.levels):
            s, r = float(g.scales[lvl]), int(g.resolutions[lvl])
            n, off = int(g.entries[lvl]), int(g.offsets[lvl])
            pos = [s * c + 0.5 for c in p]
            c0 = [math.floor(q) for q in pos]
            f = [q - math.floor(q) for q in pos]
            acc = [0.0] * g.features_per_level
            for k in range(8):
                b = [(k >> d) & 1 for d in range(3)]
                c = [c0[d] + b[d] for d in range(3)]
                w = 1.0
                for d in range(3):
                    w *= f[d] if b[d] else 1.0 - f[d]
                if r ** 3 <= n:
                    idx = c[0] + c[1] * r + c[2] * r * r
                else:
                    idx = (c[0] * 1) ^ ((c[1] * 2654435761) & 0xFFFFFFFF) ^ ((c[2] * 805459861) & 0xFFFFFFFF)
                row = idx % n + off
                for j in range(g.features_per_level):
                    acc[j] += w * float(table[row, j])
            feats += acc
        rows.append(feats)
    return torch.tensor(rows)


def test_layout_matches_tcnn_rules():
    b = per_level_scale(16, 16, 2048)
    assert b == pytest.approx(math.exp((math.log(2048) - math.log(16)) / 15))
    scales, res, entries, offsets, dense, total = level_layout(16, 16, b, 19)
    assert res[0] == 16 and scales[0] == pytest.approx(15.0)  # 2^0·16 − 1, resolution ceil + 1
    for r, n, dns in zip(res, entries, dense):
        assert n == (min(-(-r ** 3 // 8) * 8, 1 << 19))
        assert dns == (r ** 3 <= n)
    assert offsets[1] == entries[0] and total == sum(entries)
    assert dense[0] and not dense[-1]


def test_torch_encoding_equals_hand_computation():
    g = HashGrid(levels=6, features_per_level=2, log2_table_size=10, base_resolution=4, max_resolution=200,
                 bound=1.0, backend="torch")
    assert 0 < g.n_dense < g.levels  # both dense and hashed levels are exercised
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        g.table.copy_(torch.rand(g.table.shape, generator=gen) * 2 - 1)
    x = torch.rand(40, 3, generator=gen) * 2 - 1
    x[0] = torch.tensor([1.0, 1.0, 1.0])  # the far corner wraps around in dense levels, as in tcnn
    x[1] = torch.tensor([-1.0, -1.0, -1.0])
    # the reference works in float64, the grid in float32: at the finest level (scale ≈ 200) one
    # float32 ulp of the cell position is 1.5e-5, which moves a weight, and so a feature made of
    # table values in [−1, 1], by up to ~3e-5 (session 33: the table drawn from the global stream
    # put the largest difference anywhere in 5e-6 … 1.3e-5 against the old 1e-5 bound, 1 run in ~15)
    assert torch.allclose(g(x), naive_encode(g, x), atol=5e-5, rtol=0)


def test_hash_of_a_known_corner():
    g = HashGrid(levels=1, features_per_level=2, log2_table_size=8, base_resolution=64, max_resolution=64, backend="torch")
    assert g.n_dense == 0
    c = (5, 7, 11)
    s = float(g.scales[0])
    u = torch.tensor([[(c[0] - 0.5 + 0.25) / s, (c[1] - 0.5 + 0.25) / s, (c[2] - 0.5 + 0.25) / s]])
    idx, w = g.corner_indices(u)
    expect = (5 ^ (7 * 2654435761) ^ (11 * 805459861)) & 0xFFFFFFFF
    assert int(idx[0, 0, 0]) == expect % 256
    expect_111 = (6 ^ ((8 * 2654435761) & 0xFFFFFFFF) ^ ((12 * 805459861) & 0xFFFFFFFF)) % 256
    assert int(idx[0, 0, 7]) == expect_111
    assert torch.allclose(w.sum(-1), torch.ones(1, 1))


def test_interpolation_is_exact_at_grid_vertices():
    g = HashGrid(levels=1, features_per_level=3, log2_table_size=12, base_resolution=9, max_resolution=9, backend="torch")
    with torch.no_grad():
        g.table.normal_()
    s = float(g.scales[0])
    r = int(g.resolutions[0])
    verts = torch.tensor([[1, 2, 3], [4, 1, 7], [8, 8, 1]])  # u = (v − 0.5)/s stays inside [0, 1]
    u = (verts.float() - 0.5) / s  # p = s·u + 0.5 lands exactly on the vertex
    x = u * 2 - 1
    out = g(x)
    rows = verts[:, 0] + verts[:, 1] * r + verts[:, 2] * r * r
    assert torch.allclose(out, g.table.detach()[rows], atol=1e-5)


def test_gradients_flow_to_table_and_input():
    g = HashGrid(levels=4, features_per_level=2, log2_table_size=10, base_resolution=4, max_resolution=64, backend="torch")
    x = (torch.rand(64, 3) * 1.8 - 0.9).requires_grad_(True)
    y = g(x)
    (gx,) = torch.autograd.grad(y.pow(2).sum() + y.sum(), x, create_graph=True)
    assert torch.isfinite(gx).all()
    (gx.pow(2).sum() + y.sum()).backward()  # second order reaches the table (analytic normals)
    assert g.table.grad is not None and g.table.grad.abs().sum() > 0


def test_fused_lookup_matches_autograd():
    """Constant positions take the fused table lookup; its output and table gradient equal plain
    autograd's (the path taken when the positions need gradients)."""
    g = HashGrid(levels=5, features_per_level=2, log2_table_size=10, base_resolution=4, max_resolution=96, backend="torch")
    with torch.no_grad():
        g.table.uniform_(-1, 1)
    x = torch.rand(500, 3) * 1.9 - 0.95
    up = torch.randn(500, g.output_dim)
    y_fused = g(x)
    (y_fused * up).sum().backward()
    grad_fused = g.table.grad.clone()
    g.table.grad = None
    y_plain = g(x.clone().requires_grad_(True))
    (y_plain * up).sum().backward()
    assert torch.allclose(y_fused, y_plain, atol=1e-6)
    assert torch.allclose(grad_fused, g.table.grad, atol=1e-5)
    assert grad_fused.abs().sum() > 0


def test_param_copy_round_trip():
    a = HashGrid(levels=5, log2_table_size=11, base_resolution=4, max_resolution=100, backend="torch", seed=1)
    b = HashGrid(levels=5, log2_table_size=11, base_resolution=4, max_resolution=100, backend="torch", seed=2)
    x = torch.rand(100, 3) * 2 - 1
    assert not torch.allclose(a(x), b(x))
    copy_hashgrid_params(a, b)
    assert torch.equal(a(x), b(x))
    c = HashGrid(levels=4, log2_table_size=11, base_resolution=4, max_resolution=100, backend="torch")
    with pytest.raises(ValueError):
        copy_hashgrid_params(a, c)


def test_backend_choice():
    g = HashGrid(levels=2, log2_table_size=8, base_resolution=4, max_resolution=8, backend="auto")
    assert g.backend == "torch"  # CPU: always the torch path
    with pytest.raises(ValueError):
        HashGrid(levels=2, log2_table_size=8, backend="cuda")
    if not tcnn_available():
        with pytest.raises(RuntimeError):
            HashGrid(levels=2, log2_table_size=8, backend="tcnn")


def test_recomputed_lookup_gives_the_same_gradient_bit_for_bit_and_saves_only_positions():
    """grid.recompute_backward: the backward recomputes the corner rows and weights from the saved
    positions; output and table gradient equal the stored-rows lookup exactly, and the autograd
    graph holds the (N, 3) positions instead of the (N, L, 8) rows and weights."""
    g = HashGrid(levels=5, features_per_level=2, log2_table_size=10, base_resolution=4, max_resolution=96, backend="torch")
    with torch.no_grad():
        g.table.uniform_(-1, 1)
    x = torch.rand(500, 3) * 1.9 - 0.95
    up = torch.randn(500, g.output_dim)
    saved = {}
    for mode in (True, False):
        g.recompute_backward = mode
        g.table.grad = None
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.numel()) or t, lambda t: t):
            y = g(x)
        (y * up).sum().backward()
        saved[mode] = (y.detach().clone(), g.table.grad.clone(), sum(packed))
    assert torch.equal(saved[True][0], saved[False][0]) and torch.equal(saved[True][1], saved[False][1])
    assert saved[True][1].abs().sum() > 0
    assert saved[True][2] == 500 * 3 and saved[False][2] == 2 * 500 * 5 * 8


def test_the_params_switch_reaches_the_field():
    from core.params import load_params
    from core.representations.nerf import NeRFField

    for flag in (True, False):
        p = load_params("tiny", [f"coarse.grid.recompute_backward={str(flag).lower()}"])
        assert NeRFField.from_params(p).encoding.recompute_backward is flag


def test_chunked_encoding_gives_the_same_values_and_gradients():
    """grid.chunk: encoding N points a chunk at a time equals encoding them at once."""
    g = HashGrid(levels=5, features_per_level=2, log2_table_size=10, base_resolution=4, max_resolution=96, backend="torch")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        g.table.uniform_(-1, 1, generator=gen)
    x = torch.rand(1000, 3, generator=gen) * 1.9 - 0.95
    up = torch.randn(1000, g.output_dim, generator=gen)
    res = {}
    for chunk in (0, 128):
        g.chunk, g.table.grad = chunk, None
        y = g(x)
        (y * up).sum().backward()
        res[chunk] = (y.detach(), g.table.grad.clone())
    # the table gradient sums ~10-sized contributions in another order: a few ulps of 10 apart
    assert torch.equal(res[0][0], res[128][0]) and torch.allclose(res[0][1], res[128][1], atol=1e-5)


# --------------------------------------------------------------------------------- triton backend
# Under Triton's interpreter in a child process (tests/_interpreted.py). The child evaluates both backends on the same table, points and output gradients and saves the tensors;
# the tests compare them here.
TRITON_CONFIGS = {
    "magic123": dict(levels=16, features_per_level=2, log2_table_size=19, base_resolution=16, max_resolution=2048),
    "small": dict(levels=6, features_per_level=2, log2_table_size=14, base_resolution=16, max_resolution=128),
    "small_F4": dict(levels=4, features_per_level=4, log2_table_size=12, base_resolution=8, max_resolution=96),
    "tiny_F1": dict(levels=3, features_per_level=1, log2_table_size=10, base_resolution=4, max_resolution=64),
}

_TRITON_CHILD = r"""
import sys, torch
from core.representations.hashgrid import HashGrid, copy_hashgrid_params
from core.representations.nerf import NeRFField

configs, out = eval(sys.argv[1]), sys.argv[2]
gen = torch.Generator().manual_seed(3)


def pair(cfg):
    a = HashGrid(**cfg, backend="torch")
    b = HashGrid(**cfg, backend="triton")
    with torch.no_grad():
        a.table.copy_(torch.rand(a.table.shape, generator=gen) * 2 - 1)
    copy_hashgrid_params(a, b)
    return a, b


def points(g, n):
    # random points; points whose cell position p = s·u + 0.5 is a whole number at some level (cell
    # boundaries); the 8 corners of the cube and coordinates at u = 0 and u = 1 (x = ±bound)
    u = torch.rand(n, 3, generator=gen)
    k = n // 4
    s = g.scales[torch.randint(0, g.levels, (k,), generator=gen)][:, None]
    u[:k] = ((torch.floor(torch.rand(k, 3, generator=gen) * s) + 1 - 0.5) / s).clamp(0, 1)
    u[k:k + 8] = torch.tensor([[(i >> d) & 1 for d in range(3)] for i in range(8)], dtype=torch.float32)
    u[k + 8:k + 16, 0] = 0.0
    u[k + 16:k + 24, 1] = 1.0
    return u * 2 * g.bound - g.bound


def rays(g, n_rays=6, n_samples=64):
    # points as the renderer hands them over: each ray's samples one after another, 0.8/64 apart,
    # so that runs of them share a cell at the coarse levels (coarse.grid.atomics 'runs')
    o = (torch.rand(n_rays, 3, generator=gen) - 0.5) * g.bound
    d = torch.nn.functional.normalize(torch.randn(n_rays, 3, generator=gen), dim=1)
    return (o[:, None] + d[:, None] * torch.linspace(0, 0.8 * g.bound, n_samples)[None, :, None]).reshape(-1, 3)


res = {}
for name, cfg in configs.items():
    a, b = pair(cfg)
    b.atomics = "scalar"  # each point's own adds here; the runs on the rays below
    x = points(a, 256)
    up = torch.randn(x.shape[0], a.output_dim, generator=gen)
    ya, yb = a(x), b(x)
    (ya * up).sum().backward()
    (yb * up).sum().backward()
    with torch.no_grad():
        y_nograd = b(x)
    res[name] = dict(backend=b.backend, n_dense=a.n_dense, levels=a.levels, grad_fn=type(yb.grad_fn).__name__,
                     y_torch=ya.detach(), y_triton=yb.detach(), y_triton_nograd=y_nograd,
                     g_torch=a.table.grad, g_triton=b.table.grad)
    xr = rays(a)
    upr = torch.randn(xr.shape[0], a.output_dim, generator=gen)
    a.table.grad = b.table.grad = None
    (a(xr) * upr).sum().backward()
    b.atomics = "runs"
    (b(xr) * upr).sum().backward()
    res[name].update(g_torch_rays=a.table.grad, g_runs_rays=b.table.grad)
    # positions whose gradient is wanted once (fine.grid_position_grads 'triton'): the kernels'
    # position gradient against autograd's through the torch code, on the same points
    b.position_grads = "triton"
    a.table.grad = b.table.grad = None
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya2, yb2 = a(xa), b(xb)
    (ya2 * up).sum().backward()
    (yb2 * up).sum().backward()
    res[name].update(pos_grad_fn=type(yb2.grad_fn).__name__, y_pos=yb2.detach(), gx_torch=xa.grad, gx_triton=xb.grad,
                     gt_pos_torch=a.table.grad, gt_pos_triton=b.table.grad)
    b.table.requires_grad_(False)  # the positions alone (a frozen table)
    xc = x.clone().requires_grad_(True)
    (b(xc) * up).sum().backward()
    res[name].update(gx_frozen_table=xc.grad)
    b.table.requires_grad_(True)
    b.position_grads = "torch"

# positions that need gradients (analytic normals: a double backward): the torch code, same table
a, b = pair(configs["small"])
x = points(a, 64)
fb = {}
for key, g in (("torch", a), ("triton", b)):
    xx = x.clone().requires_grad_(True)
    y = g(xx)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), xx, create_graph=True)
    gx.pow(2).sum().backward()
    fb[key] = dict(y=y.detach(), gx=gx.detach(), g=g.table.grad, grad_fn=type(y.grad_fn).__name__)
res["fallback"] = fb

# a state dict saved on one backend loads on the other
cfg = dict(levels=4, log2_table_size=10, base_resolution=4, max_resolution=64, hidden=16, layers=2)
fa, fb_ = NeRFField(**cfg, backend="torch", seed=1), NeRFField(**cfg, backend="triton", seed=2)
xs = torch.rand(50, 3, generator=gen) * 2 - 1
with torch.no_grad():
    before = fb_.raw(xs)[0]
    fb_.load_portable_state_dict(fa.state_dict())
    res["state"] = dict(torch=fa.raw(xs), triton=fb_.raw(xs), before=before, backend=fb_.encoding.backend)
torch.save(res, out)
"""


@pytest.fixture(scope="module")
def triton_run(tmp_path_factory):
    return run_interpreted(_TRITON_CHILD, tmp_path_factory.mktemp("triton") / "results.pt", repr(TRITON_CONFIGS))


@pytest.mark.parametrize("name", list(TRITON_CONFIGS))
def test_triton_forward_equals_torch(triton_run, name):
    r = triton_run[name]
    assert r["backend"] == "triton" and r["grad_fn"] == "TritonLookupBackward"  # the kernel ran
    assert 0 < r["n_dense"] < r["levels"]  # dense and hashed levels both run
    torch.testing.assert_close(r["y_triton"], r["y_torch"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r["y_triton_nograd"], r["y_torch"], rtol=1e-6, atol=1e-6)  # the forward-only launch


@pytest.mark.parametrize("name", list(TRITON_CONFIGS))
def test_triton_table_gradient_equals_torch(triton_run, name):
    r = triton_run[name]
    assert r["g_torch"].abs().sum() > 0
    # points share corners within a block (the coarse levels): every one of them must be added
    torch.testing.assert_close(r["g_triton"], r["g_torch"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(TRITON_CONFIGS))
def test_runs_of_points_in_one_cell_add_the_table_gradient_once(triton_run, name):
    """coarse.grid.atomics 'runs': on the dense levels a run of consecutive points in one cell sums its
    gradient before its one atomic add a corner; the table gradient is the torch backend's."""
    r = triton_run[name]
    assert r["g_torch_rays"].abs().sum() > 0
    torch.testing.assert_close(r["g_runs_rays"], r["g_torch_rays"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(TRITON_CONFIGS))
def test_triton_position_gradients_equal_torch(triton_run, name):
    """fine.grid_position_grads 'triton': positions that need their gradient once (the fine stage's
    surface points) stay in the kernels, whose backward gives the position gradient autograd gives
    through the torch code (points on cell boundaries and at the cube's faces among them), and the
    same table gradient; with the table frozen, the positions' alone."""
    r = triton_run[name]
    assert r["pos_grad_fn"] == "TritonLookupBackward"  # the kernels ran, not the torch fallback
    torch.testing.assert_close(r["y_pos"], r["y_torch"], rtol=1e-6, atol=1e-6)
    assert r["gx_torch"].abs().sum() > 0
    scale = float(r["gx_torch"].abs().max())
    torch.testing.assert_close(r["gx_triton"], r["gx_torch"], rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(r["gx_frozen_table"], r["gx_torch"], rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(r["gt_pos_triton"], r["gt_pos_torch"], rtol=1e-5, atol=1e-5)


def test_triton_falls_back_to_torch_for_positions_that_need_gradients(triton_run):
    a, b = triton_run["fallback"]["torch"], triton_run["fallback"]["triton"]
    assert b["grad_fn"] != "TritonLookupBackward"
    for key in ("y", "gx", "g"):  # values, position gradients and the double backward's table gradient
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    assert b["g"].abs().sum() > 0


def test_a_state_dict_loads_across_backends(triton_run):
    r = triton_run["state"]
    assert r["backend"] == "triton" and not torch.allclose(r["before"], r["torch"][0])
    torch.testing.assert_close(r["triton"], r["torch"], rtol=1e-6, atol=1e-6)


def test_triton_backend_choice(monkeypatch):
    from core.representations.nerf import NeRFField

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    small = dict(levels=2, log2_table_size=8, base_resolution=4, max_resolution=8)
    assert HashGrid(**small, backend="auto").backend == "torch"
    with pytest.raises(RuntimeError, match="'triton'") as err:
        HashGrid(**small, backend="triton")
    assert "\n" not in str(err.value)
    # a field saved from the triton backend, loaded on a machine without CUDA
    f = NeRFField(**small, backend="torch", hidden=8, layers=2)
    g = NeRFField.from_state(dict(f.config, backend="triton"), f.state_dict())
    assert g.encoding.backend == "torch"


def test_the_atomics_setting_reaches_the_coarse_and_fine_grids():
    """coarse.grid.atomics reaches the coarse field's hash grid and, through the fine stage's colour
    field loaded from it, the fine stage's; a value outside runs | scalar is refused."""
    from core.params import load_params
    from core.representations.nerf import NeRFField
    from core.stages.fine import DMTetRepresentation

    p = load_params("smoke", {"coarse.grid.atomics": "scalar"})
    field = NeRFField.from_params(p)
    assert field.encoding.atomics == "scalar"
    loaded = NeRFField.from_state(field.config, field.state_dict())
    assert loaded.encoding.atomics == "runs"
    rep = DMTetRepresentation(p, loaded, torch.device("cpu"))
    assert rep.colour.field.encoding.atomics == "scalar"
    with pytest.raises(Exception, match="atomics"):
        load_params("smoke", {"coarse.grid.atomics": "pairs"})


def test_the_fine_colour_grid_differentiates_its_points_where_the_params_say():
    """fine.grid_position_grads: 'auto' has the Triton kernels differentiate the fine stage's surface
    points where the colour field's grid runs on them, and the torch code elsewhere (here, a CPU);
    'triton' on another backend is refused in one line; the coarse field's grid keeps the torch code
    for positions (its analytic normals differentiate twice)."""
    from core.params import ParamsError, load_params
    from core.representations.nerf import NeRFField
    from core.stages.fine import DMTetRepresentation, grid_position_grads

    assert load_params("magic123").fine.grid_position_grads == "auto"
    assert grid_position_grads("auto", "triton") == "triton" and grid_position_grads("auto", "torch") == "torch"
    assert grid_position_grads("torch", "triton") == "torch" and grid_position_grads("auto", "tcnn") == "torch"
    with pytest.raises(ParamsError, match="fine.grid_position_grads is 'triton' but the hash grid runs on torch") as err:
        grid_position_grads("triton", "torch")
    assert "\n" not in str(err.value)
    p = load_params("smoke")
    field = NeRFField.from_params(p)
    assert field.encoding.position_grads == "torch"
    rep = DMTetRepresentation(p, field, torch.device("cpu"))
    assert rep.colour.field.encoding.position_grads == "torch"
    with pytest.raises(ParamsError, match="grid_position_grads"):
        DMTetRepresentation(load_params("smoke", ["fine.grid_position_grads=triton"]), field, torch.device("cpu"))


def test_the_fine_colour_mlp_takes_its_own_precision_or_the_coarse_ones():
    """fine.mlp_precision: 'coarse' (the default) keeps coarse.mlp.precision for the colour field's
    MLP; 'bf16' or 'fp32' set it for the fine stage alone, the coarse field untouched and the coarse
    stage's digest the same (so a fine run can change it without the coarse stage running again);
    bf16 really runs: the colours differ from fp32's within bf16's rounding."""
    from core.params import load_params, step_digest
    from core.representations.nerf import NeRFField
    from core.stages.fine import DMTetRepresentation

    cpu = torch.device("cpu")
    base = load_params("smoke")
    assert base.fine.mlp_precision == "coarse"
    field = NeRFField.from_params(base)
    assert DMTetRepresentation(base, field, cpu).colour.field.mlp_precision == "fp32"
    coarse_bf16 = load_params("smoke", ["coarse.mlp.precision=bf16"])
    field16 = NeRFField.from_params(coarse_bf16)
    assert DMTetRepresentation(coarse_bf16, field16, cpu).colour.field.mlp_precision == "bf16"
    back = load_params("smoke", ["coarse.mlp.precision=bf16", "fine.mlp_precision=fp32"])
    assert DMTetRepresentation(back, field16, cpu).colour.field.mlp_precision == "fp32"
    fine16 = load_params("smoke", ["fine.mlp_precision=bf16"])
    assert step_digest(fine16, "coarse") == step_digest(base, "coarse")
    assert step_digest(fine16, "fine") != step_digest(base, "fine")
    rep32, rep16 = DMTetRepresentation(base, field, cpu), DMTetRepresentation(fine16, field, cpu)
    assert rep16.colour.field.mlp_precision == "bf16" and field.mlp_precision == "fp32"
    x = torch.rand(4096, 3, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    c32, c16 = rep32.colour(x).detach(), rep16.colour(x).detach()
    assert c16.dtype == torch.float32 and not torch.equal(c32, c16)
    assert (c32 - c16).abs().max() < 0.02
