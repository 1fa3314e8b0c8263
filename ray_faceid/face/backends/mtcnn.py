"""MTCNN (Zhang et al. 2016): a three-stage cascade that finds faces down to about 20 px.

Used as the small-face pass of the detection policy (face/detect.py). The networks are defined
here in plain torch and load the weights that the `facenet-pytorch` wheel ships (MIT): install it
without its dependencies (`pip install --no-deps facenet-pytorch`, it pins an old torch); it is
never imported, its files are only located. Stages: a fully convolutional proposal net over an
image pyramid, a refinement net on 24x24 crops, an output net on 48x48 crops (boxes + 5 points).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ray_faceid.errors import BackendUnavailable
from ray_faceid.face.backends.base import Detection
from ray_faceid.face.landmarks import INSIGHTFACE5, Landmarks

PYRAMID_FACTOR = 0.709  # each pyramid level is this much smaller (the paper's choice)


def weights_folder() -> Path:
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or spec.origin is None:
        raise BackendUnavailable("the small-face detector needs MTCNN's weights: "
                                 "pip install --no-deps facenet-pytorch (make setup does)")
    folder = Path(spec.origin).parent / "data"
    if not (folder / "pnet.pt").exists():
        raise BackendUnavailable(f"facenet-pytorch is installed but has no MTCNN weights in {folder}")
    return folder


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k)


class _PNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = _conv(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = _conv(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = _conv(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = _conv(32, 2, 1), _conv(32, 4, 1)

    def forward(self, x):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return F.softmax(self.conv4_1(x), dim=1)[:, 1], self.conv4_2(x)


class _RNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = _conv(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = _conv(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = _conv(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).flatten(1)))  # the weights' (Caffe) flatten order
        return F.softmax(self.dense5_1(x), dim=1)[:, 1], self.dense5_2(x)


class _ONet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = _conv(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = _conv(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = _conv(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = _conv(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).flatten(1)))
        return F.softmax(self.dense6_1(x), dim=1)[:, 1], self.dense6_2(x), self.dense6_3(x)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, by_min: bool = False) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression (overlap over the union, or over the smaller box)."""
    order, keep = np.argsort(-scores), []
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        h = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        inter = w * h
        denom = np.minimum(area[i], area[rest]) if by_min else area[i] + area[rest] - inter
        order = rest[inter / np.maximum(denom, 1e-9) <= threshold]
    return np.array(keep, dtype=np.int64)


def _refine(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Apply the nets' box regression (offsets in units of the box's size)."""
    size = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, axis=1)
    return boxes + offsets * size


def _square(boxes: np.ndarray) -> np.ndarray:
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])[:, None] / 2
    return np.concatenate([centre - half, centre + half], axis=1)


class MtcnnDetector:
    """Faces of at least `min_face` pixels; `thresholds` are the three stages' face probabilities."""

    def __init__(self, min_face: float = 20.0, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.9)):
        folder = weights_folder()
        self.nets = []
        for net, name in ((_PNet(), "pnet"), (_RNet(), "rnet"), (_ONet(), "onet")):
            net.load_state_dict(torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True))
            self.nets.append(net.eval())
        self.min_face, self.thresholds = min_face, thresholds

    @staticmethod
    def _tensor(image: np.ndarray) -> torch.Tensor:
        return (torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1)[None] - 127.5) / 128.0

    def _crops(self, image: torch.Tensor, boxes: np.ndarray, side: int) -> torch.Tensor:
        """Each box cut from the image (zero outside it) and resized to side x side."""
        _, _, h, w = image.shape
        out = []
        for x0, y0, x1, y1 in np.round(boxes).astype(int):
            crop = torch.zeros(1, 3, max(1, y1 - y0), max(1, x1 - x0))
            sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
            if sx1 > sx0 and sy1 > sy0:
                crop[:, :, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[:, :, sy0:sy1, sx0:sx1]
            out.append(F.interpolate(crop, size=(side, side), mode="area"))
        return torch.cat(out)

    @torch.no_grad()
    def detect(self, image: np.ndarray, min_face: float | None = None) -> list[Detection]:
        pnet, rnet, onet = self.nets
        tensor = self._tensor(image)
        h, w = image.shape[:2]
        scale, found = 12.0 / max(12.0, min_face or self.min_face), []
        while min(h, w) * scale >= 12:
            level = F.interpolate(tensor, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
            prob, reg = pnet(level)
            ys, xs = np.nonzero(prob[0].numpy() >= self.thresholds[0])
            if len(ys):
                cells = np.stack([xs, ys, xs, ys], axis=1) * 2.0 + np.array([0, 0, 12, 12])
                boxes = cells / scale
                offsets = reg[0].numpy()[:, ys, xs].T
                scores = prob[0].numpy()[ys, xs]
                keep = nms(boxes, scores, 0.5)
                found.append(np.concatenate([boxes[keep], scores[keep, None], offsets[keep]], axis=1))
            scale *= PYRAMID_FACTOR
        if not found:
            return []
        cand = np.concatenate(found)
        cand = cand[nms(cand[:, :4], cand[:, 4], 0.7)]
        boxes = _square(_refine(cand[:, :4], cand[:, 5:9]))
        for net, side, threshold in ((rnet, 24, self.thresholds[1]), (onet, 48, self.thresholds[2])):
            if not len(boxes):
                return []
            outputs = net(self._crops(tensor, boxes, side))
            prob, reg = outputs[0].numpy(), outputs[1].numpy()
            keep = prob >= threshold
            points = outputs[2].numpy()[keep] if len(outputs) == 3 else None
            boxes, prob, reg = boxes[keep], prob[keep], reg[keep]
            if net is rnet:
                keep = nms(boxes, prob, 0.7)
                boxes = _square(_refine(boxes[keep], reg[keep]))
        size = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)
        landmarks = np.stack([boxes[:, :1] + points[:, :5] * size[:, :1], boxes[:, 1:2] + points[:, 5:] * size[:, 1:]],
                             axis=2)
        boxes = _refine(boxes, reg)
        keep = nms(boxes, prob, 0.7, by_min=True)
        return [Detection(tuple(float(v) for v in boxes[i]), float(prob[i]), Landmarks(INSIGHTFACE5, landmarks[i]))
                for i in keep]
