"""The PyTorch rasteriser (core/rendering/raster.py) against analytic values, and its gradients."""
import numpy as np
import pytest
import torch

from core.rendering.cameras import Cameras
from core.rendering.mesh_render import clip_positions, render_mesh
from core.rendering.raster import make_rasterizer, opposite_vertices
from core.representations.dmtet import Mesh


def _analytic(pos, tri, H, W):
    """Per pixel: nearest triangle (−1) and its perspective-correct barycentrics, by solving
    Σ b_i (X_i − x W_i) = 0, Σ b_i (Y_i − y W_i) = 0, Σ b_i = 1 for each triangle."""
    ids = -np.ones((H, W), int)
    bary = np.zeros((H, W, 3))
    zbest = np.full((H, W), np.inf)
    margin = np.zeros((H, W))
    for i in range(H):
        for j in range(W):
            x, y = 2 * (j + 0.5) / W - 1, 2 * (i + 0.5) / H - 1
            for f, t in enumerate(tri):
                P = pos[t]
                A = np.stack([P[:, 0] - x * P[:, 3], P[:, 1] - y * P[:, 3], np.ones(3)])
                b = np.linalg.solve(A, [0, 0, 1])
                if (b >= 0).all():
                    z = (b @ P[:, 2]) / (b @ P[:, 3])
                    if z < zbest[i, j]:
                        zbest[i, j], ids[i, j], bary[i, j], margin[i, j] = z, f, b, b.min()
    return ids, bary, zbest, margin


def _scene():
    """Two overlapping triangles at different depths, seen by a perspective camera."""
    verts = torch.tensor([[-0.5, -0.4, 0.0], [0.45, -0.35, 0.1], [0.0, 0.5, -0.1],
                          [-0.2, -0.1, 0.3], [0.6, 0.1, 0.25], [-0.1, 0.55, 0.35]])
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    cams = Cameras.make(80.0, 20.0, 1.8, 40.0)
    return verts, faces, cams


def test_triangle_ids_and_barycentrics_match_analytic():
    verts, faces, cams = _scene()
    pos = clip_positions(verts, cams)
    H = W = 40
    r = make_rasterizer("torch")
    rast = r.rasterize(pos, faces, (H, W))[0].numpy()
    ids, bary, z, margin = _analytic(pos[0].double().numpy(), faces.numpy(), H, W)
    got = rast[..., 3].astype(int) - 1
    clear = (ids < 0) | (margin > 1e-3)  # away from edges, where the fill rule could go either way
    assert (ids >= 0).sum() > 200 and (ids == 1).sum() > 50 and (ids == 0).sum() > 50
    assert (got[clear] == ids[clear]).all()
    cov = clear & (ids >= 0)
    np.testing.assert_allclose(rast[cov][:, 0], bary[cov][:, 0], atol=1e-4)
    np.testing.assert_allclose(rast[cov][:, 1], bary[cov][:, 1], atol=1e-4)
    np.testing.assert_allclose(rast[cov][:, 2], z[cov], atol=1e-4)
    # interpolating positions gives the 3D point that projects to the pixel centre
    xyz = r.interpolate(verts, torch.from_numpy(rast)[None], faces)[0]
    pc = cams.project(xyz[torch.from_numpy(cov)][None], H)[0]
    ii, jj = np.nonzero(cov)
    np.testing.assert_allclose(pc[:, 0].numpy(), jj + 0.5, atol=1e-3)
    np.testing.assert_allclose(pc[:, 1].numpy(), (H - 1 - ii) + 0.5, atol=1e-3)  # rows flip (row 0 at y = −1)


