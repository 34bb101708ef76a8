"""Procedural test objects: coloured, non-convex shapes defined by signed distance functions.

They are the oracle's "prior" (DESIGN.md, "How we know it works without the real weights"): each
renders rgb / opacity / depth / normals from any `Cameras` by sphere tracing, with the same shading
modes and light as the NeRF renderer, and gives surface samples for Chamfer distances.
All fit inside the sphere of radius 0.62 around the origin (world frame of core/rendering/cameras.py, y up).
Depth is z-depth along the camera axis, 0 where the ray misses, as in core/representations/nerf.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from core.rendering.cameras import Cameras
from core.rendering.shading import shade

BOUNDING_RADIUS = 0.65


# ---------------------------------------------------------------------------------------- SDF parts
_CONSTS: dict = {}


def _const(values, like: torch.Tensor) -> torch.Tensor:
    """A small constant tensor on like's device, made once (no host→device copy per SDF call)."""
    key = (tuple(values), like.device, like.dtype)
    t = _CONSTS.get(key)
    if t is None:
        t = _CONSTS[key] = torch.tensor(values, dtype=like.dtype, device=like.device)
    return t


def sd_sphere(p, c, r):
    return (p - _const(c, p)).norm(dim=-1) - r


def sd_box(p, c, half):
    q = (p - _const(c, p)).abs() - _const(half, p)
    return q.clamp_min(0).norm(dim=-1) + q.amax(-1).clamp_max(0)


def sd_torus_y(p, major, minor):
    """A torus around the y axis."""
    q = torch.stack([torch.sqrt(p[..., 0] ** 2 + p[..., 2] ** 2) - major, p[..., 1]], -1)
    return q.norm(dim=-1) - minor


def rot_x(p, deg):
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    y = c * p[..., 1] - s * p[..., 2]
    z = s * p[..., 1] + c * p[..., 2]
    return torch.stack([p[..., 0], y, z], -1)


def _mix(a, b, t):
    return a + (b - a) * t[..., None]


def _col(rgb, like):
    return _const(rgb, like).expand(*like.shape[:-1], 3)


