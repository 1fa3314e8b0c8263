"""Face parsing with BiSeNet (Yu et al., BiSeNet: bilateral segmentation network), the parser PuLID
greys a face with: facexlib's `parsing_bisenet.pth`, 19 CelebAMask-HQ classes per pixel, written
from its published architecture and loaded strictly under its published names.

A ResNet-18 context path whose 1/16 and 1/32 features are refined by channel attention (with the
1/32 map's global average added) and brought up to 1/8, fused with the 1/8 features by a
channel-attention fusion, and a 3x3 + 1x1 head brought back to the image's size. The two auxiliary
heads (1/8 and 1/16 context) are loaded, as the file holds them, but not run: only the main head's
classes are read. Checked against facexlib's code on random weights: tests/face/test_pulid_encoders.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ray_faceid.errors import UnsupportedModel
from ray_faceid.weight_files import read_tensors

CLASSES = 19
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as PuLID normalises the parser's input
# The classes PuLID whitens (background, ears, earring, neck, necklace, cloth, hat): the face and hair stay.
NOT_FACE = (0, 7, 8, 9, 14, 15, 16, 18)


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu((x if self.downsample is None else self.downsample(x)) + residual)


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout))


class ResNet18(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1, self.layer2 = _stage(64, 64, 1), _stage(64, 128, 2)
        self.layer3, self.layer4 = _stage(128, 256, 2), _stage(256, 512, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        eighth = self.layer2(self.layer1(x))
        sixteenth = self.layer3(eighth)
        return eighth, sixteenth, self.layer4(sixteenth)


def _global_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3), keepdim=True)


class AttentionRefinement(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x)
        return features * torch.sigmoid(self.bn_atten(self.conv_atten(_global_mean(features))))


class ContextPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = ResNet18()
        self.arm16, self.arm32 = AttentionRefinement(256, 128), AttentionRefinement(512, 128)
        self.conv_head32, self.conv_head16 = ConvBNReLU(128, 128), ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, kernel=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eighth, sixteenth, thirty_second = self.resnet(x)
        context = self.conv_avg(_global_mean(thirty_second))  # one value per channel, added everywhere
        up32 = self.conv_head32(F.interpolate(self.arm32(thirty_second) + context, sixteenth.shape[2:],
                                              mode="nearest"))
        up16 = self.conv_head16(F.interpolate(self.arm16(sixteenth) + up32, eighth.shape[2:], mode="nearest"))
        return eighth, up16


class FeatureFusion(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, kernel=1)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        features = self.convblk(torch.cat([spatial, context], dim=1))
        weights = torch.sigmoid(self.conv2(F.relu(self.conv1(_global_mean(features)))))
        return features * weights + features


class Head(nn.Module):
    def __init__(self, cin: int, mid: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, CLASSES, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """(B, 3, H, W) images normalised with MEAN and STD -> (B, CLASSES, H, W) class scores."""

    def __init__(self):
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = Head(256, 256)
        self.conv_out16, self.conv_out32 = Head(128, 64), Head(128, 64)  # auxiliary heads: held, not run

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        eighth, context = self.cp(images)
        scores = self.conv_out(self.ffm(eighth, context))
        return F.interpolate(scores, images.shape[2:], mode="bilinear", align_corners=True)


def load_face_parsing(uri: str, meta: bool = False) -> BiSeNet:
    """facexlib's parsing_bisenet.pth (or .safetensors of the same names), loaded strictly (`meta`: on
    the meta device from the file's names and shapes alone, a check that reads no weights)."""
    state = read_tensors(uri, "face parser (parsing_bisenet.pth)", meta=meta)
    with torch.device("meta" if meta else "cpu"):
        parser = BiSeNet()
    try:
        parser.load_state_dict(state, strict=True)
    except (RuntimeError, AttributeError) as exc:
        raise UnsupportedModel(f"{uri} is not facexlib's BiSeNet face parser (parsing_bisenet.pth) in its "
                               f"published names: {str(exc).splitlines()[-1][:300]}") from None
    return parser.eval()
