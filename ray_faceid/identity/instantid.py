"""InstantID (Wang et al., InstantX/InstantID) from its published files.

Its authors ship two parts:

- `ip-adapter.bin`: `image_proj`, a resampler (learned queries, `latents`, attend over the ArcFace
  embedding projected to their width: `proj_in`, `layers.{i}.{0,1}`, `proj_out`, `norm_out`), and
  `ip_adapter`, the decoupled identity attention of every cross-attention layer (`{2k+1}.to_k_ip` /
  `to_v_ip`, FaceID's numbering), no LoRA. published.py reads it as an IdentityAdapter.
- IdentityNet (`ControlNetModel/`: config.json and weights), a ControlNet that reads the identity
  tokens in place of the text, and an image of the face's five keypoints; its residuals add to the
  UNet's at every step.

Its embeddings are antelopev2's ArcFace (glintr100) as insightface gives them, not unit length; the
unconditional rows of guidance get the tokens of a zero embedding, in the attention and in
IdentityNet alike, as its reference pipeline does.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ray_faceid.errors import BackendUnavailable, BadInput, NotFound, UnsupportedModel
from ray_faceid.identity.face_plus import FacePerceiverResampler
from ray_faceid.weights_hash import weights_hash_of

log = logging.getLogger(__name__)
LICENCE = ("InstantID weights (InstantX/InstantID): Apache-2.0; their face embeddings come from insightface's "
           "antelopev2 pack, for non-commercial research")
NEEDED = "config.json and diffusion_pytorch_model.safetensors of a ControlNetModel (ControlNetModel/ of InstantX/InstantID)"
DEFAULT_SCALE = 0.8  # the authors' examples: IdentityNet's residuals and the identity attention at 0.8
# The five points in insightface's order (the subject's right eye first: the image's left).
FIVE_POINTS = ("right_eye", "left_eye", "nose_tip", "mouth_right", "mouth_left")
LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))  # each eye and mouth corner to the nose
COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))


class InstantIDResampler(FacePerceiverResampler):
    """(B, D) embeddings -> (B, T, C) tokens: T learned queries attend over the embedding."""

    def __init__(self, embed_dim: int, cross_attention_dim: int, num_tokens: int, hidden: int, depth: int, inner: int):
        super().__init__(hidden, depth, inner, embed_dim, cross_attention_dim)
        self.latents = torch.nn.Parameter(torch.zeros(1, num_tokens, hidden))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(embedding.shape[0], -1, -1)
        return super().forward(latents, embedding[:, None].to(latents.dtype))


def keypoint_image(points: np.ndarray, width: int, height: int) -> Image.Image:
    """IdentityNet's conditioning image, drawn as its authors' pipeline draws it: from each eye and
    mouth corner to the nose an ellipse 4 px thick in that point's colour at 60 %, then a disc of
    radius 10 px in full colour on each point, on black. `points`: 5 x 2 pixels, FIVE_POINTS' order."""
    try:
        import cv2
    except ImportError:
        raise BackendUnavailable("InstantID draws its keypoint image with OpenCV: pip install "
                                 "'ray_faceid[insightface]' (antelopev2, its encoder, needs it too)") from None
    limbs = np.zeros((height, width, 3), np.uint8)
    for outer, nose in LIMBS:
        (xa, ya), (xb, yb) = points[outer], points[nose]
        centre = (int((xa + xb) / 2), int((ya + yb) / 2))
        half_length = int(np.hypot(xa - xb, ya - yb) / 2)
        angle = int(np.degrees(np.arctan2(ya - yb, xa - xb)))
        cv2.fillConvexPoly(limbs, cv2.ellipse2Poly(centre, (half_length, 4), angle, 0, 360, 1), COLOURS[outer])
    image = (limbs * 0.6).astype(np.uint8)
    for (x, y), colour in zip(points, COLOURS):
        cv2.circle(image, (int(x), int(y)), 10, colour, -1)
    return Image.fromarray(image)


def features_on_canvas(landmarks, photo_size: tuple[int, int], width: int, height: int) -> np.ndarray:
    """The five points IdentityNet reads (from any landmark scheme: face/landmarks.py names them) of a
    `photo_size` (w, h) photo, placed on a `width` x `height` image holding the photo whole (scaled to
    fit, centred), as fractions of that image: the reference photo's pose in the image made."""
    points = np.stack([landmarks.point(name) for name in FIVE_POINTS])
    scale = min(width / photo_size[0], height / photo_size[1])
    offset = np.array([width - photo_size[0] * scale, height - photo_size[1] * scale]) / 2
    return (points * scale + offset) / np.array([width, height])


def frontal_points(width: int, height: int) -> np.ndarray:
    """A frontal face in the middle of the canvas (ArcFace's template crop at half the shorter side):
    the pose when no photo gives one (an embedding given as a file)."""
    from ray_faceid.face.align import ARCFACE_112

    template = np.array([ARCFACE_112.points[name] for name in FIVE_POINTS])  # a tight 112 px face crop
    return (template - 56.0) * (0.5 * min(width, height) / 112) + np.array([width / 2, height / 2])


def box_points(box: tuple[float, float, float, float], width: int, height: int) -> np.ndarray:
    """A frontal face filling `box` (x0, y0, x1, y1 in pixels) of a `width` x `height` image, as
    fractions of it: the pose of a masked face repainted without one (ArcFace's tight crop template
    scaled to the box's shorter side, centred in it)."""
    from ray_faceid.face.align import ARCFACE_112

    x0, y0, x1, y1 = box
    template = np.array([ARCFACE_112.points[name] for name in FIVE_POINTS])
    points = (template - 56.0) * (min(x1 - x0, y1 - y0) / 112) + np.array([(x0 + x1) / 2, (y0 + y1) / 2])
    return points / np.array([width, height])


