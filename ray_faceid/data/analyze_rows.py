"""One photo -> one images-table row (+ its faces, + aligned crops). Plain Python: the Ray Data
UDF in ingest.py holds a FaceAnalyzer and calls this for each batch.

Statuses: ok (faces found), no_face, bad_image (undecodable, too large, unsupported), error
(unreadable, or an unexpected failure: recorded with its message, never raised).
"""
from __future__ import annotations

import hashlib
import io
import json
import traceback

import numpy as np
from PIL import Image

from ray_faceid import storage
from ray_faceid.errors import BadImage, FaceIdError
from ray_faceid.face.align import ARCFACE_112, Template, align
from ray_faceid.face.analyzer import FaceAnalyzer
from ray_faceid.face.face import Face

IMAGE_COLUMNS = ("uri", "status", "message", "n_faces", "width", "height", "sha256", "bytes", "faces")


def image_row(uri: str, status: str, message: str = "", sha: str = "", size: int = 0, shape=(0, 0),
              faces: list[dict] | None = None) -> dict:
    return {
        "uri": uri, "status": status, "message": message, "n_faces": len(faces or []), "width": int(shape[1]),
        "height": int(shape[0]), "sha256": sha, "bytes": size, "faces": json.dumps(faces or []),
    }


def crop_uri(dst: str, sha: str, index: int) -> str:
    return storage.join(dst, "crops", sha[:2], f"{sha}_{index}.png")


def own_crop(dataset: str, uri: str) -> str | None:
    """Where a face's crop lies in `dataset`'s own crops folder. The tables record the path the
    crop was written to, which in a copied dataset is the original's: erasing from the copy must
    delete the copy's file, never the original's."""
    _, sep, tail = str(uri).rpartition("/crops/")
    return storage.join(dataset, "crops", tail) if sep else None


def face_record(face: Face, index: int, image: np.ndarray, sha: str, dst: str | None, template: Template) -> dict:
    record = face.to_dict(with_embedding=True)
    record["face_index"] = index
    record["encoder_spec"] = face.spec.model_dump()
    if dst is not None:
        crop, matrix = align(image, face.landmarks, template)
        buf = io.BytesIO()
        Image.fromarray(crop).save(buf, "PNG")
        uri = crop_uri(dst, sha, index)
        storage.write_bytes(uri, buf.getvalue())
        record["crop_uri"] = uri
        record["crop_landmarks"] = face.landmarks.transformed(matrix).points.round(2).tolist()
        record["crop_template"] = template.name
    return record


def analyze_uris(analyzer: FaceAnalyzer, uris: list[str], dst: str | None, template: Template = ARCFACE_112,
                 skip: set[tuple[str, str]] | None = None) -> list[dict]:
    """Rows for `uris`; a (uri, sha256) pair in `skip` was recorded by an earlier run and is left out."""
    rows: dict[int, dict] = {}
    todo: list[tuple[int, str, bytes, str]] = []
    for i, uri in enumerate(uris):
        try:
            data = storage.read_bytes(uri)
        except FaceIdError as exc:
            rows[i] = image_row(uri, "error", exc.message)
            continue
        sha = hashlib.sha256(data).hexdigest()
        if skip and (uri, sha) in skip:
            continue
        todo.append((i, uri, data, sha))
    images: list[tuple[int, str, bytes, str, np.ndarray]] = []
    for i, uri, data, sha in todo:
        try:
            images.append((i, uri, data, sha, analyzer.load(data)))
        except BadImage as exc:
            rows[i] = image_row(uri, "bad_image", exc.message, sha, len(data))
    found = analyzer.analyze_batch([img for *_, img in images], return_errors=True)
    for (i, uri, data, sha, image), faces in zip(images, found):
        try:
            if isinstance(faces, FaceIdError):
                raise faces
            records = [face_record(f, k, image, sha, dst, template) for k, f in enumerate(faces)]
            rows[i] = image_row(uri, "ok" if faces else "no_face", "" if faces else "no face found", sha, len(data),
                                image.shape, records)
        except Exception as exc:  # a job records every failure and goes on
            rows[i] = image_row(uri, "error", f"{type(exc).__name__}: {exc}; {traceback.format_exc(limit=2)}", sha,
                                len(data), image.shape)
    return [rows[i] for i in sorted(rows)]
