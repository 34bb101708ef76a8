"""The coarse NeRF of Magic123 §2.1.1: Instant-NGP hash grid + a small MLP, an occupancy grid for
empty-space skipping, and volume rendering of colour, opacity, depth and normals on white.

Field: x → hash grid → MLP (3 layers, 64 hidden; Magic123 §3.2) → raw density and albedo.
  density = act(raw + blob(x)), act = trunc_exp (the released code, stable-dreamfusion) or softplus,
  blob(x) = blob_scale · exp(−‖x‖² / (2 blob_std²))   (blob_kind 'gaussian': the released code's
            blob under its exp activation, Magic123 nerf/renderer.py:733-745, blob_radius 0.2), or
          = blob_scale · (1 − ‖x‖ / blob_std)         ('linear': Magic3D's blob, threestudio
            "blob_magic3d"; the released code's reading under softplus),
  albedo  = sigmoid(·) ∈ [0, 1].
The hash grid's finer levels can be switched off (`active_levels`): their features are zeroed
before the MLP, as the released code's coarse-to-fine masks do (core/stages/coarse.py sets it).
Normals: n = −∇σ/‖∇σ‖ of the pre-activation density (its direction agrees with ∇σ's as the
activations are monotone), by finite differences (default, as the released code) or autograd.
Depth: the rendered depth is the weight-averaged distance along the *camera axis* (z-depth), not
along the ray, and is 0 where the ray is empty (Σ w_i z_i with Σ w_i = opacity).
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from core.rendering.batch import RenderBatch
from core.perf import compiled_twin, device_constant, scope, to_device
from core.rendering.cameras import Cameras, pixel_rays
from core.representations.hashgrid import HashGrid
from core.rendering.shading import shade

log = logging.getLogger(__name__)


class _TruncExp(torch.autograd.Function):
    """exp with its gradient clamped (stable-dreamfusion / torch-ngp's trunc_exp)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    return _TruncExp.apply(x)


class _PositiveCumprod(torch.autograd.Function):
    """torch.cumprod along dim 1 of a tensor with no zero in it (the transmittance's factors
    1 − α_i + 1e-10 ≥ 1e-10), with the backward torch's own takes for such a tensor,
    reversed_cumsum(y · g) / x, bit for bit. torch's `cumprod_backward` first asks the host whether any
    input is 0 (`(input == 0).any().item()`): a wait for the GPU's queue in every coarse backward
    (~5 ms of host time on an H200, reports/speed session 25), which this does without."""

    @staticmethod
    def forward(ctx, x):
        y = torch.cumprod(x, 1)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        return (y * g).flip(1).cumsum(1).flip(1).div(x)


def positive_cumprod(x: torch.Tensor) -> torch.Tensor:
    """cumprod(x, dim=1) for x without zeros; its backward never waits for the device."""
    return _PositiveCumprod.apply(x) if torch.is_grad_enabled() and x.requires_grad else torch.cumprod(x, 1)


def rand_on(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """U[0, 1) of `shape` on `device`. On the CPU straight from `generator`; on a GPU from a stream
    seeded by one draw from `generator`, so the big tensor is made where it is used (no host
    generation and copy) and a run stays reproducible and resumable from the generator's state."""
    device = torch.device(device)
    if generator is None:
        return torch.rand(shape, device=device)
    if device.type == "cpu":
        return torch.rand(shape, generator=generator)
    seed = int(torch.randint(0, 2 ** 62, (), generator=generator))
    return torch.rand(shape, generator=torch.Generator(device=device).manual_seed(seed), device=device)


# Spread the samples of one ray over the whole batch before a differentiable field evaluation on a
# GPU: the hash grid's backward pass adds into the table with atomics, and consecutive samples (one
# ray's, or one sample's finite-difference offsets) share their coarse-level cells, so a warp of
# them serialises on the same entries. A fixed stride permutation (no randomness) breaks that up.
# Where: coarse.grid.spread (NeRFField.spreads): the Triton grid's 'runs' atomics sum those runs
# first instead, and spreading would take them apart.
_SPREAD_STRIDES = (1_000_003, 999_983)


def spread_wanted(setting: str, backend, atomics) -> bool:
    """coarse.grid.spread for a grid of `backend` with `atomics` (triton's): 'always', 'never', or 'auto' =
    spread unless the grid is Triton's summing runs of consecutive points, which spreading takes apart."""
    if setting == "auto":
        return not (backend == "triton" and atomics == "runs")
    return setting == "always"


def _spread_permutation(n: int, device) -> torch.Tensor:
    p = next(q for q in _SPREAD_STRIDES if n % q)  # coprime with n: both are primes
    return torch.arange(n, device=device, dtype=torch.long).mul_(p).remainder_(n)


class NeRFField(nn.Module):
    """Hash grid + MLP → (density, albedo). Construct with `NeRFField(**field_config)`."""

    def __init__(self, levels=16, features_per_level=2, log2_table_size=19, base_resolution=16, max_resolution=2048,
                 backend="auto", bound=1.0, hidden=64, layers=3, blob_scale=10.0, blob_std=0.5,
                 density_activation="softplus", device="cpu", seed=0, blob_kind="linear"):
        super().__init__()
        self.config = dict(levels=levels, features_per_level=features_per_level, log2_table_size=log2_table_size,
                           base_resolution=base_resolution, max_resolution=max_resolution, backend=backend, bound=bound,
                           hidden=hidden, layers=layers, blob_scale=blob_scale, blob_std=blob_std,
                           density_activation=density_activation, seed=seed, blob_kind=blob_kind)
        self.bound, self.blob_scale, self.blob_std = float(bound), float(blob_scale), float(blob_std)
        if density_activation not in ("softplus", "trunc_exp"):
            raise ValueError(f"density_activation must be softplus or trunc_exp, not {density_activation!r}")
        if blob_kind not in ("gaussian", "linear"):
            raise ValueError(f"blob_kind must be gaussian or linear, not {blob_kind!r}")
        self.blob_kind = blob_kind
        self.active_levels: Optional[int] = None  # hash-grid levels in use (None: all)
        self.density_activation = density_activation
        self.encoding = HashGrid(levels, features_per_level, log2_table_size, base_resolution, max_resolution,
                                 bound=bound, backend=backend, device=device, seed=1337 + seed)
        dims = [self.encoding.output_dim] + [hidden] * (layers - 1) + [4]
        mods: list[nn.Module] = []
        with torch.random.fork_rng(devices=[]):  # the MLP's initial weights, without touching global RNG
            torch.manual_seed(seed)
            for i in range(len(dims) - 1):
                mods.append(nn.Linear(dims[i], dims[i + 1], bias=True))
                if i < len(dims) - 2:
                    mods.append(nn.ReLU(inplace=True))
        self.mlp = nn.Sequential(*mods).to(device)
        self.normals_recompute = False  # see coarse.normals_recompute
        self.mlp_precision = "fp32"  # see coarse.mlp.precision
        self.spread = "auto"  # see coarse.grid.spread

    @classmethod
    def from_params(cls, params, device="cpu") -> "NeRFField":
        c = params.coarse
        field = cls(levels=c.grid.levels, features_per_level=c.grid.features_per_level,
                   log2_table_size=c.grid.log2_table_size, base_resolution=c.grid.base_resolution,
                   max_resolution=c.grid.max_resolution, backend=c.grid.backend, bound=c.bound,
                   hidden=c.mlp.hidden, layers=c.mlp.layers, blob_scale=c.density_blob_scale,
                   blob_std=c.density_blob_std, density_activation=c.density_activation, device=device,
                   seed=params.seed, blob_kind=c.density_blob)
        field.encoding.recompute_backward = c.grid.recompute_backward
        field.encoding.chunk = c.grid.chunk
        field.encoding.atomics = c.grid.atomics
        field.spread = c.grid.spread
        field.normals_recompute = c.normals_recompute
        field.mlp_precision = c.mlp.precision
        return field

    def load_portable_state_dict(self, state: dict) -> None:
        """A state dict saved with any hash-grid backend, loaded into this field's backend (torch and
        triton share the `encoding.table` layout; tcnn holds the same numbers as one flat vector)."""
        state = dict(state)
        if self.encoding.backend == "tcnn" and "encoding.table" in state:
            state["encoding.tcnn_encoding.params"] = state.pop("encoding.table").reshape(-1)
        elif self.encoding.backend != "tcnn" and "encoding.tcnn_encoding.params" in state:
            state["encoding.table"] = state.pop("encoding.tcnn_encoding.params").reshape(self.encoding.table.shape)
        self.load_state_dict(state)

    @classmethod
    def from_state(cls, config: dict, state: dict, device="cpu") -> "NeRFField":
        """A field saved as (config, state dict), on any backend available here; in eval mode."""
        cfg = dict(config)
        if cfg.get("backend") in ("tcnn", "triton"):  # CUDA-only backends: whichever runs here
            cfg["backend"] = "auto"
        field = cls(**cfg, device=device)
        field.load_portable_state_dict(state)
        return field.eval()

    # ------------------------------------------------------------------------------------ queries
    def density_blob(self, x: torch.Tensor) -> torch.Tensor:
        """The blob added to the raw density: blob_scale · exp(−‖x‖²/(2 blob_std²)) ('gaussian', the
        released code) or blob_scale · (1 − ‖x‖ / blob_std) ('linear', Magic3D)."""
        if self.blob_kind == "gaussian":
            return self.blob_scale * torch.exp(-(x * x).sum(-1) / (2.0 * self.blob_std ** 2))
        return self.blob_scale * (1.0 - x.norm(dim=-1) / self.blob_std)

    def level_mask(self, device=None) -> Optional[torch.Tensor]:
        """(levels·features,) 1 for the features of the active levels, 0 for the rest; None when all are active."""
        n = self.active_levels
        enc = self.encoding
        if n is None or n >= enc.levels:
            return None
        return (torch.arange(enc.output_dim, device=device) < n * enc.features_per_level).float()

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoding(x)
        m = self.level_mask(h.device)
        return h if m is None else h * m

    def activate(self, raw: torch.Tensor) -> torch.Tensor:
        return F.softplus(raw) if self.density_activation == "softplus" else trunc_exp(raw)

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-activation density (blob included) (N,) and albedo logits (N, 3)."""
        n = x.shape[0]
        if self.spreads(x):
            perm = _spread_permutation(n, x.device)
            h = self._mlp(self._encode(x.index_select(0, perm)))
            h = torch.zeros_like(h).index_copy(0, perm, h)  # back in order; its backward is a gather
        else:
            h = self._mlp(self._encode(x))
        return h[:, 0].float() + self.density_blob(x), h[:, 1:].float()

    def spreads(self, x: torch.Tensor) -> bool:
        """Whether `raw` evaluates the points `x` in the spread order (_spread_permutation, above): on a
        GPU, with gradients, by coarse.grid.spread: 'auto' spreads them unless the grid is the Triton
        backend summing runs of consecutive points ('runs' atomics), which spreading would take apart."""
        if not (x.is_cuda and torch.is_grad_enabled() and x.shape[0] > 1):
            return False
        return spread_wanted(self.spread, getattr(self.encoding, "backend", None), getattr(self.encoding, "atomics", None))

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        """The MLP, in bf16 autocast when mlp_precision is 'bf16' (weights and the encoding stay fp32;
        the activations saved for the backward are half the size). bf16, not the released fp16: its
        exponent is fp32's, so the SDS gradient ÷ 65536 (docs/fidelity.md item 1) cannot underflow
        without a GradScaler."""
        if self.mlp_precision == "bf16":
            with torch.autocast(device_type=h.device.type, dtype=torch.bfloat16):
                return self.mlp(h)
        return self.mlp(h)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw, logits = self.raw(x)
        return self.activate(raw), torch.sigmoid(logits)

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3) → (N,) post-activation density, blob included."""
        return self.activate(self.raw(x)[0])

    def albedo(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3) → (N, 3) in [0, 1]."""
        return torch.sigmoid(self.raw(x)[1])

    def normals(self, x: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
        """−∇σ/‖∇σ‖ by finite differences of the raw density on a tetrahedron (4 evaluations:
        ∇f ∝ Σ_k e_k f(x + ε e_k), e_k = (1,−1,−1), (−1,−1,1), (−1,1,−1), (1,1,1))."""
        if self.normals_recompute and torch.is_grad_enabled():
            # keep only x for the backward; the four evaluations' activations are recomputed there
            return checkpoint(self._fd_normals, x, eps, use_reentrant=False)
        return self._fd_normals(x, eps)

    def _fd_normals(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        e = device_constant(((1.0, -1.0, -1.0), (-1.0, -1.0, 1.0), (-1.0, 1.0, -1.0), (1.0, 1.0, 1.0)),
                            x.dtype, x.device)
        r = self.raw((x[:, None, :] + eps * e[None]).reshape(-1, 3))[0].view(-1, 4)
        grad = r @ e
        return -F.normalize(grad, dim=-1, eps=1e-8)


# ------------------------------------------------------------------------------------ occupancy grid
class OccupancyGrid(nn.Module):
    """A res³ grid over [−bound, bound]³ of decayed maximum densities (Instant-NGP's density grid).

    `update(field, step_size)`: every cell gets max(decay · old, σ(jittered cell point)); a cell is
    occupied, by `rule`, when
      - 'alpha': its value × step_size ≥ threshold (a sample there would have α ≳ threshold);
      - 'density': its value > min(mean of all cells, density_threshold) — the released code's
        (stable-dreamfusion's) bitfield, `density_thresh` 10 (Magic123 nerf/renderer.py:1497-1507);
    then dilated by one cell so that density can still grow next to the occupied region (lift3d's).
    Samples in empty cells are skipped (σ = 0, no field evaluation). Before the first update all is
    occupied.
    """

    def __init__(self, resolution: int, bound: float, threshold: float, decay: float = 0.95, device="cpu",
                 rule: str = "alpha", density_threshold: float = 10.0):
        super().__init__()
        if rule not in ("alpha", "density"):
            raise ValueError(f"occupancy rule must be alpha or density, not {rule!r}")
        self.rule, self.density_threshold = rule, float(density_threshold)
        self.resolution, self.bound, self.threshold, self.decay = int(resolution), float(bound), float(threshold), float(decay)
        self.register_buffer("values", torch.zeros(resolution, resolution, resolution, device=device))
        self.register_buffer("occupied", torch.ones(resolution, resolution, resolution, dtype=torch.bool, device=device))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("box", torch.tensor([[-bound] * 3, [bound] * 3], dtype=torch.float32, device=device))

    def cell_centers(self) -> torch.Tensor:
        r = self.resolution
        i = (torch.arange(r, device=self.values.device, dtype=torch.float32) + 0.5) / r * 2 * self.bound - self.bound
        return torch.stack(torch.meshgrid(i, i, i, indexing="ij"), -1).reshape(-1, 3)

    @torch.no_grad()
    def update(self, field: NeRFField, step_size: float, generator: Optional[torch.Generator] = None,
               chunk: int = 1 << 18) -> None:
        r = self.resolution
        pts = self.cell_centers()
        jitter = (rand_on(pts.shape, generator, pts.device) - 0.5) * (2 * self.bound / r)
        pts = pts + jitter
        sig = torch.cat([field.density(pts[i:i + chunk]) for i in range(0, pts.shape[0], chunk)]).view(r, r, r)
        self.values.copy_(torch.maximum(self.values * self.decay, sig))
        occ = self.occupied_cells(step_size).float()
        occ = F.max_pool3d(occ[None, None], 3, stride=1, padding=1)[0, 0] > 0
        self.occupied.copy_(occ)
        self.box.copy_(torch.stack(self._compute_bbox()))
        self.updates += 1

    def occupied_cells(self, step_size: float) -> torch.Tensor:
        """(res, res, res) bool: the cells the rule marks occupied, before the dilation."""
        if self.rule == "density":  # no host sync: the mean stays on the device
            return self.values > self.values.mean().clamp(max=self.density_threshold)
        return self.values * step_size >= self.threshold

    def lookup(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3) → (N,) bool: in an occupied cell (and inside the bound)."""
        return occupied_at(self.occupied, x, self.bound)

    def bbox(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The axis-aligned box (lo, hi) (3,) around the occupied cells (cached at each update)."""
        return self.box[0], self.box[1]

    def _compute_bbox(self) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.resolution
        cell = 2 * self.bound / r
        idx = self.occupied.nonzero()
        if idx.numel() == 0 or bool(self.occupied.all()):
            full = torch.full((3,), self.bound, device=self.values.device)
            return -full, full
        lo = idx.amin(0).float() * cell - self.bound
        hi = (idx.amax(0).float() + 1) * cell - self.bound
        return lo, hi

    def fraction(self) -> torch.Tensor:
        """The occupied share of the cells, a 0-d tensor (read to the host only when shown)."""
        return self.occupied.float().mean()


def occupied_at(occupied: torch.Tensor, x: torch.Tensor, bound: float) -> torch.Tensor:
    """(N, 3) → (N,) bool: the points in an occupied cell of the (r, r, r) grid `occupied` over
    [−bound, bound]³ (and inside the bound)."""
    r = occupied.shape[0]
    idx = ((x + bound) / (2 * bound) * r).floor().long()
    inside = ((idx >= 0) & (idx < r)).all(-1)
    idx = idx.clamp(0, r - 1)
    return inside & occupied[idx[:, 0], idx[:, 1], idx[:, 2]]


# ----------------------------------------------------------------------------------- volume render
def _ray_aabb(o: torch.Tensor, d: torch.Tensor, lo, hi) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
    t0 = (lo - o) * inv
    t1 = (hi - o) * inv
    near = torch.minimum(t0, t1).amax(-1).clamp_min(0.0)
    far = torch.maximum(t0, t1).amin(-1)
    return near, far


def _ray_samples(c2w: torch.Tensor, focal: torch.Tensor, height: int, width: int, S: int,
                 jitter: Optional[torch.Tensor], offset_o: Optional[torch.Tensor], offset_d: Optional[torch.Tensor],
                 lo, hi, occupied: Optional[torch.Tensor], bound: float):
    """`render`'s rays and samples, a function of tensors (compiled with coarse.compile): the rays
    (R, 3) (moved by the offsets where given), each ray's cosine to its camera's axis, and the
    `S` stratified samples between its entry to and exit from the box (lo, hi): distances t, their
    spacing δ (R, S), positions (R, S, 3) and whether each is active (on a ray that meets the box, in
    an occupied cell of `occupied`). `jitter` (R, S) ∈ [0, 1) moves each sample within its stratum."""
    B = c2w.shape[0]
    o, d = pixel_rays(c2w, focal, height, width)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    if offset_o is not None:
        o = o + offset_o
        d = F.normalize(d + offset_d, dim=-1)
    R = o.shape[0]
    fwd = -c2w[:, :3, 2]  # camera viewing axis, (B, 3)
    cos = (d.view(B, -1, 3) * fwd[:, None, :]).sum(-1).reshape(-1)  # ray direction · axis
    near, far = _ray_aabb(o, d, lo, hi)
    hit = far > near
    span = (far - near).clamp_min(0.0)
    u = (torch.arange(S, device=o.device, dtype=torch.float32) + 0.5)[None].expand(R, S)
    if jitter is not None:
        u = u + (jitter - 0.5)
    t = near[:, None] + span[:, None] * (u / S)  # (R, S)
    delta = (span / S)[:, None].expand(R, S)
    pts = o[:, None, :] + d[:, None, :] * t[..., None]  # (R, S, 3)
    active = hit[:, None].expand(R, S)
    if occupied is not None:
        active = active & occupied_at(occupied, pts.reshape(-1, 3), bound).view(R, S)
    return o, d, cos, t, delta, pts, active


def _weights(sig_a: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor, t: torch.Tensor, cos: torch.Tensor):
    """Volume rendering's weights from the active samples' densities `sig_a` at flat positions `idx`
    of the (R, S) samples: α_i = 1 − exp(−σ_i δ_i), w_i = α_i Π_{j<i}(1 − α_j); the opacity Σ w_i and
    z-depth Σ w_i t_i · cos per ray, and the active samples' weights (compiled with coarse.compile)."""
    R, S = delta.shape
    sigma = torch.zeros(R * S, device=sig_a.device, dtype=sig_a.dtype).index_put((idx,), sig_a).view(R, S)
    alpha = 1.0 - torch.exp(-sigma * delta)
    # T_i = Π_{j<i}(1 − α_j + 1e-10): every factor ≥ 1e-10, so the backward needs no zero test
    trans = positive_cumprod(torch.cat([torch.ones(R, 1, device=sig_a.device), 1.0 - alpha + 1e-10], 1))[:, :-1]
    w = alpha * trans  # (R, S)
    opacity = w.sum(1)
    depth = (w * t).sum(1) * cos
    return opacity, depth, w.reshape(-1)[idx]


def _images(ws: torch.Tensor, ray_of: torch.Tensor, alb: torch.Tensor, col: torch.Tensor,
            nrm: Optional[torch.Tensor], opacity: torch.Tensor):
    """The per-ray sums of the samples' weighted albedo, colour and normals, on white (the colour and
    albedo), and the released code's normal image Σ sg(w_i)(n_i + 1)/2 (compiled with coarse.compile)."""
    R = opacity.shape[0]
    albedo_img = torch.zeros(R, 3, device=ws.device).index_add(0, ray_of, ws[:, None] * alb)
    rgb = torch.zeros(R, 3, device=ws.device).index_add(0, ray_of, ws[:, None] * col)
    rgb = rgb + (1.0 - opacity)[:, None]  # white background
    albedo_img = albedo_img + (1.0 - opacity)[:, None]
    normal_img = normal_sg = None
    if nrm is not None:
        normal_img = torch.zeros(R, 3, device=ws.device).index_add(0, ray_of, ws[:, None] * nrm)
        normal_sg = torch.zeros(R, 3, device=ws.device).index_add(0, ray_of, ws.detach()[:, None] * (nrm + 1.0) * 0.5)
    return rgb, albedo_img, normal_img, normal_sg


def _compaction(active: torch.Tensor, w0: Optional[torch.Tensor], min_weight: float
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The active samples' flat indices `idx` (ascending) and, given the gradient-free pass's weights
    w0, the positions within idx of the active samples of weight ≥ min_weight (those that get normals;
    None without w0). Both sizes come to the host in one wait for the device: a nonzero each would
    wait twice (the render's field pass, twice a guided coarse iteration). The same indices as
    `active.nonzero()` and `(w0[idx] >= min_weight).nonzero()`."""
    flat = active.reshape(-1)
    if w0 is None:
        return flat.nonzero(as_tuple=True)[0], None
    sel = flat & (w0 >= min_weight)
    n_idx, n_sel = torch.stack([flat.sum(), sel.sum()]).tolist()  # the one wait
    idx = torch.nonzero_static(flat, size=n_idx).squeeze(1)
    position = torch.cumsum(flat, 0) - 1  # each active sample's place in idx
    return idx, position[torch.nonzero_static(sel, size=n_sel).squeeze(1)]


def render(field: NeRFField, cameras: Cameras, height: int, width: Optional[int] = None, *,
           samples_per_ray: int = 64, occupancy: Optional[OccupancyGrid] = None, shading: str = "albedo",
           light_dir: Optional[torch.Tensor] = None, ambient: float = 0.1, diffuse: float = 0.9,
           perturb: bool = False, generator: Optional[torch.Generator] = None,
           need_normals: bool = True, early_stop: float = 1e-4, normals: str = "finite_difference",
           normal_eps: float = 1e-2, normal_min_weight: float = 1e-4, segment: int = 64,
           ray_offsets: Optional[tuple[torch.Tensor, torch.Tensor]] = None, compiled: bool = False,
           samples: str = "torch") -> RenderBatch:
    """Volume-render `cameras` (B views) at height×width; colour composited on a white background.

    Samples: `samples_per_ray` stratified samples between the ray's entry to and exit from the box
    around the occupancy grid's occupied cells (all of [−bound, bound]³ without a grid), jittered
    within their strata when `perturb`. Samples in empty occupancy cells are skipped (σ = 0), and
    so are samples behind the point where the transmittance falls below `early_stop`.
    α_i = 1 − exp(−σ_i δ_i), w_i = α_i Π_{j<i}(1 − α_j). One field evaluation per active sample
    gives density and albedo; normals (when needed) are −∇σ/‖∇σ‖ by tetrahedral finite differences
    with step `normal_eps` (the released code's finite-difference normals; smoother than the hash
    grid's analytic gradient), or the analytic gradient (autograd, create_graph) with
    normals="analytic". Both are differentiable.

    Finite-difference normals cost 4 extra field evaluations per sample, so they are computed
    only for samples whose weight w_i (from the gradient-free pass, the same parameters, hence the
    same weights) is at least `normal_min_weight`: a sample below it adds at most that weight to any
    normal, shading or orientation sum; it is shaded as if it had no normal (ambient light only).
    `normal_min_weight=0`, or analytic normals, compute them for every active sample.

    `ray_offsets` = (δo, δd), two (3,) vectors: every ray's origin moves by δo and its direction by
    δd before it is normalised again (the released code's known_view_noise_scale jitter of the
    reference rays, Magic123 nerf/utils.py:599-603, applied there to unnormalised directions).
    Besides the composited normal map, the batch carries `normal_sg` = Σ_i sg(w_i)·(n_i + 1)/2, the
    released code's normal image (composited with the detached density, no background).

    `compiled` (coarse.compile): the arithmetic between the field's evaluations — rays and samples
    (`_ray_samples`), weights (`_weights`) and the images' sums (`_images`) — under torch.compile
    while gradients are on, a few fused kernels forward and backward for the ~150 operators the host
    launches one by one eagerly; the same numbers up to float rounding (tests/test_gpu_backends.py).
    Off by default: on an H200 a coarse iteration was 7 ms slower with it (reports/speed, session 24).

    `samples` (coarse.samples): 'triton' makes the rays and samples in one Triton kernel launch
    (core.representations.samples_triton; a GPU), 'torch' with the tensors' operators (`_ray_samples`).
    """
    width = width or height
    B, S = len(cameras), samples_per_ray
    dev = cameras.device
    bound = field.bound
    R = B * height * width
    off_o = off_d = None
    if ray_offsets is not None:
        off_o, off_d = (to_device(v, dev, torch.float32) for v in ray_offsets)
    # samples span the ray's stretch inside the box around the occupied cells (the whole
    # [−bound, bound]³ before the occupancy grid knows better)
    lo, hi = occupancy.bbox() if occupancy is not None else (-bound, bound)
    focal = cameras.focal(height)
    jitter = rand_on((R, S), generator, dev) if perturb else None
    with scope("lift3d.render.samples"):
        if samples == "triton":
            from core.representations.samples_triton import triton_ray_samples as make_samples
        else:
            make_samples = compiled_twin(_ray_samples, compiled)
        o, d, cos, t, delta, pts, active = make_samples(
            cameras.c2w(), focal, height, width, S, jitter, off_o, off_d, lo, hi,
            occupancy.occupied if occupancy is not None else None, bound)
    need_n = need_normals or shading in ("lambertian", "textureless", "normal")
    analytic = need_n and normals == "analytic"
    gate = need_n and normal_min_weight > 0 and not analytic
    w0 = None
    if early_stop > 0 or gate:
        # a gradient-free pass: early ray termination (Instant-NGP) drops the samples behind the
        # point where the transmittance falls below `early_stop` (and its weights say which samples
        # need normals; the differentiable pass below has the same parameters, hence the same
        # weights); it marches front to back `segment` samples at a time and stops evaluating a
        # ray once its transmittance is below `early_stop`, so the inside of an object costs nothing
        with torch.no_grad(), scope("lift3d.render.early_stop"):
            s0 = torch.zeros(R, S, device=dev)
            log_t = torch.zeros(R, device=dev)
            alive = torch.ones(R, dtype=torch.bool, device=dev)
            log_stop = math.log(early_stop) if early_stop > 0 else -math.inf
            for a in range(0, S, segment):
                b = min(S, a + segment)
                rows, cols = (active[:, a:b] & alive[:, None]).nonzero(as_tuple=True)
                if rows.numel():
                    s0[rows, cols + a] = field.density(pts[rows, cols + a]).float()
                if b < S and early_stop > 0:
                    log_t = log_t - (s0[:, a:b] * delta[:, a:b]).sum(1)
                    alive = alive & (log_t > log_stop)
            a0 = 1.0 - torch.exp(-s0 * delta)
            t0 = torch.cumprod(torch.cat([torch.ones(R, 1, device=dev), 1.0 - a0 + 1e-10], 1), 1)[:, :-1]
            if early_stop > 0:
                active = active & (t0 > early_stop)
            w0 = (a0 * t0).reshape(-1)
    with scope("lift3d.render.field"):
        # the active samples' flat indices, and the positions `nsel` within them of the samples
        # that carry normals
        idx, nsel = _compaction(active, w0 if gate else None, normal_min_weight)
        grad_on = torch.is_grad_enabled()
        x_all = pts.reshape(-1, 3)[idx]
        nrm = None
        empty = (torch.zeros(0, device=dev), torch.zeros(0, 3, device=dev))
        if analytic:
            # the density's gradient at every active sample (create_graph while training)
            with torch.enable_grad():
                x_all = x_all.detach().requires_grad_(True)
                raw, logits = field.raw(x_all) if idx.numel() else empty
                if idx.numel():
                    g = torch.autograd.grad(raw, x_all, torch.ones_like(raw), create_graph=grad_on)[0]
                    nrm = -F.normalize(g, dim=-1, eps=1e-8)
                else:
                    nrm = torch.zeros(0, 3, device=dev)
        else:
            raw, logits = field.raw(x_all) if idx.numel() else empty
            if need_n:
                xs = x_all if nsel is None else x_all[nsel]
                nrm = field.normals(xs, normal_eps) if xs.shape[0] else torch.zeros(0, 3, device=dev)
        if nrm is not None and nsel is not None:
            # samples below normal_min_weight: a zero normal (ambient light only, no orientation term)
            nrm = torch.zeros(idx.numel(), 3, device=dev, dtype=nrm.dtype).index_put((nsel,), nrm)
        sig_a = field.activate(raw)
        alb = torch.sigmoid(logits)
    with scope("lift3d.render.composite"):
        opacity, depth, ws = compiled_twin(_weights, compiled, dynamic=True)(sig_a, idx, delta, t, cos)
        ray_of = idx // S
        ds = d[ray_of]
        if shading == "albedo":
            col = alb
        else:
            if light_dir is None:
                light = -ds
            else:
                light = light_dir.to(dev)[:, None, :].expand(B, height * width, 3).reshape(-1, 3)[ray_of]
            col = shade(alb, nrm, light, shading, ambient, diffuse)
        rgb, albedo_img, normal_img, normal_sg = compiled_twin(_images, compiled, dynamic=True)(
            ws, ray_of, alb, col, nrm, opacity)

    def img(v: torch.Tensor, c: int) -> torch.Tensor:
        return v.view(B, height, width, c).permute(0, 3, 1, 2)

    return RenderBatch(
        rgb=img(rgb, 3), opacity=img(opacity[:, None], 1), depth=img(depth[:, None], 1),
        normal=img(normal_img, 3) if normal_img is not None else None, albedo=img(albedo_img, 3),
        cameras=cameras, shading=shading, light_dir=light_dir, ambient=ambient, diffuse=diffuse,
        sample_weights=ws, sample_normals=nrm, sample_dirs=ds,
        normal_sg=img(normal_sg, 3) if normal_sg is not None else None, active_samples=int(idx.numel()),
    )


def render_chunked(field, cameras: Cameras, height: int, **kw) -> RenderBatch:
    """Render views one at a time without gradients (evaluation); outputs concatenated."""
    outs = []
    with torch.no_grad():
        for i in range(len(cameras)):
            outs.append(render(field, cameras[i], height, **kw))
    cat = lambda name: torch.cat([getattr(o, name) for o in outs]) if getattr(outs[0], name) is not None else None  # noqa: E731
    return RenderBatch(rgb=cat("rgb"), opacity=cat("opacity"), depth=cat("depth"), normal=cat("normal"),
                       cameras=cameras, shading=outs[0].shading, albedo=cat("albedo"),
                       sample_weights=cat("sample_weights"), sample_normals=cat("sample_normals"),
                       sample_dirs=cat("sample_dirs"), normal_sg=cat("normal_sg"))
