"""Safe image decoding: bytes, a path or a URI -> RGB uint8 array (H, W, 3).

Everything is checked before pixels are decoded: byte size, format, and width x height from the
header (a decompression bomb is refused before it allocates). EXIF orientation is applied, and
every mode (RGBA, LA, L, 1, P, CMYK, I;16, I, F) ends as RGB uint8; transparency is composited
onto white, the background face detectors handle best.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ray_faceid import storage
from ray_faceid.config import DecodeConfig
from ray_faceid.errors import BadImage

# Our own max_pixels check (from the header, before decoding) replaces Pillow's warning; Pillow's
# hard error at twice its limit still applies and is reported as BadImage.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

ImageSource = bytes | bytearray | memoryview | str | Path


def read_source(src: ImageSource, limits: DecodeConfig) -> tuple[bytes, str]:
    """The bytes of `src` and a name for messages; the byte limit is checked before reading a file fully."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src), "<bytes>"
    name = str(src)
    fs, path = storage.filesystem(name)
    try:
        size = fs.size(path)
    except FileNotFoundError as exc:
        raise BadImage(f"{name}: no such file") from exc
    except OSError as exc:
        raise BadImage(f"{name}: cannot read ({exc})") from exc
    if size is not None and size > limits.max_bytes:
        raise BadImage(f"{name}: file is {size} bytes, over the {limits.max_bytes}-byte limit")
    try:
        return fs.cat_file(path), name
    except (IsADirectoryError, OSError) as exc:
        raise BadImage(f"{name}: cannot read ({exc})") from exc


def _to_uint8_gray(img: Image.Image) -> Image.Image:
    """16-bit and float single-channel images scaled to 8 bits by their value range."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
        arr = arr.astype(np.float64) / 257.0
    if img.mode == "F" and arr.size and arr.max() <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; transparency composited onto white."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _to_uint8_gray(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(src: ImageSource, limits: DecodeConfig | None = None) -> np.ndarray:
    """Decode `src` into a C-contiguous RGB uint8 array, or raise BadImage saying what was wrong."""
    limits = limits or DecodeConfig()
    data, name = read_source(src, limits)
    if not data:
        raise BadImage(f"{name}: empty file (0 bytes)")
    if len(data) > limits.max_bytes:
        raise BadImage(f"{name}: {len(data)} bytes, over the {limits.max_bytes}-byte limit")
    try:
        img = Image.open(io.BytesIO(data))
        if img.format not in limits.formats:
            raise BadImage(f"{name}: format {img.format} is not accepted (accepted: {', '.join(limits.formats)})")
        width, height = img.size
        if width * height > limits.max_pixels:
            raise BadImage(
                f"{name}: {width}x{height} = {width * height} pixels, over the {limits.max_pixels}-pixel limit"
            )
        if width == 0 or height == 0:
            raise BadImage(f"{name}: image has no pixels ({width}x{height})")
        if limits.max_side and max(width, height) > limits.max_side:
            # JPEG decodes at 1/2, 1/4 or 1/8 scale (draft): its full-size pixels never exist.
            img.draft("RGB", (limits.max_side, limits.max_side))
            img.thumbnail((limits.max_side, limits.max_side), Image.Resampling.BILINEAR, reducing_gap=None)
        img.load()
        img = ImageOps.exif_transpose(img)
        rgb = to_rgb(img)
    except BadImage:
        raise
    except UnidentifiedImageError as exc:
        raise BadImage(f"{name}: not an image, or a format Pillow cannot read") from exc
    except Image.DecompressionBombError as exc:
        raise BadImage(f"{name}: refused as a decompression bomb ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImage(f"{name}: truncated or corrupt image data ({exc})") from exc
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
