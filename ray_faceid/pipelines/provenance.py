"""Provenance: every output image says what made it, in its PNG text chunks."""
from __future__ import annotations

import io
import json

from PIL import Image, PngImagePlugin

KEY = "ray_faceid"
# IPTC digital source type for generated media.
DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


def png_with_provenance(image: Image.Image, record: dict) -> bytes:
    """PNG bytes carrying `record` (JSON) plus plain 'AI-generated' markers. Deterministic: the same
    pixels and record give the same bytes."""
    info = PngImagePlugin.PngInfo()
    info.add_text(KEY, json.dumps(record, sort_keys=True))
    info.add_text("AI-Generated", "true")
    info.add_text("DigitalSourceType", DIGITAL_SOURCE_TYPE)
    buf = io.BytesIO()
    image.save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def read_provenance(png: bytes) -> dict | None:
    text = Image.open(io.BytesIO(png)).text
    return json.loads(text[KEY]) if KEY in text else None
