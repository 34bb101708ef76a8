"""The fine stage (core/stages/fine.py) end to end on CPU, oracle-guided, from a stand-in coarse field;
and the mesh regularisers of core/stages/losses.py."""
import json
import math

import pytest
import torch
from torch import nn

from core.stages.engine import erode_mask
from core.stages.fine import run_fine
from core.oracle.guidance import OracleGuidance
from core.stages.losses import mesh_laplacian_loss, mesh_normal_consistency
from core.oracle.objects import make_object
from core.params import load_params
from core.oracle.bench_fine import chamfer_relative, fine_reference, mesh_chamfer, sample_mesh_surface


class StandInField(nn.Module):
    """What core.representations.nerf.load_field gives (density, albedo), built from a known object: density is a
    soft indicator of the object (level set 10 at its surface, offset outwards by `offset`), the
    colour a learnable field that starts grey."""

    def __init__(self, obj, offset=0.0):
        super().__init__()
        self.obj, self.offset = obj, offset
        self.colour = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 3))
        nn.init.zeros_(self.colour[2].weight)
        nn.init.zeros_(self.colour[2].bias)

    def density(self, x):
        return 20.0 * torch.sigmoid(-(self.obj.sdf(x) - self.offset) / 0.02)

    def albedo(self, x):
        return torch.sigmoid(self.colour(x))


def _params(**over):
    base = {"fine.iters": 24, "fine.resolution": 48, "fine.tet_resolution": 32, "fine.checkpoint_every": 8,
            "fine.texture_size": 64, "evaluate.novel_views": 2, "fine.lr": 0.01}
    base.update(over)
    return load_params("smoke", base)


@pytest.fixture(scope="module")
def fine_run(tmp_path_factory):
    obj = make_object("blocks")
    p = _params()
    out = tmp_path_factory.mktemp("fine")
    guidance = OracleGuidance(obj, p)
    field = StandInField(obj)
    from core.rendering.cameras import Cameras

    cams = Cameras.make([65.0, 115.0], [22.5, 157.5], 1.8, 40.0)
    grey = torch.sigmoid(field.colour(torch.zeros(1, 3)))
    tr = run_fine(p, fine_reference(obj, p), field, out, guidance=guidance, device="cpu", resume=False,
                  progress=False, turntable_frames=2)
    return obj, p, out, tr, cams, grey


def test_fine_stage_outputs_and_chamfer(fine_run):
    obj, p, out, tr, cams, _ = fine_run
    result = json.loads((out / "result.json").read_text())
    assert result["stage"] == "fine" and result["steps"] == p.fine.iters and result["rasterizer"] == "torch"
    for f in result["files"]:
        assert (out / f).is_file(), f
    assert (out / "checkpoint.pt").is_file() and (out / "mesh.glb").is_file()
    chamfer = mesh_chamfer(tr.rep.dmtet.extract().detach(), obj)
    assert chamfer <= 0.03, chamfer  # the smoke preset's bound


def test_fine_stage_learns_colour(fine_run):
    """The oracle's novel views teach the colour field: renders get closer to the object's."""
    obj, p, out, tr, cams, grey = fine_run
    from core.evaluation.metrics import psnr

    tgt = obj.render(cams, 48, shading="albedo")["rgb"]
    with torch.no_grad():
        mesh = tr.rep.dmtet.extract().detach()
        now = tr.rep.render_views(cams, 48).rgb
        start = torch.cat([render_with(tr, mesh, cams[i], lambda x: grey.expand(x.shape[0], 3)) for i in range(2)])
    assert psnr(now, tgt) > psnr(start, tgt) + 0.5


def render_with(tr, mesh, cam, colour_fn):
    from core.rendering.mesh_render import render_mesh

    return render_mesh(mesh, colour_fn, cam, 48, tr.rep.rasterizer).rgb


def test_fine_resume_matches_uninterrupted(tmp_path):
    obj = make_object("torus")
    p = _params(**{"fine.iters": 8, "fine.checkpoint_every": 4, "fine.tet_resolution": 16, "fine.resolution": 32})
    ref = fine_reference(obj, p)
    torch.manual_seed(0)
    field = StandInField(obj)
    a = run_fine(p, ref, field, tmp_path / "a", guidance=OracleGuidance(obj, p), resume=False, progress=False,
                 turntable_frames=2)
    run_fine(p, ref, field, tmp_path / "b", guidance=OracleGuidance(obj, p), resume=False, progress=False,
             stop_after=4)
    assert not (tmp_path / "b" / "result.json").exists()
    b = run_fine(p, ref, field, tmp_path / "b", guidance=OracleGuidance(obj, p), resume=True, progress=False,
                 turntable_frames=2)
    assert b.step_no == 8
    torch.testing.assert_close(a.rep.dmtet.sdf, b.rep.dmtet.sdf)
    torch.testing.assert_close(a.rep.dmtet.deform, b.rep.dmtet.deform)


