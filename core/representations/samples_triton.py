"""The volume renderer's rays and samples as one Triton kernel (`coarse.samples: triton`, the default on
a GPU): what `nerf._ray_samples` computes with ~95 tensor operators, in one launch and without a
gradient (nothing upstream of the samples is trained).

One program takes a block of the R·S (ray, sample) pairs, in the order of the (R, S) outputs. For
each it forms the ray through its pixel centre as `cameras.pixel_rays` does (x = (j + ½ − W/2)/f,
y = −(i + ½ − H/2)/f, d = normalise(R_c2w · (x, y, −1)), o = the camera's centre; moved by the
offsets δo, δd and normalised again where given), the ray's entry to and exit from the box (lo, hi)
(`nerf._ray_aabb`: slabs, 1/d with |d| < 1e-9 taken as 1e-9, near clamped at 0), and the sample
t = near + span·((s + ½ + jitter − ½)/S), δ = span/S, x = o + t·d, active = the ray meets the box and
x lies in an occupied cell of the grid (`nerf.occupied_at`). The sample-0 lane of each ray also
writes its o, d and cos = d · (camera axis). fp32 throughout, each division and square root
correctly rounded and no multiply-add fused, as torch's separate kernels compute them; the matrix
product's sum and the norm's may round in another order, so the numbers agree to a few units in the
last place (tests/test_nerf.py), and an occupancy flag can differ only where a sample lies on a
cell's face to the last bit.

This module imports triton at its top: `nerf.py` imports it only when the 'triton' samples run.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from core.perf import device_constant

BLOCK = 512  # (ray, sample) pairs a program


@triton.jit
def _row(p, m):
    """One row of a camera's 4×4 matrix: the rotation's three entries and the centre's coordinate."""
    return (tl.load(p + 0, mask=m, other=0.0), tl.load(p + 1, mask=m, other=0.0), tl.load(p + 2, mask=m, other=0.0),
            tl.load(p + 3, mask=m, other=0.0))