def test_antialiased_coverage_gradient_matches_the_area_derivative():
    """d(Σ antialiased mask)/d(vertex) ≈ d(triangle area in pixels)/d(vertex): the silhouette
    blending turns the mask into a differentiable coverage."""
    g = torch.Generator().manual_seed(3)
    H = W = 48
    r = make_rasterizer("torch")
    tri = torch.tensor([[0, 1, 2]])
    cosines = []
    while len(cosines) < 5:
        xy = torch.rand(3, 2, generator=g) * 1.6 - 0.8
        p = ((xy + 1) * 0.5 * W).requires_grad_(True)
        area = 0.5 * ((p[1, 0] - p[0, 0]) * (p[2, 1] - p[0, 1]) - (p[2, 0] - p[0, 0]) * (p[1, 1] - p[0, 1])).abs()
        if float(area) < 25:
            continue
        area.backward()
        analytic = p.grad * 0.5 * W  # per unit of NDC
        pos = torch.cat([xy, torch.zeros(3, 1), torch.ones(3, 1)], 1)[None].requires_grad_(True)
        rast = r.rasterize(pos, tri, (H, W))
        aa = r.antialias((rast[..., 3:] > 0).float(), rast, pos, tri)
        assert abs(float(aa.sum()) - float(area)) < 0.15 * float(area)
        aa.sum().backward()
        got = pos.grad[0, :, :2]
        cosines.append(float(torch.nn.functional.cosine_similarity(got.flatten(), analytic.flatten(), dim=0)))
        assert 0.7 < float(got.norm() / analytic.norm()) < 1.3
    assert min(cosines) > 0.95


def test_mask_gradients_reach_vertex_positions():
    """A silhouette loss moves the vertices the right way: the triangle grows towards a larger target."""
    H = W = 32
    r = make_rasterizer("torch")
    tri = torch.tensor([[0, 1, 2]])
    big = torch.tensor([[-0.8, -0.8, 0, 1], [0.8, -0.8, 0, 1], [0.0, 0.8, 0, 1]])[None]
    target = (r.rasterize(big, tri, (H, W))[..., 3:] > 0).float()
    pos = (big * torch.tensor([0.7, 0.7, 1, 1])).clone().requires_grad_(True)
    rast = r.rasterize(pos, tri, (H, W))
    aa = r.antialias((rast[..., 3:] > 0).float(), rast, pos, tri)
    loss = ((aa - target) ** 2).sum()
    loss.backward()
    gxy = pos.grad[0, :, :2]
    assert gxy.abs().sum() > 0
    # gradient descent moves each vertex outwards (away from the centroid)
    outward = big[0, :, :2] - big[0, :, :2].mean(0)
    assert ((-gxy * outward).sum(-1) > 0).all()
    # the loss falls after a small step
    with torch.no_grad():
        p2 = pos - 0.02 * pos.grad / pos.grad.norm()
        rast2 = r.rasterize(p2, tri, (H, W))
        aa2 = r.antialias((rast2[..., 3:] > 0).float(), rast2, p2, tri)
        assert ((aa2 - target) ** 2).sum() < loss


def test_opposite_vertices_of_a_closed_surface():
    tet = torch.tensor([[0, 2, 1], [0, 1, 3], [1, 2, 3], [0, 3, 2]])
    opp = opposite_vertices(tet)
    assert (opp >= 0).all()
    for f in range(4):
        for i in range(3):  # the opposite vertex is the one vertex of the tetrahedron not on f
            assert int(opp[f, i]) == ({0, 1, 2, 3} - set(tet[f].tolist())).pop()
    open_ = opposite_vertices(torch.tensor([[0, 1, 2]]))
    assert (open_ == -1).all()


def test_render_mesh_fields_and_background():
    verts, faces, cams = _scene()
    r = make_rasterizer("torch")
    out = render_mesh(Mesh(verts, faces), lambda x: torch.full_like(x, 0.25), cams, 32, r, shading="albedo")
    assert out.rgb.shape == (1, 3, 32, 32) and out.opacity.shape == (1, 1, 32, 32)
    empty = out.opacity[0, 0] == 0
    assert torch.all(out.rgb[0][:, empty] == 1.0)  # white background
    inside = out.opacity[0, 0] == 1
    assert torch.allclose(out.rgb[0][:, inside], torch.tensor(0.25))
    d = out.depth[0, 0][inside]
    assert (d > 1.0).all() and (d < 2.6).all()  # z-depth of points near the origin from radius 1.8
    n = out.normal[0][:, inside]
    assert torch.allclose(n.norm(dim=0), torch.ones(n.shape[1]), atol=1e-4)
    for mode in ("lambertian", "textureless", "normal"):
        o = render_mesh(Mesh(verts, faces), lambda x: torch.full_like(x, 0.5), cams, 16, r, shading=mode)
        assert torch.isfinite(o.rgb).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and nvdiffrast")