def test_erode_mask_by_two_pixels():
    m = torch.zeros(1, 1, 20, 20)
    m[..., 5:15, 4:16] = 1
    e = erode_mask(m, 2)
    assert e.sum() == 6 * 8 and e[0, 0, 7:13, 6:14].all()


def test_chamfer_of_known_point_sets():
    a = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]])
    b = a + torch.tensor([0.0, 0.0, 0.1])
    assert chamfer_relative(a, b) == pytest.approx(0.1 / math.sqrt(2), rel=1e-6)
    # points sampled on a unit square's two triangles lie on it and fill it
    faces = torch.tensor([[0, 1, 3], [0, 3, 2]])
    pts = sample_mesh_surface(a, faces, 4000)
    assert (pts[:, 2] == 0).all() and pts[:, :2].min() >= 0 and pts[:, :2].max() <= 1
    assert abs(float(pts[:, 0].mean()) - 0.5) < 0.03


# ----------------------------------------------------------------------------------- regularisers
def _grid(n=6, bump=0.0):
    """A flat n×n vertex grid in the z=0 plane, optionally with its centre vertex lifted."""
    xs = torch.linspace(0, 1, n)
    v = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)
    v = torch.cat([v, torch.zeros(n * n, 1)], 1)
    f = []
    for i in range(n - 1):
        for j in range(n - 1):
            a, b, c, d = i * n + j, (i + 1) * n + j, i * n + j + 1, (i + 1) * n + j + 1
            f += [[a, b, d], [a, d, c]]
    centre = (n // 2) * n + n // 2
    v[centre, 2] = bump
    return v, torch.tensor(f)


def test_normal_consistency_zero_on_a_plane_and_grows_with_a_bump():
    v, f = _grid()
    assert float(mesh_normal_consistency(v, f)) == pytest.approx(0.0, abs=1e-6)
    vb, _ = _grid(bump=0.3)
    vb.requires_grad_(True)
    loss = mesh_normal_consistency(vb, f)
    assert loss > 0.01
    loss.backward()
    assert vb.grad[:, 2].abs().sum() > 0


def test_normal_consistency_of_a_cube_is_analytic():
    """A cube of 12 triangles: 12 edges at 90° (1 − cos = 1), 6 diagonals in flat faces (0)."""
    import trimesh

    box = trimesh.creation.box()
    v = torch.tensor(box.vertices, dtype=torch.float32)
    f = torch.tensor(box.faces)
    assert float(mesh_normal_consistency(v, f)) == pytest.approx(12 / 18, abs=1e-5)


def test_laplacian_zero_for_interior_of_plane_and_pulls_a_bump_down():
    v, f = _grid(bump=0.3)
    v.requires_grad_(True)
    loss = mesh_laplacian_loss(v, f)
    loss.backward()
    centre = 3 * 6 + 3
    assert v.grad[centre, 2] > 0  # descent lowers the bump
    flat, _ = _grid()
    # on a flat grid only the border vertices (with one-sided neighbourhoods) contribute
    lap = mesh_laplacian_loss(flat, f)
    assert float(lap) > 0 and float(mesh_laplacian_loss(v.detach(), f)) > float(lap)


def test_cli_refine_from_a_coarse_checkpoint(tmp_path):
    """`lift3d refine CKPT --out DIR` on a (tiny, few-step) coarse run: parameters come from the
    checkpoint, the reference from its folder; a bad checkpoint is one clear error."""
    from core.stages.coarse import run_coarse
    from core.oracle.bench import oracle_reference
    from flows.cli import main

    obj = make_object("snowman")
    tiny = ["coarse.iters=2", "coarse.resolution=16", "coarse.samples_per_ray=8", "coarse.grid.levels=2",
            "coarse.grid.log2_table_size=10", "coarse.grid.max_resolution=32", "coarse.mesh_resolution=16",
            "coarse.density_blob_scale=30", "guidance.kind=none"]
    p = load_params("smoke", tiny)
    run_coarse(p, oracle_reference(obj, p), tmp_path / "coarse", device="cpu", resume=False, progress=False)
    rc = main(["refine", str(tmp_path / "coarse" / "checkpoint.pt"), "--out", str(tmp_path / "fine"),
               "--set", "fine.iters=2", "--set", "fine.resolution=24", "--set", "fine.tet_resolution=12",
               "--set", "fine.texture_size=32", "--set", "evaluate.novel_views=1"])
    assert rc == 0
    result = json.loads((tmp_path / "fine" / "result.json").read_text())
    assert result["stage"] == "fine" and result["steps"] == 2 and result["tet_resolution"] == 12
    assert (tmp_path / "fine" / "mesh.obj").is_file() and (tmp_path / "fine" / "turntable.gif").is_file()
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    assert main(["refine", str(bogus), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_fine_bench_reports_the_coarse_bench_figures(tmp_path):
    """bench_oracle_fine's coarse figures are what the coarse bench measures for the same NeRF (its
    held-out views at the coarse resolution): one GPU run answers both bars."""
    import torch

    from core.oracle.bench import bench_oracle_coarse
    from core.oracle.bench_fine import bench_oracle_fine
    from core.params import load_params

    p = load_params("tiny", ["cpu_threads=1"])
    fine = bench_oracle_fine(p, ["torus"], tmp_path / "fine", torch.device("cpu"), progress=False)["torus"]
    coarse = bench_oracle_coarse(p, ["torus"], tmp_path / "coarse", torch.device("cpu"), progress=False)["torus"]
    assert fine["coarse_psnr_novel"] == coarse["psnr_novel"] and fine["coarse_mask_iou"] == coarse["mask_iou"]
    assert fine["psnr_novel_coarse"] > 0 and 0 < fine["chamfer_rel"] < 1


def test_edge_bookkeeping_without_sort_kernels_gives_what_the_sorts_gave():
    """core.ops.sort_pairs / face_edges / unique_edges (the fine stage's edge bookkeeping without a
    bitonic sort or a row-wise unique, session 16) against torch.sort and torch.unique(dim=0); and
    the sync-free normal consistency against its definition summed edge by edge in Python."""
    import trimesh

    from core.ops import face_edges, sort_pairs, unique_edges
    from core.representations.dmtet import mesh_edges

    gen = torch.Generator().manual_seed(0)
    pairs = torch.randint(0, 50, (300, 7, 2), generator=gen)
    pairs[0, 0] = torch.tensor([3, 3])  # equal ends
    assert torch.equal(sort_pairs(pairs), torch.sort(pairs, dim=-1).values)
    m = trimesh.creation.icosphere(1)
    v = torch.tensor(m.vertices, dtype=torch.float32) + 0.05 * torch.randn(len(m.vertices), 3, generator=gen)
    f = torch.tensor(m.faces, dtype=torch.long)
    rows = torch.unique(torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]], 0).sort(1).values, dim=0)
    assert torch.equal(unique_edges(face_edges(f), len(v)), rows) and torch.equal(mesh_edges(f), rows)
    assert torch.equal(unique_edges(face_edges(f), 10 * len(v)), rows)  # any bound above the indices
    normals = torch.nn.functional.normalize(torch.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]], dim=-1), dim=-1)
    by_edge: dict = {}
    for i, face in enumerate(f.tolist()):
        for a, b in ((face[0], face[1]), (face[1], face[2]), (face[2], face[0])):
            by_edge.setdefault((min(a, b), max(a, b)), []).append(i)
    terms = [1 - float(normals[i] @ normals[j]) for i, j in by_edge.values()]
    assert len(terms) == len(rows) == 120  # a closed icosphere: every edge has two faces
    assert float(mesh_normal_consistency(v, f)) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_unnormalised_laplacian_without_unique_is_the_unique_edges_sum_to_the_bit():
    """The released Laplacian (core.stages.losses.mesh_laplacian_loss_unnormalised, the paper preset's
    form) takes the unique edges by a 0/1 weight on the sorted face edges, not torch.unique (a wait
    for the GPU): its value and gradient equal the unique-edges sum's bit for bit, on a closed mesh
    and on a soup with repeated and degenerate edges."""
    import trimesh

    from core.ops import face_edges, gather_rows, unique_edges
    from core.stages.losses import mesh_laplacian_loss_unnormalised

    def by_unique(verts, faces):
        e = unique_edges(face_edges(faces), verts.shape[0])
        src, dst = torch.cat([e[:, 0], e[:, 1]]), torch.cat([e[:, 1], e[:, 0]])
        lap = torch.zeros_like(verts).index_add(0, src, gather_rows(verts, src) - gather_rows(verts, dst))
        return lap.norm(dim=-1).mean()

    gen = torch.Generator().manual_seed(0)
    s = trimesh.creation.icosphere(subdivisions=3)
    soup = torch.randint(0, 40, (90, 3), generator=gen)
    soup[0] = torch.tensor([5, 5, 7])  # a degenerate face: the edge (5, 5)
    for v0, f in ((torch.tensor(s.vertices, dtype=torch.float32), torch.tensor(s.faces)), (torch.randn(40, 3, generator=gen), soup)):
        v0 = v0 + 0.01 * torch.randn(v0.shape, generator=gen)
        got = []
        for fn in (by_unique, mesh_laplacian_loss_unnormalised):
            v = v0.clone().requires_grad_(True)
            loss = fn(v, f)
            loss.backward()
            got.append((loss.detach(), v.grad))
        assert float(got[0][0]) > 0 and torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
    assert float(mesh_laplacian_loss_unnormalised(torch.zeros(3, 3), torch.zeros(0, 3, dtype=torch.long))) == 0.0


