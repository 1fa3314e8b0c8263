"""Identity adapter kinds behind one interface: what each reads of a person and how it turns that
into identity tokens, the tokens its unconditional rows take, what sets its token count (rows of
other counts never share a UNet batch), and which people it can put in one image. The pipeline asks the adapter's kind
(`kind_of`) and never which kind it is, so a new kind plugs in here without touching the sampler.

- `fused`: one embedding per person, the references fused by quality (our adapter, IP-Adapter-FaceID);
- `multiref`: every reference read by the mapper (our PVA adapter);
- `per_photo`: each photo its own tokens, concatenated (IP-Adapter-FaceID-Portrait);
- `face_plus`: the fused embedding and the faces' CLIP image features (FaceID-Plus, PlusV2);
- `instantid`: the raw embedding to a resampler; the face's keypoints drive its IdentityNet.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ray_faceid.errors import BadInput
from ray_faceid.identity.expression import EXPRESSION_DIM
from ray_faceid.identity.tokens import fuse_embeddings

if TYPE_CHECKING:
    from ray_faceid.identity.adapter import IdentityAdapter
    from ray_faceid.pipelines.generate import IdentityCondition, IdentityPipeline


class AdapterKind:
    """The default: one fused embedding per person, read by every path."""

    name = "fused"
    identitynet = False
    """Whether the kind drives an IdentityNet beside the UNet (its residuals added at every step)."""
    per_photo = False
    """Whether each photo of a person gives its own tokens (training conditions on them so: personalize)."""

    def __init__(self, adapter: IdentityAdapter):
        self.adapter = adapter

    def tokens(self, pipe: IdentityPipeline, ident: IdentityCondition, emb: torch.Tensor,
               code: torch.Tensor | None) -> torch.Tensor:
        """(1, T, C) tokens of one person from their (R, D) reference embeddings; `code`: the
        expression code asked for (None: none)."""
        q = None if ident.quality is None else torch.as_tensor(ident.quality, dtype=emb.dtype, device=emb.device)
        expression = code if self.adapter.options.expression_dim == EXPRESSION_DIM else None
        fused = pipe.edited(ident, emb, fuse_embeddings(emb, q))
        return self.adapter.tokens(fused.unsqueeze(0), expression=expression)

    def zero_tokens(self, pipe: IdentityPipeline, dtype: torch.dtype) -> torch.Tensor:
        """(1, T, C) tokens of a zero embedding: the unconditional rows of adapters whose reference
        pipeline guides against them."""
        return self.adapter.tokens(torch.zeros(1, self.adapter.encoder_spec.dim, dtype=dtype, device=pipe.device))

    def token_counts(self, identities: list[IdentityCondition]) -> tuple:
        """What sets an image's token count beyond the adapter (empty: nothing)."""
        return ()

    def check_people(self, identities: list[IdentityCondition]) -> None:
        """People (and what each asks for) this kind cannot make into one image: BadInput naming why.
        Checked per row or request before a batch runs: one request's refusal never fails the others."""
        if not self.identitynet and any(person.pose is not None for person in identities):
            raise BadInput("pose is for InstantID (its IdentityNet reads the face's keypoints); this adapter has none")


class MultiRefKind(AdapterKind):
    name = "multiref"

    def tokens(self, pipe, ident, emb, code):
        return self.adapter.tokens(pipe.edited(ident, emb).unsqueeze(0))


