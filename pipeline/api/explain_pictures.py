"""The pictures of an `Explanation` (api/explaining.py), drawn with Pillow, as PNG bytes.

- `render_matches`: query and result side by side, each scaled to at most `height`
  pixels high, inlier matches as green lines (at most `MAX_DRAWN`, evenly chosen), up
  to `MAX_REJECTED` rejected ones as
  faded red, the query's outline mapped into the result (yellow), the inlier count.
- `render_heatmap`: the result with the heat grid (bilinear, a blue-to-red ramp)
  laid over it at `alpha`; or, with `overlay_only`, the ramp alone on a transparent
  PNG of the result's shape, for a page to lay over a thumbnail.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.api.explaining import Explanation

INLIER = (40, 230, 60, 255)
REJECTED = (255, 60, 60, 110)
REGION = (255, 220, 0, 255)
GAP = 8  # pixels between the two pictures
# Inlier lines drawn at most (evenly chosen): hundreds of lines hide the pictures.
MAX_DRAWN = 80


def _png(im: Image.Image) -> bytes:
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()


def _scaled(pixels: np.ndarray, height: int) -> tuple[Image.Image, float]:
    im = Image.fromarray(pixels).convert("RGB")
    scale = min(1.0, height / im.height, 2 * height / im.width)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im.resize(size, Image.Resampling.BILINEAR), scale


def render_matches(e: Explanation, height: int = 480) -> bytes:
    """Query (left) and result (right), with the matches and the region drawn."""
    q, qs = _scaled(e.query_pixels, height)
    r, rs = _scaled(e.result_pixels, height)
    banner = 22
    canvas = Image.new("RGBA", (q.width + GAP + r.width, max(q.height, r.height) + banner), "white")
    canvas.paste(q, (0, banner))
    canvas.paste(r, (q.width + GAP, banner))
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    v = e.data.get("verification")
    dx = q.width + GAP

    def line(p: list[float], colour: tuple[int, ...], width: int) -> None:
        a = (p[0] * qs, p[1] * qs + banner)
        b = (p[2] * rs + dx, p[3] * rs + banner)
        draw.line([a, b], fill=colour, width=width)
        for x, y in (a, b):
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], outline=colour)

    if v:
        for p in v["rejected_pairs"]:
            line(p, REJECTED, 1)
        pairs = v["inlier_pairs"]
        for i in np.linspace(0, len(pairs) - 1, min(len(pairs), MAX_DRAWN)).round().astype(int):
            line(pairs[i], INLIER, 1)
        if v["region"]:
            corners = [(x * rs + dx, y * rs + banner) for x, y in v["region"]]
            draw.line([*corners, corners[0]], fill=REGION, width=3)
    canvas = Image.alpha_composite(canvas, layer)
    text = ImageDraw.Draw(canvas)
    if v:
        words = f"{v['inliers']} inliers of {v['matches']} matches"
        if v["inliers"] > MAX_DRAWN:
            words += f" ({MAX_DRAWN} drawn)"
        words += " - verified" if v["verified"] else " - not verified"
    else:
        words = e.data.get("note", "no verification")
    line_text = f"{words}   cosine {e.data['cosine']:.3f}"
    text.text((4, 3), line_text, fill=(0, 0, 0, 255), font=ImageFont.load_default(size=14))
    return _png(canvas.convert("RGB"))


def render_result(e: Explanation, height: int = 480) -> bytes:
    """The result's picture alone, at the size `render_heatmap` draws it."""
    return _png(_scaled(e.result_pixels, height)[0])


def _ramp(heat: np.ndarray) -> np.ndarray:
    """0..1 -> RGB: blue (disagrees) through green and yellow to red (agrees)."""
    t = np.clip(heat, 0.0, 1.0)[..., None]
    stops = np.array([[30, 60, 255], [0, 200, 120], [255, 230, 0], [255, 30, 20]], np.float64)
    pos = t * (len(stops) - 1)
    i = np.minimum(pos.astype(int), len(stops) - 2)
    f = pos - i
    return (stops[i[..., 0]] * (1 - f) + stops[i[..., 0] + 1] * f).astype(np.uint8)


def render_heatmap(
    e: Explanation, height: int = 480, alpha: float = 0.45, overlay_only: bool = False
) -> bytes | None:
    """The result with its heat map over it (None without a heat map)."""
    heat = e.data.get("heat")
    if e.heat is None or not heat:
        return None
    r, scale = _scaled(e.result_pixels, height)
    x0, y0, x1, y1 = (round(c * scale) for c in heat["area"])
    grid = Image.fromarray((np.clip(e.heat, 0, 1) * 255).astype(np.uint8))
    up = np.asarray(grid.resize((max(1, x1 - x0), max(1, y1 - y0)), Image.Resampling.BILINEAR))
    colours = Image.fromarray(_ramp(up / 255.0)).convert("RGBA")
    colours.putalpha(round(255 * alpha))
    if overlay_only:
        out = Image.new("RGBA", r.size, (0, 0, 0, 0))
        out.paste(colours, (x0, y0))
        return _png(out)
    out = r.convert("RGBA")
    layer = Image.new("RGBA", r.size, (0, 0, 0, 0))
    layer.paste(colours, (x0, y0))
    return _png(Image.alpha_composite(out, layer).convert("RGB"))