def test_nvdiffrast_matches_torch():
    pytest.importorskip("nvdiffrast.torch")
    verts, faces, cams = _scene()
    pos = clip_positions(verts, cams).cuda()
    a = make_rasterizer("torch", "cuda").rasterize(pos, faces.cuda(), (64, 64))
    b = make_rasterizer("nvdiffrast", "cuda").rasterize(pos, faces.cuda().int(), (64, 64))
    same = a[..., 3] == b[..., 3]
    assert same.float().mean() > 0.99
    both = same & (a[..., 3] > 0)
    torch.testing.assert_close(a[both][:, :3], b[both][:, :3], atol=1e-4, rtol=1e-4)


def test_coverage_is_the_same_in_many_chunks_as_in_one(monkeypatch):
    """The torch rasteriser cuts its (triangle, pixel) candidates into chunks where their running sum
    passes a multiple of the chunk size: any chunk size gives the same triangle ids, also one
    smaller than a triangle's candidates (chunks of one triangle, and cuts that fall twice in one)."""
    import trimesh

    from core.rendering import raster

    m = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    verts = torch.tensor(m.vertices, dtype=torch.float32)
    verts = verts + 0.03 * torch.randn(len(verts), 3, generator=torch.Generator().manual_seed(0))
    pos = clip_positions(verts, Cameras.make([70.0, 100.0], [10.0, 200.0], [1.8, 2.2], [40.0, 40.0]))
    faces = torch.tensor(m.faces)
    whole = raster._coverage(pos, faces, 67, 67)
    assert (whole >= 0).sum() > 3000
    for size in (3_000, 5_000, 9_000, 7):  # a few chunks, each ending elsewhere; 7: below the larger triangles' boxes
        monkeypatch.setattr(raster, "_CANDIDATE_CHUNK", size)
        assert torch.equal(raster._coverage(pos, faces, 67, 67), whole), size
    assert torch.equal(opposite_vertices(faces, len(verts)), opposite_vertices(faces))


def test_uncovered_pixels_give_zeros_and_finite_gradients():
    """rasterize and interpolate compute every pixel with fixed shapes (no host syncs) and keep zeros
    where no triangle covers: a first triangle that is degenerate with a vertex at w = 0 (what an
    uncovered pixel would read without the stand-in) leaves no NaN in the gradients."""
    verts, faces, cams = _scene()
    pos = clip_positions(verts, cams).detach()
    pos = torch.cat([pos, torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])], 1)  # w = 0
    tri = torch.cat([torch.tensor([[6, 7, 6]]), faces])  # degenerate, drawn nowhere
    pos.requires_grad_(True)
    attr = torch.randn(1, 8, 3, requires_grad=True)
    r = make_rasterizer("torch")
    rast = r.rasterize(pos, tri, (32, 32))
    val = r.interpolate(attr, rast, tri)
    empty = rast[..., 3] == 0
    assert empty.sum() > 100 and (~empty).sum() > 100
    assert (rast[empty] == 0).all() and (val[empty] == 0).all() and (rast[..., 3][~empty] >= 2).all()
    (rast[..., :3].square().sum() + val.square().sum()).backward()
    assert torch.isfinite(pos.grad).all() and torch.isfinite(attr.grad).all() and pos.grad[0, :6].abs().sum() > 0


def test_vertex_gather_is_indexing_with_a_fixed_order_backward():
    """raster._gather_vertices: the values of advanced indexing, and a gradient summed by index_add
    (fixed order) — advanced indexing's index_put-with-accumulate backward varied between runs on a
    2-thread CPU at these sizes, which broke the killed-and-resumed stage test's bit-equality."""
    from core.rendering.raster import _gather_vertices

    g = torch.Generator().manual_seed(0)
    values = torch.randn(2, 50, 4, generator=g, requires_grad=True)
    v = torch.randint(0, 50, (2, 96, 96, 3), generator=g)
    out = _gather_vertices(values, v)
    assert torch.equal(out, values[torch.arange(2).view(2, 1, 1, 1), v])
    w = torch.randn(out.shape, generator=g)
    grads = [torch.autograd.grad((_gather_vertices(values, v) * w).sum(), values)[0] for _ in range(3)]
    assert all(torch.equal(grads[0], q) for q in grads[1:])
    ref = torch.zeros(2, 50, 4, dtype=torch.float64)
    ref.index_put_((torch.arange(2).view(2, 1, 1, 1).expand_as(v), v), w.double(), accumulate=True)
    torch.testing.assert_close(grads[0].double(), ref, rtol=1e-5, atol=1e-4)


