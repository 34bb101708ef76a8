"""Textured mesh export of the fine stage (Magic123 §2.1.2's output): OBJ + MTL + PNG with a UV
atlas from xatlas, a GLB (glTF binary, PBR material with the same texture) and a turntable GIF.

Texture baking: the atlas triangles are rasterised in UV space (clip position (2u−1, 2v−1, 0, 1),
any backend of core/rendering/raster.py), the surface point of each texel is interpolated from the mesh's
vertices and the colour field is evaluated there. Texels outside every chart are then filled from
their covered neighbours for a few pixels (`pad`), so bilinear lookups at chart edges do not pick up
background. The image is stored with row 0 at v = 1 (the OBJ / glTF convention after trimesh's flip).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from core.rendering.cameras import orbit_cameras
from core.representations.dmtet import Mesh
from core.rendering.raster import Rasterizer, make_rasterizer
from core.io import atomic_save_image, atomic_write, atomic_write_bytes

log = logging.getLogger(__name__)


@dataclass
class TexturedMesh:
    verts: np.ndarray  # (N, 3) the mesh's vertices
    faces: np.ndarray  # (F, 3) into verts
    uvs: np.ndarray  # (M, 2) atlas coordinates in [0, 1]
    uv_faces: np.ndarray  # (F, 3) into uvs (corner by corner the same triangles as `faces`)
    vmapping: np.ndarray  # (M,) the vertex of each uv vertex
    texture: np.ndarray  # (S, S, 3) uint8, row 0 at v = 1


def decimate(mesh: Mesh, faces: int) -> Mesh:
    """The mesh simplified to about `faces` faces by quadric edge collapse (trimesh, through
    fast-simplification), as the released export does before its UV atlas (Magic123
    nerf/renderer.py:811, pymeshlab's quadric edge collapse to decimate_target). A mesh with at
    most `faces` faces, or `faces` = 0, is returned as it is."""
    if faces <= 0 or mesh.num_faces <= faces:
        return mesh
    import trimesh

    tm = trimesh.Trimesh(mesh.verts.cpu().numpy(), mesh.faces.cpu().numpy(), process=False)
    out = tm.simplify_quadric_decimation(face_count=int(faces))
    dev = mesh.verts.device
    log.info("export: %d faces simplified to %d (quadric edge collapse)", mesh.num_faces, len(out.faces))
    return Mesh(torch.as_tensor(np.asarray(out.vertices), dtype=mesh.verts.dtype, device=dev),
                torch.as_tensor(np.asarray(out.faces), dtype=torch.int64, device=dev))


def uv_atlas(verts: np.ndarray, faces: np.ndarray, iterations: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xatlas: (vmapping (M,), uv_faces (F, 3), uvs (M, 2)). `iterations`: the chart-growing and
    seeding passes (ChartOptions.max_iterations; released 4, xatlas's default 1)."""
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(verts.astype(np.float32), faces.astype(np.uint32))
    charts = xatlas.ChartOptions()
    charts.max_iterations = int(iterations)
    atlas.generate(chart_options=charts)
    vmapping, indices, uvs = atlas[0]
    return vmapping.astype(np.int64), indices.astype(np.int64), uvs.astype(np.float32)


def dilate(img: torch.Tensor, covered: torch.Tensor, pad: int) -> torch.Tensor:
    """Fill uncovered texels (H, W) from the mean of covered 3×3 neighbours, `pad` rounds."""
    img = img.clone()
    cov = covered.clone().float()
    k = torch.ones(1, 1, 3, 3, device=img.device)
    for _ in range(pad):
        s = torch.nn.functional.conv2d((img * cov[..., None]).permute(2, 0, 1)[:, None], k, padding=1)[:, 0].permute(1, 2, 0)
        n = torch.nn.functional.conv2d(cov[None, None], k, padding=1)[0, 0]
        grow = (cov == 0) & (n > 0)
        if not grow.any():
            break
        img[grow] = s[grow] / n[grow][:, None]
        cov[grow] = 1.0
    return img


@torch.no_grad()
def bake_texture(mesh: Mesh, colour_fn: Callable[[torch.Tensor], torch.Tensor], size: int = 1024,
                 rasterizer: Rasterizer | None = None, pad: int = 4, chunk: int = 1 << 18,
                 atlas_iterations: int = 1) -> TexturedMesh:
    verts = mesh.verts.detach().float()
    faces = mesh.faces.long()
    dev = verts.device
    rasterizer = rasterizer or make_rasterizer("auto", dev)
    t0 = time.perf_counter()
    vmapping, uv_faces, uvs = uv_atlas(verts.cpu().numpy(), faces.cpu().numpy(), atlas_iterations)
    t_atlas = time.perf_counter() - t0
    uv_t = torch.from_numpy(uvs).to(dev)
    pos = torch.cat([uv_t * 2 - 1, torch.zeros_like(uv_t[:, :1]), torch.ones_like(uv_t[:, :1])], -1)[None]
    tri = torch.from_numpy(uv_faces).to(dev)
    tri_r = tri.int() if rasterizer.backend == "nvdiffrast" else tri
    rast = rasterizer.rasterize(pos.contiguous(), tri_r, (size, size))
    xyz = rasterizer.interpolate(verts[torch.from_numpy(vmapping).to(dev)][None], rast, tri_r)[0]  # (S, S, 3)
    covered = rast[0, ..., 3] > 0
    img = torch.ones(size, size, 3, device=dev)
    pts = xyz[covered]
    if pts.shape[0]:
        img[covered] = torch.cat([colour_fn(pts[i:i + chunk]).float() for i in range(0, pts.shape[0], chunk)]).clamp(0, 1)
    img = dilate(img, covered, pad)
    tex = (torch.flip(img, dims=[0]).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)  # row 0 at v = 1
    log.info("export: atlas %.1f s, %d² texture baked in %.1f s", t_atlas, size, time.perf_counter() - t0 - t_atlas)
    return TexturedMesh(verts.cpu().numpy(), faces.cpu().numpy(), uvs, uv_faces, vmapping, tex)


def write_obj(tm: TexturedMesh, out_dir: Path, name: str = "mesh") -> Path:
    """OBJ + MTL + PNG: vertices as they are, texture coordinates per atlas vertex, faces v/vt."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{name}_albedo.png"
    atomic_save_image(png, tm.texture)
    mtl = out_dir / f"{name}.mtl"
    atomic_write_bytes(mtl, (f"newmtl material0\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nNs 1\nillum 1\nmap_Kd {png.name}\n").encode())
    lines = [f"mtllib {mtl.name}", "usemtl material0"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in tm.verts]
    lines += [f"vt {u:.6f} {v:.6f}" for u, v in tm.uvs]
    vf = tm.vmapping[tm.uv_faces] + 1  # position index of each corner
    tf = tm.uv_faces + 1
    lines += [f"f {a}/{ta} {b}/{tb} {c}/{tc}" for (a, b, c), (ta, tb, tc) in zip(vf, tf)]
    path = out_dir / f"{name}.obj"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def write_glb(tm: TexturedMesh, path: Path) -> Path:
    """GLB with a PBR material whose base colour is the baked texture (one vertex per atlas vertex)."""
    import trimesh
    from PIL import Image

    material = trimesh.visual.material.PBRMaterial(
        baseColorTexture=Image.fromarray(tm.texture), metallicFactor=0.0, roughnessFactor=1.0, doubleSided=False)
    visual = trimesh.visual.TextureVisuals(uv=tm.uvs, material=material)
    m = trimesh.Trimesh(vertices=tm.verts[tm.vmapping], faces=tm.uv_faces, visual=visual, process=False)
    path = Path(path)
    atomic_write_bytes(path, m.export(file_type="glb"))
    return path


@torch.no_grad()
def turntable(mesh: Mesh, colour_fn, path: Path, rasterizer: Rasterizer | None = None, frames: int = 36,
              resolution: int = 256, polar: float = 80.0, radius: float = 1.8, fovy: float = 40.0,
              shading: str = "lambertian", progress: bool = True) -> Path:
    """A GIF of the mesh turning once, lit from the camera (a progress bar over the frames)."""
    import imageio.v2 as imageio
    from tqdm import tqdm

    from core.rendering.mesh_render import render_mesh

    dev = mesh.verts.device
    rasterizer = rasterizer or make_rasterizer("auto", dev)
    cams = orbit_cameras(frames, polar=polar, radius=radius, fovy=fovy, device=dev)
    imgs = []
    mesh = mesh.detach()  # once: its edge sort (the torch antialias') is made at the first frame and kept
    for i in tqdm(range(frames), desc="turntable", disable=not progress, dynamic_ncols=True, leave=False):
        cam = cams[i]
        light = torch.nn.functional.normalize(cam.centers, dim=-1)
        r = render_mesh(mesh, colour_fn, cam, resolution, rasterizer, shading=shading, light_dir=light)
        imgs.append((r.rgb[0].permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8))
    path = Path(path)
    return atomic_write(path, lambda t: imageio.mimsave(t, imgs, duration=1.0 / 12, loop=0), suffix=".gif")


def export_textured_mesh(mesh: Mesh, colour_fn, out_dir: Path, texture_size: int = 1024,
                         rasterizer: Rasterizer | None = None, name: str = "mesh",
                         turntable_frames: int = 36, turntable_resolution: int = 256,
                         atlas_iterations: int = 1) -> dict[str, str]:
    """Everything at once: OBJ+MTL+PNG, GLB, turntable GIF. Returns the file names. A line per part
    (and a bar over the turntable's frames) says where it is and how long it took."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log.info("export: UV atlas (xatlas, %d iteration%s) and a %d² texture for %d faces", atlas_iterations,
             "s" if atlas_iterations != 1 else "", texture_size, int(mesh.faces.shape[0]))
    tm = bake_texture(mesh, colour_fn, texture_size, rasterizer, atlas_iterations=atlas_iterations)
    t_files = time.perf_counter()
    obj = write_obj(tm, out_dir, name)
    glb = write_glb(tm, out_dir / f"{name}.glb")
    t1 = time.perf_counter()
    log.info("export: %s and %s written (%.1f s, the files %.1f s of it); turntable: %d frames at %d²", obj.name,
             glb.name, t1 - t0, t1 - t_files, turntable_frames, turntable_resolution)
    gif = turntable(mesh, colour_fn, out_dir / "turntable.gif", rasterizer, frames=turntable_frames,
                    resolution=turntable_resolution)
    log.info("exported %s (%d vertices, %d faces, %d² texture), %s, %s (turntable %.1f s)", obj.name, len(tm.verts),
             len(tm.faces), texture_size, glb.name, gif.name, time.perf_counter() - t1)
    return {"obj": obj.name, "mtl": f"{name}.mtl", "texture": f"{name}_albedo.png", "glb": glb.name,
            "turntable": gif.name}
