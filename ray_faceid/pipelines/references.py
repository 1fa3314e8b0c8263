"""Reference photos -> the embeddings an identity is conditioned on, through the face stack."""
from __future__ import annotations

import numpy as np

from ray_faceid.errors import NoFace
from ray_faceid.face.analyzer import FaceAnalyzer


def embed_references(analyzer: FaceAnalyzer, images: list, names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(R, D) embeddings and (R,) quality scores of the largest face of each reference photo.
    A photo without a face is an error naming it (an identity must not silently lose a reference)."""
    names = names or [str(i) for i in images]
    embeddings, quality = [], []
    for name, faces in zip(names, analyzer.analyze_batch(list(images))):
        if not faces:
            raise NoFace(f"{name}: no face found; use a photo where the face is visible and at least ~40 px wide")
        embeddings.append(faces[0].embedding)
        quality.append(faces[0].quality["score"])
    return np.stack(embeddings), np.asarray(quality, dtype=np.float32)


def reference_crops(analyzer: FaceAnalyzer, images: list, names: list[str] | None = None) -> list[np.ndarray]:
    """The largest face of each reference photo aligned at 224 px as FaceID-Plus reads it through CLIP
    (face/clip_image.py): the same face embed_references embeds."""
    from ray_faceid.face.clip_image import face_crop

    names = names or [str(i) for i in images]
    crops = []
    for name, image in zip(names, images):
        pixels = analyzer.load(image)
        faces = analyzer.analyze(pixels)
        if not faces:
            raise NoFace(f"{name}: no face found; use a photo where the face is visible and at least ~40 px wide")
        crops.append(face_crop(pixels, faces[0].landmarks))
    return crops


def reference_pose(analyzer: FaceAnalyzer, image, width: int, height: int, name: str | None = None) -> np.ndarray:
    """InstantID's pose from a photo: its largest face's five keypoints placed on a `width` x `height`
    image holding the photo whole (5 x 2, fractions of the image; identity/instantid.py)."""
    from ray_faceid.identity.instantid import features_on_canvas

    pixels = analyzer.load(image)
    faces = analyzer.analyze(pixels)
    if not faces:
        raise NoFace(f"{name or image}: no face found; use a photo where the face is visible and at least ~40 px wide")
    return features_on_canvas(faces[0].landmarks, (pixels.shape[1], pixels.shape[0]), width, height)
