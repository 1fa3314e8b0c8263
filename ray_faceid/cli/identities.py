"""`ray-faceid identities enroll|list|embed|show|delete|rotate-secret|move-secret-out`: the identity registry
from the command line."""
from __future__ import annotations

import json
from typing import Optional

import typer

from ray_faceid.cli.common import console, print_json, user_errors

app = typer.Typer(help="The identity registry: enroll people from photos, list, show, delete.", no_args_is_help=True)
RegistryOpt = typer.Option("./faceid_registry", "--registry", help="Registry store: a folder or fsspec URI.")
TenantOpt = typer.Option("default", "--tenant", help="Tenant that owns the identities.")


@app.command()
def enroll(
    photos: list[str] = typer.Argument(..., help="1-10 photos of the person alone."),
    consent: str = typer.Option(..., "--consent", help="Reference to the person's recorded consent."),
    name: str = typer.Option("", "--name", help="The person's name, unique per tenant: generate --identity NAME, "
                             "catalogs and the API then find them by it."),
    name_exists: str = typer.Option("refuse", "--name-exists", help="When the name is taken: refuse | rename "
                                    "(adds a suffix) | replace (erases the identity holding it)."),
    reconsent: str = typer.Option(None, "--reconsent", help="For a person erased before: the new consent "
                                  "reference they gave (without it, an erased person is refused)."),
    face_backend: str = typer.Option("dlib", "--face-backend", help="dlib (default) | insightface: the face stack "
                                     "that finds and embeds the faces (a published IP-Adapter-FaceID or InstantID "
                                     "file takes insightface's ArcFace; `identities embed` adds another stack's later)."),
    insightface_root: Optional[str] = typer.Option(None, "--insightface-root", help="An insightface pack folder "
                                                   "(its .onnx files; the packs are non-commercial)."),
    registry: str = RegistryOpt,
    tenant: str = TenantOpt,
):
    """Enroll one person; prints the new id, and the reason for every rejected photo."""
    import numpy as np

    from ray_faceid.cli.faces import face_config, face_stack
    from ray_faceid.config import ServeLimits
    from ray_faceid.enrollment import rejection
    from ray_faceid.errors import BadInput, FaceIdError
    from ray_faceid.face.align import align, loose_template
    from ray_faceid.face.analyzer import FaceAnalyzer
    from ray_faceid.registry import REFERENCE_CROP, Registry

    with user_errors():
        limits = ServeLimits()
        if not 1 <= len(photos) <= limits.max_photos:
            raise BadInput(f"give between 1 and {limits.max_photos} photos, got {len(photos)}")
        analyzer = FaceAnalyzer(face_config(face_stack(face_backend, insightface_root), insightface_root, True, "all"))
        reports, embeddings, quality, crops = [], [], [], []
        for i, (path, found) in enumerate(zip(photos, analyzer.analyze_batch(photos, return_errors=True))):
            faces = [] if isinstance(found, FaceIdError) else found
            # A read error names the file itself; the report names it once.
            reason = (found.message.removeprefix(f"{path}: ") if isinstance(found, FaceIdError)
                      else rejection([f.to_dict() for f in faces], limits))
            reports.append({"index": i, "filename": path, "accepted": reason is None, "reason": reason})
            if reason is None:
                embeddings.append(faces[0].embedding)
                quality.append(faces[0].quality["score"])
                crops.append(align(analyzer.load(path), faces[0].landmarks, loose_template(REFERENCE_CROP))[0])
            else:
                typer.echo(f"rejected {path}: {reason}")
        if not embeddings:
            raise BadInput("no usable photo: " + "; ".join(f"{r['filename']}: {r['reason']}" for r in reports))
        meta = Registry(registry).create(tenant, name, consent, np.stack(embeddings), np.array(quality), analyzer.spec,
                                         crops, reports, name_exists=name_exists, reconsent=reconsent)
    called = f" as {meta['name']!r}" if meta["name"] else ""
    typer.echo(f"enrolled {meta['id']}{called} ({meta['faces_used']} of {len(photos)} photos used)")


