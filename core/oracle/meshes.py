"""Known objects from textured mesh files (OBJ, GLB/glTF, PLY, …, read by trimesh).

A `MeshObject` has the interface of the procedural objects (core/oracle/objects.py): `render`
(rgb on white, opacity in {0, 1}, z-depth, normals, albedo, with the same shading modes and light)
and `sample_surface` for Chamfer distances, so a user's own shape serves the oracle benchmark
(`lift3d bench oracle --objects PATH`) and the analytic priors (`--set sd.model=analytic:PATH`).

The mesh is centred on its bounding box and scaled so that its farthest vertex lies at
`FIT_RADIUS` (inside the procedural objects' bounding sphere), in the file's own axes: glTF's
y-up, front +z, which is our world's (core/rendering/cameras.py). Colour: the base-colour texture
sampled at the interpolated UV (bilinear), else vertex colours, else the material's main colour.
It is rasterised with lift3d's rasteriser (core/rendering/raster.py: nvdiffrast or the PyTorch one).

`write_example_house(path)` writes a small textured GLB (a house with a door at the front, one
window on the +x side and a chimney on the −x half of the roof: no mirror symmetry) for tests and
the analytic benchmark.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from core.rendering.cameras import Cameras
from core.rendering.shading import shade

FIT_RADIUS = 0.6
MESH_SUFFIXES = (".obj", ".glb", ".gltf", ".ply", ".off", ".stl")


def is_mesh_path(name: str) -> bool:
    return Path(str(name)).suffix.lower() in MESH_SUFFIXES


class MeshObject:
    """A textured triangle mesh as a known object."""

    def __init__(self, name: str, verts: torch.Tensor, faces: torch.Tensor, uv: Optional[torch.Tensor] = None,
                 texture: Optional[torch.Tensor] = None, vertex_colors: Optional[torch.Tensor] = None,
                 color: tuple[float, float, float] = (0.7, 0.7, 0.7)):
        self.name = name
        self.verts, self.faces = verts.float(), faces.long()
        self.uv, self.texture = uv, texture  # (V, 2) OBJ convention (v up); (3, H, W) in [0, 1]
        self.vertex_colors = vertex_colors  # (V, 3)
        self.color = torch.tensor(color, dtype=torch.float32)
        self._rasterizers: dict = {}

    @classmethod
    def load(cls, path: Path | str) -> "MeshObject":
        import trimesh

        from core.errors import InputError

        path = Path(path).expanduser()
        if not path.is_file():
            raise InputError(f"mesh file not found: {path}")
        try:
            mesh = trimesh.load(path, force="mesh", process=False)
        except Exception as e:  # noqa: BLE001 - trimesh raises many kinds
            raise InputError(f"could not read the mesh {path}: {e}") from None
        if len(mesh.faces) == 0:
            raise InputError(f"mesh {path} has no faces")
        v = torch.tensor(np.asarray(mesh.vertices), dtype=torch.float32)
        lo, hi = v.min(0).values, v.max(0).values
        v = v - 0.5 * (lo + hi)
        v = v * (FIT_RADIUS / v.norm(dim=-1).max().clamp_min(1e-9))
        faces = torch.tensor(np.asarray(mesh.faces), dtype=torch.long)
        uv = texture = vcol = None
        color = (0.7, 0.7, 0.7)
        visual = mesh.visual
        if getattr(visual, "kind", None) == "texture" and getattr(visual, "uv", None) is not None:
            mat = visual.material
            image = getattr(mat, "baseColorTexture", None) or getattr(mat, "image", None)
            if image is not None:
                uv = torch.tensor(np.asarray(visual.uv), dtype=torch.float32)
                texture = torch.tensor(np.asarray(image.convert("RGB")), dtype=torch.float32).permute(2, 0, 1) / 255
            main = getattr(mat, "main_color", None)
            if main is not None:
                color = tuple(float(c) / 255.0 for c in np.asarray(main)[:3])
        elif getattr(visual, "kind", None) == "vertex":
            vcol = torch.tensor(np.asarray(visual.vertex_colors)[:, :3], dtype=torch.float32) / 255.0
        elif getattr(visual, "kind", None) == "face":
            fc = np.asarray(visual.face_colors)[:, :3]
            color = tuple(float(c) / 255.0 for c in fc.mean(0))
        return cls(path.stem, v, faces, uv, texture, vcol, color)

    # --------------------------------------------------------------------------------- geometry
    def sample_surface(self, n: int, generator: Optional[torch.Generator] = None, device="cpu") -> torch.Tensor:
        from core.evaluation.metrics import sample_mesh_surface

        return sample_mesh_surface(self.verts, self.faces, n).to(device)

    def _rasterizer(self, device):
        from core.rendering.raster import make_rasterizer

        key = str(device)
        if key not in self._rasterizers:
            self._rasterizers[key] = make_rasterizer("auto", device)
        return self._rasterizers[key]

    def _albedo(self, attrs: torch.Tensor, n_base: int) -> torch.Tensor:
        """Colours (P, 3) of pixels from their interpolated attributes."""
        if self.texture is not None:
            uv = attrs[:, n_base:n_base + 2]
            grid = torch.stack([uv[:, 0] * 2 - 1, (1 - uv[:, 1]) * 2 - 1], -1)  # image row 0 = v 1
            tex = self.texture.to(attrs.device)[None]
            return F.grid_sample(tex, grid[None, None], mode="bilinear", padding_mode="border",
                                 align_corners=False)[0, :, 0].t()
        if self.vertex_colors is not None:
            return attrs[:, n_base:n_base + 3]
        return self.color.to(attrs.device).expand(attrs.shape[0], 3)

    # ---------------------------------------------------------------------------------- render
    @torch.no_grad()
    def render(self, cameras: Cameras, height: int, width: Optional[int] = None, shading: str = "albedo",
               light_dir: Optional[torch.Tensor] = None, ambient: float = 0.1, diffuse: float = 0.9,
               **_) -> dict[str, torch.Tensor]:
        """Same outputs as ProceduralObject.render: rgb (B,3,H,W) on white, opacity/mask in {0,1},
        z-depth (0 where empty), world normals (0 where empty), albedo."""
        from core.rendering.mesh_render import clip_positions, vertex_normals

        width = width or height
        if width != height:
            raise ValueError("MeshObject.render: square images only")
        dev = cameras.device
        B, H, W = len(cameras), height, width
        rast_ = self._rasterizer(dev)
        verts, faces = self.verts.to(dev), self.faces.to(dev)
        tri = faces.int() if rast_.backend == "nvdiffrast" else faces
        pos = clip_positions(verts, cameras)
        rast = rast_.rasterize(pos, tri, (H, W))
        covered = rast[..., 3] > 0
        attrs = [verts, vertex_normals(verts, faces)]
        if self.texture is not None:
            attrs.append(self.uv.to(dev))
        elif self.vertex_colors is not None:
            attrs.append(self.vertex_colors.to(dev))
        interp = rast_.interpolate(torch.cat(attrs, -1), rast, tri)
        depth = rast_.interpolate(pos[..., 3:4].contiguous(), rast, tri)[..., 0]
        bidx, iy, ix = torch.nonzero(covered, as_tuple=True)
        a = interp[bidx, iy, ix]
        xyz, n = a[:, :3], F.normalize(a[:, 3:6], dim=-1, eps=1e-12)
        view = F.normalize(cameras.centers.to(dev)[bidx] - xyz, dim=-1)
        n = torch.where((n * view).sum(-1, keepdim=True) < 0, -n, n)  # two-sided: face the camera
        alb = self._albedo(a, 6).clamp(0, 1)
        if shading == "albedo":
            col = alb
        else:
            light = view if light_dir is None else light_dir.to(dev)[bidx]
            col = shade(alb, n, light, shading, ambient, diffuse)

        def img(values, ch, fill):
            out = torch.full((B, H, W, ch), fill, device=dev)
            out[bidx, iy, ix] = values.reshape(-1, ch).to(out.dtype)
            return torch.flip(out, dims=[1]).permute(0, 3, 1, 2).contiguous()  # row 0 at the top

        return {"rgb": img(col, 3, 1.0), "opacity": img(torch.ones_like(col[:, :1]), 1, 0.0),
                "depth": img(depth[bidx, iy, ix], 1, 0.0), "normal": img(n, 3, 0.0), "albedo": img(alb, 3, 1.0)}


# ------------------------------------------------------------------------------------ an example mesh
def _house_texture(size: int = 256) -> np.ndarray:
    """A texture atlas: left half walls (bricks, a door, a window), right half roof tiles and chimney."""
    t = np.zeros((size, size, 3), np.float32)
    yy, xx = np.mgrid[0:size, 0:size] / size
    brick = ((np.floor(yy * 16) % 2 == 0) ^ (np.floor(xx * 16 + 0.5 * (np.floor(yy * 16) % 2)) % 2 == 0))
    t[:] = np.where(brick[..., None], [0.85, 0.75, 0.55], [0.8, 0.68, 0.5])
    t[:, size // 2:] = np.where((np.floor(yy[:, size // 2:] * 12) % 2 == 0)[..., None], [0.7, 0.15, 0.1],
                                [0.55, 0.1, 0.08])
    return (t * 255).astype(np.uint8)


def write_example_house(path: Path | str) -> Path:
    """A textured house (GLB via trimesh): walls on one part of a texture atlas with a blue door on
    the front (+z) wall and a yellow window on the +x wall only, a red roof, a dark chimney on the
    −x half of the roof."""
    import trimesh
    from PIL import Image

    tex = _house_texture()
    s = tex.shape[0]
    verts, faces, uvs = [], [], []

    def paint(u0, v0, u1, v1, rgb):  # a rectangle of the atlas in UV (v up)
        r0, r1 = int((1 - v1) * s), int((1 - v0) * s)
        tex[r0:r1, int(u0 * s):int(u1 * s)] = (np.array(rgb) * 255).astype(np.uint8)

    def quad(p, uv_rect):
        """p: 4 corners counter-clockwise seen from outside; uv_rect: (u0, v0, u1, v1)."""
        u0, v0, u1, v1 = uv_rect
        base = len(verts)
        verts.extend(p)
        uvs.extend([(u0, v0), (u1, v0), (u1, v1), (u0, v1)])
        faces.extend([(base, base + 1, base + 2), (base, base + 2, base + 3)])

    def tri(p, uv3):
        base = len(verts)
        verts.extend(p)
        uvs.extend(uv3)
        faces.append((base, base + 1, base + 2))

    x0, x1, y0, y1, z0, z1, ridge = -0.5, 0.5, -0.45, 0.1, -0.35, 0.35, 0.45
    wall = lambda i: (0.02 + 0.12 * i, 0.02, 0.12 + 0.12 * i, 0.5)  # noqa: E731 - one atlas cell per wall
    quad([(x0, y0, z1), (x1, y0, z1), (x1, y1, z1), (x0, y1, z1)], wall(0))  # front (+z): the door
    quad([(x1, y0, z0), (x0, y0, z0), (x0, y1, z0), (x1, y1, z0)], wall(1))  # back
    quad([(x1, y0, z1), (x1, y0, z0), (x1, y1, z0), (x1, y1, z1)], wall(2))  # +x: the window
    quad([(x0, y0, z0), (x0, y0, z1), (x0, y1, z1), (x0, y1, z0)], wall(3))  # −x
    quad([(x0, y0, z0), (x1, y0, z0), (x1, y0, z1), (x0, y0, z1)], (0.02, 0.6, 0.1, 0.65))  # floor
    paint(0.02 + 0.04, 0.02, 0.02 + 0.08, 0.3, (0.15, 0.25, 0.7))  # the door (front wall cell)
    paint(0.26 + 0.03, 0.22, 0.26 + 0.09, 0.4, (0.95, 0.85, 0.2))  # the window (+x wall cell)
    roof = (0.55, 0.05, 0.95, 0.95)
    quad([(x0 - 0.05, y1, z1 + 0.05), (x1 + 0.05, y1, z1 + 0.05), (x1 + 0.05, ridge, 0.0), (x0 - 0.05, ridge, 0.0)],
         roof)  # front slope
    quad([(x1 + 0.05, y1, z0 - 0.05), (x0 - 0.05, y1, z0 - 0.05), (x0 - 0.05, ridge, 0.0), (x1 + 0.05, ridge, 0.0)],
         roof)  # back slope
    gable = [(0.42, 0.55), (0.5, 0.55), (0.46, 0.7)]
    tri([(x1, y1, z1), (x1, y1, z0), (x1, ridge - 0.02, 0.0)], gable)
    tri([(x0, y1, z0), (x0, y1, z1), (x0, ridge - 0.02, 0.0)], gable)
    # the chimney: a box on the −x half of the back slope
    cx0, cx1, cz0, cz1, cy0, cy1 = -0.35, -0.22, -0.2, -0.08, 0.2, 0.55
    dark = (0.42, 0.8, 0.5, 0.9)
    paint(*dark, (0.2, 0.2, 0.22))
    quad([(cx0, cy0, cz1), (cx1, cy0, cz1), (cx1, cy1, cz1), (cx0, cy1, cz1)], dark)
    quad([(cx1, cy0, cz0), (cx0, cy0, cz0), (cx0, cy1, cz0), (cx1, cy1, cz0)], dark)
    quad([(cx1, cy0, cz1), (cx1, cy0, cz0), (cx1, cy1, cz0), (cx1, cy1, cz1)], dark)
    quad([(cx0, cy0, cz0), (cx0, cy0, cz1), (cx0, cy1, cz1), (cx0, cy1, cz0)], dark)
    quad([(cx0, cy1, cz1), (cx1, cy1, cz1), (cx1, cy1, cz0), (cx0, cy1, cz0)], dark)
    visual = trimesh.visual.TextureVisuals(uv=np.array(uvs), image=Image.fromarray(tex))
    mesh = trimesh.Trimesh(vertices=np.array(verts), faces=np.array(faces), visual=visual, process=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mesh.export(path)
    return path


if __name__ == "__main__":  # python -m core.oracle.meshes house.glb
    import sys

    print(write_example_house(sys.argv[1] if len(sys.argv) > 1 else "house.glb"))
