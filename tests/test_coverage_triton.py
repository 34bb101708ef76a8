"""core.rendering.coverage_triton (`fine.coverage: triton`, the default on a GPU): the torch
rasteriser's coverage pass as one Triton kernel picks, at every pixel, the triangle the tensors'
pass (raster._coverage) picks: nearest depth, ties to the larger triangle id, nothing behind the
camera, outside −1 ≤ z/w ≤ 1, of zero area or off-screen. Run on CPU tensors under Triton's
interpreter in a child process (tests/_interpreted.py), where no multiply-add is fused, so the two
must agree exactly."""
from __future__ import annotations

import pytest
import torch
from _interpreted import run_interpreted

from core.errors import Lift3DError
from core.rendering.raster import coverage_kind

_CHILD = r"""
import sys, math, torch, trimesh
from core.rendering.raster import _coverage, torch_rasterize

out = sys.argv[1]
gen = torch.Generator().manual_seed(0)
H, W = 32, 40
cases = {}

# a soup over two views: some vertices behind the camera (w < 0), depths past ±1, slivers
n = 60
pos = torch.randn(2, 3 * n, 4, generator=gen) * torch.tensor([0.7, 0.7, 0.8, 0.0])
pos[..., 3] = 0.4 + 1.6 * torch.rand(2, 3 * n, generator=gen)
pos[0, :12, 3] = -0.5
cases["soup"] = (pos, torch.arange(3 * n).view(n, 3))

# exact ties: the same triangle three times, and two coplanar triangles sharing an edge
t = torch.tensor([[-0.6, -0.5, 0.1, 1.0], [0.7, -0.4, 0.1, 1.0], [0.0, 0.8, 0.1, 1.0], [0.9, 0.9, 0.1, 1.0]])
cases["ties"] = (t[None], torch.tensor([[0, 1, 2], [0, 1, 2], [1, 3, 2], [0, 1, 2]]))

# a closed sphere in front of the camera (perspective w), and one triangle larger than the image
s = trimesh.creation.icosphere(subdivisions=1, radius=0.6)
v = torch.tensor(s.vertices, dtype=torch.float32)
w = 2.5 + v[:, 2:3]
cases["sphere"] = (torch.cat([v[:, :2] * 1.4, (v[:, 2:3] * 0.5), w], 1)[None] / 1.0,
                   torch.tensor(s.faces, dtype=torch.long))
cases["big"] = (torch.tensor([[[-3.0, -3.0, 0.2, 1.0], [4.0, -2.0, -0.3, 1.0], [-1.0, 5.0, 0.5, 1.0]]]),
                torch.tensor([[0, 1, 2]]))

# nothing on screen
cases["offscreen"] = (torch.tensor([[[2.0, 2.0, 0.0, 1.0], [3.0, 2.0, 0.0, 1.0], [2.0, 3.0, 0.0, 1.0]]]),
                      torch.tensor([[0, 1, 2]]))

res = {}
for name, (p, tri) in cases.items():
    res[name] = dict(torch=_coverage(p, tri, H, W, "torch"), triton=_coverage(p, tri, H, W, "triton"))
p, tri = cases["sphere"]
res["rast"] = dict(torch=torch_rasterize(p, tri, (H, W), "torch"), triton=torch_rasterize(p, tri, (H, W), "triton"))
torch.save(res, out)
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    return run_interpreted(_CHILD, tmp_path_factory.mktemp("cov") / "results.pt", loaded_loop_bound=True)


@pytest.mark.parametrize("case", ["soup", "ties", "sphere", "big", "offscreen"])
def test_triton_coverage_picks_the_tensor_passes_triangle_at_every_pixel(interpreted, case):
    r = interpreted[case]
    assert r["triton"].dtype == r["torch"].dtype == torch.long and r["triton"].shape == r["torch"].shape
    assert torch.equal(r["triton"], r["torch"])
    covered = int((r["torch"] >= 0).sum())
    if case == "offscreen":
        assert covered == 0
    else:  # the comparison saw covered pixels, and more than one triangle where there are several
        assert covered > 0
        if case != "big":
            assert r["torch"][r["torch"] >= 0].unique().numel() > 1


def test_triton_coverage_breaks_depth_ties_to_the_larger_triangle(interpreted):
    """Triangles 0, 1 and 3 are one triangle: where it alone covers, 3 wins; triangle 2 shares its depth
    plane beside it."""
    ids = interpreted["ties"]["triton"]
    assert set(ids.unique().tolist()) == {-1, 2, 3}


def test_rasterize_with_the_triton_coverage_equals_the_tensor_pass(interpreted):
    r = interpreted["rast"]
    assert torch.equal(r["triton"], r["torch"]) and int((r["torch"][..., 3] > 0).sum()) > 50


def test_coverage_kind_picks_the_tensor_pass_off_a_gpu_and_refuses_triton_there():
    assert coverage_kind("auto", "cpu") == "torch"
    assert coverage_kind("torch", "cpu") == "torch"
    with pytest.raises(Lift3DError, match="fine.coverage is 'triton' but the device is not CUDA"):
        coverage_kind("triton", "cpu")
    with pytest.raises(ValueError, match="unknown fine.coverage"):
        coverage_kind("fast", "cpu")
