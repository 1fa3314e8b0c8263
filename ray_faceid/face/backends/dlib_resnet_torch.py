"""dlib's 128-d face recognition ResNet as a torch module, weights read from dlib's own `.dat`.

Same function as dlib's (verified against its descriptors), but batched, multi-threaded on CPU,
runnable on CUDA and exportable to ONNX / TensorRT. Each conv + affine pair is folded into one
conv. A residual block adds its input (2x2 average-pooled where the block downsamples) to its
output; where the two differ in channels or size, the smaller is zero-padded, as dlib's add_prev
layer does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ray_faceid.face.backends.dlib_dat import AffineWeights, ConvWeights, DlibResNetWeights


def _folded_conv(conv: ConvWeights, affine: AffineWeights) -> nn.Conv2d:
    out_ch, in_ch, kh, kw = conv.weight.shape
    layer = nn.Conv2d(in_ch, out_ch, (kh, kw), stride=conv.stride, padding=conv.padding)
    gamma = torch.from_numpy(affine.gamma)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(conv.weight) * gamma[:, None, None, None])
        layer.bias.copy_(torch.from_numpy(conv.bias) * gamma + torch.from_numpy(affine.beta))
    return layer


def _add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b where the smaller of the two is zero-padded (channels, rows, columns at the end)."""
    c, h, w = (max(x, y) for x, y in zip(a.shape[1:], b.shape[1:]))

    def grow(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return grow(a) + grow(b)


class ResidualBlock(nn.Module):
    def __init__(self, first: nn.Conv2d, second: nn.Conv2d):
        super().__init__()
        self.first, self.second = first, second
        self.downsample = first.stride[0] == 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.second(F.relu(self.first(x)))
        skip = F.avg_pool2d(x, 2, 2) if self.downsample else x
        return F.relu(_add_zero_padded(skip, y))


class DlibResNet(nn.Module):
    """RGB face chips (N x 150 x 150 x 3, uint8 or float 0..255; dlib's chip alignment) -> N x 128."""

    def __init__(self, weights: DlibResNetWeights):
        super().__init__()
        self.chip_size = weights.chip_size
        self.register_buffer("mean", torch.tensor(weights.mean_rgb, dtype=torch.float32).view(1, 3, 1, 1))
        self.stem = _folded_conv(weights.convs[0], weights.affines[0])
        layers = [_folded_conv(c, a) for c, a in zip(weights.convs[1:], weights.affines[1:])]
        self.blocks = nn.ModuleList(ResidualBlock(layers[i], layers[i + 1]) for i in range(0, len(layers), 2))
        self.fc = nn.Linear(weights.fc.shape[0], weights.fc.shape[1], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.from_numpy(weights.fc.T.copy()))

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        x = (chips.permute(0, 3, 1, 2).float() - self.mean) / 256.0
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))
