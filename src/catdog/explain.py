"""Class activation maps with torchcam, for one-logit (sigmoid) models.

torchcam explains a class index of a multi-class output. A sigmoid model has one logit z = "class 1 vs class 0";
its exact two-class equivalent has logits (-z/2, +z/2), whose softmax is (1 - sigmoid(z), sigmoid(z)). We build
that view (replacing the last Linear(C, 1) by Linear(C, 2) with weights (-w/2, +w/2)), so a "cat" prediction is
explained as evidence for cat, not as a weak dog score, and every torchcam method, CAM included, applies.
"""
from __future__ import annotations

import copy
import io
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchcam import methods
from torchcam.methods._utils import locate_candidate_layer
from torchcam.utils import overlay_mask

METHODS = {"gradcam": methods.GradCAM, "gradcampp": methods.GradCAMpp, "layercam": methods.LayerCAM,
           "scorecam": methods.ScoreCAM, "cam": methods.CAM}

logging.getLogger("torchcam").setLevel(logging.ERROR)  # it warns about each layer it picks itself


class CamUnavailable(ValueError):
    """The method cannot be applied to this model (e.g. the original CAM without global average pooling)."""


def two_class_view(model: nn.Module) -> nn.Module:
    """A copy of a one-logit model whose last Linear(C, 1) becomes the equivalent Linear(C, 2): (-z/2, +z/2)."""
    twin = copy.deepcopy(model).eval()
    name, last = [(n, m) for n, m in twin.named_modules() if isinstance(m, nn.Linear)][-1]
    if last.out_features != 1:
        return twin
    head = nn.Linear(last.in_features, 2, bias=last.bias is not None)
    with torch.no_grad():
        head.weight.copy_(torch.cat([-last.weight, last.weight]) / 2)
        if last.bias is not None:
            head.bias.copy_(torch.cat([-last.bias, last.bias]) / 2)
    parent = twin.get_submodule(name.rpartition(".")[0]) if "." in name else twin
    setattr(parent, name.rpartition(".")[2], head)
    return twin


def default_target_layer(model: nn.Module, image_size: int) -> str:
    """The model's own choice (its last conv activation), else the deepest layer with a spatial output."""
    return getattr(model, "cam_layer", None) or locate_candidate_layer(model, (3, image_size, image_size))


def has_gap_head(model: nn.Module) -> bool:
    """The original CAM needs global average pooling straight into a single linear classifier."""
    return isinstance(getattr(model, "pool", None), nn.AdaptiveAvgPool2d) and isinstance(getattr(model, "fc", None), nn.Linear)


def compute_cams(model: nn.Module, x: Tensor, method: str = "gradcam", target_layer: str | None = None,
                 class_idx: list[int] | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Maps (B, S, S) in [0, 1] for a batch x (B, 3, S, S), with P(class 1) and the class each map explains.

    By default each image's map explains its predicted class.
    """
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose from {', '.join(METHODS)}")
    if method == "cam" and not has_gap_head(model):
        raise CamUnavailable(f"the original CAM needs global average pooling before one linear layer; "
                             f"{type(model).__name__} has none (use gradcam, gradcampp, layercam or scorecam)")
    model.eval()
    with torch.no_grad():
        probs = torch.sigmoid(model(x).squeeze(1))  # (B,)
    if class_idx is None:
        class_idx = (probs > 0.5).long().tolist()
    twin = two_class_view(model)
    layer = target_layer or default_target_layer(model, x.shape[-1])
    maps, acts = _raw_maps(twin, x, method, layer, class_idx)
    # A map with no positive evidence at that layer is all zero after the ReLU: rather than a blank picture,
    # show LayerCAM's map (positive gradients only), and failing that where the layer is active at all.
    blank = _is_blank(maps)
    if blank.any() and method != "layercam":
        maps[blank] = _raw_maps(twin, x, "layercam", layer, class_idx)[0][blank]
        blank = _is_blank(maps)
    if blank.any():
        maps[blank] = acts[blank].relu().mean(1)
    maps = F.interpolate(maps[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    maps = maps.clamp_(min=0)
    peak = maps.flatten(1).max(1).values.view(-1, 1, 1)
    maps = torch.where(peak > 0, maps / peak.clamp(min=1e-12), maps)
    return maps.numpy().astype(np.float32), probs.numpy(), class_idx


def _raw_maps(twin: nn.Module, x: Tensor, method: str, layer: str, class_idx: list[int]) -> tuple[Tensor, Tensor]:
    """torchcam's maps (B, h, w) at the layer's resolution, NaN-free, and the layer's activations (B, C, h, w)."""
    kwargs = {"fc_layer": "fc"} if method == "cam" else {}
    try:
        extractor = METHODS[method](twin, target_layer=layer, input_shape=tuple(x.shape[1:]), **kwargs)
    except ValueError as e:
        raise CamUnavailable(str(e)) from None
    with extractor:
        with torch.set_grad_enabled(method not in ("cam", "scorecam")):
            scores = twin(x.clone())  # (B, 2)
            try:
                maps = extractor(class_idx, scores)[0].detach().float()  # (B, h, w)
            except (IndexError, RuntimeError) as e:  # a layer whose output is not a (B, C, h, w) map
                raise CamUnavailable(f"layer {layer!r} gives no spatial map to explain ({e}); choose a "
                                     f"convolutional layer") from None
            acts = extractor.hook_a[0].detach().float()  # (B, C, h, w)
            if acts.ndim != 4:
                raise CamUnavailable(f"layer {layer!r} gives no spatial map to explain (its output has shape "
                                     f"{tuple(acts.shape)}); choose a convolutional layer")
    return torch.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0), acts