@triton.jit
def _samples_kernel(c2w_ptr, focal_ptr, jit_ptr, off_ptr, box_ptr, occ_ptr,
                    o_ptr, d_ptr, cos_ptr, t_ptr, delta_ptr, pts_ptr, active_ptr,
                    total, HW, W, half_w, half_h, Sf, res, bound,
                    S: tl.constexpr, HAS_JITTER: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_OCC: tl.constexpr,
                    BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = n < total
    r = n // S
    s = n - r * S
    b = r // HW
    pix = r - b * HW
    i = pix // W
    j = pix - i * W
    # the camera: c2w[b] (row-major 4×4) and its focal length
    cb = c2w_ptr + b * 16
    r00, r01, r02, ox = _row(cb, m)
    r10, r11, r12, oy = _row(cb + 4, m)
    r20, r21, r22, oz = _row(cb + 8, m)
    f = tl.load(focal_ptr + b, mask=m, other=1.0)
    # the pixel centre's direction in the camera (cameras.pixel_rays), then in the world
    x = tl.div_rn(j.to(tl.float32) + 0.5 - half_w, f)
    y = -tl.div_rn(i.to(tl.float32) + 0.5 - half_h, f)
    dx = r00 * x + r01 * y - r02
    dy = r10 * x + r11 * y - r12
    dz = r20 * x + r21 * y - r22
    nrm = tl.maximum(tl.sqrt_rn(dx * dx + dy * dy + dz * dz), 1e-12)
    dx = tl.div_rn(dx, nrm)
    dy = tl.div_rn(dy, nrm)
    dz = tl.div_rn(dz, nrm)
    cos = -(dx * r02 + dy * r12 + dz * r22)  # d · (−the camera's z axis)
    if HAS_OFFSET:  # one offset for every origin, one for every direction (the reference rays' noise)
        ox = ox + tl.load(off_ptr + 0)
        oy = oy + tl.load(off_ptr + 1)
        oz = oz + tl.load(off_ptr + 2)
        dx = dx + tl.load(off_ptr + 3)
        dy = dy + tl.load(off_ptr + 4)
        dz = dz + tl.load(off_ptr + 5)
        nrm = tl.maximum(tl.sqrt_rn(dx * dx + dy * dy + dz * dz), 1e-12)
        dx = tl.div_rn(dx, nrm)
        dy = tl.div_rn(dy, nrm)
        dz = tl.div_rn(dz, nrm)
        cos = -(dx * r02 + dy * r12 + dz * r22)
    # the box's slabs (nerf._ray_aabb)
    one = tl.full([BLOCK], 1.0, tl.float32)
    ix = tl.div_rn(one, tl.where(tl.abs(dx) < 1e-9, 1e-9, dx))
    iy = tl.div_rn(one, tl.where(tl.abs(dy) < 1e-9, 1e-9, dy))
    iz = tl.div_rn(one, tl.where(tl.abs(dz) < 1e-9, 1e-9, dz))
    ax = (tl.load(box_ptr + 0) - ox) * ix
    bx = (tl.load(box_ptr + 3) - ox) * ix
    ay = (tl.load(box_ptr + 1) - oy) * iy
    by = (tl.load(box_ptr + 4) - oy) * iy
    az = (tl.load(box_ptr + 2) - oz) * iz
    bz = (tl.load(box_ptr + 5) - oz) * iz
    near = tl.maximum(tl.maximum(tl.maximum(tl.minimum(ax, bx), tl.minimum(ay, by)), tl.minimum(az, bz)), 0.0)
    far = tl.minimum(tl.minimum(tl.maximum(ax, bx), tl.maximum(ay, by)), tl.maximum(az, bz))
    hit = far > near
    span = tl.maximum(far - near, 0.0)
    u = s.to(tl.float32) + 0.5
    if HAS_JITTER:
        u = u + (tl.load(jit_ptr + n, mask=m, other=0.5) - 0.5)
    t = near + span * tl.div_rn(u, one * Sf)
    px = ox + dx * t
    py = oy + dy * t
    pz = oz + dz * t
    active = hit
    if HAS_OCC:  # the occupancy grid's cell (nerf.occupied_at)
        side = one * (2 * bound)
        cx = tl.floor(tl.div_rn(px + bound, side) * res).to(tl.int32)
        cy = tl.floor(tl.div_rn(py + bound, side) * res).to(tl.int32)
        cz = tl.floor(tl.div_rn(pz + bound, side) * res).to(tl.int32)
        inside = (cx >= 0) & (cx < res) & (cy >= 0) & (cy < res) & (cz >= 0) & (cz < res)
        cx = tl.minimum(tl.maximum(cx, 0), res - 1)
        cy = tl.minimum(tl.maximum(cy, 0), res - 1)
        cz = tl.minimum(tl.maximum(cz, 0), res - 1)
        cell = (cx.to(tl.int64) * res + cy) * res + cz
        occ = tl.load(occ_ptr + cell, mask=m & inside, other=0)
        active = active & inside & (occ != 0)
    tl.store(t_ptr + n, t, mask=m)
    tl.store(pts_ptr + n * 3 + 0, px, mask=m)
    tl.store(pts_ptr + n * 3 + 1, py, mask=m)
    tl.store(pts_ptr + n * 3 + 2, pz, mask=m)
    tl.store(active_ptr + n, active.to(tl.int8), mask=m)
    first = m & (s == 0)
    tl.store(o_ptr + r * 3 + 0, ox, mask=first)
    tl.store(o_ptr + r * 3 + 1, oy, mask=first)
    tl.store(o_ptr + r * 3 + 2, oz, mask=first)
    tl.store(d_ptr + r * 3 + 0, dx, mask=first)
    tl.store(d_ptr + r * 3 + 1, dy, mask=first)
    tl.store(d_ptr + r * 3 + 2, dz, mask=first)
    tl.store(cos_ptr + r, cos, mask=first)
    tl.store(delta_ptr + r, tl.div_rn(span, one * Sf), mask=first)


def triton_ray_samples(c2w: torch.Tensor, focal: torch.Tensor, height: int, width: int, S: int,
                       jitter: Optional[torch.Tensor], offset_o: Optional[torch.Tensor],
                       offset_d: Optional[torch.Tensor], lo, hi, occupied: Optional[torch.Tensor], bound: float):
    """`nerf._ray_samples`'s outputs (o, d, cos, t, δ, positions, active) from one kernel launch."""
    dev = c2w.device
    B = c2w.shape[0]
    R = B * height * width
    f32 = dict(device=dev, dtype=torch.float32)
    c2w = c2w.to(**f32).contiguous()
    focal = torch.as_tensor(focal, **f32).expand(B).contiguous()
    if isinstance(lo, torch.Tensor):  # the occupied cells' box, on the device
        box = torch.stack([lo.to(**f32).expand(3), hi.to(**f32).expand(3)]).contiguous()
    else:  # the whole [−bound, bound]³: numbers kept on the device once (no copy a call)
        box = device_constant(((float(lo),) * 3, (float(hi),) * 3), torch.float32, dev)
    o, d = torch.empty(R, 3, **f32), torch.empty(R, 3, **f32)
    cos, delta = torch.empty(R, **f32), torch.empty(R, **f32)
    t, pts = torch.empty(R, S, **f32), torch.empty(R, S, 3, **f32)
    active = torch.empty(R, S, device=dev, dtype=torch.int8)
    has_off = offset_o is not None
    off = torch.cat([offset_o.reshape(3), offset_d.reshape(3)]).to(**f32) if has_off else box
    jit = jitter.to(**f32).contiguous() if jitter is not None else t
    occ = occupied.contiguous().view(torch.uint8) if occupied is not None else active
    res = occupied.shape[0] if occupied is not None else 1
    total = R * S
    _samples_kernel[(triton.cdiv(total, BLOCK),)](
        c2w, focal, jit, off, box, occ, o, d, cos, t, delta, pts, active,
        total, height * width, width, 0.5 * width, 0.5 * height, float(S), res, float(bound),
        S=S, HAS_JITTER=jitter is not None, HAS_OFFSET=has_off, HAS_OCC=occupied is not None, BLOCK=BLOCK,
        enable_fp_fusion=False)  # each multiply and add rounded as torch's separate kernels round them
    return o, d, cos, t, delta[:, None].expand(R, S), pts, active.view(torch.bool)
