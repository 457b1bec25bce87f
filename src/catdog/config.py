"""The run configuration: one frozen dataclass, saved as config.json in every run folder."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

MODELS = ("resnet", "seed")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "onecycle", "cosine")


def default_data_dir() -> Path:
    """The embedded cats-vs-dogs set (or $CATDOG_DATA when set)."""
    if os.environ.get("CATDOG_DATA"):
        return Path(os.environ["CATDOG_DATA"])
    return Path(__file__).resolve().parents[2] / "data" / "cats_and_dogs"


# Random-resized crops show objects larger in training than whole images do at test time; a network with global
# pooling sees them at the size it learnt when the test input is a little larger (Touvron et al. 2019, "Fixing
# the train-test resolution discrepancy"). The factor was chosen on validation (benchmarks/accuracy.md).
EVAL_SCALE = 1.15

# Progressive resizing: early epochs train on smaller inputs, which cost less (compute grows with the area), and
# the size reaches image_size at this share of the epochs, so the last ones train at the final size.
PROGRESSIVE_RAMP = 0.85

# Fine-tuning at the evaluation size (Touvron et al. 2019 again): the last `finetune` share of the epochs train on
# whole images at the size the model is evaluated at, flipped only, from a fresh optimiser state at this share of the
# peak learning rate (a 10 % linear warm-up, then cosine decay to zero).
FINETUNE_LR_SHARE = 1 / 30

# Per-model training recipes; a command-line flag overrides any field.
RECIPES: dict[str, dict] = {
    # The seed's recipe, as in seed_keras.py: Adam 1e-3, batch 32, 25 epochs, shear/zoom/flip.
    "seed": dict(epochs=25, batch_size=32, lr=1e-3, weight_decay=0.0, optimizer="adam", schedule="constant",
                 image_size=64, label_smoothing=0.0, shear=0.2, zoom=0.2, crop=0.0, jitter=0.0, erase=0.0, mix=0.0,
                 ema=0.0, tta=False, bf16=False, eval_scale=1.0, progressive=0.0, decode_scale=1.0, finetune=0.0),
    # The default from-scratch recipe, chosen on validation accuracy (benchmarks/accuracy.md): 96 px input
    # (48 px at first, growing), random-resized crop + flip + colour jitter + mixup/cutmix, AdamW with a one-cycle
    # schedule, bf16 autocast.
    "resnet": dict(epochs=240, batch_size=64, lr=3e-3, weight_decay=5e-2, optimizer="adamw", schedule="onecycle",
                   image_size=96, label_smoothing=0.1, shear=0.0, zoom=0.0, crop=0.35, jitter=0.2, erase=0.0,
                   mix=0.3, ema=0.0, tta=True, bf16=True, eval_scale=EVAL_SCALE, progressive=0.5),
}


def scaled_size(image_size: int, scale: float) -> int:
    """image_size x scale, rounded to a multiple of 8 (image_size itself when the scale is 1): the evaluation size
    and the decode size of a recipe."""
    return image_size if scale == 1 else max(16, 8 * round(image_size * scale / 8))


RUN_MARKERS = ("config.json", "last.pt", "best.pt")  # a folder holding any of these holds a run
# what a run writes at its top level, besides them
RUN_FILES = ("history.csv", "data.json", "skipped.csv", "metrics.json", "results.json", "predictions.csv",
             "mistakes.csv", "report.html")

# fields every saved config.json has held since the first release (later fields default when absent)
CORE_KEYS = ("model", "epochs", "image_size", "batch_size", "lr", "seed")


def model_meta_problem(classes, image_size) -> str | None:
    """Why a saved model's classes or input size cannot be used (a damaged or hand-edited file), else None."""
    if (not isinstance(classes, (list, tuple)) or len(classes) != 2 or len(set(classes)) != 2
            or not all(isinstance(c, str) and c for c in classes)):
        return f"its classes must be two different names, not {classes!r}"
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 16 <= image_size <= 2048:
        return f"its input size must be a whole number of pixels from 16 to 2048, not {image_size!r}"
    return None


