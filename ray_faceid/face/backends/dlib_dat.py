"""Read the weights of dlib's face recognition ResNet from its serialized `.dat` file.

dlib writes integers as one header byte (low nibble: byte count; bit 7: negative) followed by
little-endian magnitude bytes, strings as a length then bytes, and tensors (version 2) as four
integer dimensions then raw little-endian float32 values. Layers are written from the input
towards the output, each after its type name ("con_4", "affine_", "fc_2", ...), so the weights
can be read in forward order by walking those names.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ray_faceid.errors import BackendUnavailable


class _Reader:
    def __init__(self, data: bytes, pos: int = 0):
        self.data, self.pos = data, pos

    def int(self) -> int:
        head = self.data[self.pos]
        size, negative = head & 0x0F, head & 0x80
        raw = self.data[self.pos + 1 : self.pos + 1 + size]
        self.pos += 1 + size
        value = int.from_bytes(raw, "little")
        return -value if negative else value

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        return float(np.ldexp(float(mantissa), exponent))

    def tensor(self) -> np.ndarray:
        version = self.int()
        if version != 2:
            raise BackendUnavailable(f"dlib tensor format version {version} is not supported (expected 2)")
        shape = tuple(self.int() for _ in range(4))
        count = int(np.prod(shape))
        values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.pos)
        self.pos += 4 * count
        return values.reshape(shape).astype(np.float32)


def _after(data: bytes, name: bytes, start: int) -> int:
    """Position just after the next serialized string `name` at or after `start`, or -1."""
    marker = bytes([0x01, len(name)]) + name
    found = data.find(marker, start)
    return -1 if found < 0 else found + len(marker)


@dataclass
class ConvWeights:
    weight: np.ndarray  # out x in x kh x kw
    bias: np.ndarray
    stride: int
    padding: int


@dataclass
class AffineWeights:
    gamma: np.ndarray
    beta: np.ndarray


@dataclass
class DlibResNetWeights:
    mean_rgb: tuple[float, float, float]
    chip_size: int
    convs: list[ConvWeights]
    affines: list[AffineWeights]
    fc: np.ndarray  # inputs x outputs


def read_dlib_resnet(data: bytes) -> DlibResNetWeights:
    pos = _after(data, b"input_rgb_image_sized", 0)
    if pos < 0:
        raise BackendUnavailable("not a dlib face recognition model: no input_rgb_image_sized layer")
    reader = _Reader(data, pos)
    mean = (reader.float(), reader.float(), reader.float())
    chip_size = reader.int()

    convs, affines = [], []
    pos = reader.pos
    while (pos := _after(data, b"con_4", pos)) >= 0:
        r = _Reader(data, pos)
        params = r.tensor().ravel()
        filters, kh, kw, stride_y, stride_x, pad_y, pad_x = (r.int() for _ in range(7))
        in_ch = (params.size - filters) // (filters * kh * kw)
        weight = params[: filters * in_ch * kh * kw].reshape(filters, in_ch, kh, kw)
        convs.append(ConvWeights(weight, params[filters * in_ch * kh * kw :], stride_y, pad_y))
        pos = r.pos
    pos = 0
    while (pos := _after(data, b"affine_", pos)) >= 0:
        r = _Reader(data, pos)
        params = r.tensor().ravel()
        half = params.size // 2
        affines.append(AffineWeights(params[:half], params[half:]))
        pos = r.pos
    pos = _after(data, b"fc_2", 0)
    if pos < 0 or not convs or len(convs) != len(affines):
        raise BackendUnavailable("dlib model layout not recognised (expected con_4/affine_ pairs and an fc_2 layer)")
    r = _Reader(data, pos)
    outputs, inputs = r.int(), r.int()
    fc = r.tensor().reshape(-1)[: inputs * outputs].reshape(inputs, outputs)
    return DlibResNetWeights(mean, chip_size, convs, affines, fc)
