"""ONNX export: sigmoid and flip averaging baked into the graph, metadata for the runner, checked against PyTorch."""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from catdog import fileio
from catdog.model import load_checkpoint, predict_probs
from catdog.predict import ONNX_INPUT, ONNX_OUTPUT, onnx_input, resolve_model

OPSET = 17
ATOL = 1e-5  # largest allowed |P_onnx - P_torch| over the check batch; float32 kernels differ by ~1e-7 here
INPUT_DOC = "float32 (batch, 3, S, S) RGB, resized to S x S (bilinear, aspect ratio not kept), uint8 / 255, no mean/std"


class ExportError(ValueError):
    """The exported graph does not reproduce the PyTorch model (or cannot be written)."""


class ProbabilityHead(nn.Module):
    """Wraps a one-logit model so it returns (B, 2) class probabilities, averaged with the mirror image if tta."""

    def __init__(self, model: nn.Module, tta: bool):
        super().__init__()
        self.model, self.tta = model, tta

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, S, S) in [0, 1] -> (B, 2)
        p = torch.sigmoid(self.model(x))  # (B, 1) = P(class 1)
        if self.tta:
            p = (p + torch.sigmoid(self.model(x.flip(3)))) / 2
        return torch.cat([1 - p, p], 1)


def _to_onnx_bytes(head: nn.Module, image_size: int) -> bytes:
    buf = io.BytesIO()
    dummy = torch.rand(2, 3, image_size, image_size)
    with warnings.catch_warnings():
        # the TorchScript exporter warns it is legacy; the torch.export one needs onnxscript, which we do not ship
        warnings.simplefilter("ignore")
        torch.onnx.export(head, (dummy,), buf, dynamo=False, opset_version=OPSET, input_names=[ONNX_INPUT],
                          output_names=[ONNX_OUTPUT], dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}})
    return buf.getvalue()


def _onnx_probs(model_bytes: bytes, images: np.ndarray) -> np.ndarray:
    """P(class 1) from the exported graph for uint8 (N, S, S, 3) images, with ONNX Runtime."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return sess.run([ONNX_OUTPUT], {ONNX_INPUT: onnx_input(images)})[0][:, 1]


def export_onnx(run: str | Path, out: str | Path | None = None, atol: float = ATOL, n_check: int = 16,
                seed: int = 0) -> dict:
    """Export a run (or .pt) to ONNX, verify it against PyTorch on a seeded batch, then write it atomically."""
    import onnx

    if not 0 <= atol < float("inf"):  # also refuses nan, before the export and its check run
        raise ExportError(f"--atol must be a number of 0 or more, not {atol}")
    ckpt = resolve_model(run)
    if ckpt.suffix != ".pt":
        raise ExportError(f"{ckpt} is already an ONNX file; export needs a run folder or a .pt checkpoint")
    model, meta = load_checkpoint(ckpt)
    size, tta = int(meta["image_size"]), bool(meta.get("tta", False))
    out = Path(out) if out is not None else ckpt.with_name("model.onnx")
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give a file name")
    if out.suffix.lower() == ".pt" or (out.exists() and out.resolve() == ckpt.resolve()):
        raise ExportError(f"--out {out} would overwrite a checkpoint; give the ONNX file a name of its own "
                          f"(default: {ckpt.with_name('model.onnx')})")
    if out.exists() and out.suffix.lower() != ".onnx":  # only an earlier export is replaced, never another file
        raise ExportError(f"--out {out} exists and is not an ONNX file; give the model a name ending in .onnx")

    proto = onnx.load_from_string(_to_onnx_bytes(ProbabilityHead(model, tta).eval(), size))
    props = {"classes": json.dumps(meta["classes"]), "image_size": str(size), "input": INPUT_DOC,
             "scale": "uint8 RGB / 255, NCHW", "output": "(batch, 2) probabilities, ordered as classes",
             "tta": "true" if tta else "false", "model": meta["model"], "source": str(ckpt),
             "verified_atol": f"{atol:g}", "train_size": str(meta.get("train_size", size))}
    for k, v in props.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    proto.doc_string = f"catdog {meta['model']} classifier {meta['classes']}; input {INPUT_DOC}"
    onnx.checker.check_model(proto)
    model_bytes = proto.SerializeToString()

    # The check batch: seeded noise plus flat and mirrored images, odd batch size to exercise the dynamic axis.
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n_check, size, size, 3), dtype=np.uint8)
    images[0], images[1] = 0, 255
    images[2] = images[3, :, ::-1]
    expected = predict_probs(model, images, tta=tta).numpy()
    got = _onnx_probs(model_bytes, images)
    max_diff = float(np.abs(got - expected).max())
    if not np.allclose(got, expected, rtol=0, atol=atol):
        raise ExportError(f"ONNX outputs differ from PyTorch by up to {max_diff:.3g} (> atol {atol:g}); nothing written")
    fileio.write_bytes(out, model_bytes)
    return {"out": str(out), "checkpoint": str(ckpt), "classes": meta["classes"], "image_size": size, "tta": tta,
            "opset": OPSET, "checked_images": n_check, "max_abs_diff": max_diff, "atol": atol,
            "bytes": len(model_bytes)}
