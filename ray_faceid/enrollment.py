"""Which photos an identity may be enrolled from, and why the others are rejected.

One rule set for the HTTP API and the CLI: exactly one face, wide enough, sharp enough.
"""
from __future__ import annotations

from ray_faceid.config import ServeLimits
from ray_faceid.errors import ConsentWithdrawn, ErasedPerson, NameTaken


def rejection(faces: list[dict], limits: ServeLimits) -> str | None:
    """None if the photo's faces (Face.to_dict form) make a usable reference, else the reason."""
    if not faces:
        return "no face found"
    if len(faces) > 1:
        return f"{len(faces)} faces: send photos of this person alone"
    q = faces[0]["quality"]
    if q["face_px"] < limits.min_face_px:
        return f"face too small ({q['face_px']:.0f} px wide; need {limits.min_face_px:.0f})"
    if q["sharpness"] < limits.min_sharpness:
        return f"too blurry (sharpness {q['sharpness']:.0f}; need {limits.min_sharpness:.0f})"
    return None


def enroll_dataset(registry, tenant: str, dataset: str, consent: str, limits: ServeLimits | None = None,
                   reconsent: dict[str, str] | None = None) -> dict:
    """Enroll every identity of an ingest output (after `ray-faceid pairs`) from its best faces.

    Each identity's faces pass the same rules as uploaded photos; its registry name is
    "<identity label>" and its meta records the dataset, so a re-run skips identities already
    enrolled from that dataset, and an erased person is skipped unless `reconsent` gives their label's
    new consent reference. Returns {label: id} for enrolled and {label: reason} for skipped ones."""
    import io
    import json

    import numpy as np
    from PIL import Image

    from ray_faceid import storage
    from ray_faceid.data import tables
    from ray_faceid.data.pairs import IDENTITIES
    from ray_faceid.face.spec import EncoderSpec
    from ray_faceid.registry import REFERENCE_CROP

    limits = limits or ServeLimits()
    spec = EncoderSpec(**json.loads(storage.read_bytes(storage.join(dataset, tables.SUMMARY)))["encoder_spec"])
    faces = {f["face_id"]: f for f in tables.read_table(storage.join(dataset, tables.FACES)).to_pylist()}
    already = {m.get("source", {}).get("identity") for m in registry.list(tenant)
               if m.get("source", {}).get("dataset") == dataset}
    enrolled, skipped = {}, {}
    for row in tables.read_table(storage.join(dataset, IDENTITIES)).to_pylist():
        label = row["identity"]
        if label in already:
            skipped[label] = "already enrolled from this dataset"
            continue
        if row.get("flagged"):  # a folder that is not one person (pairs.folder_problem), or a loose cluster
            skipped[label] = f"flagged: {row.get('flagged_reason') or 'not cohesive'}"
            continue
        usable = [faces[i] for i in row["face_ids"] if faces[i].get("crop_uri")
                  and rejection([{"quality": {k: faces[i][f"q_{k}"] for k in ("face_px", "sharpness")}}], limits) is None]
        usable = sorted(usable, key=lambda f: -(f["q_score"] or 0))[: limits.max_photos]
        if not usable:
            skipped[label] = "no face passes the enrollment rules (size, sharpness)"
            continue
        crops = [np.asarray(Image.open(io.BytesIO(storage.read_bytes(f["crop_uri"]))).convert("RGB")
                            .resize((REFERENCE_CROP, REFERENCE_CROP), Image.Resampling.LANCZOS)) for f in usable]
        photos = [{"index": k, "filename": f["image_uri"], "accepted": True, "reason": None} for k, f in enumerate(usable)]
        try:
            meta = registry.create(tenant, label, consent, np.array([f["embedding"] for f in usable], np.float32),
                                   np.array([f["q_score"] or 0.0 for f in usable], np.float32), spec, crops, photos,
                                   source={"dataset": dataset, "identity": label},
                                   reconsent=(reconsent or {}).get(label))
        except (NameTaken, ErasedPerson, ConsentWithdrawn) as exc:  # this label is skipped, with why; the run goes on
            skipped[label] = exc.message
            continue
        enrolled[label] = meta["id"]
    return {"enrolled": enrolled, "skipped": skipped}


def embed_again(registry, tenant: str, identity: str, analyzer) -> dict:
    """Another encoder's embeddings of an enrolled person, from the reference crops the registry keeps
    (no photo is needed, none is kept): each crop's face through `analyzer`'s face stack, stored beside
    the enrollment's (Registry.add_embeddings), one per crop in the crops' order (personalize and
    FaceID-Portrait pair them), so a crop where it finds no face fails the person, naming it. A person
    enrolled with that encoder already is left as they are ("already": True)."""
    import numpy as np

    from ray_faceid.errors import BadInput, FaceIdError
    from ray_faceid.face.spec import EncoderSpec

    meta = registry.get(tenant, identity)
    who = meta.get("name") or identity
    result = {"id": identity, "name": meta.get("name"), "encoder": analyzer.spec.key()}
    if EncoderSpec(**meta["encoder"]).key() == analyzer.spec.key():
        return dict(result, already=True, faces_used=meta["faces_used"])
    crops = registry.references(tenant, identity)
    found = analyzer.analyze_batch(crops, return_errors=True)
    missing = [k for k, faces in enumerate(found) if isinstance(faces, FaceIdError) or not faces]
    if missing:
        raise BadInput(f"{who}: {analyzer.spec.key()} found no face in reference crop(s) {missing} of {len(crops)}; "
                       "their embeddings must pair with every crop: re-enroll them with this face stack")
    embeddings = np.stack([faces[0].embedding for faces in found])
    quality = np.asarray([faces[0].quality["score"] for faces in found])
    registry.add_embeddings(tenant, identity, embeddings, quality, analyzer.spec)
    return dict(result, already=False, faces_used=len(embeddings))