# -------------------------------------------------------------------------------------- the objects
@dataclass
class ProceduralObject:
    name: str
    sdf: Callable[[torch.Tensor], torch.Tensor]  # (N, 3) → (N,)
    color: Callable[[torch.Tensor], torch.Tensor]  # (N, 3) surface points → (N, 3) albedo in [0, 1]

    # --------------------------------------------------------------------------------- geometry
    def normals(self, p: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
        offs = torch.eye(3, dtype=p.dtype, device=p.device) * eps
        pts = torch.cat([p[:, None] + offs, p[:, None] - offs], 1).reshape(-1, 3)
        s = self.sdf(pts).view(-1, 2, 3)
        return F.normalize(s[:, 0] - s[:, 1], dim=-1)

    def sample_surface(self, n: int, generator: Optional[torch.Generator] = None, device="cpu") -> torch.Tensor:
        """n points on the surface: rejection from a narrow band, then projected with the SDF."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        out, have = [], 0
        while have < n:
            p = (torch.rand(max(4 * n, 20000), 3, generator=g) * 2 - 1) * BOUNDING_RADIUS
            d = self.sdf(p)
            p = p[d.abs() < 0.03]
            for _ in range(3):  # Newton-like projection onto the zero level set
                p = p - self.sdf(p)[:, None] * self.normals(p)
            p = p[self.sdf(p).abs() < 1e-3]
            out.append(p)
            have += p.shape[0]
        return torch.cat(out)[:n].to(device)

    # ---------------------------------------------------------------------------------- render
    @torch.no_grad()
    def render(self, cameras: Cameras, height: int, width: Optional[int] = None, shading: str = "albedo",
               light_dir: Optional[torch.Tensor] = None, ambient: float = 0.1, diffuse: float = 0.9,
               max_steps: int = 64, dense_march: Optional[bool] = None) -> dict[str, torch.Tensor]:
        """Sphere tracing. Returns rgb (B,3,H,W) on white, opacity / mask (B,1,H,W) in {0,1},
        depth (B,1,H,W) z-depth (0 where empty), normal (B,3,H,W) (0 where empty), albedo."""
        width = width or height
        B = len(cameras)
        dev = cameras.device
        o, d = cameras.rays(height, width)
        o, d = o.reshape(-1, 3), d.reshape(-1, 3)
        # start at the bounding sphere
        b = (o * d).sum(-1)
        c = (o * o).sum(-1) - BOUNDING_RADIUS ** 2
        disc = b * b - c
        may_hit = disc > 0
        t = (-b - disc.clamp_min(0).sqrt()).clamp_min(0)
        t_far = -b + disc.clamp_min(0).sqrt()
        alive = may_hit.clone()
        hit = torch.zeros_like(alive)
        if dense_march if dense_march is not None else dev.type == "cuda":
            # no compaction (the GPU path): every ray marches every step, and one host sync every
            # 8 steps stops the march once no ray is left
            for k in range(max_steps):
                if k and k % 8 == 0 and not bool(alive.any()):
                    break
                s = self.sdf(o + d * t[:, None])
                hit = hit | (alive & (s < 5e-4))
                alive = alive & ~hit & (t <= t_far)
                t = t + torch.where(alive, s, torch.zeros_like(s))
            hit = hit & (t <= t_far)
            max_steps = 0
        for _ in range(max_steps):
            if not alive.any():
                break
            idx = alive.nonzero(as_tuple=True)[0]
            p = o[idx] + d[idx] * t[idx, None]
            s = self.sdf(p)
            done = s < 5e-4
            hit[idx[done]] = True
            t[idx] = t[idx] + torch.where(done, torch.zeros_like(s), s)
            gone = t[idx] > t_far[idx]
            alive[idx[done | gone]] = False
        R = o.shape[0]
        hidx = hit.nonzero(as_tuple=True)[0]
        p = o[hidx] + d[hidx] * t[hidx, None]
        n = self.normals(p)
        alb = self.color(p).clamp(0, 1)
        if shading == "albedo":
            col = alb
        else:
            if light_dir is None:
                light = -d[hidx]
            else:
                light = light_dir.to(dev)[:, None, :].expand(B, height * width, 3).reshape(-1, 3)[hidx]
            col = shade(alb, n, light, shading, ambient, diffuse)
        rgb = torch.ones(R, 3, device=dev)
        rgb[hidx] = col
        albedo = torch.ones(R, 3, device=dev)
        albedo[hidx] = alb
        normal = torch.zeros(R, 3, device=dev)
        normal[hidx] = n
        fwd = -cameras.c2w()[:, :3, 2]
        cos = (d.view(B, -1, 3) * fwd[:, None, :]).sum(-1).reshape(-1)
        depth = torch.zeros(R, device=dev)
        depth[hidx] = t[hidx] * cos[hidx]
        mask = hit.float()

        def img(v, ch):
            return v.view(B, height, width, ch).permute(0, 3, 1, 2).contiguous()

        return {"rgb": img(rgb, 3), "opacity": img(mask[:, None], 1), "depth": img(depth[:, None], 1),
                "normal": img(normal, 3), "albedo": img(albedo, 3)}


def _torus(p):
    return sd_torus_y(rot_x(p, 60.0), 0.36, 0.15)


def _torus_color(p):
    q = rot_x(p, 60.0)
    ang = torch.atan2(q[..., 2], q[..., 0])  # around the ring
    t = 0.5 + 0.5 * torch.sin(2.0 * ang)
    base = _mix(_col((0.9, 0.25, 0.15), p), _col((0.15, 0.35, 0.9), p), t)
    stripe = (torch.sin(3.0 * ang) > 0.7).float()  # three yellow bands
    return _mix(base, _col((0.95, 0.85, 0.2), p), stripe)


def _blocks(p):
    """An L of boxes with a step: non-convex."""
    a = sd_box(p, (-0.12, -0.2, 0.0), (0.35, 0.14, 0.22))  # base slab
    b = sd_box(p, (-0.33, 0.12, 0.0), (0.14, 0.2, 0.22))  # upright at the left
    c = sd_box(p, (0.3, 0.03, 0.05), (0.1, 0.1, 0.1))  # a cube on the right, sitting on the slab
    return torch.minimum(torch.minimum(a, b), c)


def _blocks_color(p):
    a = sd_box(p, (-0.12, -0.2, 0.0), (0.35, 0.14, 0.22))
    b = sd_box(p, (-0.33, 0.12, 0.0), (0.14, 0.2, 0.22))
    c = sd_box(p, (0.3, 0.03, 0.05), (0.1, 0.1, 0.1))
    which = torch.stack([a, b, c], -1).argmin(-1)
    cols = _const((0.2, 0.7, 0.3, 0.85, 0.55, 0.1, 0.55, 0.2, 0.75), p).view(3, 3)
    out = cols[which]
    # a darker checker pattern on the slab
    check = ((torch.floor(p[..., 0] / 0.12) + torch.floor(p[..., 2] / 0.12)) % 2 == 0) & (which == 0)
    return torch.where(check[..., None], out * 0.55, out)


def _snowman(p):
    body = sd_sphere(p, (0.0, -0.25, 0.0), 0.3)
    head = sd_sphere(p, (0.0, 0.22, 0.0), 0.2)
    nose = sd_sphere(p, (0.0, 0.22, 0.22), 0.06)
    hat = sd_box(p, (0.0, 0.43, 0.0), (0.12, 0.06, 0.12))
    return torch.minimum(torch.minimum(body, head), torch.minimum(nose, hat))


def _snowman_color(p):
    nose = sd_sphere(p, (0.0, 0.22, 0.22), 0.06)
    hat = sd_box(p, (0.0, 0.43, 0.0), (0.12, 0.06, 0.12))
    body = sd_sphere(p, (0.0, -0.25, 0.0), 0.3)
    base = _mix(_col((0.92, 0.92, 0.98), p), _col((0.55, 0.75, 0.95), p), (0.5 + 0.5 * torch.sin(5 * p[..., 0])).clamp(0, 1) * 0.6)
    scarf = ((p[..., 1] > -0.02) & (p[..., 1] < 0.08)).float()
    base = _mix(base, _col((0.85, 0.1, 0.15), p), scarf)
    buttons = ((body < 0.01) & (p[..., 2] > 0.2) & (torch.sin(40 * p[..., 1]) > 0.7)).float()
    base = _mix(base, _col((0.1, 0.1, 0.1), p), buttons)
    base = torch.where((hat < 0.01)[..., None], _col((0.15, 0.15, 0.2), p), base)
    return torch.where((nose < 0.01)[..., None], _col((1.0, 0.5, 0.05), p), base)


OBJECTS: dict[str, ProceduralObject] = {
    "torus": ProceduralObject("torus", _torus, _torus_color),
    "blocks": ProceduralObject("blocks", _blocks, _blocks_color),
    "snowman": ProceduralObject("snowman", _snowman, _snowman_color),
}


_MESHES: dict = {}


def make_object(name: str):
    """A procedural object by name, or a textured mesh file (OBJ, GLB, …; core/oracle/meshes.py) by path."""
    from core.errors import Lift3DError
    from core.oracle.meshes import MeshObject, is_mesh_path

    if name in OBJECTS:
        return OBJECTS[name]
    if is_mesh_path(name):
        key = str(Path(name).expanduser().resolve())
        if key not in _MESHES:
            _MESHES[key] = MeshObject.load(name)
        return _MESHES[key]
    raise Lift3DError(f"unknown procedural object '{name}' (known: {', '.join(OBJECTS)}; or a mesh file "
                      f"path ending in .obj, .glb, .gltf, .ply, .off, .stl)")
