"""`ray-faceid demo`: the main job on the embedded default (local Ray, local folders, offline).

1. the face stack on real photos (the ones insightface ships, or --photos DIR: one folder per person);
2. the Ray Data ingest of those photos into a dataset (tables, crops, identities, pairs);
3. the Serve application on loopback: enroll people over HTTP, only from photos of them alone (by
   default Tom Hanks; with --photos every folder that is one person, from their best face crops,
   each other folder named with why it was left out), render one and two of them, print the
   identity scores, write the PNGs;
4. the catalog render job (a single-person, a two-person and an inpaint row) naming the people
   enrolled in 3, then `eval` over its manifest: the metrics table and a contact sheet.
It ends with commands that run as printed (the virtualenv's own `ray-faceid`).

Each stage prints one screen at most: what it did, the key figures, where its outputs are. The
diffusion side runs the tiny untrained components (no base model can be downloaded here), so the
images are noise-like and labelled untrained; the face stack, jobs and API are the real ones.
"""
from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ray_faceid.cli.common import console, user_errors
from ray_faceid.errors import FaceIdError, NotFound


def _analyze(images: list[str]) -> None:
    """One row per photo (faces found, the largest face's size and quality, or why it was skipped)."""
    from ray_faceid.config import DetectionConfig, FaceConfig
    from ray_faceid.face.analyzer import FaceAnalyzer

    analyzer = FaceAnalyzer(FaceConfig(detection=DetectionConfig(policy="all")))
    table = Table(title=f"face encoder {analyzer.spec.key()} ({analyzer.spec.license})", title_justify="left")
    for col in ("photo", "faces", "largest face px", "quality", "note"):
        table.add_column(col, no_wrap=col != "note")
    total = 0
    for name, found in zip(images, analyzer.analyze_batch(images, return_errors=True)):
        if isinstance(found, FaceIdError):
            table.add_row(Path(name).name, "0", "-", "-", found.message)
            continue
        total += len(found)
        largest = max(found, key=lambda f: f.quality["face_px"], default=None)
        table.add_row(Path(name).name, str(len(found)), "-" if largest is None else f"{largest.quality['face_px']:.0f}",
                      "-" if largest is None else f"{largest.quality['score']:.2f}",
                      "" if found else "no face")
    console.print(table)
    console.print(f"{total} face(s) in {len(images)} photo(s); per face details: {_command()} faces analyze PHOTO",
                  highlight=False)


def _dataset_people(dataset: Path, photos: Path, most_photos: int = 10) -> tuple[dict[str, list[bytes]], dict[str, str]]:
    """Every person of an ingest (by folder, most faces first): name -> their best face crops (PNG,
    each from a photo of them alone), and name -> why a folder is left out."""
    from ray_faceid import storage
    from ray_faceid.config import IngestConfig
    from ray_faceid.data import tables
    from ray_faceid.data.pairs import IDENTITIES

    faces = {f["face_id"]: f for f in tables.read_table(str(dataset / tables.FACES)).to_pylist()}
    people = sorted(tables.read_table(str(dataset / IDENTITIES)).to_pylist(), key=lambda r: (-r["n_faces"], r["identity"]))
    chosen, left_out = {}, {}
    for row in people:
        if row.get("flagged"):
            left_out[row["identity"]] = row.get("flagged_reason") or "not one person"
            continue
        best = sorted((faces[i] for i in row["face_ids"] if faces[i].get("crop_uri")), key=lambda f: -(f["q_score"] or 0))
        chosen[row["identity"]] = [storage.read_bytes(f["crop_uri"]) for f in best[:most_photos]]
    extensions = IngestConfig().extensions
    for folder in sorted(p for p in photos.iterdir() if p.is_dir()):
        if folder.name not in chosen and folder.name not in left_out:
            given = [p for p in folder.iterdir() if p.suffix.lower() in extensions]
            left_out[folder.name] = (f"no photo of {len(given)} shows one face alone" if given else "no photos")
    return chosen, left_out


def _photo_counts(photos: Path | None, people: dict[str, list[bytes]]) -> dict[str, int]:
    """Photos given per person: the files in their folder (--photos), else the photos sent."""
    from ray_faceid.config import IngestConfig

    if photos is None:
        return {name: len(sent) for name, sent in people.items()}
    extensions = IngestConfig().extensions
    return {name: sum(p.suffix.lower() in extensions for p in (photos / name).iterdir()) for name in people}


