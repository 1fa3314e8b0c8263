"""`ray-faceid eval`: identity metrics over generated images, with the conditioning encoder and,
when configured, a second independent one (scoring only with the encoder the method was
conditioned on flatters it).

Input: a render output (its manifest.parquet says which identities each image should show), or a
folder of images that should all show the identities given. Per encoder: identity similarity
(mean, p10), detection rate, leakage on multi-identity images. The second encoder's reference
embeddings come from the registry's reference crops, analysed by that encoder.
"""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from ray_faceid import storage
from ray_faceid.config import SCORING_FACE, FaceConfig
from ray_faceid.errors import BadInput, FaceIdError
from ray_faceid.eval.identity import score_output

SHEET, REPORT = "contact_sheet.png", "eval.json"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def _targets(source: str, identities: list[str] | None) -> list[dict]:
    """[{id, image_uri, identities}] of the images to score."""
    manifest = storage.join(source, "manifest.parquet")
    if storage.exists(manifest):
        from ray_faceid.data import tables

        rows = [r for r in tables.read_table(manifest).to_pylist() if r["status"] == "ok"]
        return [{"id": r["id"], "image_uri": r["output_uri"],
                 "identities": [i["name"] for i in json.loads(r["provenance"])["identities"]]} for r in rows]
    if not identities:
        raise BadInput(f"{source} has no manifest.parquet: pass --identities ID[,ID] that every image should show")
    uris = sorted(storage.list_files(source, IMAGE_EXTENSIONS))
    if not uris:
        raise BadInput(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {source}")
    return [{"id": u.rsplit("/", 1)[-1], "image_uri": u, "identities": list(identities)} for u in uris]


def render_notes(source: str) -> dict:
    """What a reader of the scores needs to know about the render behind them: rows that failed
    (not scored) and whether an untrained smoke-test base made the images."""
    manifest = storage.join(source, "manifest.parquet")
    if not storage.exists(manifest):
        return {"failed_rows": 0, "untrained_base": False}
    from ray_faceid.data import tables

    rows = tables.read_table(manifest).to_pylist()
    made = [json.loads(r["provenance"]) for r in rows if r["status"] == "ok" and r.get("provenance")]
    return {"failed_rows": sum(r["status"] != "ok" for r in rows),
            "untrained_base": any(p.get("untrained_base") for p in made)}


def _references(analyzer, registry, tenant: str, identity: str) -> np.ndarray | None:
    """The identity's reference embeddings in this analyzer's space (None: no usable reference)."""
    embeddings, _, spec = registry.embeddings(tenant, identity)
    if spec.key() == analyzer.spec.key():
        return embeddings
    found = [faces[0].embedding for faces in analyzer.analyze_batch(registry.references(tenant, identity)) if faces]
    return np.stack(found) if found else None


def _metrics(scores: list[dict]) -> dict:
    sims = np.array([s["similarity"] for s in scores if s and s["similarity"] is not None])
    multi = [s for s in scores if s and len(s["identities"]) > 1]
    leak = [s["leakage"] for s in multi if s["leakage"] is not None]
    return {
        "images": len(scores),
        "detection_rate": sum(bool(s and s["face_found"]) for s in scores) / len(scores) if scores else None,
        "similarity_mean": float(sims.mean()) if sims.size else None,
        "similarity_p10": float(np.percentile(sims, 10)) if sims.size else None,
        "multi_identity_images": len(multi),
        "leakage_mean": float(np.mean(leak)) if leak else None,
        "leakage_max": float(np.max(leak)) if leak else None,
    }


def default_second_face() -> tuple[FaceConfig | None, str]:
    """The independent recogniser eval scores with unless told otherwise: SFace where installed
    (trained apart from dlib's ResNet, which conditions generation), and a line saying which."""
    from ray_faceid.face.backends.sface_encoder import sface_available

    why_not = sface_available()
    if why_not:
        return None, f"no second recogniser ({why_not})"
    return SCORING_FACE.model_copy(update={"recognizer": "sface"}), "second recogniser: SFace (OpenCV Zoo)"


def evaluate(source: str, registry, tenant: str = "default", identities: list[str] | None = None,
             face: FaceConfig | None = None, second_face: FaceConfig | None = None, out: str | None = None,
             sheet_rows: int = 24) -> dict:
    from ray_faceid.eval.contact_sheet import contact_sheet
    from ray_faceid.face.analyzer import FaceAnalyzer

    targets = _targets(source, identities)
    if not targets:
        raise BadInput(f"{source}: no generated images to evaluate (a render output whose rows all failed, or a "
                       "folder without images): nothing was scored")
    encoders = {"conditioning": FaceAnalyzer(face or SCORING_FACE)}
    if second_face is not None:
        encoders["second"] = FaceAnalyzer(second_face)
        if encoders["second"].spec.key() == encoders["conditioning"].spec.key():
            raise BadInput("the second encoder is the conditioning encoder: configure an independent recogniser")
    wanted = sorted({i for t in targets for i in t["identities"]})
    ids = {i: registry.resolve(tenant, i) for i in wanted}  # catalogs may name people or give their ids
    refs = {name: {i: _references(a, registry, tenant, ids[i]) for i in wanted} for name, a in encoders.items()}
    per_row, scores = [], {name: [] for name in encoders}
    for target in targets:
        image = np.asarray(Image.open(io.BytesIO(storage.read_bytes(target["image_uri"]))).convert("RGB"))
        row = {"id": target["id"], "image_uri": target["image_uri"], "identities": target["identities"]}
        for name, analyzer in encoders.items():
            try:
                faces = analyzer.analyze(image)
            except FaceIdError:
                faces = []
            usable = {i: refs[name][i] for i in target["identities"] if refs[name][i] is not None}
            row[name] = score_output(faces, usable)
            scores[name].append(row[name])
        per_row.append(row)
    report = {"source": source, "encoders": {name: {"spec": a.spec.key(), **_metrics(scores[name])}
                                             for name, a in encoders.items()}, "rows": per_row,
              "render": render_notes(source)}
    out = out or source
    registry.record_output(tenant, out)  # the sheet shows reference crops: erasing a person reaches it
    storage.write_bytes(storage.join(out, REPORT), json.dumps(report, indent=2).encode())
    sheet = []
    for row in per_row[:sheet_rows]:
        crops = [(registry.get(tenant, ids[i]).get("name") or i, registry.references(tenant, ids[i])[0])
                 for i in row["identities"]]
        scores_lines = [f"{n} sim {row[n]['similarity']:.2f}" if row[n]["similarity"] is not None
                        else f"{n} no face" for n in encoders]
        image = Image.open(io.BytesIO(storage.read_bytes(row["image_uri"])))
        sheet.append({"references": crops, "output": image, "label": "\n".join([row["id"], *scores_lines])})
    buf = io.BytesIO()
    contact_sheet(sheet).save(buf, "PNG")
    storage.write_bytes(storage.join(out, SHEET), buf.getvalue())
    report["contact_sheet"] = storage.join(out, SHEET)
    return report
