"""An uploaded query carried across a relevance-feedback round trip, bounded and stateless.

The page cannot ask the user to upload again for each round, and the server
keeps nothing between requests. So the results page carries, in hidden form
fields, the 224x224 pixels the model saw, as a lossless PNG (at most about
200 KB in base64, whatever the upload's size), and a JPEG thumbnail to show.
Sent back, the PNG is an upload like any other: `api.search_in` decodes it to
the very same pixels (a 224x224 image is neither resized nor cropped), so
every round embeds exactly the query of the first. A client that edits the
fields only searches with another image, as it could by uploading one; a PNG
of a shape no page sends (a thin strip that decoding would upscale) is a 400.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image

from pipeline import api
from pipeline.api.session import is_model_input
from pipeline.inputs import thumbs
from pipeline.inputs.decode import DecodeError, decode_bytes
from pipeline.web.failures import BadRequest

# Base64 characters: a 224x224 RGB PNG is at most ~151 KB (~201 KB encoded);
# Flask's form memory limit (500 KB) bounds the whole form anyway.
MAX_PNG_B64 = 256_000
MAX_THUMB_B64 = 128_000
_BASE64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")


@dataclass(frozen=True)
class CarriedQuery:
    """An upload as the page carries it: its name, the model's input, a thumbnail."""

    name: str
    png_b64: str
    thumb_b64: str

    def upload(self) -> api.Upload:
        return api.Upload(self.name, base64.b64decode(self.png_b64))


def from_upload(
    name: str, data: bytes, max_pixels: int, shape: dict[str, Any] | None = None
) -> CarriedQuery:
    """Decode an upload once (the caller holds a decode slot) into what the page carries.

    `shape`: the descriptor's decode arguments; a whole image travels at its decoded
    size, which decoding again leaves as it is.
    """
    try:
        pixels = decode_bytes(data, max_pixels, **(shape or {})).pixels
        thumb = thumbs.thumbnail_bytes(data, max_pixels)
    except DecodeError as e:  # worded as api.search_in words it
        raise BadRequest(f"cannot use query image {name}: {e}") from None
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, "PNG")
    return CarriedQuery(name, _b64(png.getvalue()), _b64(thumb))


def from_form(form: Mapping[str, Any]) -> CarriedQuery | None:
    """The query a results page sent back, or None if the form carries none."""
    png, thumb = form.get("query_png"), form.get("query_thumb", "")
    if not png:
        return None
    if len(png) > MAX_PNG_B64 or len(thumb) > MAX_THUMB_B64:
        raise BadRequest("the carried query image is larger than a results page sends")
    if not _BASE64.match(png) or not _BASE64.match(thumb):
        raise BadRequest("the carried query image is not base64")
    try:
        _check_shape(base64.b64decode(png, validate=True))
    except binascii.Error:
        raise BadRequest("the carried query image is not base64") from None
    name = os.path.basename(str(form.get("query_name") or "query"))[:255] or "query"
    return CarriedQuery(name, png, thumb)


def _check_shape(data: bytes) -> None:
    """Refuse (400), from its header alone, a carried image that no results page sends: a
    page carries a PNG whose shorter side is the model's input size and whose longer side
    is at most MAX_ASPECT times that (`is_model_input`). A thin one would be upscaled to
    gigabytes."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h) = im.format, im.size
    except Exception:  # any header Pillow cannot read
        raise BadRequest("the carried query image is not a PNG") from None
    if fmt != "PNG" or not is_model_input(w, h):
        raise BadRequest(f"the carried query image ({w}x{h}) is not one a results page sends")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
