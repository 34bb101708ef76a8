"""Item 8, textual inversion (docs/fidelity.md): Magic123's recipe is diffusers' textual_inversion
example as scripts/textual_inversion/textual_inversion.sh runs it (guochengqian/Magic123)."""
from __future__ import annotations

import pytest
import torch

from core.guidance.sd import load_stable_diffusion
from core.guidance.textual_inversion import (batch_size_at, learn_token, learn_token_from_params, on_background,
                                             released_augment, textual_inversion_lr)
from core.params import load_params
from _tiny_priors import tiny_models


def test_magic123_defaults_are_the_released_script():
    ti = load_params("magic123").textual_inversion
    # textual_inversion.sh: --train_batch_size=16 --gradient_accumulation_steps=1 --max_train_steps=3000
    # --lr_scheduler=constant --lr_warmup_steps=0 --resolution=512 --use_augmentations; the example's
    # defaults otherwise: --learning_rate 1e-4, no --scale_lr, --repeats 100, AdamW (0.9, 0.999), 1e-2, 1e-8
    assert (ti.steps, ti.batch_size, ti.gradient_accumulation) == (3000, 16, 1)
    assert ti.lr == 1e-4 and ti.scale_lr is False
    assert ti.repeats == 100
    assert (ti.weight_decay, tuple(ti.adam_betas), ti.adam_eps) == (1e-2, (0.9, 0.999), 1e-8)
    assert (ti.augmentation, ti.background, ti.vae_input) == ("released", "black", "unit")
    assert load_params("magic123").sd.resolution == 512
    assert load_params("consistent123").textual_inversion.enabled is False


def test_scale_lr_formula():
    assert textual_inversion_lr(1e-4, 16, 1, scale_lr=False) == 1e-4  # as released
    assert textual_inversion_lr(1e-4, 16, 1, scale_lr=True) == pytest.approx(1.6e-3)
    assert textual_inversion_lr(5e-4, 4, 2, scale_lr=True) == pytest.approx(4e-3)
    assert textual_inversion_lr(1e-4, 16, 2, scale_lr=True, processes=8) == pytest.approx(2.56e-2)


def test_short_last_batch_of_every_epoch():
    # one image × 100 repeats, batches of 16, no drop_last: six of 16 then one of 4, every epoch
    sizes = [batch_size_at(i, 16, 100) for i in range(14)]
    assert sizes == [16] * 6 + [4] + [16] * 6 + [4]
    assert sum(batch_size_at(i, 16, 100) for i in range(7)) == 100
    assert [batch_size_at(i, 16, None) for i in range(8)] == [16] * 8
    assert [batch_size_at(i, 4, 8) for i in range(4)] == [4, 4, 4, 4]  # an exact multiple: no short batch
    assert [batch_size_at(i, 1, 100) for i in range(3)] == [1, 1, 1]


def test_background_black_is_the_rgba_converted_to_rgb():
    rgb = torch.ones(3, 8, 8)
    rgb[:, 2:6, 2:6] = torch.tensor([0.8, 0.2, 0.1])[:, None, None]
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 2:6] = 1
    black = on_background(rgb, mask, "black")
    assert torch.equal(black[:, 2:6, 2:6], rgb[:, 2:6, 2:6]) and black[:, 0, 0].sum() == 0
    assert torch.equal(on_background(rgb, mask, "white"), rgb)


def test_released_augmentation_is_seeded_and_leaves_the_global_stream_alone():
    rgb = torch.zeros(3, 64, 64)
    rgb[:, 16:48, 20:44] = 0.7
    state = torch.get_rng_state()
    a = released_augment(rgb, 3, 32, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    b = released_augment(rgb, 3, 32, torch.Generator().manual_seed(0))
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a[0], a[1])  # every view draws its own augmentation
    c = released_augment(rgb, 3, 32, torch.Generator().manual_seed(1))
    assert not torch.equal(a, c)


def _example_pipeline(size: int):
    """The example's `--use_augmentations` transforms as its textual_inversion.py:487-507 writes them
    (torchvision's own classes throughout, its RandomRotation included)."""
    from torchvision import transforms as T

    big, small = int(size * 5 / 4), int(size * 5 / 6)
    return T.Compose([
        T.Resize(big, antialias=True), T.CenterCrop(big),
        T.RandomApply([T.RandomRotation(degrees=10, fill=1.0), T.CenterCrop(small), T.Resize(size, antialias=True)],
                      p=0.75),
        T.RandomResizedCrop(size, scale=(0.85, 1.15), antialias=True),
        T.RandomApply([T.ColorJitter(0.04, 0.04, 0.04, 0.04)], p=0.75),
        T.RandomGrayscale(p=0.10),
        T.RandomApply([T.GaussianBlur(5, (0.1, 2))], p=0.10),
        T.RandomHorizontalFlip(),
    ])


