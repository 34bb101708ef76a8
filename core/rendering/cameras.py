"""Cameras in the papers' convention (Magic123 §3.2, stable-dreamfusion's coordinates).

World frame: y is up. A camera sits on a sphere around the origin, at polar angle θ measured from
+y (θ = 90° is the equator), azimuth φ around +y with φ = 0 on the +z axis, radius r, and looks at
the origin. So the reference view (θ = 90°, φ = 0°, r = 1.8, FOV 40°) is the *front*: it sits on
+z and looks down −z. Camera axes follow OpenGL: x right, y up, the camera looks along −z.
All angles crossing this module's interface are in degrees.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from core.perf import device_constant, to_device

UP = (0.0, 1.0, 0.0)


def spherical_to_cartesian(polar: torch.Tensor, azimuth: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Degrees in, (…, 3) positions out."""
    th, ph = torch.deg2rad(polar), torch.deg2rad(azimuth)
    return torch.stack(
        [radius * torch.sin(th) * torch.sin(ph), radius * torch.cos(th), radius * torch.sin(th) * torch.cos(ph)],
        dim=-1,
    )


def cartesian_to_spherical(xyz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(…, 3) positions → polar, azimuth (degrees, azimuth in (−180, 180]), radius."""
    r = xyz.norm(dim=-1)
    polar = torch.rad2deg(torch.acos((xyz[..., 1] / r.clamp_min(1e-12)).clamp(-1.0, 1.0)))
    azimuth = torch.rad2deg(torch.atan2(xyz[..., 0], xyz[..., 2]))
    return polar, azimuth, r


def look_at(eye: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Camera-to-world matrices (B, 4, 4) for cameras at `eye` (B, 3) looking at `target`."""
    target = torch.zeros_like(eye) if target is None else target.expand_as(eye)
    back = torch.nn.functional.normalize(eye - target, dim=-1)  # camera +z points away from the scene
    up = device_constant(UP, eye.dtype, eye.device).expand_as(eye)
    right = torch.cross(up, back, dim=-1)
    # at the poles up ∥ back: pick +z·sign as the right-vector reference instead
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    alt = device_constant((0.0, 0.0, -1.0), eye.dtype, eye.device).expand_as(eye)
    right = torch.where(degenerate, torch.cross(alt, back, dim=-1), right)
    right = torch.nn.functional.normalize(right, dim=-1)
    true_up = torch.cross(back, right, dim=-1)
    c2w = torch.eye(4, dtype=eye.dtype, device=eye.device).repeat(eye.shape[0], 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, true_up, back, eye
    return c2w


@dataclass
class Cameras:
    """A batch of B cameras on the viewing sphere. Tensors of shape (B,), degrees.

    Cameras moved from the host to a GPU keep their host copy (`host`): the few numbers a camera
    needs (its centre, c2w, w2c, projection and focal length) are computed there and sent in one copy
    each, without waiting (each was a dozen one-thread kernels on the GPU, launched from the host
    every iteration: session 23)."""

    polar: torch.Tensor
    azimuth: torch.Tensor
    radius: torch.Tensor
    fovy: torch.Tensor
    host: Optional["Cameras"] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = self.polar.shape[0]
        for name in ("azimuth", "radius", "fovy"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"Cameras.{name} must have shape ({n},), got {tuple(getattr(self, name).shape)}")

    @classmethod
    def make(cls, polar, azimuth, radius, fovy, device="cpu") -> "Cameras":
        vals = [torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in (polar, azimuth, radius, fovy)]
        n = max(v.numel() for v in vals)
        vals = [v.expand(n).clone() if v.numel() == 1 else v for v in vals]
        return cls(*vals).to(device)

    def __len__(self) -> int:
        return self.polar.shape[0]

    @property
    def device(self) -> torch.device:
        return self.polar.device

    def to(self, device) -> "Cameras":
        device = torch.device(device)
        if device.type == "cpu" and self.host is not None:
            return self.host  # the host copy they came from: no copy back, no wait
        moved = Cameras(*(to_device(t, device) for t in (self.polar, self.azimuth, self.radius, self.fovy)))
        if device.type != "cpu":
            moved.host = self if self.device.type == "cpu" else self.host
        return moved

    def for_small_math(self) -> "Cameras":
        """Where a few numbers per camera are best computed: the host copy where these cameras have one
        (the result then sent with core.perf.to_device, without waiting), else the cameras themselves
        (copying them back would wait for the GPU)."""
        return self.host if self.host is not None and self.device.type != "cpu" else self

    def _small(self, fn: Callable[["Cameras"], torch.Tensor]) -> torch.Tensor:
        """fn(cameras): on the host copy where there is one, then sent to these cameras' device."""
        c = self.for_small_math()
        return fn(self) if c is self else to_device(fn(c), self.device)

    def __getitem__(self, idx) -> "Cameras":
        sel = [t[idx] for t in (self.polar, self.azimuth, self.radius, self.fovy)]
        out = Cameras(*(s.reshape(-1) for s in sel))
        if self.host is not None and not isinstance(idx, torch.Tensor):
            out.host = self.host[idx]
        return out

    @property
    def centers(self) -> torch.Tensor:
        return self._small(lambda c: spherical_to_cartesian(c.polar, c.azimuth, c.radius))

    def c2w(self) -> torch.Tensor:
        return self._small(lambda c: look_at(c.centers))

    def w2c(self) -> torch.Tensor:
        # inv_ex: linalg.inv's numbers without its error check (a read of `info`, a wait for the
        # GPU where it runs there); a look-at matrix is a rotation and a translation, never singular
        return self._small(lambda c: torch.linalg.inv_ex(c.c2w()).inverse)

    def focal(self, height: int) -> torch.Tensor:
        """Focal length in pixels for an image `height` pixels tall."""
        return self._small(lambda c: 0.5 * height / torch.tan(0.5 * torch.deg2rad(c.fovy)))

    def rays(self, height: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """World-space ray origins and unit directions, each (B, H, W, 3), through pixel centres."""
        width = width or height
        f = self.focal(height)
        return pixel_rays(self.c2w(), f, height, width)

    def projection(self, near: float = 0.1, far: float = 100.0, aspect: float = 1.0) -> torch.Tensor:
        """OpenGL perspective projection matrices (B, 4, 4)."""
        def make(c: "Cameras") -> torch.Tensor:
            t = torch.tan(0.5 * torch.deg2rad(c.fovy))
            p = torch.zeros(len(c), 4, 4, device=c.device)
            p[:, 0, 0] = 1.0 / (t * aspect)
            p[:, 1, 1] = 1.0 / t
            p[:, 2, 2] = -(far + near) / (far - near)
            p[:, 2, 3] = -2.0 * far * near / (far - near)
            p[:, 3, 2] = -1.0
            return p

        return self._small(make)

    def mvp(self, near: float = 0.1, far: float = 100.0) -> torch.Tensor:
        """World → clip space (B, 4, 4), for rasterisers."""
        return self._small(lambda c: c.projection(near, far) @ c.w2c())

    def project(self, points: torch.Tensor, height: int, width: int | None = None) -> torch.Tensor:
        """World points (B, N, 3) → pixel coordinates (B, N, 2) as (column, row), and depth (B, N)."""
        width = width or height
        w2c = self.w2c()
        pc = torch.einsum("bij,bnj->bni", w2c[:, :3, :3], points) + w2c[:, None, :3, 3]
        f = self.focal(height)[:, None]
        u = f * pc[..., 0] / (-pc[..., 2]) + 0.5 * width
        v = -f * pc[..., 1] / (-pc[..., 2]) + 0.5 * height
        return torch.stack([u, v, -pc[..., 2]], dim=-1)


def pixel_rays(c2w: torch.Tensor, focal: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray origins and unit directions (B, H, W, 3) through the pixel centres of cameras with
    camera-to-world matrices c2w (B, 4, 4) and focal lengths `focal` (B,) in pixels (Cameras.rays;
    a function of tensors alone, for torch.compile: core.representations.nerf)."""
    dev = c2w.device
    j = torch.arange(width, device=dev, dtype=torch.float32) + 0.5
    i = torch.arange(height, device=dev, dtype=torch.float32) + 0.5
    ii, jj = torch.meshgrid(i, j, indexing="ij")
    f = focal[:, None, None]
    x = (jj[None] - 0.5 * width) / f
    y = -(ii[None] - 0.5 * height) / f
    d_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)
    d = torch.einsum("bij,bhwj->bhwi", c2w[:, :3, :3], d_cam)
    d = torch.nn.functional.normalize(d, dim=-1)
    o = c2w[:, None, None, :3, 3].expand_as(d)
    return o, d


def reference_cameras(cam_params, device="cpu") -> Cameras:
    """The reference view: front, Magic123 §3.2."""
    p = cam_params
    return Cameras.make(p.ref_polar, p.ref_azimuth, p.radius, p.fovy, device=device)


def view_ranges(cam_params, progress: float | None = None) -> dict[str, tuple[float, float]]:
    """The (lo, hi) ranges novel views are drawn from: polar, azimuth, radius, fovy.

    With `camera.progressive_view` and a `progress` (the fraction of the coarse stage done), the
    ranges widen from the reference view to the full ranges as Consistent123's released coarse
    stage does (lyk412/Consistent123 nerf/utils.py:693-703): r = min(1, init + 2·progress), each
    bound = reference·(1 − r) + full bound·r (the reference radius and fovy are `radius`, `fovy`).
    """
    p = cam_params
    full = {"polar": tuple(p.polar_range), "azimuth": tuple(p.azimuth_range), "radius": tuple(p.radius_range),
            "fovy": tuple(p.fovy_range)}
    if not p.progressive_view or progress is None:
        return full
    r = min(1.0, p.progressive_init_ratio + 2.0 * float(progress))
    ref = {"polar": p.ref_polar, "azimuth": p.ref_azimuth, "radius": p.radius, "fovy": p.fovy}
    return {k: (ref[k] * (1 - r) + lo * r, ref[k] * (1 - r) + hi * r) for k, (lo, hi) in full.items()}


def upper_hemisphere_directions(n: int, draw: str = "cube", generator: torch.Generator | None = None) -> torch.Tensor:
    """n unit vectors with y ≥ 0: the released 'uniform sphere' camera draws (stable-dreamfusion).

    'cube': (U(−1, 1), U(0, 1), U(−1, 1)) normalised, as Magic123's rand_poses draws them
    (guochengqian/Magic123 nerf/provider.py:86-93) — despite the option's name not uniform on the
    hemisphere (directions towards the cube's corners are denser); 'gaussian': (N, |N|, N) normalised,
    uniform on the hemisphere (Consistent123 nerf/provider.py:92-99).
    """
    if draw == "cube":
        x = 2.0 * torch.rand(n, generator=generator) - 1.0
        y = torch.rand(n, generator=generator)
        z = 2.0 * torch.rand(n, generator=generator) - 1.0
    elif draw == "gaussian":
        x = torch.randn(n, generator=generator)
        y = torch.randn(n, generator=generator).abs()
        z = torch.randn(n, generator=generator)
    else:
        raise ValueError(f"unknown uniform_sphere_draw {draw!r} (cube, gaussian)")
    return torch.nn.functional.normalize(torch.stack([x, y, z], dim=-1), dim=-1)


def sample_cameras(cam_params, n: int, generator: torch.Generator | None = None, device="cpu",
                   progress: float | None = None) -> Cameras:
    """Novel views as the released code samples them (stable-dreamfusion's rand_poses).

    With probability `camera.uniform_sphere_rate` — one draw for the whole batch, as released
    (Magic123 nerf/provider.py:86) — the cameras sit on the upper hemisphere
    (`upper_hemisphere_directions`), whatever polar_range / azimuth_range say; radius and FOV are
    still drawn from their ranges. Otherwise polar, azimuth, radius and FOV are uniform in their
    ranges (polar uniform in angle, not on the sphere; provider.py:99-100). With rate 0 no branch draw
    is made, so the random stream is the one of the plain uniform sampler. `progress` (the fraction
    of the coarse stage done) narrows the ranges when `camera.progressive_view` is on (`view_ranges`).
    Every draw comes from `generator`.
    """
    p = cam_params
    rng = view_ranges(p, progress)

    def uni(lo_hi):
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    rate = float(getattr(p, "uniform_sphere_rate", 0.0))
    if rate > 0.0 and torch.rand((), generator=generator).item() < rate:
        d = upper_hemisphere_directions(n, getattr(p, "uniform_sphere_draw", "cube"), generator)
        polar, azimuth, _ = cartesian_to_spherical(d)
        cams = Cameras(polar, azimuth, uni(rng["radius"]), uni(rng["fovy"]))
    else:
        cams = Cameras(uni(rng["polar"]), uni(rng["azimuth"]), uni(rng["radius"]), uni(rng["fovy"]))
    return cams.to(device)


def orbit_cameras(n: int, polar: float = 90.0, radius: float = 1.8, fovy: float = 40.0, start: float = 0.0, device="cpu") -> Cameras:
    """n views evenly spaced in azimuth at a fixed polar angle (detector views, turntables)."""
    az = start + torch.arange(n, dtype=torch.float32) * (360.0 / n)
    az = (az + 180.0) % 360.0 - 180.0
    return Cameras.make(polar, az, radius, fovy, device=device)


def wrap_degrees(a: torch.Tensor) -> torch.Tensor:
    """Angles to (−180, 180]."""
    return -((-a + 180.0) % 360.0 - 180.0)


def relative_pose(ref: Cameras, tgt: Cameras) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Δpolar, Δazimuth, Δradius) from the reference camera to the target camera, degrees."""
    return tgt.polar - ref.polar, wrap_degrees(tgt.azimuth - ref.azimuth), tgt.radius - ref.radius


def fovy_to_focal(fovy_deg: float, height: int) -> float:
    return 0.5 * height / math.tan(0.5 * math.radians(fovy_deg))