def _command() -> str:
    """How to run ray-faceid as printed: the virtualenv's own script, which works outside it too."""
    import sys

    script = Path(sys.executable).parent / "ray-faceid"
    if not script.exists():
        return "ray-faceid"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def _serve_story(out: Path, people: dict[str, list[bytes]], given: dict[str, int], port: int,
                 untrained: str) -> tuple[str, dict[str, str]]:
    import httpx
    from ray import serve

    from deployments.local import config_from_yaml, start

    registry = out / "registry"  # kept between runs: people enrolled there before stay (same names are replaced)
    url, tokens = start(config_from_yaml(registry=str(registry)), port=port)
    headers = {"Authorization": f"Bearer {next(iter(tokens.values()))}"}
    console.print(f"API up at {url} (docs {url}/docs) while this stage runs; `serve` below keeps one up with its "
                  "web page")
    try:
        with httpx.Client(base_url=url, timeout=300, headers=headers) as client:
            ids = {}
            for name, photos in people.items():
                files = [("photos", (f"{name}_{k}.png", data, "image/png")) for k, data in enumerate(photos)]
                r = client.post("/v1/identities", files=files, data={"consent": "demo-consent-record", "name": name,
                                                                     "name_exists": "replace"})
                r.raise_for_status()
                ids[name] = r.json()["id"]
                console.print(f"enrolled {name}: {ids[name]} ({r.json()['faces_used']} of {given[name]} photos used)")
            names = list(ids)
            # Small sizes: the tiny base attends over every latent pixel, so 128 px takes 10x the time of 64.
            requests = {"single": {"identities": [{"name": names[0], "expression": "smile"}], "width": 64, "height": 64}}
            if len(names) >= 2:
                requests["two"] = {"identities": [{"name": n} for n in names[:2]], "width": 128, "height": 64}
            else:
                console.print("(one person enrolled: the two-person image needs two; run the demo on your own "
                              "people with PHOTOS=DIR, one folder each)")
            table = Table(title="identity scores of the generated images", title_justify="left")
            for col in ("image", "person", "face found", "similarity", "same person"):
                table.add_column(col)
            for label, body in requests.items():
                r = client.post("/v1/generate", json={"prompt": "a portrait photo of a person", "steps": 8, "seed": 7,
                                                      **body})
                r.raise_for_status()
                image = r.json()["images"][0]
                target = out / f"{label}.png"
                target.write_bytes(base64.b64decode(image["png_base64"]))
                for s in image["scores"]:
                    name = next(n for n, i in ids.items() if i == s["id"])
                    sim = "-" if s["similarity"] is None else f"{s['similarity']:.3f}"
                    table.add_row(str(target), name, str(s["face_found"]), sim, str(s["same_person"]))
            console.print(table)
            if untrained:
                console.print(untrained)
    finally:
        serve.shutdown()
        console.print("API stopped (`ray-faceid serve` keeps one up)")
    return next(iter(tokens)), ids


