"""Every bad input the decoder must refuse with a BadImage that says what was wrong, and every
odd-but-valid input it must turn into RGB uint8."""
import io

import numpy as np
import pytest
from PIL import Image

from ray_faceid.config import DecodeConfig
from ray_faceid.errors import BadImage
from ray_faceid.face.decode import decode_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w=64, h=48) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)
    arr = np.stack([np.tile(x, (h, 1)), np.tile(x[::-1], (h, 1)), np.full((h, w), 128, np.uint8)], -1)
    return Image.fromarray(arr)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty file"),
        (b"this is a text file, not a photo\n" * 10, "not an image"),
        (encode(gradient(), "JPEG")[:200], "truncated or corrupt"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "not an image|truncated or corrupt"),
        (encode(gradient(), "PPM"), "format PPM is not accepted"),
    ],
    ids=["zero-byte", "text", "truncated-jpeg", "corrupt-png", "unsupported-format"],
)
def test_bad_bytes_are_refused_with_a_reason(data, message):
    with pytest.raises(BadImage, match=message):
        decode_image(data)


def test_decompression_bomb_is_refused_before_decoding():
    # 96 megapixels of 1-bit PNG: a few kB on disk, 288 MB once decoded to RGB.
    bomb = encode(Image.new("1", (12000, 8000)), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(BadImage, match="12000x8000 = 96000000 pixels, over the 80000000-pixel limit"):
        decode_image(bomb)


def test_byte_limit(tmp_path):
    data = encode(gradient(), "PNG")
    with pytest.raises(BadImage, match="over the 100-byte limit"):
        decode_image(data, DecodeConfig(max_bytes=100))
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(BadImage, match="big.png: file is .* over the 100-byte limit"):
        decode_image(str(path), DecodeConfig(max_bytes=100))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(BadImage, match="no such file"):
        decode_image(str(tmp_path / "nope.jpg"))
    with pytest.raises(BadImage, match="cannot read"):
        decode_image(str(tmp_path))


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "RGB"])
def test_every_mode_becomes_rgb_uint8(mode):
    img = gradient().convert(mode)
    out = decode_image(encode(img, "TIFF" if mode == "CMYK" else "PNG"))
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    if mode == "L":
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_cmyk_jpeg_and_webp():
    assert decode_image(encode(gradient().convert("CMYK"), "JPEG")).shape == (48, 64, 3)
    webp = decode_image(encode(gradient(), "WEBP", lossless=True))
    assert np.array_equal(webp, np.asarray(gradient()))


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 5, 10))
    out = decode_image(encode(rgba, "PNG"))
    assert out[0, 0].tolist() == [0, 0, 255]
    assert out[0, 9].tolist() == [255, 255, 255]


def test_sixteen_bit_grey_keeps_its_range():
    arr = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (8, 1))
    out = decode_image(encode(Image.fromarray(arr), "PNG"))
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255
    assert np.all(np.diff(out[0, :, 0].astype(int)) >= 0)


def test_exif_orientation_is_applied():
    img = gradient(64, 48)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert out.shape == (64, 48, 3)


def test_large_photos_are_decoded_reduced_to_max_side():
    buf = io.BytesIO()
    Image.new("RGB", (3000, 2000), (200, 120, 40)).save(buf, "JPEG")
    out = decode_image(buf.getvalue(), DecodeConfig(max_side=1024))
    assert out.shape == (683, 1024, 3) and abs(int(out[300, 500, 0]) - 200) < 4
    assert decode_image(buf.getvalue()).shape == (2000, 3000, 3)  # no limit by default
