"""The CLIP image encoder FaceID-Plus / PlusV2 read a face through (and the FLUX IP-Adapter a photo:
`image_embeds`), from a folder the user gives.

IP-Adapter-FaceID-Plus takes, besides the ArcFace embedding, the penultimate hidden states of a CLIP
vision transformer (CLIP-ViT-H-14, laion2B: the `models/image_encoder` folder its authors publish)
over the face aligned on the ArcFace template at 224 px. Its reference pipeline guides classifier-
free guidance against the features of an all-zero image (zero after the processor's normalisation).
Nothing is downloaded: a folder without the weights fails in one line naming the files needed.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ray_faceid.errors import NotFound, UnsupportedModel
from ray_faceid.face.align import ARCFACE_112, Template, align, loose_template, template_transform, warp
from ray_faceid.weights_hash import weights_hash_of

log = logging.getLogger(__name__)
CROP = 224
# insightface's norm_crop at 224: the ArcFace template scaled by 224 / 112 (no shift).
ARCFACE_224 = Template("arcface_224", CROP, {n: (x * CROP / 112, y * CROP / 112) for n, (x, y) in ARCFACE_112.points.items()})
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
NEEDED = "config.json and model.safetensors (or pytorch_model.bin) of a CLIPVisionModel(WithProjection)"


def check_folder(folder: str) -> Path:
    """The folder, if it holds a CLIP vision model's files (read without loading them)."""
    root = Path(folder)
    if not (root / "config.json").is_file() or not any((root / w).is_file() for w in WEIGHTS):
        raise NotFound(f"no CLIP image encoder at {folder}: FaceID-Plus needs the folder its authors publish "
                       f"(models/image_encoder of h94/IP-Adapter, CLIP-ViT-H-14) holding {NEEDED}")
    return root


class ClipImageEncoder:
    def __init__(self, folder: str, device: str | torch.device = "cpu"):
        from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

        try:  # the processor without torchvision (which we do not install), named so it says nothing
            from transformers import CLIPImageProcessorPil as CLIPImageProcessor
        except ImportError:
            from transformers import CLIPImageProcessor

        from ray_faceid.quiet import model_loading

        model_loading()
        root = check_folder(folder)
        try:
            config = CLIPVisionConfig.from_pretrained(root)
            with_projection = any("WithProjection" in a for a in (config.architectures or []))
            cls = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
            model, info = cls.from_pretrained(root, output_loading_info=True)
        except Exception as exc:  # noqa: BLE001 - a damaged config or weights file raises many types
            raise UnsupportedModel(f"{folder}: not a loadable CLIP vision model ({str(exc).splitlines()[0][:120]}): "
                                   f"give a folder holding {NEEDED}") from None
        if info.get("missing_keys"):  # weights of another model: transformers would fill them at random
            raise UnsupportedModel(f"{folder}: its weights lack {len(info['missing_keys'])} of the model's tensors "
                                   f"(e.g. {sorted(info['missing_keys'])[0]}): give a folder holding {NEEDED}")
        self.model = model.eval().to(device)
        self.model.requires_grad_(False)
        # The authors' folder has no processor config; their pipeline uses CLIP's defaults (OpenAI's mean/std)
        # at the model's own input size (224 px for theirs).
        has_processor = (root / "preprocessor_config.json").is_file()
        side = model.config.image_size
        self.processor = CLIPImageProcessor.from_pretrained(root) if has_processor else CLIPImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        self.folder = str(root)
        self.sha256 = weights_hash_of(self.model)
        self._negative: torch.Tensor | None = None

    @property
    def feature_dim(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def _hidden(self, pixels: torch.Tensor) -> torch.Tensor:
        weight = next(self.model.parameters())
        return self.model(pixels.to(weight.device, weight.dtype), output_hidden_states=True).hidden_states[-2].float()

    def features(self, crops: list[np.ndarray]) -> np.ndarray:
        """(R, S, H) penultimate hidden states of R aligned 224 px RGB face crops."""
        pixels = self.processor(images=list(crops), return_tensors="pt").pixel_values
        return self._hidden(pixels).cpu().numpy()

    @torch.no_grad()
    def image_embeds(self, images: list[np.ndarray]) -> np.ndarray:
        """(R, P) projected image embeddings of R RGB images, each read whole as the processor resizes
        and crops it (what image IP-Adapters take, e.g. the FLUX IP-Adapter: identity/flux_adapter.py)."""
        if not hasattr(self.model, "visual_projection"):
            raise UnsupportedModel(f"{self.folder} is a CLIPVisionModel without its projection: image embeddings need a "
                                   "CLIPVisionModelWithProjection folder (e.g. openai/clip-vit-large-patch14's)")
        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values
        weight = next(self.model.parameters())
        return self.model(pixels.to(weight.device, weight.dtype)).image_embeds.float().cpu().numpy()

    def enrolled_features(self, references: list[np.ndarray]) -> np.ndarray:
        """`features` of an enrolled person, from the reference crops the registry keeps."""
        return self.features([face_crop_from_reference(r) for r in references])

    def negative(self) -> torch.Tensor:
        """(1, S, H): the features classifier-free guidance guides against (an all-zero processed image)."""
        if self._negative is None:
            shape = self.processor(images=[np.zeros((CROP, CROP, 3), np.uint8)], return_tensors="pt").pixel_values.shape
            self._negative = self._hidden(torch.zeros(shape))
        return self._negative


def face_crop(image: np.ndarray, landmarks) -> np.ndarray:
    """The face aligned as FaceID-Plus's reference pipelines crop it for CLIP: insightface's
    norm_crop at 224 px of an OpenCV (BGR) image, handed to the processor as it is, so its channels
    reach CLIP in BGR order. Ours are RGB: reversed here to give the reference's input."""
    return np.ascontiguousarray(align(image, landmarks, ARCFACE_224)[0][..., ::-1])


def face_crop_from_reference(reference: np.ndarray) -> np.ndarray:
    """`face_crop` of an enrolled person, from a reference crop the registry keeps (RGB, the face on
    the loose diffusion template: registry.REFERENCE_CROP px) instead of the photo, which is not
    kept. The face spans about 160 of the reference's 256 px, so CLIP reads it slightly softer than
    from the photo (tests/identity/test_face_plus.py measures how close the two crops are)."""
    matrix = template_transform(loose_template(reference.shape[0]), ARCFACE_224)
    return np.ascontiguousarray(warp(reference, matrix, CROP)[..., ::-1])
