"""Batch augmentation on tensors: the seed's shear/zoom/flip plus optional crop, colour jitter and erasing.

Every random draw comes from the torch.Generator passed in, so a seeded generator gives the same batch.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def to_tensor(images: np.ndarray | Tensor) -> Tensor:
    """uint8 (B, H, W, C) images to float (B, C, H, W) in [0, 1], channels-last in memory."""
    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).float().div_(255)  # (B, C, H, W), NHWC strides


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> Tensor:
    return torch.rand(n, generator=gen) * (high - low) + low


def affine_matrices(n: int, gen: torch.Generator, shear: float = 0.2, zoom: float = 0.2, flip: bool = True,
                    crop: float = 0.0) -> Tensor:
    """(n, 2, 3) matrices mapping output to input coordinates in [-1, 1], as F.affine_grid expects."""
    z = 1 + _uniform(n, -zoom, zoom, gen)  # > 1 zooms out, < 1 zooms in
    sx, sy = _uniform(n, -shear, shear, gen), _uniform(n, -shear, shear, gen)
    a = torch.stack([torch.stack([z, z * sx], -1), torch.stack([z * sy, z], -1)], -2)  # (n, 2, 2)
    t = torch.zeros(n, 2)
    if crop > 0:
        # random resized crop: a smaller window, a little off square, anywhere inside the image
        scale = _uniform(n, 1 - crop, 1.0, gen)
        ratio = torch.exp(_uniform(n, -crop / 2, crop / 2, gen))
        s = torch.stack([scale * ratio.sqrt(), scale / ratio.sqrt()], -1).clamp(max=1.0)  # (n, 2)
        a = a * s[:, None, :]
        t = (torch.rand(n, 2, generator=gen) * 2 - 1) * (1 - s)
    if flip:
        mirror = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        a = a * torch.stack([mirror, torch.ones(n)], -1)[:, None, :]
    return torch.cat([a, t[:, :, None]], -1)


def color_jitter(x: Tensor, strength: float, gen: torch.Generator) -> Tensor:
    """Random brightness, contrast and saturation, each scaled by a factor in [1 - s, 1 + s]."""
    n = x.shape[0]
    b, c, s = (_uniform(n, 1 - strength, 1 + strength, gen).view(n, 1, 1, 1) for _ in range(3))
    x = x * b
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * c + mean
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - gray) * s + gray
    return x.clamp_(0, 1)


def random_erase(x: Tensor, p: float, gen: torch.Generator, area: tuple[float, float] = (0.02, 0.25)) -> Tensor:
    """With probability p per image, fill one random rectangle (2-25 % of the area) with noise."""
    n, _, h, w = x.shape
    frac = _uniform(n, *area, gen)
    ratio = torch.exp(_uniform(n, np.log(0.3), np.log(3.3), gen))
    eh = (frac * h * w * ratio).sqrt().clamp(1, h)  # eh * ew = frac * h * w, eh / ew = ratio
    ew = (frac * h * w / ratio).sqrt().clamp(1, w)
    top = torch.rand(n, generator=gen) * (h - eh)
    left = torch.rand(n, generator=gen) * (w - ew)
    on = torch.rand(n, generator=gen) < p
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    mask = ((rows >= top.view(n, 1, 1)) & (rows < (top + eh).view(n, 1, 1))
            & (cols >= left.view(n, 1, 1)) & (cols < (left + ew).view(n, 1, 1)) & on.view(n, 1, 1))
    noise = torch.rand(x.shape, generator=gen)
    return torch.where(mask[:, None], noise, x)


def augment_batch(x: Tensor, gen: torch.Generator, shear: float = 0.2, zoom: float = 0.2, flip: bool = True,
                  crop: float = 0.0, jitter: float = 0.0, erase: float = 0.0, size: int | None = None) -> Tensor:
    """Augment a float batch (B, C, H, W) in [0, 1]; geometry uses reflection padding, as Keras' default.

    size: the output side (default H); the same geometric transform then also resizes the images.
    """
    theta = affine_matrices(x.shape[0], gen, shear, zoom, flip, crop)
    out_shape = list(x.shape) if size is None else [x.shape[0], x.shape[1], size, size]
    grid = F.affine_grid(theta, out_shape, align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if jitter > 0:
        x = color_jitter(x, jitter, gen)
    if erase > 0:
        x = random_erase(x, erase, gen)
    return x.contiguous(memory_format=torch.channels_last)


def flip_batch(x: Tensor, gen: torch.Generator) -> Tensor:
    """Mirror each image of a float batch (B, C, H, W) left to right with even odds; channels-last out."""
    mirror = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(mirror[:, None, None, None], x.flip(3), x).contiguous(memory_format=torch.channels_last)


def mix_batch(x: Tensor, y: Tensor, gen: torch.Generator, alpha: float = 1.0) -> tuple[Tensor, Tensor]:
    """Mixup or CutMix (even odds) of the batch with a shuffled copy of itself; y becomes the mixed targets."""
    n, _, h, w = x.shape
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))  # share of the image that stays
    partner = torch.randperm(n, generator=gen)
    if torch.rand(1, generator=gen).item() < 0.5:  # mixup: blend whole images
        return lam * x + (1 - lam) * x[partner], lam * y + (1 - lam) * y[partner]
    # cutmix: paste a box of area (1 - lam) from the partner image; targets mix by the pasted area
    bh, bw = int(round(h * (1 - lam) ** 0.5)), int(round(w * (1 - lam) ** 0.5))
    top = int(torch.randint(0, h - bh + 1, (1,), generator=gen))
    left = int(torch.randint(0, w - bw + 1, (1,), generator=gen))
    x = x.clone()
    x[:, :, top:top + bh, left:left + bw] = x[partner, :, top:top + bh, left:left + bw]
    area = bh * bw / (h * w)
    return x, (1 - area) * y + area * y[partner]