@app.command("enroll-dataset")
def enroll_dataset(
    dataset: str = typer.Argument(..., help="An ingest output (after `ray-faceid pairs`)."),
    consent: str = typer.Option(..., "--consent", help="Reference to the consent / licence covering the dataset's people."),
    reconsent: list[str] = typer.Option([], "--reconsent", help="LABEL=REF: re-enroll a person erased before, under "
                                        "the new consent reference they gave (repeat per person). Erased people "
                                        "are skipped otherwise, so scheduled re-runs never bring them back."),
    registry: str = RegistryOpt,
    tenant: str = TenantOpt,
):
    """Enroll every identity of an ingest output from its best faces (re-runs skip those enrolled and
    those erased)."""
    from ray_faceid.enrollment import enroll_dataset as enroll_all
    from ray_faceid.errors import BadInput
    from ray_faceid.registry import Registry

    with user_errors():
        bad = [r for r in reconsent if "=" not in r or not r.split("=", 1)[0].strip() or not r.split("=", 1)[1].strip()]
        if bad:
            raise BadInput(f"--reconsent takes LABEL=REF (the person's dataset label, their new consent), got {bad[0]!r}")
        given = dict(r.split("=", 1) for r in reconsent)
        result = enroll_all(Registry(registry), tenant, dataset, consent, reconsent=given)
    for label, identity in result["enrolled"].items():
        typer.echo(f"enrolled {label}: {identity}")
    for label, reason in result["skipped"].items():
        typer.echo(f"skipped {label}: {reason}")


@app.command("list")
def list_identities(registry: str = RegistryOpt, tenant: str = TenantOpt, as_json: bool = typer.Option(False, "--json")):
    """Identities of a tenant (metadata only)."""
    from ray_faceid.registry import Registry

    with user_errors():
        rows = Registry(registry).require().list(tenant)
    if as_json:
        print_json(rows)
        return
    if not rows:  # an empty answer looked like a command that did nothing
        tenants = Registry(registry).tenants()
        others = f" (tenants with people here: {', '.join(tenants)}; pick one with --tenant)" if tenants else ""
        console.print(f"no identities for tenant {tenant!r} in {registry}{others}", soft_wrap=True, highlight=False)
    for meta in sorted(rows, key=lambda m: ((m["name"] or "").casefold(), m["id"])):  # as people look them up: by name
        console.print(f"{meta['id']}  {meta['name'] or '-'}  faces={meta['faces_used']}  created={meta['created']}")


