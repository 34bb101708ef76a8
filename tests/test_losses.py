"""Magic123 eqs. 1–3 and the released code's regularisers against hand computations."""
import math

import pytest
import torch

from core.evaluation.metrics import mask_iou, psnr
from core.stages.losses import (entropy_loss, gaussian_blur, gaussian_kernel, normal_smoothness_loss,
                                orientation_loss, pearson_depth_loss, reconstruction_loss, reference_mask_loss,
                                reference_rgb_loss)


def test_eq1_masked_rgb_and_mask_mse():
    ref = torch.tensor([[[[1.0, 0.0], [0.5, 1.0]]]]).expand(1, 3, 2, 2)
    rgb = torch.tensor([[[[0.0, 1.0], [0.5, 0.5]]]]).expand(1, 3, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    # masked squared errors per channel: 1, 0 (masked out), 0, 0.25 → mean over 12 values = 3·1.25/12
    assert reference_rgb_loss(rgb, ref, mask).item() == pytest.approx(1.25 / 4)
    opacity = torch.tensor([[[[0.5, 0.0], [1.0, 0.0]]]])
    # (1−.5)² + 0 + 0 + 1² = 1.25 over 4 pixels
    assert reference_mask_loss(opacity, mask).item() == pytest.approx(1.25 / 4)
    total = reconstruction_loss(rgb, opacity, ref, mask, 5.0, 0.5)
    assert total.item() == pytest.approx(5.0 * 1.25 / 4 + 0.5 * 1.25 / 4)


def test_eq2_pearson_depth_loss():
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]]]])  # the last pixel is outside
    d = torch.tensor([[[[1.0, 2.0], [3.0, 4.0], [5.0, -100.0]]]])
    ref_same = 2 * d + 7  # a positive affine map: correlation 1 → loss 0
    assert pearson_depth_loss(d, ref_same, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert pearson_depth_loss(d, -d, mask).item() == pytest.approx(1.0, abs=1e-6)  # anti-correlated → 1
    ref = torch.tensor([[[[1.0, 3.0], [2.0, 5.0], [4.0, 1000.0]]]])
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    y = torch.tensor([1.0, 3.0, 2.0, 5.0, 4.0])
    xc, yc = x - x.mean(), y - y.mean()
    r = float((xc * yc).sum() / math.sqrt(float((xc ** 2).sum() * (yc ** 2).sum())))  # = 0.8
    assert r == pytest.approx(0.8)
    assert pearson_depth_loss(d, ref, mask).item() == pytest.approx(0.5 * (1 - r), abs=1e-6)


def test_eq3_normal_smoothness():
    k = gaussian_kernel(9)
    assert k.shape == (9, 9) and k.sum().item() == pytest.approx(1.0) and k[4, 4] == k.max()
    const = torch.nn.functional.normalize(torch.tensor([0.3, -0.2, 0.9]), dim=0)[None, :, None, None].expand(2, 3, 12, 12)
    assert normal_smoothness_loss(const.clone()).item() == pytest.approx(0.0, abs=1e-5)
    # one spike on a zero map: the loss at each pixel is ‖n − blur(n)‖, computed here by hand
    n = torch.zeros(1, 3, 9, 9)
    n[0, 0, 4, 4] = 1.0
    blurred = k  # the spike's blur is the kernel itself (centred, nothing reaches the border)
    per_px = (n[0, 0] - blurred).abs()  # only channel 0 is non-zero
    assert normal_smoothness_loss(n).item() == pytest.approx(per_px.mean().item(), rel=1e-4)
    # stop-gradient: the gradient is that of ‖n − const‖ (the target does not move)
    m = n.clone().requires_grad_(True)
    normal_smoothness_loss(m).backward()
    expect = (n[0, 0] - blurred).sign() / 81.0
    assert torch.allclose(m.grad[0, 0], expect, atol=1e-5)
    assert torch.allclose(gaussian_blur(const.clone()), const, atol=1e-6)


def test_entropy_and_orientation():
    assert entropy_loss(torch.full((1, 1, 2, 2), 0.5)).item() == pytest.approx(1.0, abs=1e-6)  # one bit
    assert entropy_loss(torch.tensor([0.0, 1.0])).item() < 1e-3
    d = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])  # rays looking down −z
    n_toward = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])  # normals facing the camera: no penalty
    w = torch.tensor([0.5, 0.25], requires_grad=True)
    assert orientation_loss(w, n_toward, d, n_rays=1).item() == 0.0
    n_away = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.6, -0.8]], requires_grad=True)
    # Σ w (n·d)² over the ray: 0.5·1 + 0.25·0.64
    loss = orientation_loss(w, n_away, d, n_rays=2)
    assert loss.item() == pytest.approx((0.5 + 0.25 * 0.64) / 2)
    loss.backward()
    assert w.grad is None or torch.all(w.grad == 0)  # weights are under stop-gradient
    assert n_away.grad.abs().sum() > 0  # the normals get the gradient


def test_psnr_and_iou():
    a = torch.zeros(1, 3, 4, 4)
    b = torch.full((1, 3, 4, 4), 0.1)
    assert psnr(a, b) == pytest.approx(20.0)
    assert psnr(a, a) == 100.0
    m1 = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    m2 = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    assert mask_iou(m1, m2) == pytest.approx(1 / 3)


def test_pearson_depth_loss_by_index_is_the_boolean_masks_to_the_bit():
    """Issue 15, session 21: eq. 2's pixels taken by one compaction (one host sync a reference step,
    not three): the loss and its gradient those of boolean-mask indexing, bit for bit."""
    g = torch.Generator().manual_seed(0)
    d = torch.rand(2, 1, 24, 24, generator=g, requires_grad=True)
    ref = torch.rand(2, 1, 24, 24, generator=g)
    mask = (torch.rand(2, 1, 24, 24, generator=g) > 0.4).float()
    mask[1] = 0
    mask[1, 0, 3, 4] = 1  # one pixel: no statistics, zero
    loss = pearson_depth_loss(d, ref, mask)
    (grad,) = torch.autograd.grad(loss, d)
    x = d[0].reshape(-1)[mask[0].reshape(-1) > 0.5]
    y = ref[0].reshape(-1)[mask[0].reshape(-1) > 0.5]
    xc, yc = x - x.mean(), y - y.mean()
    corr = (xc * yc).mean() / (xc.pow(2).mean().sqrt() * yc.pow(2).mean().sqrt() + 1e-8)
    by_mask = torch.stack([0.5 * (1.0 - corr), d.new_zeros(())]).mean()
    (grad_mask,) = torch.autograd.grad(by_mask, d)
    assert torch.equal(loss, by_mask) and torch.equal(grad, grad_mask)


def test_pearson_depth_loss_gradient_is_finite_on_a_flat_render():
    """A render whose depth is constant over the mask (an empty field there: all 0) has no
    correlation to speak of: the loss is ½ and its gradient finite (it was NaN: the square root of
    a zero variance)."""
    d = torch.zeros(1, 1, 8, 8, requires_grad=True)
    ref = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    loss = pearson_depth_loss(d, ref, torch.ones(1, 1, 8, 8))
    loss.backward()
    assert loss.item() == pytest.approx(0.5) and torch.isfinite(d.grad).all()
