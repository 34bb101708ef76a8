"""The PyTorch hash grid against tiny-cuda-nn's formulas, computed by hand point by point."""
import math

import pytest
import torch

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
    with torch.no_grad():
        g.table.uniform_(-1, 1)
    x = torch.rand(40, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x[0] = torch.tensor([1.0, 1.0, 1.0])  # the far corner wraps around in dense levels, as in tcnn
    x[1] = torch.tensor([-1.0, -1.0, -1.0])
    assert torch.allclose(g(x), naive_encode(g, x), atol=1e-5)


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
