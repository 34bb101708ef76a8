"""The coarse stage's losses (Magic123 §2.1.1, eqs. 1–4) and the released code's regularisers.

Each equation lives in one function. Images are (B, C, H, W); masks (B, 1, H, W) in {0, 1}.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from core.ops import face_edges, gather_rows, sorted_edge_keys, unique_edges


def reference_rgb_loss(rgb: torch.Tensor, ref_rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Magic123 eq. 1, first term: ‖M ⊙ (I^r − G_θ(v^r))‖², as a mean over pixels and channels."""
    return ((mask * (ref_rgb - rgb)) ** 2).mean()


def reference_mask_loss(opacity: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Magic123 eq. 1, second term: ‖M − M(G_θ(v^r))‖², the rendered opacity against the mask (mean)."""
    return ((mask - opacity) ** 2).mean()


def reconstruction_loss(rgb, opacity, ref_rgb, mask, lambda_rgb: float, lambda_mask: float) -> torch.Tensor:
    """Magic123 eq. 1: L_rec = λ_rgb ‖M ⊙ (I^r − G)‖² + λ_mask ‖M − M(G)‖²."""
    return lambda_rgb * reference_rgb_loss(rgb, ref_rgb, mask) + lambda_mask * reference_mask_loss(opacity, mask)


def pearson_depth_loss(depth: torch.Tensor, ref_depth: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Magic123 eq. 2: L_d = ½ [1 − cov(M⊙d^r, M⊙d) / (σ(M⊙d^r) σ(M⊙d))].

    Computed over the mask's pixels (the masked-out pixels are not part of the statistics), per
    image, then averaged over the batch. `depth` and `ref_depth` must follow the same convention
    (both bigger = nearer, or both bigger = farther): the caller flips one if needed.
    """
    losses = []
    for d, r, m in zip(depth, ref_depth, mask):
        # the mask's pixels by one compaction (one wait for the GPU; a count and two boolean-mask
        # indexings were three), the same pixels in the same order
        sel = torch.nonzero(m.reshape(-1) > 0.5).squeeze(1)
        if sel.numel() < 2:
            losses.append(depth.new_zeros(()))
            continue
        x, y = gather_rows(d.reshape(-1), sel), gather_rows(r.reshape(-1), sel)
        xc, yc = x - x.mean(), y - y.mean()
        # the variances held off 0 before the square root: a render whose depth is constant over the
        # mask (an empty field there) has a zero variance, whose square root's gradient is inf, and
        # inf × 0 made the depth's gradient NaN. Any variance above 1e-20 gives the same numbers
        sx, sy = xc.pow(2).mean().clamp_min(1e-20).sqrt(), yc.pow(2).mean().clamp_min(1e-20).sqrt()
        corr = (xc * yc).mean() / (sx * sy + eps)
        losses.append(0.5 * (1.0 - corr))
    return torch.stack(losses).mean()


def gaussian_kernel(size: int = 9, sigma: float | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """A normalised 2D Gaussian (size × size); σ as OpenCV picks it for that size by default."""
    sigma = sigma if sigma is not None else 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def gaussian_blur(img: torch.Tensor, size: int = 9, sigma: float | None = None,
                  padding: str = "replicate") -> torch.Tensor:
    """Per-channel Gaussian blur; (B, C, H, W) → same. `padding` 'reflect' is torchvision's
    `gaussian_blur` (the released code's TF.gaussian_blur(x, kernel_size=9): σ = 1.7)."""
    k = gaussian_kernel(size, sigma, img.device, img.dtype)
    c = img.shape[1]
    w = k[None, None].expand(c, 1, size, size)
    pad = size // 2
    return F.conv2d(F.pad(img, (pad, pad, pad, pad), mode=padding), w, groups=c)


def normal_smoothness_loss(normal: torch.Tensor, kernel_size: int = 9) -> torch.Tensor:
    """Magic123 eq. 3: L_n = ‖n − τ(g(n, k))‖, τ = stop-gradient, g = k×k Gaussian blur (k = 9).

    n is the rendered normal map (B, 3, H, W). The norm is taken per pixel (Euclidean over the three
    components) and averaged over pixels: a mean of ‖n_p − τ(g(n))_p‖₂.
    """
    target = gaussian_blur(normal, kernel_size).detach()
    diff = normal - target
    return (diff.pow(2).sum(1) + 1e-12).sqrt().mean()


def normal_tv_loss(normal: torch.Tensor) -> torch.Tensor:
    """The released code's total variation of the normal image (Magic123 nerf/utils.py:801-807,
    lambda_normal_smooth): mean((n[y+1] − n[y])²) + mean((n[x+1] − n[x])²), means over all entries."""
    return ((normal[:, :, 1:, :] - normal[:, :, :-1, :]) ** 2).mean() + \
        ((normal[:, :, :, 1:] - normal[:, :, :, :-1]) ** 2).mean()


def normal_blur_mse_loss(normal: torch.Tensor, kernel_size: int = 9, blur_grad: bool = True) -> torch.Tensor:
    """Eq. 3 as the released code computes it (lambda_normal_smooth2d, Magic123 nerf/utils.py:809-813):
    MSE(n, g(n)) with g torchvision's 9×9 Gaussian blur (σ 1.7, reflect padding). Magic123 lets the
    gradient through the blurred target too (`blur_grad`); Consistent123 detaches it (its
    nerf/utils.py:1210), which is the paper's stop-gradient τ."""
    target = gaussian_blur(normal, kernel_size, padding="reflect")
    if not blur_grad:
        target = target.detach()
    return F.mse_loss(normal, target)


def entropy_loss(opacity: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The released code's entropy (stable-dreamfusion's lambda_entropy): the binary entropy
    −α log₂ α − (1 − α) log₂(1 − α) of each value, clamped to [eps, 1 − eps], averaged; pushes them
    to 0 or 1. The released code applies it to each sample's weight w_i (nerf/utils.py:796); it
    also works on each pixel's opacity."""
    a = opacity.clamp(eps, 1.0 - eps)
    return (-a * torch.log2(a) - (1 - a) * torch.log2(1 - a)).mean()


def orientation_loss(weights: torch.Tensor, normals: torch.Tensor, dirs: torch.Tensor, n_rays: int) -> torch.Tensor:
    """DreamFusion's orientation loss (the released code's lambda_orient): per ray
    Σ_i stopgrad(w_i) · max(0, n_i · d_i)², averaged over the rays; normals should not face away
    from the camera (d = ray direction, so a visible normal has n·d < 0). The samples given may be
    a subset (those with weight); the sum runs over them, the mean over all `n_rays` rays."""
    if weights.numel() == 0:
        return weights.new_zeros(())
    cos = (normals * dirs).sum(-1)
    return (weights.detach() * cos.clamp_min(0.0) ** 2).sum() / max(1, n_rays)


def coarse_objective(l_rec, l_guidance, l_depth, l_normal, lambda_depth: float, lambda_normal: float):
    """Magic123 eq. 4: L_c = L_rec + L_g + λ_d L_d + λ_n L_n."""
    return l_rec + l_guidance + lambda_depth * l_depth + lambda_normal * l_normal


# ------------------------------------------------------------------ fine stage (DMTet) mesh regularisers
# DESIGN.md's table (the authors' released scripts; the paper's §3.2 names no mesh regulariser): mesh
# normal consistency 0.1 and Laplacian smoothing 0.1 in the fine stage.
def mesh_normal_consistency(verts: torch.Tensor, faces: torch.Tensor,
                            edges: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean of 1 − cos(n_i, n_j) over pairs of faces sharing an edge (edges of exactly two faces).
    No host sync: the pairs are a mask over the faces' edges in key order, not a compacted list.
    `edges`: sorted_edge_keys(faces, len(verts)) when the caller has it already."""
    v = gather_rows(verts, faces)
    fn = F.normalize(torch.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], dim=-1), dim=-1, eps=1e-12)
    ks, order = edges if edges is not None else sorted_edge_keys(faces, verts.shape[0])
    fs = torch.remainder(order, faces.shape[0])  # face_edges lists the faces' three edges face by face, thrice
    pair = (ks[1:] == ks[:-1]).to(fn.dtype)  # entry k: edges k and k+1 of the sorted list are one edge
    cos = (gather_rows(fn, fs[:-1]) * gather_rows(fn, fs[1:])).sum(-1)
    return ((1.0 - cos) * pair).sum() / pair.sum().clamp_min(1.0)  # 0 without pairs


def _directed_edges(faces: torch.Tensor, n_verts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both directions (src, dst) of every unique undirected edge of a triangle mesh."""
    e = unique_edges(face_edges(faces), n_verts)
    return torch.cat([e[:, 0], e[:, 1]]), torch.cat([e[:, 1], e[:, 0]])


def mesh_laplacian_loss_unnormalised(verts: torch.Tensor, faces: torch.Tensor,
                                     edges: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The released code's uniform Laplacian loss (Magic123 nerf/renderer.py:594-627, Consistent123
    the same): L = D − A over the mesh's edges, loss = mean over all vertices of ‖(L v)_i‖ =
    ‖Σ_{j∈N(i)} (v_i − v_j)‖ (not divided by the degree).

    The unique edges without a compaction (no host sync, where torch.unique waits for its count):
    the faces' 3F edge keys sorted, each edge's first occurrence kept by a 0/1 weight, the repeats
    adding exact zeros between the same terms in the same order, so the sum is unique's to the bit.
    `edges`: sorted_edge_keys(faces, len(verts)) when the caller has it already."""
    n = verts.shape[0]
    if faces.shape[0] == 0:
        return verts.new_zeros(())
    ks = (edges if edges is not None else sorted_edge_keys(faces, n))[0]
    first = torch.cat([ks.new_ones(1, dtype=torch.bool), ks[1:] != ks[:-1]]).to(verts.dtype)[:, None]
    lo, hi = torch.div(ks, n, rounding_mode="floor"), ks % n
    src, dst, keep = torch.cat([lo, hi]), torch.cat([hi, lo]), torch.cat([first, first])
    lap = torch.zeros_like(verts).index_add(0, src, (gather_rows(verts, src) - gather_rows(verts, dst)) * keep)
    return lap.norm(dim=-1).mean()


def mesh_laplacian_loss(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Uniform Laplacian smoothing: mean over vertices of ‖(1/|N(i)|) Σ_{j∈N(i)} v_j − v_i‖."""
    src, dst = _directed_edges(faces, verts.shape[0])
    if src.numel() == 0:
        return verts.new_zeros(())
    acc = torch.zeros_like(verts).index_add(0, src, gather_rows(verts, dst))
    deg = torch.zeros(verts.shape[0], device=verts.device, dtype=verts.dtype).index_add(0, src, torch.ones_like(src, dtype=verts.dtype))
    used = deg > 0
    lap = acc[used] / deg[used, None] - verts[used]
    return lap.norm(dim=-1).mean()
