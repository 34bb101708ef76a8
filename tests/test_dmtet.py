"""DMTet (core/representations/dmtet.py): marching tetrahedra on analytic SDFs, init from a density field, colour copy."""
import math

import torch
from torch import nn

from core.representations.dmtet import DMTet, ColourField, NUM_TRIANGLES, TRIANGLE_TABLE, boundary_edge_count, marching_tets


def _closed_manifold(faces):
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], 0).sort(1).values
    _, counts = torch.unique(e, dim=0, return_counts=True)
    return bool((counts == 2).all())


def _signed_volume(verts, faces):
    v = verts[faces]
    return float((v[:, 0] * torch.cross(v[:, 1], v[:, 2], dim=-1)).sum() / 6)


def test_triangle_table_covers_all_cases():
    assert NUM_TRIANGLES.tolist() == [0, 1, 1, 2, 1, 2, 2, 1, 1, 2, 2, 1, 2, 1, 1, 0]
    for code in range(1, 15):  # complementary codes give the same triangles, flipped
        a = TRIANGLE_TABLE[code][: NUM_TRIANGLES[code]]
        b = TRIANGLE_TABLE[15 - code][: NUM_TRIANGLES[code]]
        assert sorted(map(sorted, a.tolist())) == sorted(map(sorted, b.tolist()))


def test_marching_tets_sphere_watertight_and_accurate():
    R = 0.55
    dm = DMTet(24, 1.0)
    dm.init_from_sdf(lambda x: R - x.norm(dim=-1))  # positive inside
    mesh = dm.extract()
    assert mesh.faces.shape[0] > 1000
    assert boundary_edge_count(mesh.faces) == 0 and _closed_manifold(mesh.faces)
    V, E = mesh.verts.shape[0], mesh.faces.shape[0] * 3 // 2
    assert V - E + mesh.faces.shape[0] == 2  # Euler characteristic of a sphere
    r = mesh.verts.detach().norm(dim=-1)
    assert (r - R).abs().max() < 0.1 * dm.spacing
    vol = _signed_volume(mesh.verts.detach(), mesh.faces)  # > 0: faces point outwards
    assert abs(vol - 4 / 3 * math.pi * R ** 3) / (4 / 3 * math.pi * R ** 3) < 0.03


def test_marching_tets_is_differentiable_in_sdf_and_deformation():
    dm = DMTet(12, 1.0)
    dm.init_from_sdf(lambda x: 0.5 - x.norm(dim=-1))
    mesh = dm.extract()
    mesh.verts.norm(dim=-1).sum().backward()
    assert dm.sdf.grad.abs().sum() > 0 and dm.deform.grad.abs().sum() > 0
    # growing the SDF everywhere moves the surface outwards
    with torch.no_grad():
        before = dm.extract().verts.norm(dim=-1).mean()
        dm.sdf += 0.02
        after = dm.extract().verts.norm(dim=-1).mean()
    assert after > before


def test_torus_has_genus_one():
    dm = DMTet(32, 1.0)

    def torus(x):
        q = torch.stack([torch.sqrt(x[:, 0] ** 2 + x[:, 2] ** 2) - 0.5, x[:, 1]], -1)
        return 0.2 - q.norm(dim=-1)

    dm.init_from_sdf(torus)
    m = dm.extract()
    assert _closed_manifold(m.faces)
    V, F = m.verts.shape[0], m.faces.shape[0]
    assert V - F * 3 // 2 + F == 0


class BlobField(nn.Module):
    """A stand-in for the coarse NeRF: density of an ellipsoid, a learnable colour."""

    axes = torch.tensor([0.5, 0.35, 0.3])

    def __init__(self):
        super().__init__()
        self.colour = nn.Parameter(torch.tensor([0.2, 0.5, 0.8]))

    def ellipsoid(self, x):
        return (x / self.axes).norm(dim=-1)

    def density(self, x):
        return 40.0 * torch.relu(1.5 - self.ellipsoid(x))  # 20 on the unit ellipsoid

    def albedo(self, x):
        return self.colour.expand(x.shape[0], 3) * (0.5 + 0.5 * torch.sigmoid(x[:, :1]))


def test_init_from_density_reproduces_the_level_set():
    field = BlobField()
    dm = DMTet(32, 1.0)
    dm.init_from_density(field.density, threshold=20.0)
    assert (dm.deform == 0).all()
    m = dm.extract()
    assert _closed_manifold(m.faces)
    # the extracted surface lies on the density's level set σ = threshold (the unit ellipsoid)
    e = field.ellipsoid(m.verts.detach())
    assert (e - 1).abs().max() < 0.05
    # and it covers it: points of the level set are close to the mesh's vertices
    g = torch.Generator().manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(500, 3, generator=g), dim=-1)
    pts = d / (d / field.axes).norm(dim=-1, keepdim=True)
    nearest = torch.cdist(pts, m.verts.detach()).min(1).values
    assert nearest.max() < dm.spacing


def test_colour_field_is_a_trainable_copy():
    field = BlobField()
    cf = ColourField(field)
    x = torch.rand(10, 3)
    torch.testing.assert_close(cf(x), field.albedo(x))
    opt = torch.optim.Adam(cf.trainable_parameters(), lr=0.1)
    cf(x).sum().backward()
    opt.step()
    assert not torch.allclose(cf(x), field.albedo(x))
    torch.testing.assert_close(field.colour.detach(), torch.tensor([0.2, 0.5, 0.8]))


def test_empty_and_full_grids_give_empty_meshes():
    pos = torch.rand(4, 3)
    tets = torch.tensor([[0, 1, 2, 3]])
    assert marching_tets(pos, -torch.ones(4), tets).faces.shape[0] == 0
    assert marching_tets(pos, torch.ones(4), tets).faces.shape[0] == 0