@app.command()
def embed(
    people: list[str] = typer.Argument(None, help="Names or ids; default: every person of the tenant."),
    face_backend: str = typer.Option("insightface", "--face-backend", help="dlib | insightface: the face stack whose "
                                     "embeddings an adapter needs (IP-Adapter-FaceID: insightface's buffalo_l)."),
    insightface_root: Optional[str] = typer.Option(None, "--insightface-root", help="An insightface pack folder "
                                                   "(its .onnx files; the packs are non-commercial)."),
    recognizer_onnx: Optional[str] = typer.Option(None, "--recognizer-onnx", help="An ArcFace-shaped ONNX model "
                                                  "of your own instead of the backend's recogniser."),
    registry: str = RegistryOpt,
    tenant: str = TenantOpt,
):
    """Add another face stack's embeddings to enrolled people, from the reference crops the registry
    keeps (no photo needed), so a person enrolled once works with adapters of that encoder too (e.g.
    enrolled with dlib, then served with a published IP-Adapter-FaceID). Exits 3 if a person failed."""
    from ray_faceid.cli.faces import face_config, face_stack
    from ray_faceid.enrollment import embed_again
    from ray_faceid.errors import FaceIdError
    from ray_faceid.face.analyzer import FaceAnalyzer
    from ray_faceid.registry import Registry

    with user_errors():
        if face_backend == "insightface" and not insightface_root and recognizer_onnx:
            face_backend = "dlib"  # an ONNX recogniser of the user's own on the embedded detector
        config = face_config(face_stack(face_backend, insightface_root), insightface_root, True)
        if recognizer_onnx:
            config = config.model_copy(update={"recognizer_onnx": recognizer_onnx})
        analyzer = FaceAnalyzer(config)
        store = Registry(registry).require()
        wanted = [store.resolve(tenant, p) for p in people] if people else [m["id"] for m in store.list(tenant)]
        failed = 0
        for identity in wanted:
            try:
                done = embed_again(store, tenant, identity, analyzer)
            except FaceIdError as exc:
                failed += 1
                console.print(f"failed {identity}: {exc.message}", highlight=False, soft_wrap=True)
                continue
            what = "enrolled with it already" if done["already"] else "added"
            console.print(f"{done['name'] or identity}: {done['faces_used']} embeddings of {done['encoder']} "
                          f"{what}", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(3)


@app.command()
def show(identity: str = typer.Argument(..., help="An id or a name."), registry: str = RegistryOpt,
         tenant: str = TenantOpt):
    """One identity's metadata as JSON."""
    from ray_faceid.registry import Registry

    with user_errors():
        store = Registry(registry).require()
        console.print_json(json.dumps(store.get(tenant, store.resolve(tenant, identity))))


@app.command()
def delete(identity: str = typer.Argument(..., help="An id or a name."), registry: str = RegistryOpt,
           tenant: str = TenantOpt,
           also: list[str] = typer.Option([], "--also", help="Another render output or ingest dataset to erase "
                                          "the person from (those `render` made from this registry, and the "
                                          "dataset they were enrolled from, are found without it)."),
           as_json: bool = typer.Option(False, "--json", help="Print the erasure report as JSON.")):
    """Erase a person: leaves a tombstone (no face data) and removes their references, embeddings,
    adapters, the render outputs that show them, contact sheets and their faces in ingest datasets;
    prints what was removed, where."""
    from ray_faceid.erasure import erase_identity
    from ray_faceid.registry import Registry

    with user_errors():
        store = Registry(registry).require()
        report = erase_identity(store, tenant, identity, also=also)  # also finishes one that stopped midway
        found = report["id"]
    if as_json:
        print_json(report)
        return
    console.print(f"erased {found}" + (f" ({identity})" if found != identity else ""), highlight=False)
    for entry in report["removed"]:
        counts = ", ".join(f"{k} {v}" for k, v in entry.items() if k not in ("what", "where"))
        console.print(f"  {entry['what']}: {entry['where']} ({counts})", highlight=False, soft_wrap=True)
    console.print(f"  tombstone: {report['tombstone']} (enrolling them again needs --reconsent)", highlight=False,
                  soft_wrap=True)


@app.command("rotate-secret")
def rotate_secret(new_secret_file: str = typer.Option(..., "--new-secret-file", help="A file holding the new secret "
                                                      "(at least 32 characters), outside the store."),
                  registry: str = RegistryOpt):
    """Re-key every tombstone to a new registry secret. The current one comes from
    RAY_FACEID_REGISTRY_SECRET(_FILE); afterwards point RAY_FACEID_REGISTRY_SECRET_FILE at the new file
    everywhere the registry is used. A rotation that stopped is finished by running it again."""
    from pathlib import Path

    from ray_faceid.errors import BadInput
    from ray_faceid.registry import Registry
    from ray_faceid.registry_secret import RegistrySecretError, inside_store
    from ray_faceid.secret_rotation import rotate

    with user_errors():
        Registry(registry).require()
        new_secret_file = str(Path(new_secret_file).resolve())
        if inside_store(new_secret_file, registry):
            raise RegistrySecretError(f"{new_secret_file} lies inside the registry it would key: keep it outside")
        try:
            secret = Path(new_secret_file).read_bytes().strip()
        except OSError as exc:
            raise BadInput(f"cannot read the new secret at {new_secret_file}: {exc.strerror}") from None
        report = rotate(registry, secret)
    console.print(f"re-keyed {report['rekeyed']} of {report['tombstones']} tombstones to secret {report['key_id']}; "
                  f"now set RAY_FACEID_REGISTRY_SECRET_FILE={new_secret_file} wherever this registry is used",
                  highlight=False, soft_wrap=True)


@app.command("move-secret-out")
def move_secret_out(secret_file: str = typer.Argument(..., help="Where the secret goes, outside the store."),
                    registry: str = RegistryOpt):
    """Move the secret earlier versions kept inside the store (_secret.key) to a file of its own."""
    from ray_faceid.registry import Registry
    from ray_faceid.secret_rotation import move_out

    with user_errors():
        Registry(registry).require()
        move_out(registry, secret_file)
    console.print(f"the registry's secret is now in {secret_file} (mode 0600), not in the store; set "
                  f"RAY_FACEID_REGISTRY_SECRET_FILE={secret_file} wherever this registry is used", highlight=False,
                  soft_wrap=True)