def identitynet_config(folder: str, unet_config=None) -> dict:
    """The config of the IdentityNet in `folder` (read without loading it: a Serve config is checked
    before any replica starts), fitting the UNet of `unet_config` where given; NotFound or
    UnsupportedModel in one line naming the files needed, or the base it was made for."""
    root = Path(folder)
    config_file = root / "config.json"
    weights = [p for p in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin") if (root / p).is_file()]
    if not config_file.is_file() or not weights:
        raise NotFound(f"no IdentityNet at {folder}: InstantID needs the folder its authors publish, holding {NEEDED}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise UnsupportedModel(f"{folder}/config.json is not readable JSON ({exc}): give a folder holding {NEEDED}") from None
    if not isinstance(config, dict) or config.get("_class_name") != "ControlNetModel":
        found = config.get("_class_name") if isinstance(config, dict) else None
        raise UnsupportedModel(f"{folder} holds a {found or 'model of no class'}, not a ControlNetModel: give "
                               f"InstantID's IdentityNet folder ({NEEDED})")
    # Its residuals add to the UNet's down and mid blocks: they must have the UNet's blocks and widths.
    layout = ("cross_attention_dim", "in_channels", "block_out_channels", "down_block_types", "layers_per_block",
              "addition_embed_type")
    for key in layout if unet_config is not None else ():
        wanted = unet_config.get(key)
        if key == "in_channels" and wanted == 9:  # an inpainting UNet: IdentityNet reads its 4 latent channels
            wanted = 4
        if _as_list(config.get(key)) != _as_list(wanted):
            raise UnsupportedModel(f"{folder}: an IdentityNet with {key} {config.get(key)}; this base's UNet has "
                                   f"{wanted}: it was made for another base family")
    return config


def _as_list(value):
    """A config value as JSON gives it (a tuple from a live config, a list from a file)."""
    return list(value) if isinstance(value, (list, tuple)) else value


def attach_identitynet(pipe, folder: str | None, scale: float, option: str) -> None:
    """InstantID reads the face through its IdentityNet as well: load it from `folder` beside the
    pipeline's adapter, in the UNet's device and dtype. `option` names where the user gives it
    (--identitynet, identitynet in a config); a folder for another adapter, or none for InstantID, is
    refused in one line."""
    attach_identitynet_to(pipe.adapter, pipe.base.unet, pipe.device, folder, scale, option)


def attach_identitynet_to(adapter, unet, device, folder: str | None, scale: float, option: str) -> None:
    """`attach_identitynet` for an adapter installed in `unet` outside a pipeline (personalize's workers)."""
    if adapter is None or not adapter.kind.identitynet:
        if folder:
            raise BadInput(f"{option} is for InstantID's ip-adapter.bin; this adapter has no IdentityNet")
        return
    if not folder:
        raise BadInput(f"InstantID reads the face through its IdentityNet too: give {option} FOLDER ({NEEDED})")
    adapter.identitynet = IdentityNet(folder, unet, scale).to(device, unet.dtype)


class IdentityNet:
    """InstantID's ControlNet from the folder the user gives (diffusers' ControlNetModel)."""

    def __init__(self, folder: str, unet, scale: float = DEFAULT_SCALE):
        from diffusers import ControlNetModel

        from ray_faceid.quiet import model_loading

        model_loading()
        root = Path(folder)
        identitynet_config(folder, unet.config)
        if not 0.0 <= scale <= 2.0:
            raise BadInput(f"the IdentityNet scale must be between 0 and 2, got {scale}")
        try:
            model, info = ControlNetModel.from_pretrained(root, output_loading_info=True)
        except Exception as exc:  # noqa: BLE001 - a damaged weights file raises many types
            raise UnsupportedModel(f"{folder}: not a loadable ControlNet ({str(exc).splitlines()[0][:120]}): give a "
                                   f"folder holding {NEEDED}") from None
        if info.get("missing_keys"):
            raise UnsupportedModel(f"{folder}: its weights lack {len(info['missing_keys'])} of the ControlNet's "
                                   f"tensors (e.g. {sorted(info['missing_keys'])[0]}): give a folder holding {NEEDED}")
        self.model = model.eval().requires_grad_(False)
        self.scale = scale
        self.folder = str(root)
        self.sha256 = weights_hash_of(self.model)

    def to(self, device, dtype=None) -> "IdentityNet":
        # A dtype only where it changes (diffusers warns of every cast, even to the dtype it has).
        self.model.to(device, None if dtype == self.model.dtype else dtype)
        return self

    def record(self) -> dict:
        """What the provenance says of it: the weights' hash, the scale."""
        return {"weights_sha256": self.sha256, "scale": self.scale, "folder": Path(self.folder).name}

    def residuals(self, sample: torch.Tensor, t, tokens: torch.Tensor, image: torch.Tensor, added: dict | None):
        """(down residuals, mid residual) for the UNet: `tokens` (rows, T, C) in place of the text,
        `image` (rows, 3, H, W) in [0, 1]. An inpainting UNet's extra input channels (mask, masked image)
        are not IdentityNet's: it reads the noisy latents alone."""
        sample = sample[:, : self.model.config.in_channels]
        return self.model(sample, t, encoder_hidden_states=tokens.to(self.model.dtype),
                          controlnet_cond=image.to(self.model.dtype), conditioning_scale=self.scale,
                          added_cond_kwargs=added, return_dict=False)