def test_released_augmentation_is_the_one_pipeline_with_its_fixed_part_made_once():
    """ReleasedAugment resizes and crops the image once and draws the rest per view, and rotates
    without torchvision's boolean-mask fill (no host sync): the views of the example's pipeline,
    torchvision's classes as one Compose run per view, to the bit, over 40 draws."""
    from core.guidance.textual_inversion import ReleasedAugment

    rgb = torch.rand(3, 48, 40, generator=torch.Generator().manual_seed(2))
    whole = _example_pipeline(32)
    aug, gen = ReleasedAugment(rgb, 32), torch.Generator().manual_seed(5)
    for _ in range(4):
        peek = torch.Generator()
        peek.set_state(gen.get_state())  # the seed the call is about to draw
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=peek).item())
        views = aug(10, gen)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            expected = torch.stack([whole(rgb) for _ in range(10)]).clamp(0, 1)
        assert torch.equal(views, expected)


class _Recorder:
    """Wraps the VAE's encode to record what the VAE receives."""

    def __init__(self, vae):
        self.vae, self.inputs = vae, []
        self._encode = vae.encode

    def __enter__(self):
        def enc(x, *a, **k):
            self.inputs.append(x.detach().clone())
            return self._encode(x, *a, **k)

        self.vae.encode = enc
        return self

    def __exit__(self, *exc):
        self.vae.encode = self._encode


def _object():
    rgb = torch.ones(3, 48, 48)
    rgb[:, 12:36, 16:32] = torch.tensor([0.8, 0.2, 0.1])[:, None, None]
    mask = torch.zeros(1, 48, 48)
    mask[:, 12:36, 16:32] = 1
    return rgb, mask


@pytest.mark.parametrize("vae_input,low", [("unit", 0.0), ("signed", -1.0)])
def test_vae_sees_unit_range_images_as_released(vae_input, low):
    parts = load_stable_diffusion(tiny_models()["sd"], "cpu", torch.float32)
    rgb, mask = _object()
    with _Recorder(parts.vae) as rec:
        learn_token(parts, rgb, mask, steps=1, batch_size=2, resolution=32, vae_input=vae_input,
                    background="black", repeats=None, progress=False)
    x = torch.cat(rec.inputs)
    assert x.shape[0] == 2
    # the black background reaches the VAE as 0 (unit: [0, 1] images as released) or −1 (signed)
    assert float(x.min()) == pytest.approx(low, abs=1e-3)
    assert float(x.max()) <= 1.0 + 1e-5


def test_batches_accumulation_optimizer_and_progress_bar(monkeypatch, capsys):
    parts = load_stable_diffusion(tiny_models()["sd"], "cpu", torch.float32)
    rgb, mask = _object()
    seen = {}

    class AdamW(torch.optim.AdamW):
        def __init__(self, params, **kw):
            seen.update(kw)
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", AdamW)
    p = load_params("tiny", ["textual_inversion.steps=3", "textual_inversion.batch_size=2",
                             "textual_inversion.repeats=5", "textual_inversion.gradient_accumulation=2",
                             "textual_inversion.scale_lr=true", "sd.resolution=32"])
    with _Recorder(parts.vae) as rec:
        learn_token_from_params(parts, rgb, mask, p, progress=True)
    # 3 steps × 2 micro-batches from batches of 2, 2, 1 (5 repeats): 2 2 1 2 2 1
    assert [x.shape[0] for x in rec.inputs] == [2, 2, 1, 2, 2, 1]
    ti = p.textual_inversion
    assert seen["lr"] == pytest.approx(ti.lr * 2 * 2)  # scale_lr: lr × accumulation × batch
    assert seen["weight_decay"] == 1e-2 and tuple(seen["betas"]) == (0.9, 0.999) and seen["eps"] == 1e-8
    err = capsys.readouterr().err
    assert "textual inversion" in err and "3/3" in err  # the tqdm bar