def _render_story(out: Path, tenant: str, ids: dict[str, str], inpaint_photo: str, untrained: str) -> None:
    import json

    import numpy as np
    from PIL import Image

    from ray_faceid.cli.render import eval_table
    from ray_faceid.config import RenderConfig
    from ray_faceid.data.render import run_render
    from ray_faceid.eval.run import default_second_face, evaluate
    from ray_faceid.registry import Registry

    work = out / "catalog"
    work.mkdir(parents=True, exist_ok=True)
    photo = Image.open(inpaint_photo).convert("RGB")
    photo.thumbnail((256, 256))
    photo.save(work / "photo.png")
    mask = np.zeros((photo.height, photo.width), np.uint8)
    mask[photo.height // 5 : photo.height * 4 // 5, photo.width // 5 : photo.width * 4 // 5] = 255
    Image.fromarray(mask).save(work / "mask.png")
    names = list(ids)  # catalogs name people as they were enrolled
    rows = [{"id": "single-smile", "identities": [names[0]], "prompt": "a portrait photo of a person",
             "expression": "smile"}]
    if len(names) >= 2:
        rows.append({"id": "two-people", "identities": names[:2], "prompt": "two people side by side", "size": "128x64"})
    rows.append({"id": "inpaint", "identities": [names[-1]], "prompt": "a person", "image": str(work / "photo.png"),
                 "mask": str(work / "mask.png")})
    (work / "catalog.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rendered = out / "rendered"
    summary = run_render(str(work / "catalog.jsonl"), str(rendered), "tiny", str(out / "registry"),
                         config=RenderConfig(steps=8, size="64x64", workers=1), tenant=tenant)
    console.print(f"rendered {summary['rendered']} of {summary['rows']} catalog rows ({summary['failed']} failed) "
                  f"in {summary['seconds']:.0f} s -> {rendered}/images, manifest.parquet")
    for row_id, error in summary["errors"].items():
        console.print(f"failed {row_id}: {error}")
    second, _ = default_second_face()
    report = evaluate(str(rendered), Registry(str(out / "registry")), tenant, second_face=second)
    console.print(eval_table(report, "eval of the rendered catalog"))
    typer.echo("encoders: " + ", ".join(f"{n} = {m['spec']}" for n, m in report["encoders"].items()))
    if untrained:
        console.print("(found: share of images with a face; untrained base: see stage 3)")
    console.print(f"contact sheet (references and outputs side by side): {report['contact_sheet']}")


def sample_story(samples: list[str]) -> tuple[str, dict[str, list[bytes]], str]:
    """The default demo on insightface's photos: their folder, the people enrolled (Tom Hanks from his
    photo alone; the group photo t1.jpg is analysed, never enrolled) and the photo inpainted."""
    hanks = [s for s in samples if Path(s).name.startswith("Tom_Hanks")]
    if not hanks:
        raise NotFound("no sample photo of Tom Hanks (insightface ships it): install the insightface extra or pass "
                       "--photos DIR")
    return str(Path(hanks[0]).parent), {"tom_hanks": [Path(hanks[0]).read_bytes()]}, hanks[0]


def demo(
    photos: Optional[Path] = typer.Option(None, "--photos", help="Folder of photos; default: the ones insightface ships."),
    out: Path = typer.Option(Path("demo_out"), "--out", help="Where the dataset, registry and images go."),
    port: int = typer.Option(8765, "--port", min=1, max=65535, help="Loopback port of the demo's API."),
):
    """Face stack, Ray Data ingest, the Serve API, catalog render and eval, end to end on the embedded default."""
    import os

    from deployments.local import check_port_free
    from ray_faceid import storage
    from ray_faceid.config import IngestConfig
    from ray_faceid.data.ingest import run_ingest
    from ray_faceid.data.pairs import build_pairs
    from ray_faceid.face.analyzer import sample_images

    through_make = "MAKELEVEL" in os.environ  # `make demo`: its variables, not this command's flags
    with user_errors():
        check_port_free(port, "PORT=" if through_make else "--port")  # before minutes of ingest, not after
        samples = [str(p) for p in sample_images()]
        if photos is None:
            folder, people, inpaint_photo = sample_story(samples)
        else:
            folder = str(photos)
        images = list(storage.list_files(folder, IngestConfig().extensions))
        console.rule("1. face analysis")
        _analyze(images)

        console.rule("2. Ray Data ingest")
        from ray_faceid.data.cluster import init_ray

        init_ray(num_cpus=4)  # one local cluster for ingest and Serve (three deployments hold a CPU each)
        out.mkdir(parents=True, exist_ok=True)
        dataset = out / "dataset"
        shutil.rmtree(dataset, ignore_errors=True)
        summary = run_ingest(folder, str(dataset), IngestConfig(crop_size=256, workers=2), labels="folders")
        grouped = build_pairs(str(dataset))
        console.print(f"{summary['files']} photos -> {summary['faces']} faces, {grouped['identities']} people (by folder), "
                      f"{grouped['pairs']} cross-training pairs in {summary['seconds']:.0f} s -> {dataset}")
        if not grouped["identities"]:
            console.print("  (no people: photos directly in the folder have no name; put each person's photos in a "
                          "folder named after them)")
        for row in summary["not_used"]:  # the first few (the summary keeps NOT_USED_SHOWN)
            console.print(f"  not used {Path(row['uri']).name}: {row['reason']}")
        unused = summary["files"] - summary["status_counts"].get("ok", 0)
        if unused > len(summary["not_used"]):
            console.print(f"  and {unused - len(summary['not_used'])} more not used: every file's status is in "
                          f"{dataset}/images.parquet")

        console.rule("3. Serve: enroll, generate, score")
        untrained = ("the demo's diffusion base is tiny and untrained: its images are noise, so no face is found in "
                     "them and similarity is '-'. With a real base and an identity adapter (--model, --adapter: the "
                     "README's 'Bring published weights'; `ray-faceid stand-ins` tries each layout offline) these "
                     "columns measure identity.")
        if photos is not None:
            people, left_out = _dataset_people(dataset, photos)
            for name, why in left_out.items():
                console.print(f"not enrolled {name}: {why}", highlight=False)
            if not people:
                raise NotFound(f"{photos}: no folder holds photos of one person alone; the demo needs one folder of "
                               "photos per person, named after them")
            inpaint_photo = next(p for p in images if Path(p).parent.name == next(iter(people)))
        tenant, ids = _serve_story(out, people, _photo_counts(photos, people), port, untrained)

        console.rule("4. catalog render and evaluation")
        shutil.rmtree(out / "rendered", ignore_errors=True)
        _render_story(out, tenant, ids, inpaint_photo, untrained)
    registry, first, command = out / "registry", next(iter(ids)), _command()
    console.rule("next")
    console.print(f"outputs in {out}/. Try next (as printed, from this folder):")
    console.print(f"  {command} identities list --registry {registry} --tenant {tenant}", soft_wrap=True, highlight=False)
    console.print(f"  {command} generate --registry {registry} --tenant {tenant} --identity {first} "
                  f"--prompt 'a portrait, smiling' --out {first}.png", soft_wrap=True, highlight=False)
    console.print(f"  {command} serve --registry {registry}   # then open the web page it prints (/ui) and "
                  "sign in with its token", soft_wrap=True, highlight=False)
    console.print("From the tiny base to real images: a diffusers folder (--model) and a published identity adapter "
                  "(--adapter ip-adapter-faceid_sd15.bin): README, 'Bring published weights'.", soft_wrap=True,
                  highlight=False)