def test_init_from_a_density_below_the_threshold_lowers_the_level(caplog):
    # a faint blob (peak density 4) never reaches the mesh threshold 10: the start mesh is taken at
    # half the peak, as the coarse mesh is, instead of starting (and staying) empty
    dm = DMTet(16, 1.0)
    with caplog.at_level("WARNING"):
        dm.init_from_density(lambda x: 4.0 * torch.exp(-(x.norm(dim=-1) / 0.4) ** 2), 10.0)
    mesh = dm.extract()
    assert mesh.faces.shape[0] > 100
    r = mesh.verts.detach().norm(dim=-1)  # σ = 2 at r = 0.4·sqrt(ln 2) ≈ 0.333
    assert (r.mean() - 0.4 * math.sqrt(math.log(2))).abs() < 0.05
    assert "never crosses" in caplog.text
    empty = DMTet(16, 1.0)
    empty.init_from_density(lambda x: torch.zeros(x.shape[0]), 10.0)
    assert empty.extract().faces.shape[0] == 0


def test_mesh_gradients_are_the_same_bits_run_to_run():
    """The fine stage's gradient through the mesh (marching tets' interpolation, vertex normals, the
    normal-consistency and Laplacian regularisers) is the same to the bit on every run. Advanced
    indexing's backward adds a vertex's many contributions with atomics across a CPU's threads, in
    an order that changes from run to run; two `lift3d refine` runs of one coarse checkpoint
    drifted apart from their first guided step (session 12). Gathers by index_select sum in index
    order."""
    from core.rendering.mesh_render import vertex_normals
    from core.stages.losses import mesh_laplacian_loss, mesh_laplacian_loss_unnormalised, mesh_normal_consistency

    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        dm = DMTet(40, 1.0)
        dm.init_from_sdf(lambda x: 0.6 - x.norm(dim=-1) + 0.05 * torch.sin(9 * x).prod(-1))
        with torch.no_grad():
            dm.deform.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))

        def grads():
            dm.zero_grad(set_to_none=True)
            mesh = dm.extract()
            w = torch.linspace(-1, 1, mesh.verts.numel()).view_as(mesh.verts)
            loss = ((vertex_normals(mesh.verts, mesh.faces) * w).sum() + mesh_normal_consistency(mesh.verts, mesh.faces)
                    + mesh_laplacian_loss(mesh.verts, mesh.faces)
                    + mesh_laplacian_loss_unnormalised(mesh.verts, mesh.faces) + (mesh.verts * w).sum())
            loss.backward()
            return dm.sdf.grad.clone(), dm.deform.grad.clone()

        first = grads()
        assert first[0].abs().sum() > 0 and first[1].abs().sum() > 0
        for _ in range(5):
            again = grads()
            assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    finally:
        torch.set_num_threads(threads)


def test_surface_voxels_give_the_mesh_of_every_tetrahedron():
    """extract() marches only the tetrahedra of voxels the surface passes through (surface_tets): the
    same vertices, faces and gradients, in the same order, as marching every tetrahedron of the grid."""
    dm = DMTet(14, 1.0)  # all_tets: the grid of tests/test_tets.py (orientation, conformity)
    assert dm.all_tets().shape == (dm.num_tets, 4) == (6 * 14 ** 3, 4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # two blobs and noise: many cut voxels, some isolated
        x = dm.grid_verts
        dm.sdf.copy_(0.5 - (x - 0.2).norm(dim=-1) + 0.3 * torch.rand(x.shape[0], generator=g) - 0.15)
        dm.deform.copy_(torch.randn(x.shape, generator=g))
    sub = dm.surface_tets()
    assert 0 < sub.shape[0] < dm.num_tets and sub.shape[0] % 6 == 0
    fast, full = dm.extract(), marching_tets(dm.vertices(), dm.sdf, dm.all_tets())
    assert torch.equal(fast.faces, full.faces) and torch.equal(fast.verts, full.verts)
    w = torch.randn(fast.verts.shape, generator=g)
    grads = [torch.autograd.grad((m.verts * w).sum(), (dm.sdf, dm.deform)) for m in (fast, full)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_surface_voxels_are_those_whose_corners_differ_up_to_the_grids_far_faces():
    """surface_tets' two max pools pick the voxels whose 8 corners are not all on one side, as the
    corners' sum did, in the grid's order: on random signs, and where only a far corner vertex
    (index r on an axis, beyond every voxel's (0,0,0) corner) is inside: then its one voxel only."""
    r, n = 5, 6
    dm = DMTet(r, 1.0)
    g = torch.Generator().manual_seed(11)

    def by_corners():
        occ = (dm.sdf > 0).view(n, n, n).long()
        corners = sum(occ[a:a + r, b:b + r, c:c + r] for a in (0, 1) for b in (0, 1) for c in (0, 1))
        return dm._voxel_tets(torch.nonzero(((corners > 0) & (corners < 8)).reshape(-1)).squeeze(1))

    for sdf in (torch.randn(n ** 3, generator=g), torch.ones(n ** 3), -torch.ones(n ** 3)):
        with torch.no_grad():
            dm.sdf.copy_(sdf)
        assert torch.equal(dm.surface_tets(), by_corners())
    for corner in ((r, r, r), (r, 0, r), (0, r, 0)):  # grid corners: each in one voxel
        with torch.no_grad():
            dm.sdf.fill_(-1.0)
            dm.sdf.view(n, n, n)[corner] = 1.0
        tets = dm.surface_tets()
        assert tets.shape == (6, 4) and torch.equal(tets, by_corners())
        assert (tets == (corner[0] * n + corner[1]) * n + corner[2]).any()  # the voxel has that corner
