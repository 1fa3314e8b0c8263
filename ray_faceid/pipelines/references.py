"""Reference photos -> the embeddings an identity is conditioned on, through the face stack."""
from __future__ import annotations

import itertools
import logging

import numpy as np

from ray_faceid.errors import BadInput, NoFace
from ray_faceid.face.analyzer import FaceAnalyzer

log = logging.getLogger(__name__)

# A face at least this fraction of the largest one's width is someone the photo may be of: a group
# photo is refused rather than read as its largest face (a small face in the background is not).
ALSO_A_SUBJECT = 0.5


def every_face_analyzer() -> FaceAnalyzer:
    """The default face stack reading every face of a photo, so `the_face` can refuse a group photo."""
    from ray_faceid.config import DetectionConfig, FaceConfig

    return FaceAnalyzer(FaceConfig(detection=DetectionConfig(policy="all")))


def the_face(faces: list, name: str):
    """The one person a reference photo shows (faces largest first, from an analyzer whose policy is
    'all'); no face, or several of much the same size, is an error naming the photo."""
    if not faces:
        raise NoFace(f"{name}: no face found; use a photo where the face is visible and at least ~40 px wide")
    subjects = [f for f in faces if f.width >= ALSO_A_SUBJECT * faces[0].width]
    if len(subjects) > 1:
        raise BadInput(f"{name}: {len(subjects)} faces of much the same size: whose? give a photo of the person "
                       "alone, or crop this one to their face")
    return faces[0]


def embed_references(analyzer: FaceAnalyzer, images: list, names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(R, D) embeddings and (R,) quality scores of the face of each reference photo. A photo without
    a face, or of several people, is an error naming it (an identity must not silently lose a reference,
    nor take someone else's)."""
    names = names or [str(i) for i in images]
    embeddings, quality = [], []
    for name, faces in zip(names, analyzer.analyze_batch(list(images))):
        face = the_face(faces, name)
        embeddings.append(face.embedding)
        quality.append(face.quality["score"])
    _say_strangers(analyzer, names, embeddings)
    return np.stack(embeddings), np.asarray(quality, dtype=np.float32)


def _say_strangers(analyzer: FaceAnalyzer, names: list[str], embeddings: list) -> None:
    """Said, not refused (one person's photos years apart may fail the check): the photos the face
    stack does not verify as the others' person, the odd ones out by name, once each."""
    misses: dict[str, list[str]] = {name: [] for name in names}
    for (a, ea), (b, eb) in itertools.combinations(zip(names, embeddings), 2):
        if not analyzer.verify(ea, eb)[0]:
            misses[a].append(b)
            misses[b].append(a)
    worst = max((len(v) for v in misses.values()), default=0)
    if not worst:
        return
    check = f"the {analyzer.spec.name} check at distance {analyzer.threshold:.2f}"
    odd = [name for name, missed in misses.items() if len(missed) == worst]
    if len(odd) == len(names):  # no odd one out: every photo fails against another
        log.warning("%s may not show one person (%s): the person's identity is read from all of them together; "
                    "check the photos", " and ".join(names) if len(names) == 2 else ", ".join(names), check)
        return
    for name in odd:
        log.warning("%s may not show the person of %s (%s): the person's identity is read from all the photos "
                    "together; check it", name, ", ".join(misses[name]), check)


def reference_crops(analyzer: FaceAnalyzer, images: list, names: list[str] | None = None) -> list[np.ndarray]:
    """The face of each reference photo aligned at 224 px as FaceID-Plus reads it through CLIP
    (face/clip_image.py): the same face embed_references embeds."""
    from ray_faceid.face.clip_image import face_crop

    names = names or [str(i) for i in images]
    crops = []
    for name, image in zip(names, images):
        pixels = analyzer.load(image)
        crops.append(face_crop(pixels, the_face(analyzer.analyze(pixels), name).landmarks))
    return crops


def reference_pose(analyzer: FaceAnalyzer, image, width: int, height: int, name: str | None = None) -> np.ndarray:
    """InstantID's pose from a photo: its face's five keypoints placed on a `width` x `height`
    image holding the photo whole (5 x 2, fractions of the image; identity/instantid.py)."""
    from ray_faceid.identity.instantid import features_on_canvas

    pixels = analyzer.load(image)
    face = the_face(analyzer.analyze(pixels), name or str(image))
    return features_on_canvas(face.landmarks, (pixels.shape[1], pixels.shape[0]), width, height)
