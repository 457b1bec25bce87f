"""The networks: the seed's CNN and a stronger residual CNN, both ending in one logit (sigmoid = P(class 1))."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from catdog.config import model_meta_problem


class SeedNet(nn.Module):
    """The seed's CNN: Conv 32 3x3 ReLU, MaxPool 2, Conv 32 3x3 ReLU, MaxPool 2, Dense 128 ReLU, Dense 1.

    The first ReLU runs after its pool here: max and ReLU commute, so outputs and gradients are the seed's exactly,
    and that ReLU, over the largest activation map, touches a quarter of the values (a seed epoch 0.72 -> 0.68 s).
    The second block keeps the seed's order, so its ReLU output stays the map class activations are computed on.
    """

    cam_layer = "features.4"  # the last conv's activation (29x29 at 64 px), the finest map near the output

    def __init__(self, image_size: int = 64):
        super().__init__()
        side = ((image_size - 2) // 2 - 2) // 2  # two valid 3x3 convs, each followed by a 2x2 pool
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3), MaxPool2x2(), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3), nn.ReLU(inplace=True), MaxPool2x2(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * side * side, 128), nn.ReLU(inplace=True),
                                        nn.Linear(128, 1))
        _init_like_keras(self)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, S, S) -> (B, 1) logits
        return self.classifier(self.features(x))


class MaxPool2x2(nn.MaxPool2d):
    """A 2x2 max pool (stride 2, odd edges dropped): nn.MaxPool2d, with a faster forward pass at inference.

    Without gradients the pool is the elementwise maximum of the map's four strided quarters: the same values,
    but on channels-last bf16 maps it skips the index bookkeeping, and the seed network's inference over the
    624 embedded test images went from 47 to 41 ms (2 threads, batches of 64). Training keeps nn.MaxPool2d,
    whose backward pass is several times faster than the quarters' (a seed step took 44 ms instead of 8), and
    ONNX export keeps its MaxPool operator.
    """

    def __init__(self):
        super().__init__(2)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or torch.onnx.is_in_onnx_export():
            return super().forward(x)
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        return torch.maximum(torch.maximum(x[..., 0:h:2, 0:w:2], x[..., 0:h:2, 1:w:2]),
                             torch.maximum(x[..., 1:h:2, 0:w:2], x[..., 1:h:2, 1:w:2]))


def _init_like_keras(module: nn.Module) -> None:
    """Glorot-uniform weights and zero biases, Keras' defaults, so the seed trains as it does there."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a shortcut (He et al. 2016); stride 2 halves the map."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small residual CNN with global average pooling before a linear classifier (so the original CAM applies)."""

    cam_layer = "features"  # output of the last residual block, just before global average pooling

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), depth: tuple[int, ...] = (2, 2, 2),
                 dropout: float = 0.2, stem_stride: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, stem_stride, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        blocks = []
        for c_in, c_out, n in zip(widths[:-1], widths[1:], depth):
            blocks += [BasicBlock(c_in, c_out, 2)] + [BasicBlock(c_out, c_out, 1) for _ in range(n - 1)]
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[-1], 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, S, S) -> (B, 1) logits
        f = self.features(self.stem(x))  # (B, C, S/8, S/8)
        return self.fc(self.dropout(self.pool(f).flatten(1)))


def build_model(name: str, image_size: int = 64) -> nn.Module:
    """A fresh network by name: "seed" or "resnet"."""
    if name == "seed":
        return SeedNet(image_size)
    if name == "resnet":
        # inputs above 64 px are downsampled by the stem, so the blocks cost what they cost at 64 px
        return ResNet(stem_stride=2 if image_size > 64 else 1)
    raise ValueError(f"unknown model {name!r} (choose seed or resnet)")


def read_torch_file(path: Path, device: str = "cpu") -> dict:
    """A checkpoint file's contents; a clear ValueError for a file that is not one (damaged, or something else)."""
    import pickle
    import zipfile

    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except (IsADirectoryError, FileNotFoundError, PermissionError, torch.cuda.OutOfMemoryError):  # not the file's fault
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, ValueError, TypeError,
            AttributeError, ImportError, IndexError, KeyError, UnicodeDecodeError, OSError) as e:
        # OSError: a truncated zip makes torch seek before the file's start (EINVAL)
        raise ValueError(f"{path} is not a readable catdog checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a catdog checkpoint (it holds a {type(ckpt).__name__})")
    return ckpt


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """A trained network in eval mode and its checkpoint metadata (classes, image_size, config, ...)."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").exists() else path / "last.pt"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix.lower() == ".onnx":
        raise ValueError(f"{path} is an ONNX model; this needs the PyTorch checkpoint (a run folder or .pt file)")
    ckpt = read_torch_file(path, device)
    try:
        problem = model_meta_problem(ckpt["classes"], ckpt["image_size"])
        if problem is None:
            problem = model_meta_problem(ckpt["classes"], ckpt.get("train_size", ckpt["image_size"]))
        if problem:
            raise ValueError(problem)
        model = build_model(ckpt["model"], ckpt.get("train_size", ckpt["image_size"]))
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is not a usable catdog checkpoint ({type(e).__name__}: {e})") from None
    if not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()):
        raise ValueError(f"{path} holds weights that are not finite numbers (NaN or infinity): the training that "
                         f"wrote it diverged, or the file was altered")
    model.eval().to(device)
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "train_state_dict", "optimizer", "scheduler", "ema")}
    return model, meta


@torch.inference_mode()
def predict_probs(model: nn.Module, images, batch_size: int = 64, tta: bool = False, device: str = "cpu",
                  bf16: bool = False) -> "torch.Tensor":
    """P(class 1) for uint8 (N, S, S, 3) images; tta averages the image and its mirror image.

    Batches of 64 keep the activations in cache: validating the resnet recipe (200 images at 112 px, each with
    its mirror image) took 260 ms in batches of 64 against 395 ms in batches of 256, with the same results.
    """
    from catdog.augment import to_tensor

    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = to_tensor(images[i:i + batch_size]).to(device)  # (B, 3, S, S)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            p = torch.sigmoid(model(x).float().squeeze(1))
            if tta:
                p = (p + torch.sigmoid(model(x.flip(3)).float().squeeze(1))) / 2
        out.append(p.float().cpu())
    return torch.cat(out) if out else torch.zeros(0)
