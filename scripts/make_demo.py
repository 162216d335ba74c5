"""Make a small demo collection from the sample images bundled inside scikit-image.

The scikit-image wheel ships about 30 sample pictures in `skimage/data/`
(astronaut, chelsea the cat, coffee, rocket, a stereo pair of motorcycles,
textures, microscopy, ...). This script copies the ones present in the
installed package into label folders, with no network access: images that
scikit-image would download on demand (through pooch) are not used. Each
image's licence is given in the docstring of its loader in `skimage.data`
(mostly CC0 or public domain).

    pip install -e '.[demo]'
    python scripts/make_demo.py demo      # then: cbir index demo

Files are copied byte for byte with their timestamps, and identical files
already in place are left alone, so a rerun changes nothing and a following
`cbir index` finds every image unchanged.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.util
import shutil
import sys
from pathlib import Path

# label folder -> bundled file names (any other bundled .png/.jpg goes to "other").
GROUPS: dict[str, tuple[str, ...]] = {
    "people": ("astronaut.png", "camera.png"),
    "animals": ("chelsea.png", "horse.png"),
    "vehicles": ("motorcycle_left.png", "motorcycle_right.png", "rocket.jpg"),
    "objects": ("coffee.png", "coins.png", "clock_motion.png"),
    "textures": ("brick.png", "grass.png", "gravel.png"),
    "space": ("hubble_deep_field.jpg", "moon.png"),
    "microscopy": ("cell.png", "ihc.png", "retina.jpg", "microaneurysms.png"),
    "text": ("page.png", "text.png"),
    "synthetic": (
        "chessboard_GRAY.png",
        "chessboard_RGB.png",
        "color.png",
        "logo.png",
        "phantom.png",
    ),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def bundled_data_dir() -> Path:
    """The `skimage/data` folder of the installed scikit-image, without importing it."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "scikit-image is not installed: pip install -e '.[demo]' (or pip install scikit-image)"
        )
    return Path(spec.origin).parent / "data"


def plan(data_dir: Path) -> list[tuple[Path, str]]:
    """(bundled file, label) for every sample image present in `data_dir`."""
    present = {p.name: p for p in data_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    out: list[tuple[Path, str]] = []
    for label, names in GROUPS.items():
        out.extend((present.pop(name), label) for name in names if name in present)
    out.extend((present[name], "other") for name in sorted(present))
    return out


def make_demo(dest: Path) -> tuple[int, int, list[str]]:
    """Copy the bundled images into `dest/LABEL/`; returns (written, already present, labels)."""
    written = kept = 0
    todo = plan(bundled_data_dir())
    for src, label in todo:
        target = dest / label / src.name
        if target.is_file() and filecmp.cmp(src, target, shallow=False):
            kept += 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        written += 1
    return written, kept, sorted({label for _, label in todo})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", nargs="?", default="demo", help="folder to fill (default: demo/)")
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    written, kept, labels = make_demo(dest)
    if written + kept == 0:
        print("no sample images found in the installed scikit-image", file=sys.stderr)
        return 1
    print(
        f"wrote {written} images ({kept} already present) into {dest}/ "
        f"in {len(labels)} label folders: {', '.join(labels)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