class PerPhotoKind(AdapterKind):
    """FaceID-Portrait: each reference photo's own tokens, in photo order."""

    name = "per_photo"
    per_photo = True

    def tokens(self, pipe, ident, emb, code):
        # torch.compile and ONNX Runtime key their graphs by the token count (a new count compiles or
        # exports once); a TensorRT plan is built for one count (not checked on others yet).
        if pipe.backend == "tensorrt" and emb.shape[0] != 1:
            raise BadInput(f"identity {ident.name}: FaceID-Portrait with {emb.shape[0]} photos gives "
                           f"{emb.shape[0]} sets of tokens; a TensorRT plan holds one: use --backend torch, "
                           "torch.compile or onnxruntime")
        t = self.adapter.tokens(emb)
        return t.reshape(1, -1, t.shape[-1])

    def token_counts(self, identities):
        return tuple(len(np.atleast_2d(person.embeddings)) for person in identities)

    def check_people(self, identities):
        super().check_people(identities)
        for person in identities:
            if person.edits:
                raise BadInput(f"identity {person.name}: attribute edits act on one fused embedding; FaceID-Portrait "
                               "reads each photo's own")
        counts = list(self.token_counts(identities))
        if len(set(counts)) > 1:
            raise BadInput("FaceID-Portrait gives tokens per photo: every person in one image needs the same number "
                           f"of photos (got {counts})")


class FacePlusKind(AdapterKind):
    """FaceID-Plus / PlusV2: the fused embedding and the mean CLIP image features of the person's faces."""

    name = "face_plus"

    def tokens(self, pipe, ident, emb, code):
        fused = pipe.edited(ident, emb, fuse_embeddings(emb))
        return self.adapter.tokens(fused.unsqueeze(0), image_features=self._image_features(pipe, ident, emb.dtype))

    def _image_features(self, pipe, ident, dtype) -> torch.Tensor:
        """(1, S, H): the mean CLIP image features of the identity's reference faces."""
        if ident.image_features is None:
            raise BadInput(f"identity {ident.name}: {self.adapter.published['variant']} reads the face's CLIP image "
                           "features as well as its embedding: give reference photos or an enrolled person, and the CLIP "
                           "image encoder (--image-encoder FOLDER; image_encoder in a Serve config)")
        features = torch.as_tensor(np.asarray(ident.image_features), dtype=dtype, device=pipe.device)
        want = self.adapter.mapper.feature_dim
        if features.ndim != 3 or features.shape[-1] != want:
            raise BadInput(f"identity {ident.name}: image features of shape {tuple(features.shape)}; the adapter "
                           f"reads R x S x {want} (its CLIP image encoder's hidden states)")
        return features.mean(dim=0, keepdim=True)

    def zero_tokens(self, pipe, dtype):
        """The zero embedding with the features of an empty image, as its pipeline guides."""
        if self.adapter.image_encoder is None:
            raise BadInput("FaceID-Plus guides against its CLIP image encoder's features of an empty image: give "
                           "--image-encoder FOLDER")
        negative = self.adapter.image_encoder.negative().to(pipe.device, dtype)
        empty = torch.zeros(1, self.adapter.encoder_spec.dim, dtype=dtype, device=pipe.device)
        return self.adapter.tokens(empty, image_features=negative)


class InstantIdKind(AdapterKind):
    """InstantID: the raw (not unit) embedding, as its pipeline gives it; its IdentityNet reads one
    face's tokens and keypoints per image (the pose a row or request gives, else a frontal face)."""

    name = "instantid"
    identitynet = True

    def tokens(self, pipe, ident, emb, code):
        return self.adapter.tokens(emb.mean(0, keepdim=True))

    def check_people(self, identities):
        for person in identities:
            if person.edits:
                raise BadInput(f"identity {person.name}: attribute edits act on a unit embedding; InstantID reads the "
                               "raw one")
        if len(identities) > 1:
            raise BadInput(f"InstantID's IdentityNet reads one face's tokens and keypoints: one person per image "
                           f"(got {len(identities)})")


def kind_of(adapter: IdentityAdapter) -> AdapterKind:
    """The kind of a loaded adapter, from its mapper and its published record."""
    if (adapter.published or {}).get("per_photo"):
        return PerPhotoKind(adapter)
    kinds = {"multiref": MultiRefKind, "face_plus": FacePlusKind, "instantid": InstantIdKind}
    return kinds.get(adapter.options.mapper, AdapterKind)(adapter)
