"""Make the embedded copy of a folder-per-class dataset: shorter side downscaled to 128 px, JPEG quality 90.

Usage: python scripts/embed_dataset.py SRC DST [--short-side 128] [--quality 90]
e.g.   python scripts/embed_dataset.py ../shared/data/cats_and_dogs data/cats_and_dogs
"""
import argparse
from pathlib import Path

from PIL import Image, ImageOps

EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def shrink(src: Path, dst: Path, short_side: int, quality: int) -> None:
    """Write SRC as a JPEG whose shorter side is at most `short_side` pixels."""
    with Image.open(src) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        scale = short_side / min(img.size)
        if scale < 1:
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            img = img.resize(size, Image.Resampling.LANCZOS)
        dst.parent.mkdir(parents=True, exist_ok=True)
        img.save(dst, "JPEG", quality=quality, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--short-side", type=int, default=128)
    ap.add_argument("--quality", type=int, default=90)
    args = ap.parse_args()
    files = sorted(p for p in args.src.rglob("*") if p.suffix.lower() in EXTS and not p.name.startswith("."))
    for i, src in enumerate(files, 1):
        shrink(src, (args.dst / src.relative_to(args.src)).with_suffix(".jpg"), args.short_side, args.quality)
        if i % 500 == 0 or i == len(files):
            print(f"{i}/{len(files)}", flush=True)


if __name__ == "__main__":
    main()