def test_antialias_gathers_vertices_with_a_fixed_order_backward():
    """raster._gather_at (antialias's per-pixel vertex gathers, many pixels to a vertex): the values
    of advanced indexing, and index_select's fixed-order backward, so a CPU run at paper resolution
    resumes bit for bit (the hazard of _gather_vertices, above)."""
    from core.rendering.raster import _gather_at

    g = torch.Generator().manual_seed(1)
    values = torch.randn(3, 40, 4, generator=g, requires_grad=True)
    b = torch.randint(0, 3, (5000,), generator=g)
    v = torch.randint(0, 40, (5000, 3), generator=g)
    out = _gather_at(values, b, v)
    assert torch.equal(out, values[b[:, None], v]) and out.grad_fn.name().startswith("View")
    assert torch.equal(_gather_at(values, b, v[:, 0]), values[b, v[:, 0]])
    w = torch.randn(out.shape, generator=g)
    grads = [torch.autograd.grad((_gather_at(values, b, v) * w).sum(), values)[0] for _ in range(3)]
    assert all(torch.equal(grads[0], q) for q in grads[1:])
    ref = torch.zeros(3, 40, 4, dtype=torch.float64)
    ref.index_put_((b[:, None].expand_as(v), v), w.double(), accumulate=True)
    torch.testing.assert_close(grads[0].double(), ref, rtol=1e-5, atol=1e-4)


def test_antialias_of_one_pixel_wide_or_high_images():
    """The one pass over both directions of pixel pairs: an image one pixel wide has vertical pairs
    only, one pixel high horizontal ones only. A triangle over all of it changes nothing; one with
    an edge across it blends the two pixels at the edge and no other."""
    from core.rendering.raster import torch_antialias, torch_rasterize

    everywhere = torch.tensor([[[-3.0, -3.0, 0.0, 1.0], [3.0, -3.0, 0.0, 1.0], [-3.0, 3.0, 0.0, 1.0]]])
    half = torch.tensor([[[-3.0, -3.0, 0.0, 1.0], [0.1, -3.0, 0.0, 1.0], [0.1, 3.0, 0.0, 1.0],
                          [-3.0, 3.0, 0.0, 1.0]]])  # x < 0.1 covered, for every y
    tri, quad = torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, 2], [0, 2, 3]])
    for H, W in ((1, 8), (8, 1), (1, 1)):
        colour = torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(H * 10 + W))
        assert torch.equal(torch_antialias(colour, torch_rasterize(everywhere, tri, (H, W)), everywhere, tri), colour)
    for H, W in ((1, 8), (8, 1)):
        p = half if W > 1 else half[..., [1, 0, 2, 3]]  # the edge x = 0.1, or y = 0.1 for the tall image
        rast = torch_rasterize(p, quad, (H, W))
        colour = (rast[..., 3:] > 0).float().expand(1, H, W, 3).contiguous()
        out = torch_antialias(colour, rast, p, quad).reshape(-1, 3)
        changed = torch.nonzero((out != colour.reshape(-1, 3)).any(1)).squeeze(1).tolist()
        assert 1 <= len(changed) <= 2 and all(i in (3, 4) for i in changed), changed  # pixels 3 | 4 straddle 0.1


