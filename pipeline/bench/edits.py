"""The near-duplicate benchmark's data: edited copies made with Pillow, and the truth.

Its own module because it is pure image work (no catalog, no model): `EDITS` holds
one function per edit kind, `make_set` makes every copy of the chosen originals into
a work folder and returns what each image is (`Item`), from which
`pipeline.bench.duplicates` scores the groups. The shared datasets are read in place
(never copied): Corel-1K gives originals and distractors, Holidays-150 its queries as
originals and its other photos of the same place as "not a duplicate", UKBench-1000
its groups of 4 shots of one object as "similar shots".
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from pipeline.errors import CbirError

# An edit: (RGB image, seeded rng) -> (edited image, format, save options).
Edit = Callable[[Image.Image, random.Random], tuple[Image.Image, str, dict]]
JPEG = ("JPEG", {"quality": 90})  # what an edited copy is usually saved as


def _resize(im: Image.Image, rng: random.Random):
    return im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS), *JPEG


def _jpeg(quality: int) -> Edit:
    return lambda im, rng: (im, "JPEG", {"quality": quality})


def _crop(im: Image.Image, rng: random.Random):
    """Cut 5-20% off the width and the height, at a random place."""
    f = rng.uniform(0.05, 0.20)
    w, h = round(im.width * (1 - f)), round(im.height * (1 - f))
    x, y = rng.randint(0, im.width - w), rng.randint(0, im.height - h)
    return im.crop((x, y, x + w, y + h)), *JPEG


def _rotate90(im: Image.Image, rng: random.Random):
    return im.transpose(Image.Transpose.ROTATE_90), *JPEG


def _rotate_small(im: Image.Image, rng: random.Random):
    """3-5 degrees either way, same size: the corners that come in are black."""
    angle = rng.uniform(3, 5) * rng.choice((-1, 1))
    return im.rotate(angle, Image.Resampling.BICUBIC, fillcolor=(0, 0, 0)), *JPEG


def _flip(im: Image.Image, rng: random.Random):
    return ImageOps.mirror(im), *JPEG


def _colour(im: Image.Image, rng: random.Random):
    """Brightness, contrast and saturation, each by a factor of 0.7-1.3."""
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        im = enhance(im).enhance(rng.uniform(0.7, 1.3))
    return im, *JPEG


def _blur(im: Image.Image, rng: random.Random):
    return im.filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 2.5))), *JPEG


def _border(im: Image.Image, rng: random.Random):
    """Half the copies letterboxed to a square (black bars), half framed (6-10%, white)."""
    if rng.random() < 0.5:
        side = max(im.size)
        return ImageOps.pad(im, (side, side), color=(0, 0, 0)), *JPEG
    return ImageOps.expand(
        im, round(max(im.size) * rng.uniform(0.06, 0.10)), (255, 255, 255)
    ), *JPEG


def _text(im: Image.Image, rng: random.Random):
    """A watermark: a large half-transparent line across the middle, a caption in a corner."""
    layer = Image.new("RGBA", im.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    big = ImageFont.load_default(size=max(12, im.width // 9))
    draw.text((im.width / 2, im.height / 2), "(c) PHOTO STOCK", (255, 255, 255, 110), big, "mm")
    small = ImageFont.load_default(size=max(8, im.height // 18))
    draw.text((6, im.height - 6), "cbir 2024-06-01", (255, 255, 0, 230), small, "ld")
    return Image.alpha_composite(im.convert("RGBA"), layer).convert("RGB"), *JPEG


def _screenshot(im: Image.Image, rng: random.Random):
    """Shown smaller, captured, scaled back up, edges cut off by 1-3%, saved as PNG."""
    s = rng.uniform(0.5, 0.8)
    small = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.BILINEAR)
    back = small.resize(im.size, Image.Resampling.BICUBIC)
    dx, dy = round(im.width * rng.uniform(0.01, 0.03)), round(im.height * rng.uniform(0.01, 0.03))
    return back.crop((dx, dy, im.width - dx, im.height - dy)), "PNG", {}


EDITS: dict[str, Edit] = {
    "resize 50%": _resize,
    "jpeg q30": _jpeg(30),
    "jpeg q95": _jpeg(95),
    "crop 5-20%": _crop,
    "rotate 90": _rotate90,
    "rotate 3-5": _rotate_small,
    "flip": _flip,
    "colour": _colour,
    "blur": _blur,
    "border": _border,
    "text": _text,
    "screenshot": _screenshot,
}


def edited(im: Image.Image, kind: str, rng: random.Random) -> tuple[bytes, str]:
    """The bytes of an edited copy of `im` and its file suffix."""
    out, fmt, options = EDITS[kind](im.convert("RGB"), rng)
    data = io.BytesIO()
    out.save(data, fmt, **options)
    return data.getvalue(), ".png" if fmt == "PNG" else ".jpg"


@dataclass(frozen=True)
class Item:
    """What one image of the benchmark is.

    family: the original it was made from (itself for an original or an unedited
    photo); two images are the same photo exactly when their families are equal.
    scene: the scene or object it shows (a UKBench object, a Holidays place, else its
    family). kind: an edit kind, or original, distractor, ukbench, holidays.
    """

    family: str
    scene: str
    kind: str


def _slug(kind: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in kind)


def make_set(
    datasets: str | Path,
    work: str | Path,
    originals: int = 100,
    seed: int = 0,
    kinds: list[str] | None = None,
) -> dict[str, Item]:
    """Make the edited copies under `work`/edits and return every image's Item, by path
    (the shared images by their resolved path, read in place).

    Originals: `originals` Corel-1K images (a seeded choice) and the 150 Holidays
    queries, each edited once per kind; the rest of Corel-1K are distractors.
    """
    root = Path(datasets).resolve()
    corel, holidays, ukbench = root / "corel1k", root / "holidays150", root / "ukbench1000"
    for d in (corel / "manifest.csv", holidays / "groundtruth.csv", ukbench / "images"):
        if not d.exists():
            raise CbirError(f"the near-duplicate benchmark needs {d}")
    items: dict[str, Item] = {}
    with (corel / "manifest.csv").open(newline="") as f:
        corel_files = [str(corel / r["path"]) for r in csv.DictReader(f)]
    rng = random.Random(seed)
    chosen = set(rng.sample(corel_files, min(originals, len(corel_files))))
    for p in corel_files:
        items[p] = Item(p, p, "original" if p in chosen else "distractor")
    for p in sorted((holidays / "images").glob("*.jpg")):
        place = f"holidays:{int(p.stem) // 100}"
        items[str(p)] = Item(str(p), place, "original" if p.stem.endswith("00") else "holidays")
    for p in sorted((ukbench / "images").glob("*.jpg")):
        items[str(p)] = Item(str(p), f"ukbench:{int(p.stem[-5:]) // 4}", "ukbench")
    out = Path(work) / "edits"
    for n, (path, item) in enumerate([(p, i) for p, i in items.items() if i.kind == "original"]):
        folder = out / f"{n:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            for kind in kinds or EDITS:
                data, suffix = edited(im, kind, random.Random(f"{seed}:{path}:{kind}"))
                copy = folder / f"{_slug(kind)}{suffix}"
                copy.write_bytes(data)
                items[str(copy.resolve())] = Item(item.family, item.scene, kind)
    return items