def test_a_fine_step_sorts_its_meshs_edges_once(monkeypatch):
    """The torch rasteriser's antialias (its neighbours across each edge, opposite_vertices) and both
    mesh regularisers read one sort of the step's 3F edge keys, kept by that step's mesh
    (Mesh.edge_sort): one sort a step, where there were two until session 34, and of the step's own
    mesh (a sort kept past its step would change the losses: they equal a sort for every reader)."""
    import core.ops
    import core.representations.dmtet as dmtet
    from core.stages.fine import make_fine_stage

    obj = make_object("torus")
    p = _params(**{"fine.iters": 4, "fine.tet_resolution": 16, "fine.resolution": 32})
    calls = []

    def counted(faces, n):
        calls.append(int(faces.shape[0]))
        return core.ops.sorted_edge_keys(faces, n)

    def losses(per_reader: bool) -> list[float]:
        torch.manual_seed(0)
        stage = make_fine_stage(p, fine_reference(obj, p), StandInField(obj), guidance=OracleGuidance(obj, p))
        assert stage.rep.rasterizer.backend == "torch"
        out = []
        for _ in range(3):
            before = len(calls)
            out.append(float(stage.step()["loss"].detach()))
            assert len(calls) - before == (2 if per_reader else 1), calls
            assert calls[-1] == stage.rep.mesh.num_faces > 0
        return out

    monkeypatch.setattr(dmtet, "sorted_edge_keys", counted)
    shared = losses(per_reader=False)
    monkeypatch.setattr(dmtet.Mesh, "edge_sort", lambda self: counted(self.faces, self.verts.shape[0]))  # kept by none
    assert losses(per_reader=True) == shared