def _is_blank(maps: Tensor) -> Tensor:
    return maps.flatten(1).max(1).values <= 0


def overlay(image: np.ndarray | Image.Image, cam: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The heatmap (jet colour map) blended over the image, at the image's own size."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    return overlay_mask(img.convert("RGB"), Image.fromarray(np.asarray(cam, dtype=np.float32), mode="F"), alpha=alpha)


def cams_for_images(model: nn.Module, images: np.ndarray, method: str = "gradcam", target_layer: str | None = None,
                    batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """compute_cams over uint8 (N, S, S, 3) images, in batches: maps (N, S, S), P(class 1), explained classes."""
    from catdog.augment import to_tensor

    cams, probs, cls = [], [], []
    for i in range(0, len(images), batch_size):
        c, p, k = compute_cams(model, to_tensor(images[i:i + batch_size]), method, target_layer)
        cams.append(c)
        probs.append(p)
        cls.extend(k)
    if not cams:
        side = images.shape[1] if images.ndim == 4 else 0
        return np.zeros((0, side, side), np.float32), np.zeros(0, np.float32), []
    return np.concatenate(cams), np.concatenate(probs), cls


def display_image(path, max_side: int = 384) -> Image.Image:
    """The upright RGB image of a file, shrunk to at most max_side pixels, for overlays and galleries."""
    from catdog.data import load_rgb

    img = load_rgb(path, max_side)  # decoded as the model's input was, so a file the model read shows here too
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return img


def explain_files(run, paths: list, out, method: str = "gradcam", target_layer: str | None = None,
                  max_side: int = 512) -> dict:
    """Write a CAM overlay PNG per image into `out`; unreadable images are listed in "failed", not raised."""
    from catdog import fileio
    from catdog.data import SkipImage, decode_image
    from catdog.model import load_checkpoint

    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose from {', '.join(METHODS)}")
    model, meta = load_checkpoint(run)
    size, classes = meta["image_size"], meta["classes"]
    arrays, shown, kept, failed = [], [], [], []
    for path in map(str, paths):
        try:
            if not os.path.isfile(path):
                raise SkipImage("no such file" if not os.path.exists(path) else "not a file")
            arrays.append(decode_image(path, size))
            shown.append(display_image(path, max_side))
            kept.append(path)
        except SkipImage as e:
            failed.append({"path": path, "reason": str(e)})
    written = []
    if kept:
        cams, probs, cls = cams_for_images(model, np.stack(arrays), method, target_layer)
        used: set[str] = set()
        for path, img, cam, p, k in zip(kept, shown, cams, probs, cls):
            name = f"{fileio.cut_name(Path(path).stem, 200)}-{method}"  # within the 255-byte limit for a name
            while name in used:  # two inputs with the same file name in different folders
                name += "_"
            used.add(name)
            target = Path(out) / f"{name}.png"
            buf = io.BytesIO()
            overlay(img, cam).save(buf, format="PNG")
            fileio.write_bytes(target, buf.getvalue())
            written.append({"path": path, "out": str(target), "predicted": classes[int(p > 0.5)],
                            "explained": classes[k], f"prob_{classes[1]}": round(float(p), 6)})
    return {"method": method, "layer": target_layer or default_target_layer(model, size),
            "written": written, "failed": failed}