def test_released_augmentation_compacts_nothing():
    """The augmentation runs on the GPU each step, beside the UNet: a `nonzero` there waits for the
    GPU. torchvision's RandomRotation fills by boolean indexing (two `nonzero`s a rotated view);
    ReleasedAugment's pipeline calls none."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from core.guidance.textual_inversion import ReleasedAugment

    aten = torch.ops.aten
    masked = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default)

    class Compactions(TorchDispatchMode):
        """`nonzero`, and indexing by a boolean mask (which runs one inside)."""
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (aten.nonzero.default, aten.masked_select.default) or (
                    func in masked and any(t is not None and t.dtype == torch.bool for t in args[1])):
                Compactions.n += 1
            return func(*args, **(kwargs or {}))

    rgb = torch.rand(3, 48, 40, generator=torch.Generator().manual_seed(2))
    with Compactions():
        ReleasedAugment(rgb, 32)(16, torch.Generator().manual_seed(0))
    assert Compactions.n == 0
    with Compactions(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(16):
            _example_pipeline(32)(rgb)
    assert Compactions.n >= 2  # torchvision's own rotation compacts (p = 0.75 a view)


def test_the_hue_without_its_einsum_is_torchvisions_to_the_bit():
    """The colour jitter's hue (`_adjust_hue`): torchvision's adjust_hue with its last step, a one-hot
    einsum (on a GPU ~45 batched gemv launches a batch of 16 views: reports/speed session 30), as a
    gather. The same bits over random and edge pixels (black, white, greys with no hue, each sextant's
    border, a hue wrapping past 1), every hue factor's range and a batch; and no matrix product runs."""
    import torchvision.transforms.functional as TF
    from torch.utils._python_dispatch import TorchDispatchMode

    from core.guidance.textual_inversion import _adjust_hue

    g = torch.Generator().manual_seed(3)
    img = torch.rand(2, 3, 40, 36, generator=g)
    img[:, :, :4] = 0.0
    img[:, :, 4:8] = 1.0
    img[:, :, 8:12] = torch.rand(2, 1, 4, 36, generator=g)  # greys: no saturation, no hue
    img[:, :, 12:14] = torch.tensor([1.0, 1.0, 0.0])[:, None, None]  # a sextant's border (yellow)
    img[:, :, 14:16] = torch.tensor([1.0, 0.0, 1.0 - 1e-7])[:, None, None]  # a hue just below 1
    img[:, :, 16:18] = torch.tensor([0.0, 0.5, 0.5])[:, None, None]
    img[:, :, 18:20] = -0.0  # a black of −0s: the einsum's sum makes them +0
    def bits(x):  # torch.equal takes −0 for +0: compare the bit patterns
        return x.contiguous().view(torch.int32)

    for factor in (-0.5, -0.04, -1e-3, 0.0, 0.013, 0.04, 0.5):
        assert torch.equal(bits(_adjust_hue(img, factor)), bits(TF.adjust_hue(img, factor))), factor
        assert torch.equal(bits(_adjust_hue(img[0], factor)), bits(TF.adjust_hue(img[0], factor))), factor

    aten = torch.ops.aten
    products = (aten.mm.default, aten.bmm.default, aten.addmm.default, aten.mv.default)

    class Products(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Products.n += func in products
            return func(*args, **(kwargs or {}))

    with Products():
        _adjust_hue(img, 0.04)
    assert Products.n == 0
    with Products():
        TF.adjust_hue(img, 0.04)
    assert Products.n > 0  # torchvision's runs one: the check above can see it


def test_rotation_grid_by_multiply_adds_is_the_fp64_product():
    """The GPU's rotation grid (core.guidance.textual_inversion._grid_fp64: two multiply-adds over
    the pixels in place of an fp64 matrix product) rounds to the fp32 grid the product gives, at the
    released sizes (640² before the crop, the views' 512²) and angles across RandomRotation's ±10°,
    tiny ones included (where the two products' sum stops being exact in fp64)."""
    import torchvision.transforms.functional as TF

    from core.guidance.textual_inversion import _base_grid, _grid_fp64

    gen = torch.Generator().manual_seed(0)
    angles = [0.0, 1e-9, -3e-7, 1e-4, 10.0, -10.0] + (torch.rand(24, generator=gen) * 20 - 10).tolist()
    fp32_differs = 0  # the check can fail: an fp32 product of the same grid differs at most angles
    for h, w in [(640, 640), (512, 512), (48, 40)]:
        base = _base_grid(h, w, torch.float64, torch.device("cpu"))
        for angle in angles:
            matrix = TF._get_inverse_affine_matrix([0.0, 0.0], -angle, [0.0, 0.0], 1.0, [0.0, 0.0])
            theta = torch.tensor(matrix, dtype=torch.float32).reshape(1, 2, 3).transpose(1, 2)
            theta = (theta / torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float32)).double()
            by_product = base.bmm(theta).float()
            assert torch.equal(_grid_fp64(base, theta).float(), by_product), (h, w, angle)
            fp32_differs += not torch.equal(by_product, base.float().bmm(theta.float()))
    assert fp32_differs > len(angles)