@dataclass(frozen=True)
class TrainConfig:
    data: str = field(default_factory=lambda: str(default_data_dir()))  # dataset root (DIR/<class>/ or DIR/train/<class>/)
    out: str = "runs/train"  # run folder
    model: str = "resnet"  # network: "resnet" (default) or "seed" (the seed's exact CNN)
    epochs: int = 240  # passes over the training split
    image_size: int = 96  # images are resized to image_size x image_size
    batch_size: int = 64  # images per optimisation step
    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 5e-2  # decoupled (AdamW) or L2 (Adam) weight decay
    optimizer: str = "adamw"  # "adam" or "adamw"
    schedule: str = "onecycle"  # learning-rate schedule: "constant", "onecycle" or "cosine"
    label_smoothing: float = 0.1  # targets pulled towards 0.5 by this amount
    shear: float = 0.0  # random shear factor range (+/-); the seed uses 0.2
    zoom: float = 0.0  # random zoom range (+/-); the seed uses 0.2
    flip: bool = True  # random horizontal flip, as the seed
    crop: float = 0.35  # extra random-resized-crop strength (0 = off)
    jitter: float = 0.2  # colour jitter strength (brightness/contrast/saturation, 0 = off)
    erase: float = 0.0  # probability of random erasing (0 = off)
    mix: float = 0.3  # probability that a batch is mixed by mixup or cutmix (0 = off)
    ema: float = 0.0  # exponential moving average of weights (decay, 0 = off)
    tta: bool = True  # average predictions over the image and its horizontal flip
    eval_scale: float = EVAL_SCALE  # validation and inference input size = image_size x eval_scale (resnet only)
    progressive: float = 0.5  # training input starts at this share of image_size and grows to it (0 = off)
    decode_scale: float = 1.0  # training images are decoded at image_size x decode_scale; crops resample from that
    finetune: float = 0.0  # share of the epochs, at the end, that fine-tune on whole images at the eval size (0 = off)
    val_fraction: float = 0.1  # stratified share of train held out to choose the checkpoint
    seed: int = 0  # seeds the split, the shuffling, the augmentation and the weights
    threads: int = 0  # torch intra-op threads (0 = all cores)
    workers: int = 0  # processes decoding images (0 = one per core)
    bf16: bool = True  # bfloat16 autocast for the forward pass (CPU with AMX, or CUDA)
    device: str = "auto"  # "cpu", "cuda" or "auto" (CUDA when a GPU is present)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, not {self.model!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, not {self.schedule!r}")
        if self.epochs < 1:
            raise ValueError("epochs must be at least 1")
        if not 16 <= self.image_size <= 1024:
            raise ValueError("image_size must be between 16 and 1024")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not 0 < self.lr < float("inf"):  # also refuses nan
            raise ValueError("lr must be a positive number")
        if self.seed < 0:
            raise ValueError("seed must be 0 or more")
        if self.threads < 0 or self.workers < 0:
            raise ValueError("threads and workers must be 0 (one per core) or more")
        if not 0 <= self.val_fraction < 1:
            raise ValueError("val_fraction must be in [0, 1)")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError("label_smoothing must be in [0, 1)")
        if not 0 <= self.ema < 1:
            raise ValueError("ema must be in [0, 1)")
        if not 0.5 <= self.eval_scale <= 2:
            raise ValueError("eval_scale must be between 0.5 and 2")
        if self.progressive and not 0.5 <= self.progressive <= 1:
            raise ValueError("progressive must be 0 (off) or between 0.5 and 1")
        if not 0 <= self.finetune <= 0.5:
            raise ValueError("finetune must be a share of the epochs from 0 (off) to 0.5")
        if not 1 <= self.decode_scale <= 2:
            raise ValueError("decode_scale must be between 1 and 2")
        if self.model == "seed" and self.progressive not in (0, 1):
            raise ValueError("the seed network's dense layer fixes its input size: it cannot train progressively")
        if self.model == "seed" and self.eval_size != self.image_size:
            raise ValueError("the seed network's dense layer fixes its input size: eval_scale must be 1 for it")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError("device must be cpu, cuda or auto")

    @property
    def augmentation(self) -> dict:
        """The keyword arguments of catdog.augment.augment_batch that this recipe trains with."""
        return dict(shear=self.shear, zoom=self.zoom, flip=self.flip, crop=self.crop, jitter=self.jitter,
                    erase=self.erase)

    @property
    def eval_size(self) -> int:
        """The input size for validation and inference: image_size x eval_scale, rounded to a multiple of 8."""
        return scaled_size(self.image_size, self.eval_scale)

    @property
    def decode_size(self) -> int:
        """The side training images are decoded at: image_size x decode_scale, rounded to a multiple of 8."""
        return scaled_size(self.image_size, self.decode_scale)

    def source_size_at(self, size: int) -> int:
        """The side of the images a training input of this size is cropped from: size x decode_scale, rounded to a
        multiple of 8, at most decode_size (so smaller early-epoch inputs do not sample a much larger image). With
        decode_scale 1 every size crops from the decoded images themselves, as runs did before decode_scale."""
        if self.decode_scale == 1:
            return self.decode_size
        return min(self.decode_size, scaled_size(size, self.decode_scale))

    @property
    def finetune_epochs(self) -> int:
        """The fine-tuning epochs at the end: the finetune share of the epochs, rounded (none in short runs)."""
        return round(self.epochs * self.finetune)

    @property
    def main_epochs(self) -> int:
        """The epochs before fine-tuning: the learning-rate schedule and progressive resizing span these."""
        return self.epochs - self.finetune_epochs

    def is_finetune(self, epoch: int) -> bool:
        """Whether an epoch (1-based) is one of the fine-tuning epochs at the end."""
        return epoch > self.main_epochs

    def train_size_at(self, epoch: int) -> int:
        """The training input size of an epoch (1-based): with progressive resizing it grows linearly from
        image_size x progressive to image_size over the first PROGRESSIVE_RAMP share of the main epochs, in steps of
        8 px in between; from there on, and for a one-epoch run, it is image_size; fine-tuning epochs train at the
        evaluation size."""
        if self.is_finetune(epoch):
            return self.eval_size
        ramp = round(PROGRESSIVE_RAMP * self.main_epochs) - 1
        if not self.progressive or self.progressive == 1 or epoch - 1 >= ramp:
            return self.image_size
        start = self.image_size * self.progressive
        size = start + (self.image_size - start) * (epoch - 1) / ramp
        return min(self.image_size, max(16, 8 * round(size / 8)))

    @classmethod
    def for_model(cls, model: str = "resnet", **overrides) -> "TrainConfig":
        """The model's recipe, with the given fields overridden (None values are ignored)."""
        if model not in RECIPES:
            raise ValueError(f"model must be one of {MODELS}, not {model!r}")
        fields = {**RECIPES[model], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(model=model, **fields)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in json.loads(text).items() if k in known}
        fields.setdefault("eval_scale", 1.0)  # runs made before eval_scale existed validated at their image size
        fields.setdefault("progressive", 0.0)  # and trained at their image size throughout
        fields.setdefault("decode_scale", 1.0)  # on images decoded at that size
        fields.setdefault("finetune", 0.0)  # without fine-tuning at the end
        return cls(**fields)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        try:
            text = Path(path).read_text(encoding="utf-8")
            missing = [k for k in CORE_KEYS if k not in json.loads(text)]
            if missing:  # every run wrote these: without them the recipe would silently fall back to defaults
                raise ValueError(f"no {', '.join(map(repr, missing))}")
            return cls.from_json(text)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is damaged ({e})") from None