def test_the_regularisers_share_one_edge_sort_and_compute_what_each_computes_alone():
    """The fine stage sorts the faces' edge keys once for both mesh regularisers
    (core.ops.sorted_edge_keys): each given the shared sort returns its own value and
    gradient bit for bit, and the face of each sorted edge (its position mod F) is the face
    face_edges listed it for (the normal-consistency pairs as arange(F).repeat(3)[order] made them)."""
    import trimesh

    from core.ops import edge_keys, face_edges, sorted_edge_keys
    from core.stages.losses import mesh_laplacian_loss_unnormalised

    gen = torch.Generator().manual_seed(1)
    s = trimesh.creation.icosphere(subdivisions=3)
    v0 = torch.tensor(s.vertices, dtype=torch.float32) + 0.02 * torch.randn(len(s.vertices), 3, generator=gen)
    f = torch.tensor(s.faces)
    ks, order = sorted_edge_keys(f, len(v0))
    key = edge_keys(face_edges(f), len(v0))
    assert torch.equal(key[order], ks) and bool((ks[1:] >= ks[:-1]).all())
    assert torch.equal(torch.remainder(order, len(f)), torch.arange(len(f)).repeat(3)[order])
    for fn in (mesh_normal_consistency, mesh_laplacian_loss_unnormalised):
        got = []
        for edges in (None, (ks, order)):
            v = v0.clone().requires_grad_(True)
            loss = fn(v, f, edges)
            loss.backward()
            got.append((loss.detach(), v.grad))
        assert float(got[0][0]) > 0 and torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