def test_compiled_rasteriser_renders_without_gradients_eagerly(monkeypatch):
    """fine.compile: a render without gradients (the outputs, the texture's bake) takes the eager
    functions, so nothing is compiled for a few renders at new sizes; the images are the eager ones.
    (With gradients the compiled functions serve: tests/test_gpu_backends.py.)"""
    from core import perf
    from core.perf import compile_kind
    from core.rendering.raster import Rasterizer

    def no_compile(*a, **k):
        raise AssertionError("torch.compile called for a render without gradients")

    monkeypatch.setattr(torch, "compile", no_compile)
    monkeypatch.setattr(perf, "_COMPILED", {})
    verts, faces, cams = _scene()
    eager, compiled = Rasterizer("torch", torch.device("cpu")), Rasterizer("torch", torch.device("cpu"), compiled=True)
    with torch.no_grad():
        a, b = (render_mesh(Mesh(verts, faces), lambda x: x.sigmoid(), cams, 32, r, shading="lambertian")
                for r in (eager, compiled))
    assert torch.equal(a.rgb, b.rgb) and torch.equal(a.opacity, b.opacity) and not perf._COMPILED
    # fine.compile's auto is compiled only on a GPU; an unknown mode is an error
    assert compile_kind("auto", "cpu") == compile_kind("default", "cpu") == "none"
    with pytest.raises(ValueError, match="fine.compile"):
        compile_kind("fast", "cpu")


def _opposite_by_dict(tri: torch.Tensor) -> torch.Tensor:
    """opposite_vertices by a Python dict of the undirected edges (the reference)."""
    faces = tri.tolist()
    by_edge: dict = {}
    for f, t in enumerate(faces):
        for i in range(3):
            by_edge.setdefault(frozenset((t[(i + 1) % 3], t[(i + 2) % 3])), []).append((f, i))
    out = torch.full((len(faces), 3), -1, dtype=torch.long)
    for users in by_edge.values():
        if len(users) == 2:
            (f, i), (g, j) = users
            out[f, i], out[g, j] = faces[g][j], faces[f][i]
    return out


def test_opposite_vertices_without_compaction_are_the_dicts():
    """Issue 15, session 21: the neighbours across each edge found without a compaction (no host
    sync), against a dict of edges on meshes with boundaries, non-manifold edges (three triangles on
    one) and repeated triangles; with and without the vertex count given, and from the mesh's shared
    edge sort (core.ops.sorted_edge_keys, which the fine stage's regularisers read: session 34)."""
    import trimesh

    from core.ops import sorted_edge_keys

    m = trimesh.creation.icosphere(subdivisions=2)
    sphere = torch.tensor(m.faces)
    g = torch.Generator().manual_seed(3)
    meshes = [sphere, sphere[:57], torch.cat([sphere, sphere[:5]]),  # closed, open, doubled triangles
              torch.cat([sphere, torch.tensor([[0, 1, 7], [1, 0, 9]])]),  # edge (0, 1) on three and four
              torch.randint(0, 12, (40, 3), generator=g), torch.tensor([[0, 1, 2]])]
    for tri in meshes:
        expected = _opposite_by_dict(tri)
        assert torch.equal(opposite_vertices(tri), expected)
        assert torch.equal(opposite_vertices(tri, int(tri.max()) + 5), expected)
        n = int(tri.max()) + 1
        assert torch.equal(opposite_vertices(tri, n, sorted_edge_keys(tri, n)), expected)
    assert opposite_vertices(torch.zeros((0, 3), dtype=torch.long)).shape == (0, 3)


def test_antialias_gradient_stays_finite_where_the_coverage_rounded_the_other_way():
    """A coverage pass whose multiply-adds round differently from the antialias's edge functions (the
    Triton kernel's on a GPU, nvdiffrast's) can give a triangle a pixel whose centre lies just outside
    one of its edges. Where that edge runs along a pixel pair, both centres have the same edge value,
    and the crossing's division was 0 / 0 in the backward: every vertex gradient NaN under a finite
    loss (session 24: a fine stage stopped at step 0). The pair is not blended, as before, and the
    gradient is finite."""
    from core.rendering.raster import torch_antialias, torch_rasterize

    H = W = 8

    def clip(x, y):  # screen → clip, w = 1
        return [x / W * 2 - 1, y / H * 2 - 1, 0.0, 1.0]

    # a horizontal edge at y = 3.25, a quarter pixel above row 3's centres
    pos = torch.tensor([[clip(0.5, 3.25), clip(6.5, 3.25), clip(3.5, 0.25)]], requires_grad=True)
    tri = torch.tensor([[0, 1, 2]])
    rast = torch_rasterize(pos, tri, (H, W)).detach().clone()
    assert not (rast[0, 3, :, 3] > 0).any()  # row 3 is outside the triangle by the tensors' arithmetic
    color = torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(0))
    rast[0, 3, 3, 3], rast[0, 3, 3, 2] = 1.0, rast[0, 2, 3, 2]  # pixel (3, 3) given to the triangle
    out = torch_antialias(color, rast, pos, tri)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(pos.grad).all() and pos.grad.abs().sum() > 0


