import numpy as np
import pytest
import torch

from catdog.augment import augment_batch, to_tensor


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    return to_tensor(rng.integers(0, 256, (6, 24, 24, 3), dtype=np.uint8))


def test_to_tensor_scales_to_unit_range_channels_first():
    x = to_tensor(np.full((2, 5, 7, 3), 255, np.uint8))
    assert x.shape == (2, 3, 5, 7) and x.dtype == torch.float32 and float(x.max()) == 1.0


@pytest.mark.parametrize("extra", [{}, dict(crop=0.25, jitter=0.2, erase=0.5)])
def test_augment_keeps_shape_and_range_and_is_seeded(batch, extra):
    a = augment_batch(batch, torch.Generator().manual_seed(1), **extra)
    b = augment_batch(batch, torch.Generator().manual_seed(1), **extra)
    c = augment_batch(batch, torch.Generator().manual_seed(2), **extra)
    assert a.shape == batch.shape and torch.isfinite(a).all()
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b), "same seed, same batch"
    assert not torch.equal(a, c), "another seed, another batch"
    assert not torch.allclose(a, batch), "the batch was changed"


def test_no_shear_no_zoom_no_flip_is_identity(batch):
    out = augment_batch(batch, torch.Generator().manual_seed(0), shear=0, zoom=0, flip=False)
    assert torch.allclose(out, batch, atol=1e-5)


def test_flip_alone_mirrors_about_half_the_images():
    x = torch.rand(64, 3, 8, 8)
    out = augment_batch(x, torch.Generator().manual_seed(0), shear=0, zoom=0, flip=True)
    same = [torch.allclose(o, i, atol=1e-5) for o, i in zip(out, x)]
    mirrored = [torch.allclose(o, i.flip(2), atol=1e-5) for o, i in zip(out, x)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 16 < sum(mirrored) < 48


def test_random_erase_covers_two_to_twenty_five_percent_in_one_rectangle():
    from catdog.augment import random_erase

    x = torch.zeros(200, 1, 32, 32)
    out = random_erase(x, 1.0, torch.Generator().manual_seed(0))
    erased = out[:, 0] != 0  # noise is almost never exactly 0
    area = erased.flatten(1).float().mean(1)
    assert area.min() > 0.005 and area.max() < 0.3 and 0.05 < area.mean() < 0.2
    rows, cols = erased.any(2).sum(1), erased.any(1).sum(1)  # extent of each rectangle
    assert (rows * cols >= erased.flatten(1).sum(1)).all()
    assert (rows > 2).float().mean() > 0.9 and (cols > 2).float().mean() > 0.9, "rectangles, not strips"


def test_mix_batch_mixes_images_and_targets_consistently():
    from catdog.augment import mix_batch

    x = torch.cat([torch.zeros(8, 3, 16, 16), torch.ones(8, 3, 16, 16)])
    y = torch.cat([torch.zeros(8), torch.ones(8)])
    for seed in range(10):
        mx, my = mix_batch(x, y, torch.Generator().manual_seed(seed))
        # images are 0 or 1 everywhere, labels equal the image value: the mixed target is the mean pixel
        assert torch.allclose(mx.mean(dim=(1, 2, 3)), my, atol=1e-5)
        assert my.min() >= 0 and my.max() <= 1
