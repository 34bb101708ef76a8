"""The project's tetrahedral grid (core/representations/tets.py), as DMTet forms it: orientation,
volume, conformity."""
import numpy as np

from core.representations.dmtet import DMTet
from core.representations.tets import tet_faces, tet_volumes


def _grid(resolution: int, bound: float):
    """DMTet's grid as numpy: its vertices and every tetrahedron (all_tets)."""
    dm = DMTet(resolution, bound)
    return dm.grid_verts.numpy(), dm.all_tets().numpy()


def test_kuhn_grid_volumes_positive_and_fill_the_cube():
    bound = 0.7
    verts, tets = _grid(5, bound)
    assert verts.shape == (6 ** 3, 3) and tets.shape == (6 * 5 ** 3, 4)
    vol = tet_volumes(verts, tets)
    assert (vol > 0).all()
    np.testing.assert_allclose(vol, (2 * bound / 5) ** 3 / 6, rtol=1e-5)
    np.testing.assert_allclose(vol.sum(), (2 * bound) ** 3, rtol=1e-6)
    assert np.abs(verts).max() <= bound + 1e-6


def test_shared_faces_are_consistent():
    """Every interior triangle belongs to exactly two tets, with opposite orientations; every
    other triangle lies on the cube's boundary."""
    r = 4
    verts, tets = _grid(r, 1.0)
    faces = tet_faces(tets).reshape(-1, 3)
    key = np.sort(faces, 1)
    uniq, inv, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    assert counts.max() == 2
    boundary = uniq[counts == 1]
    on_side = np.isclose(np.abs(verts[boundary]), 1.0)  # (Fb, 3 verts, 3 axes)
    assert (on_side.all(1).any(-1)).all(), "a face used by one tet must lie on a cube side"
    assert len(boundary) == 6 * 2 * r * r  # each side: r² squares, two triangles each
    # opposite orientation: the oriented normals of the two copies point in opposite directions
    v = verts[faces]
    n = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    inv = inv.reshape(-1)
    shared = np.nonzero(counts[inv] == 2)[0]
    order = shared[np.argsort(inv[shared], kind="stable")]
    a, b = order[0::2], order[1::2]
    assert (inv[a] == inv[b]).all()
    dots = (n[a] * n[b]).sum(-1)
    assert (dots < 0).all()
    # outward: a tet's face normal points away from its fourth vertex
    t = tets[:7]
    f = tet_faces(t)
    for i in range(4):
        fv = verts[f[:, i]]
        nn = np.cross(fv[:, 1] - fv[:, 0], fv[:, 2] - fv[:, 0])
        assert ((nn * (verts[t[:, i]] - fv[:, 0])).sum(-1) < 0).all()