def test_pixel_barycentrics_stay_finite_on_a_zero_area_pixel():
    """A covered pixel whose triangle's edge functions sum to exactly 0 there (a sliver the coverage
    pass kept by its corners' area) gets its first corner's barycentrics (1, 0), finite where 0 / 0
    was NaN in the image and the gradient; other pixels are unchanged."""
    from core.rendering.raster import _STAND_IN, _pixel_rast

    H = W = 4
    p = torch.tensor(_STAND_IN).expand(1, H, W, 3, 4).clone()
    p[0, 1, 2] = torch.tensor([[-1.0, -0.25, 0.0, 1.0], [0.0, -0.25, 0.0, 1.0], [1.0, -0.25, 0.0, 1.0]])  # collinear
    p.requires_grad_(True)
    tid = torch.full((1, H, W), -1)
    tid[0, 1, 2] = 0
    tid[0, 2, 1] = 0
    r = _pixel_rast(p, tid, torch.tensor(_STAND_IN))
    r[..., :3].sum().backward()
    assert torch.isfinite(r).all() and torch.isfinite(p.grad).all()
    assert r[0, 1, 2, :2].tolist() == [1.0, 0.0]  # the sliver's pixel: its first corner
    # the stand-in triangle's pixel: the barycentrics of its centre, as without the sliver beside it
    alone = _pixel_rast(torch.tensor(_STAND_IN).expand(1, H, W, 3, 4), tid, torch.tensor(_STAND_IN))
    assert torch.equal(r[0, 2, 1], alone[0, 2, 1]) and r[0, 2, 1, 3] == 1.0


def test_rows_taken_element_by_element_give_index_selects_values_and_gradients_bit_for_bit():
    """core.ops.gather_flat (gather_rows on a GPU for rows of 16 to 64 bytes, which CUDA's index_select
    copies a thread block a row): the same rows as index_select, and the same gradient to the bit,
    repeated indices included (its index_add adds each element's contributions in the index's order)."""
    from core.ops import gather_flat, gather_rows

    g = torch.Generator().manual_seed(0)
    for shape, dtype in (((500, 4), torch.float32), ((300, 2, 3), torch.float64), ((50, 4), torch.long)):
        values = (torch.randn(shape, generator=g) * 100).to(dtype)
        idx = torch.randint(0, shape[0], (4000,), generator=g)
        assert torch.equal(gather_flat(values, idx), values.index_select(0, idx))
        if dtype.is_floating_point:
            a, b = values.clone().requires_grad_(True), values.clone().requires_grad_(True)
            up = torch.randn(4000, *shape[1:], generator=g, dtype=dtype)
            gather_flat(a, idx).backward(up)
            b.index_select(0, idx).backward(up)
            assert torch.equal(a.grad, b.grad)
    # off a GPU gather_rows keeps index_select (the rows' path is the GPU's alone)
    v = torch.randn(10, 4, requires_grad=True)
    assert type(gather_rows(v, torch.tensor([[1, 2], [3, 3]])).grad_fn).__name__ == "ViewBackward0"
    assert type(gather_rows(v, torch.tensor([1, 2])).grad_fn.next_functions[0][0]).__name__ == "IndexSelectBackward0"


