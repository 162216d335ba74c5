"""The images an int8 model is quantised on: which ones, how they are identified, and checked.

A calibration is named by the digests of its images' contents (`calibration_id`),
so a catalog's recorded id finds its model without reading an image, and the
images, if the model must be built again, are checked against that id first.
Apart from the OpenVINO runtime and conversion because none of this needs
OpenVINO or NNCF: choosing and identifying a calibration is plain file hashing.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.embed.modelcache import file_sha256
from pipeline.errors import CbirError

CALIBRATION_SIZE = 300


def calibration_id(paths: list[str]) -> str:
    """sha256 of the sorted sha256s of the calibration files' contents (order and place free)."""
    try:
        digests = [file_sha256(Path(p)) for p in paths]
    except OSError as e:
        raise CbirError(f"cannot read calibration image {e.filename}: {e.strerror}") from None
    return digests_id(digests)


def digests_id(digests: list[str]) -> str:
    """The calibration id of files with these sha256s (`calibration_id` without reading them)."""
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


@dataclass(frozen=True)
class Calibration:
    """What an int8 model is quantised on, and where a copy of the model is kept.

    `id` (`calibration_id` of the images) names the model in every cache key, so a
    catalog's recorded id finds its model without reading an image. `paths` are
    the images to quantise on should the model have to be built (checked against
    `id` first); `kept` is the catalog's own model folder (`openvino_convert.keep`),
    tried first. Hashable: it is an argument of `api.cached_embedder`.
    """

    id: str
    paths: tuple[str, ...] = ()
    kept: str | None = None

    @classmethod
    def of(cls, paths: list[str] | tuple[str, ...], kept: str | None = None) -> Calibration:
        """The calibration of these image files (reads each once for its id)."""
        return cls(calibration_id(list(paths)), tuple(paths), kept)


class CalibrationGone(CbirError):
    """An int8 model that is in no cache and whose calibration images are gone or changed."""


def choose_calibration(paths: list[str], n: int = CALIBRATION_SIZE, seed: int = 0) -> list[str]:
    """A deterministic sample of `n` paths: the same collection gives the same choice.

    Ranked by a seeded hash of each path, so the choice depends neither on the
    order the paths come in nor on a random generator's implementation.
    """
    # os.fsencode: a file name that is not UTF-8 is hashed as the bytes it is.
    ranked = sorted(
        set(paths), key=lambda p: hashlib.sha256(f"{seed}:".encode() + os.fsencode(p)).digest()
    )
    return sorted(ranked[:n])


def as_calibration(
    calibration: Calibration | list[str] | tuple[str, ...] | None,
) -> Calibration | None:
    """A `Calibration` as given, or that of these image paths (None without any)."""
    if isinstance(calibration, Calibration) or not calibration:
        return calibration or None
    return Calibration.of(calibration)


def check_images(calibration: Calibration) -> list[str]:
    """The calibration's image files, once their contents are checked against its id."""
    hint = (
        "put them back, or pass --calibration DIR (a folder holding them, or other images: "
        "those make a slightly different model, which indexing accepts with --allow-mixed)"
    )
    if not calibration.paths:
        raise CalibrationGone(
            f"the int8 model of calibration {calibration.id[:12]} is in no model cache and its "
            f"calibration images are not recorded: pass --calibration DIR"
        )
    try:
        digests = [file_sha256(Path(p)) for p in calibration.paths]
    except OSError as e:
        raise CalibrationGone(
            f"cannot rebuild the int8 model: calibration image {e.filename} is unreadable "
            f"({e.strerror}; {len(calibration.paths)} recorded); {hint}"
        ) from None
    if digests_id(digests) != calibration.id:
        raise CalibrationGone(
            f"cannot rebuild the int8 model: its {len(calibration.paths)} calibration images "
            f"have changed since it was made; {hint}"
        )
    return list(calibration.paths)
