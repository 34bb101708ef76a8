"""Rendering the fine stage's DMTet mesh (Magic123 §2.1.2) into the same `RenderBatch` the NeRF
renderer gives the guidance: colour on white (shading modes of core/rendering/shading.py), opacity (the
antialiased coverage mask), depth along the camera axis (0 where empty) and world-space normals.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch

from core.ops import gather_rows
from core.perf import scope
from core.rendering.cameras import Cameras
from core.rendering.batch import RenderBatch
from core.rendering.raster import Rasterizer
from core.rendering.shading import shade

if TYPE_CHECKING:
    from core.representations.dmtet import Mesh


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted vertex normals (N, 3) of a mesh with outward-oriented faces."""
    v = gather_rows(verts, faces)  # (F, 3, 3), with a fixed-order backward (core.ops)
    fn = torch.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], dim=-1)  # length = 2·area
    # each face's normal once per corner: an expand's copy, whose backward sums the three corners
    # (repeat_interleave's backward is an index_add over 3F rows: a scatter of atomics on a GPU)
    vn = torch.zeros_like(verts).index_add(0, faces.reshape(-1), fn[:, None].expand(-1, 3, -1).reshape(-1, 3))
    return torch.nn.functional.normalize(vn, dim=-1, eps=1e-12)


def clip_positions(verts: torch.Tensor, cameras: Cameras) -> torch.Tensor:
    """World vertices (N, 3) → clip space (B, N, 4) for every camera."""
    vh = torch.cat([verts, torch.ones_like(verts[:, :1])], -1)
    return torch.einsum("bij,nj->bni", cameras.mvp().to(verts), vh)


def render_mesh(
    mesh: "Mesh",
    colour_fn: Callable[[torch.Tensor], torch.Tensor],
    cameras: Cameras,
    resolution: int,
    rasterizer: Rasterizer,
    shading: str = "albedo",
    light_dir: Optional[torch.Tensor] = None,
    ambient: float = 0.1,
    diffuse: float = 0.9,
    step: int = 0,
    total_steps: int = 1,
    stage: str = "fine",
) -> RenderBatch:
    H = W = int(resolution)
    B = len(cameras)
    verts, faces = mesh.verts, mesh.faces
    dev = verts.device
    if faces.shape[0] == 0:  # an empty mesh renders as background
        white = torch.ones(B, 3, H, W, device=dev)
        zeros = torch.zeros(B, 1, H, W, device=dev)
        return RenderBatch(white + 0 * verts.sum(), zeros, zeros.clone(), torch.zeros(B, 3, H, W, device=dev),
                           cameras, shading, light_dir, step, total_steps, stage, ambient, diffuse)
    tri = faces.int() if rasterizer.backend == "nvdiffrast" else faces
    with scope("lift3d.render.raster"):
        pos = clip_positions(verts, cameras)
        rast = rasterizer.rasterize(pos, tri, (H, W))
        covered = rast[..., 3] > 0  # (B, H, W)
    with scope("lift3d.render.shade"):
        vn = vertex_normals(verts, faces)
        attrs = torch.cat([verts, vn], -1)  # (N, 6)
        interp = rasterizer.interpolate(attrs, rast, tri)  # (B, H, W, 6)
        normal = torch.nn.functional.normalize(interp[..., 3:], dim=-1, eps=1e-12)
        depth = rasterizer.interpolate(pos[..., 3:4].contiguous(), rast, tri)  # clip w = distance along the camera axis
        # the covered pixels as flat indices into (B·H·W) rows: gathers by index_select (core.ops), whose
        # backward is an index_add, and the colours written back by index_copy. Indexing by the three
        # (b, y, x) tensors gave the same values, with an accumulating index_put (a sort on a GPU) in
        # each gather's backward. The torch antialias's pixel pairs come in the same read of the device
        pix, pairs = rasterizer.compactions(covered, rast)
        colour = torch.ones(B * H * W, 3, device=dev, dtype=verts.dtype)
        if pix.numel():
            n_pix = gather_rows(normal.reshape(-1, 3), pix)
            if shading in ("albedo", "lambertian"):
                albedo = colour_fn(gather_rows(interp.reshape(-1, interp.shape[-1]), pix)[:, :3])
            else:
                albedo = torch.ones_like(n_pix)
            light = None
            if shading in ("lambertian", "textureless"):
                if light_dir is None:
                    light_dir = torch.nn.functional.normalize(cameras.centers.to(dev), dim=-1)
                light = gather_rows(light_dir.to(dev), torch.div(pix, H * W, rounding_mode="floor"))
            c = shade(albedo, n_pix, light if light is not None else n_pix, shading, ambient, diffuse)
            colour = colour.index_copy(0, pix, c.to(colour.dtype))
        colour = colour.view(B, H, W, 3)
        mask = covered.unsqueeze(-1).to(verts.dtype)
    # antialias the composite on white together with the mask, so silhouettes blend into the
    # background and their gradients reach the vertex positions (core/rendering/raster.py)
    with scope("lift3d.render.antialias"):
        # the torch backend's edge sort is the mesh's, which its regularisers read too (Mesh.edge_sort)
        edges = mesh.edge_sort() if rasterizer.backend != "nvdiffrast" else None
        both = rasterizer.antialias(torch.cat([colour, mask], -1), rast, pos, tri, edges=edges, pairs=pairs)
        colour, opacity = both[..., :3], both[..., 3:]
    # rasterisers put row 0 at NDC y = −1; images have row 0 at the top
    to_img = lambda t: torch.flip(t, dims=[1]).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return RenderBatch(
        rgb=to_img(colour).clamp(0.0, 1.0),
        opacity=to_img(opacity).clamp(0.0, 1.0),
        depth=to_img(depth * mask),
        normal=to_img(normal * mask),
        cameras=cameras,
        shading=shading,
        light_dir=light_dir,
        step=step,
        total_steps=total_steps,
        stage=stage,
        ambient=ambient,
        diffuse=diffuse,
    )