def test_antialias_without_its_second_compaction_blends_as_the_compacted_pairs_did():
    """torch_antialias blends every pixel pair with a zero weight where it is no silhouette (session
    37), where it blended only the compacted silhouette pairs (`keep`, a wait for the device): the
    same image and the same gradients, bit for bit, on a noisy DMTet blob from three cameras; and the
    pixel pairs handed in by Rasterizer.compactions (read in one wait with the covered pixels) are
    the ones it finds itself."""
    from core.rendering.cameras import orbit_cameras
    from core.rendering.raster import _pair_edges, opposite_vertices, pixel_pairs, torch_antialias
    from core.representations.dmtet import DMTet

    dm = DMTet(12, 1.0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        dm.sdf.copy_(0.6 - dm.grid_verts.norm(dim=-1) + 0.25 * torch.rand(dm.sdf.shape, generator=g))
    mesh = dm.extract().detach()
    cams, H = orbit_cameras(3, 70.0, 2.2, 40.0), 48
    r = make_rasterizer("torch")
    rast = r.rasterize(clip_positions(mesh.verts, cams), mesh.faces, (H, H))
    tri, tid = mesh.faces, rast[..., 3].long() - 1
    covered = rast[..., 3] > 0
    pix, pairs = r.compactions(covered, rast)
    assert torch.equal(pix, torch.nonzero(covered.reshape(-1)).squeeze(1))
    assert torch.equal(pairs, torch.nonzero(pixel_pairs(tid)).squeeze(1))
    colour = torch.rand(3, H, H, 4, generator=g)

    def compacted(color, pos):  # the blend of sessions 20–36: only the silhouette pairs, compacted
        opp = opposite_vertices(tri, pos.shape[1])
        blend, t_grad, pT, pO = _pair_edges(pairs, tid, rast[..., 2], pos, tri, opp)
        keep = torch.nonzero(blend).squeeze(1)
        flat_c = color.reshape(-1, 4)
        tt, pTo, pOo = t_grad[keep].clamp(0.0, 1.0), pT[keep], pO[keep]
        cT, cO = flat_c[pTo], flat_c[pOo]
        alpha = (0.5 - tt)[:, None]
        to_T = alpha.detach()[:, 0] > 0
        delta = torch.where(to_T[:, None], alpha * (cO - cT), (-alpha) * (cT - cO))
        return flat_c.index_add(0, torch.where(to_T, pTo, pOo), delta).view(color.shape)

    w = torch.rand(3, H, H, 4, generator=g)
    results = []
    for fn in (compacted, lambda c, p: torch_antialias(c, rast, p, tri, pairs=pairs),
               lambda c, p: torch_antialias(c, rast, p, tri)):
        c, p = colour.clone().requires_grad_(True), clip_positions(mesh.verts, cams).requires_grad_(True)
        out = fn(c, p)
        results.append((out.detach(), *torch.autograd.grad((out * w).sum(), (c, p))))
    blended = (results[0][0] != colour).any(-1).sum()
    assert blended > 20  # silhouette pixels moved
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_pairs_left_unblended_reach_neither_the_image_nor_the_gradient():
    """_blend_pairs zeroes a pair's weight before any arithmetic where it is no silhouette: its t
    (±inf where no edge was crossed; NaN from a degenerate triangle) changes no pixel and no gradient,
    as when such pairs were compacted away."""
    from core.rendering.raster import _blend_pairs

    g = torch.Generator().manual_seed(4)
    color = torch.rand(1, 2, 3, 3, generator=g, requires_grad=True)
    pT, pO = torch.tensor([0, 1, 3, 4]), torch.tensor([1, 2, 4, 5])
    blend = torch.tensor([True, False, False, True])
    t = torch.tensor([0.2, float("nan"), float("inf"), 0.7], requires_grad=True)
    out = _blend_pairs(color, blend, t, pT, pO)
    gc, gt = torch.autograd.grad(out.sum() + (out ** 2).sum(), (color, t))
    assert torch.isfinite(gc).all() and torch.isfinite(gt).all()
    assert gt[1] == 0 and gt[2] == 0 and gt[0] != 0 and gt[3] != 0
    flat, moved = color.detach().reshape(-1, 3), out.detach().reshape(-1, 3)
    # pair 0 moves T's pixel 0 (t < ½), pair 3 the other's, pixel 5 (t > ½); the unblended pairs' 1–4 stay
    assert torch.equal(moved[1:5], flat[1:5])
    assert not torch.equal(moved[0], flat[0]) and not torch.equal(moved[5], flat[5])
